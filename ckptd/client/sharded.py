"""Sharded capture (FSDP2, DTensor) in DCP's own format: every rank stages its own shards.

Under ``torch.distributed`` a sharded state cannot be staged by one process: each rank holds a
different piece of every parameter and of the optimizer state. ``ShardedClient`` lets rank 0
decide (its ``CheckpointClient`` reads the control file, as under DDP), broadcasts the decision
with everything the acks need, and then every rank writes its local shards with DCP's own
planner and ``FileSystemWriter`` into a slot on its node (the coordinator, rank 0, adds
``.metadata``), writes ``capture.json`` with a fresh token last, and acks its own files: to
``.ckptd/acks/`` on the leader's node, to ``.ckptd/nodes/<node>/acks/`` on the others, whose
daemons (``ckptd run --role follower``) store those parts. The leader commits the checkpoint
once every rank's part is stored, so the store holds a plain DCP checkpoint:
``torch.distributed.checkpoint.load`` restores it on any world size.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd._torch import torch_required
from ckptd.protocol import (
    STALE_AFTER_S,
    Ack,
    RunPaths,
    daemon_alive,
    local_node_id,
    write_ack,
)
from ckptd.staging import CAPTURE_FILE, DEFAULT_SLOTS, busy_slots, not_private, staging_dir_for

with torch_required():
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from ckptd.client.client import CheckpointClient
from ckptd.client.collective import device, distributed

__all__ = ["ShardedClient"]

log = logging.getLogger("ckptd.client")


@dataclass(frozen=True)
class _Plan:
    """Rank 0's decision, broadcast to every rank: what each rank's ack says."""

    run_id: str
    leader_node: str
    capture: str
    step: int
    seq: int | None
    requested_step: int
    tags: tuple[str, ...]
    reason: str
    metrics: dict[str, float]
    best: bool  # a best waits (bounded) for a free slot; a scheduled capture does not


class ShardedClient:
    """Captures a sharded state on every rank at the steps the daemon asks for.

    ``maybe_snapshot`` is a collective: every rank calls it at the same points (after each eval
    with ``evaluated=True``, so rank 0 first waits for that eval's verdict; at every step too if
    the daemon runs a schedule). Nothing is sent but one small broadcast when nothing is due.
    Without a process group it works as a world of one.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        node_id: str | None = None,
        rendezvous_timeout: float = 2.0,
        slots: int = DEFAULT_SLOTS,
        stale_after: float = STALE_AFTER_S,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, not {slots}")
        self.paths = RunPaths(Path(run_dir))
        self.rank = dist.get_rank() if distributed() else 0
        self.world_size = dist.get_world_size() if distributed() else 1
        self.node_id = local_node_id() if node_id is None else node_id
        self.rendezvous_timeout = rendezvous_timeout
        self.stale_after = stale_after
        self._slot_count = slots
        # Only rank 0 reads the control file and holds the run's client lock.
        self._leader = (
            CheckpointClient(run_dir, rendezvous_timeout=rendezvous_timeout) if self.rank == 0 else None
        )
        self.last_blocked_s: float | None = None  # seconds the last capture kept this rank
        # DCP's async save: the trainer waits for a copy of its shards into memory this stager
        # keeps and reuses (no allocation after the first capture); a thread then writes them
        # into the slot. Its collectives (planning, the commit of the metadata) run on a group
        # of their own, so they never interleave with the training's on the default group.
        # Creating the group is a collective: every rank builds its ShardedClient.
        self._group = dist.new_group(backend="gloo") if distributed() else None
        self._stager = DefaultStager(
            StagingOptions(
                use_pinned_memory=torch.cuda.is_available(),
                use_shared_memory=False,
                use_async_staging=False,
                use_non_blocking_copy=False,
            )
        )
        self._writing: threading.Event | None = None  # set once the last capture is acknowledged
        self._closed = False

    def maybe_snapshot(self, step: int, state_fn: Callable[[], Any], *, evaluated: bool = False) -> bool:
        """Capture ``state_fn()`` (a DCP state dict: DTensors, ``get_state_dict``'s result) on
        every rank if rank 0 finds a capture due at ``step``. Returns whether it was staged."""
        if self._closed:
            raise ValueError("this ShardedClient is closed")
        plan = _broadcast(self._decide(step, evaluated) if self._leader is not None else None)
        if plan is None:
            return False
        return self._capture(plan, state_fn)

    def wait_staged(self) -> None:
        """Wait until the last capture is written into its slot and acknowledged (or failed,
        which is logged: staging trouble never raises into training)."""
        acknowledged, self._writing = self._writing, None
        if acknowledged is not None:
            acknowledged.wait()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.wait_staged()
        self._stager.close()
        if self._leader is not None:
            self._leader.close()

    def __enter__(self) -> ShardedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- rank 0 ----------------------------------------------------------------------------

    def _decide(self, step: int, evaluated: bool) -> _Plan | None:
        assert self._leader is not None
        if evaluated:
            self._leader.wait_verdict(step)
        due = self._leader.claim_due(step)
        if due is None:
            return None
        control, verdict = due.control, due.verdict
        tags = (*(verdict.tags if verdict else ()), *(("periodic",) if due.periodic else ()))
        return _Plan(
            run_id=control.run_id,
            leader_node=control.node or self.node_id,
            capture=f"{step}-{secrets.token_hex(6)}",
            step=step,
            seq=control.seq if verdict else None,
            requested_step=verdict.eval_step if verdict else step,
            tags=tags,
            reason=verdict.reason if verdict else f"every {control.every_steps} steps",
            metrics=dict(verdict.metrics) if verdict else {},
            best=verdict is not None,
        )

    # -- every rank ------------------------------------------------------------------------

    def _capture(self, plan: _Plan, state_fn: Callable[[], Any]) -> bool:
        started = time.perf_counter()
        self.wait_staged()  # its slot has no ack yet: it must not be chosen again
        paths = self._ack_paths(plan.leader_node)
        slot, why = self._ready(paths, plan)
        # The user's state_fn runs before the ranks agree: a rank whose state_fn raises must
        # not leave the others blocked in DCP's collectives. It raises once all have agreed.
        state, failure = None, None
        if slot is not None:
            try:
                state = state_fn()
                if not isinstance(state, dict):
                    raise TypeError(
                        f"state_fn must return a DCP state dict (a dict), not {type(state).__name__}"
                    )
            except Exception as exc:
                failure, why = exc, f"state_fn raised {type(exc).__name__}: {exc}"
        ready = slot is not None and failure is None
        if not _everyone(ready):
            if not ready:
                log.warning("ckptd: rank %d cannot stage step %d: %s", self.rank, plan.step, why)
            if failure is not None:
                raise failure
            return False  # DCP's save is collective: all ranks capture, or none
        assert slot is not None and isinstance(state, dict)
        _empty(slot)
        writer = dcp.FileSystemWriter(str(slot), single_file_per_rank=True, sync_files=False, overwrite=True)
        writing = dcp.async_save(
            state, storage_writer=writer, async_stager=self._stager, process_group=self._group
        )
        assert isinstance(writing, Future)  # a synchronous stager: no separate staging future
        acknowledged = threading.Event()
        writing.add_done_callback(functools.partial(self._acknowledge, paths, slot, plan, acknowledged))
        self._writing = acknowledged
        self.last_blocked_s = time.perf_counter() - started
        return True

    def _acknowledge(
        self, paths: RunPaths, slot: Path, plan: _Plan, acknowledged: threading.Event, writing: Future[Any]
    ) -> None:
        """On DCP's writer thread, once the slot is written: its token last, then the ack. The
        event is set last, whatever happened: until then the slot, which no ack names yet, is
        not free (a Future wakes ``result()`` before it runs this callback)."""
        try:
            # DCP's CheckpointException is a BaseException: exception() returns it, never raises.
            failed = writing.exception()
            if failed is not None:
                log.warning("ckptd: rank %d could not stage step %d: %s", self.rank, plan.step, failed)
                _empty(slot)  # a partial write must not keep filling shared memory
                return
            write_ack(paths, self._ack(slot, plan))
        except Exception as exc:  # on DCP's thread: nobody else would hear of it
            log.warning("ckptd: rank %d could not acknowledge step %d: %s", self.rank, plan.step, exc)
        finally:
            acknowledged.set()

    def _ack(self, slot: Path, plan: _Plan) -> Ack:
        token = secrets.token_hex(8)
        files = {
            p.name: p.stat().st_size for p in sorted(slot.iterdir()) if p.is_file() and not p.is_symlink()
        }
        (slot / CAPTURE_FILE).write_text(f'{{"token": "{token}"}}\n')  # last: the slot is whole
        return Ack(
            name=Ack.name_for(plan.seq, plan.step, self.rank),
            captured_step=plan.step,
            slot=slot.name,
            files=files,
            seq=plan.seq,
            requested_step=plan.requested_step,
            tags=plan.tags,
            reason=plan.reason,
            metrics=plan.metrics,
            token=token,
            token_file=CAPTURE_FILE,
            rank=self.rank,
            world_size=self.world_size,
            capture=plan.capture,
        )

    def _ack_paths(self, leader_node: str) -> RunPaths:
        """Rank 0 acks to the leader (it is on the leader's node); another rank to its own node's
        daemon, unless its node is the leader's."""
        if self.rank == 0 or self.node_id == leader_node:
            return self.paths
        return self.paths.node(self.node_id)

    def _ready(self, paths: RunPaths, plan: _Plan) -> tuple[Path | None, str]:
        """A free slot of this rank on this node, or None and why not; never raises (the ranks
        are about to agree: one that raised would leave the others waiting)."""
        try:
            return self._free_slot(paths, plan)
        except OSError as exc:
            return None, f"cannot prepare a slot: {exc}"

    def _free_slot(self, paths: RunPaths, plan: _Plan) -> tuple[Path | None, str]:
        if self.rank != 0 and not daemon_alive(paths, self.stale_after):
            return None, f"no live ckptd daemon for node {self.node_id} (heartbeat {paths.status})"
        staging = staging_dir_for(plan.run_id)
        squatted = not_private(staging)
        if squatted is not None:
            return None, squatted
        staging.mkdir(mode=0o700, parents=True, exist_ok=True)
        deadline = time.monotonic() + (self.rendezvous_timeout if plan.best else 0.0)
        while True:
            busy = busy_slots(paths)
            free = [f"r{self.rank}-{k}" for k in range(self._slot_count) if f"r{self.rank}-{k}" not in busy]
            if free:
                slot = staging / free[0]
                slot.mkdir(mode=0o700, exist_ok=True)
                return slot, ""
            if time.monotonic() >= deadline:
                return None, f"all {self._slot_count} slots of rank {self.rank} are held by pending acks"
            time.sleep(0.05)


def _empty(slot: Path) -> None:
    """The token goes first (the slot holds no capture from now on), then last capture's files."""
    (slot / CAPTURE_FILE).unlink(missing_ok=True)
    for entry in slot.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _broadcast(plan: _Plan | None) -> _Plan | None:
    """Rank 0's plan on every rank (as it is without a process group)."""
    if not distributed():
        return plan
    box: list[_Plan | None] = [plan]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _everyone(ready: bool) -> bool:
    """Whether every rank is ready: one all-reduce of a flag (MIN)."""
    if not distributed():
        return ready
    flag = torch.tensor([1 if ready else 0], dtype=torch.int32, device=device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
