"""The trainer-side client: cheap polling, the post-eval rendezvous, and the snapshot.

Everything here runs inside the training loop, so the rule is: when nothing is
asked, cost one ``os.stat``; when the daemon is gone, cost nothing more and
never raise; when a capture is due, copy tensors to shared memory and return
without touching the store or waiting for a disk.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from ckptd.client.overlap import BackgroundCopy, Deferred, Optimizers, storage_key, version_of
from ckptd.client.snapshot import Export, Slot, encode_structure, export_layout, export_tensors, flatten_state
from ckptd.errors import ProtocolError, SnapshotError, UnsupportedLeafError
from ckptd.protocol import (
    PROTOCOL_VERSION,
    STALE_AFTER_S,
    Ack,
    Control,
    RunPaths,
    atomic_write_json,
    daemon_alive,
    read_control,
    write_ack,
)
from ckptd.records import Verdict
from ckptd.staging import (
    DEFAULT_SLOTS,
    DISK_SLOT_PREFIX,
    STRUCTURE_FILE,
    TENSORS_FILE,
    Layout,
    busy_slots,
    disk_slot_name,
    disk_staging_dir,
    no_room,
    slot_dir,
    slot_name,
    staging_dir_for,
)

log = logging.getLogger("ckptd.client")

StateFn = Callable[[], Any]


@dataclass(frozen=True)
class _Payload:
    """What one capture writes into a slot: a safetensors file and the small files beside it."""

    tensors: Sequence[tuple[str, torch.Tensor]]
    files: Mapping[str, bytes]
    data_file: str  # the safetensors file, which carries the token
    metadata: Mapping[str, str]
    shard_bytes: int | None = None  # the daemon shards data_file above this (an Export's bound)

    @classmethod
    def of(cls, state: Any, step: int) -> _Payload:
        """A nested state (tensors + structure.json), or an ``Export`` in a framework's layout.

        Raises ``UnsupportedLeafError`` for what cannot be stored."""
        if isinstance(state, Export):
            files = {name: bytes(content) for name, content in state.files.items()}
            tensors = export_tensors(state)
            return cls(tensors, files, state.tensors_file, dict(state.metadata), state.max_shard_bytes)
        tensors, skeleton = flatten_state(state)
        files = {STRUCTURE_FILE: encode_structure(skeleton, step)}
        return cls(tensors, files, TENSORS_FILE, {"format": "ckptd"})

    def layout(self, token: str = "", ack: str = "") -> Layout:
        extra = {"token": token, "ack": ack} if token else {}
        return export_layout(self.tensors, {**self.metadata, **extra})


# Clients holding the lock, so that a forked child (a DataLoader worker) lets go of it.
_LOCK_HOLDERS: weakref.WeakSet[CheckpointClient] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child shares the parent's lock and slot mappings: it must never capture, and its
    # copy of the lock fd must not keep the lock held after the parent's client closes.
    for client in list(_LOCK_HOLDERS):
        client._become_passive_copy()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(frozen=True)
class Due:
    """A capture due at a step: the control holding its verdict (its seq names the ack), the
    verdict (None for a scheduled capture alone) and whether the schedule asked too."""

    control: Control
    verdict: Verdict | None
    periodic: bool


class CheckpointClient:
    """Lets a running daemon capture the trainer's state at the steps it asks for.

    With no daemon, every call is a cheap no-op: training must never depend on it.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        rendezvous_timeout: float = 2.0,
        slots: int = DEFAULT_SLOTS,
        slot_timeout: float | None = None,
        stale_after: float = STALE_AFTER_S,
        optimizer: object | Sequence[object] | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, not {slots}")
        self.paths = RunPaths(Path(run_dir))
        self.rendezvous_timeout = rendezvous_timeout
        # How long a best capture waits for a free slot (default: rendezvous_timeout). A periodic
        # capture never waits: a busy store must not stall every scheduled step.
        self.slot_timeout = slot_timeout
        self.stale_after = stale_after
        self._slot_count = slots
        self._slots: dict[str, Slot] = {}
        self._control: Control | None = None
        self._control_signature: tuple[int, int, int] | None = None
        self._started = time.time()
        # Verdicts up to this control seq of this daemon run are done (captured, or written
        # before we started). Not by eval step: a resumed run logs lower steps again.
        self._handled: tuple[str, int] = ("", -1)
        self._last_periodic_step = -1
        self._warned: set[str] = set()
        self._preparing: threading.Thread | None = None
        self._lock_fd: int | None = None  # held for our life: we are the run's one capturing client
        # Closes the lock fd when close() is never called: a client dropped without it must
        # not keep the run from the next client of this process.
        self._lock_release: weakref.finalize[[int], CheckpointClient] | None = None
        self._passive = False  # another client holds the lock: never capture
        self._captures_tried = 0
        self._skipped = 0
        self._skips: dict[str, int] = {}  # per kind of cause, for client.json
        self._last_skip = (-1, "")  # (step, reason) of the last capture not taken
        self._prepared = False  # a slot was prepared, by the user or at the first quiet step
        self._on_disk = False  # shared memory could not take a capture: slots on local disk
        self._staging: tuple[BackgroundCopy, int] | None = None  # a copy still running, its step
        self._optimizers = Optimizers()
        # Storages found written while being staged (outside any optimizer step): copied before
        # maybe_snapshot returns from then on, so such a write costs one capture, not every one.
        self._touched: set[tuple[str, int]] = set()
        for each in _as_list(optimizer):
            self.track_optimizer(each)

    def __enter__(self) -> CheckpointClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the two calls a training loop makes -------------------------------------------

    def wait_verdict(self, step: int, timeout: float | None = None) -> Verdict | None:
        """After logging an eval at ``step``, wait (bounded) until the daemon has judged it.

        Returns the verdict for ``step`` (or one for a later step written during the
        wait), or None when no daemon is alive or none came in time. A verdict written
        before this client started is never returned. A ``snapshot`` verdict is then
        captured by the next ``maybe_snapshot``. Flush the log before calling: the
        daemon can only judge lines that reached the file.
        """
        if not daemon_alive(self.paths, self.stale_after):
            return None
        deadline = time.monotonic() + (self.rendezvous_timeout if timeout is None else timeout)
        self._refresh_control()
        before = self._control_version()
        # The daemon answers in about a millisecond: look often at first (a stat is ~1 us),
        # then back off so a slow or absent answer costs no CPU.
        pause = 0.0001
        while True:
            verdict = self._verdict_for(step, before)
            if verdict is not None:
                return verdict
            if time.monotonic() >= deadline:
                return None
            time.sleep(pause)
            pause = min(pause * 1.5, 0.01)
            self._refresh_control()

    def maybe_snapshot(self, step: int, state_fn: StateFn) -> bool:
        """At a step boundary: capture ``state_fn()`` if the daemon asked for this step.

        One ``os.stat`` when nothing is due. When a capture is due, tensors are copied
        into a shared-memory slot and acknowledged; the daemon persists them. Returns
        whether a capture was staged. Never raises into training, save the user's own
        ``state_fn`` errors and an ``UnsupportedLeafError`` at this client's first capture;
        a capture not taken later (no free slot, shared memory full, a leaf that cannot
        be stored) is logged once per cause and counted in ``.ckptd/client.json``. Only
        one client per run captures: another (a second rank) stays passive, with a warning.

        ``state_fn`` returns a nested state (stored as ``tensors.safetensors`` +
        ``structure.json``, read back by ``load_snapshot``) or an ``Export``: flat tensors in a
        safetensors file of its own name plus the framework's small files, so the checkpoint
        is what the framework's own ``save`` writes (``from_pretrained`` loads it).
        """
        due = self.claim_due(step, state_fn)
        return due is not None and self._capture(due.control, step, due.verdict, due.periodic, state_fn)

    def claim_due(self, step: int, state_fn: StateFn | None = None) -> Due | None:
        """What this step must capture, if anything, now counted as handled: the standing
        verdict for a step reached, or the schedule's step. None also when no daemon is alive or
        another client serves the run. With nothing due, the first call given ``state_fn``
        prepares a slot in the background. ``maybe_snapshot`` captures what this returns; a
        sharded capture (``ShardedClient``) broadcasts it to every rank first."""
        self._refresh_control()
        control = self._control
        if control is None:
            return None
        asked = self._due(control, step)
        periodic = self._periodic_due(control, step)
        if asked is None and not periodic:
            if state_fn is not None and not self._prepared:
                self._prepare_quietly(state_fn)
            return None
        if not daemon_alive(self.paths, self.stale_after):
            self._warn_once("dead", "ckptd daemon heartbeat is stale; snapshots paused")
            return None
        # Done either way: a capture that fails is not retried at every later step.
        if asked is not None:
            self._handled = (asked.run_id, asked.seq)
        if periodic:
            self._last_periodic_step = step
        if not self._serving(control):
            return None
        return Due(asked or control, None if asked is None else asked.verdict, periodic)

    def prepare(self, state_fn: StateFn) -> bool:
        """Reserve and fault in a shared-memory slot for ``state_fn()`` in the background.

        The first capture otherwise pays for faulting in a fresh slot, page by page (about
        3.5 s per GiB on the development VM, 12 us a page). Call once after the first
        optimizer step (the optimizer state exists then) and before the first eval; it costs
        the trainer the sizing of the state and returns. False, and nothing done, when no
        daemon is alive yet to say where the slots go, or another client serves the run.
        Raises ``UnsupportedLeafError`` when the state holds a value that cannot be stored.
        ``state_fn`` may return an ``Export`` (a framework's own layout), as for ``maybe_snapshot``.
        """
        self._refresh_control()
        control = self._control
        if control is None or not daemon_alive(self.paths, self.stale_after):
            return False
        if not self._serving(control):
            return False
        self._finish_preparing()
        # A state that cannot be stored fails here, loudly, before the run depends on it.
        payload = _Payload.of(state_fn(), 0)
        nbytes = payload.layout().total
        staging = staging_dir_for(control.run_id)
        self._preparing = threading.Thread(
            target=self._prefault,
            args=(staging, nbytes, payload.data_file),
            name="ckptd-prefault",
            daemon=True,
        )
        self._preparing.start()
        self._prepared = True
        return True

    def track_optimizer(self, optimizer: object) -> None:
        """Let captures overlap the next forward and backward pass: the copy of what
        ``optimizer`` owns (its params and state) finishes in a thread, and its next ``step``
        waits for it (a step pre-hook). Wrappers holding the optimizer as ``.optimizer``
        (accelerate's) are looked through. Tensors it does not own are copied before
        ``maybe_snapshot`` returns. Call ``wait_staged`` before changing its params in place
        outside ``step`` (clipping weights, an EMA written into them): a capture whose tensors
        changed while being copied is dropped, with a warning, not stored mixed.
        """
        self._optimizers.add(optimizer)

    def wait_staged(self, timeout: float | None = None) -> bool:
        """Wait until the last capture's copy into shared memory is complete (and acknowledged,
        unless it was dropped), and a slot being prepared is ready. True when no such work is
        running any more; False on timeout."""
        if self._preparing is not None:
            self._preparing.join(timeout)
            if self._preparing.is_alive():
                return False
            self._preparing = None
        if self._staging is None:
            return True
        job, step = self._staging
        if not job.join(timeout):
            return False
        self._staging = None
        if job.failure is not None:
            self._touched |= job.changed
            self._skip(step, job.failure.kind, str(job.failure))
        return True

    def _prepare_quietly(self, state_fn: StateFn) -> None:
        """At the first step where nothing is due, ``prepare`` a slot, so that the first capture
        finds it faulted in. Never raises: the first capture reports what is wrong."""
        try:
            self.prepare(state_fn)
        except Exception as exc:
            self._warn_once("prepare", f"could not prepare a staging slot: {type(exc).__name__}: {exc}")
        # Once only, whatever happened: a trainer is not charged for sizing its state every step.
        self._prepared = True

    def close(self) -> None:
        """Release this process's mappings; free slots are removed from shared memory."""
        self.wait_staged()
        self._finish_preparing()
        busy = busy_slots(self.paths)
        for slot in self._slots.values():
            if slot.name in busy:
                slot.close()  # the daemon still needs its bytes
            else:
                slot.unlink()
        self._slots.clear()
        if self._lock_release is not None:
            self._lock_release()  # closes the fd, releasing the flock: another client may serve
            self._lock_fd = self._lock_release = None
            _LOCK_HOLDERS.discard(self)

    # -- control file --------------------------------------------------------------------

    def _refresh_control(self) -> None:
        try:
            st = os.stat(self.paths.control)
        except FileNotFoundError:
            self._control, self._control_signature = None, None
            return
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if signature == self._control_signature:
            return
        self._control_signature = signature
        try:
            control = read_control(self.paths.control)
        except FileNotFoundError:
            self._control = None
            return
        except ProtocolError as exc:
            self._warn_once("protocol", f"ignoring control file: {exc}")
            self._control = None
            return
        if not self._confined(control):
            self._control = None
            return
        # A verdict from before this process existed speaks of another trainer's step.
        if control.written < self._started:
            self._handled = max(self._handled_in(control), (control.run_id, control.seq))
        elif control.standing is not None and control.standing.written < self._started:
            self._handled = max(self._handled_in(control), (control.run_id, control.standing.seq))
        self._control = control

    def _confined(self, control: Control) -> bool:
        """The slots go where this client computes, never where a control file points."""
        expected = staging_dir_for(control.run_id)
        if Path(control.staging) == expected:
            return True
        self._warn_once(
            "staging",
            f"ignoring control file {self.paths.control}: its staging dir {control.staging!r} "
            f"is not {expected}",
        )
        return False

    def _handled_in(self, control: Control) -> tuple[str, int]:
        # Seqs count within one daemon run id; another run id starts over.
        return self._handled if self._handled[0] == control.run_id else (control.run_id, -1)

    def _due(self, control: Control, step: int) -> Control | None:
        """The snapshot verdict to capture now, as the control it was written in (its own seq
        names the ack): the standing one, which later skips do not take away, or, from a
        daemon that writes none, the latest verdict."""
        if control.standing is not None:
            seq, verdict = control.standing.seq, control.standing.verdict
        elif control.verdict is not None and control.verdict.action == "snapshot":
            seq, verdict = control.seq, control.verdict
        else:
            return None
        if seq <= self._handled_in(control)[1] or step < verdict.eval_step:
            return None
        return replace(control, seq=seq, verdict=verdict)

    def _control_version(self) -> tuple[str, int] | None:
        return (self._control.run_id, self._control.seq) if self._control else None

    def _verdict_for(self, step: int, before: tuple[str, int] | None) -> Verdict | None:
        """The verdict for ``step``, or for a later step if written since ``before``; not an old one."""
        control = self._control
        verdict = control.verdict if control else None
        if control is None or verdict is None or control.written < self._started:
            return None
        asked = self._due(control, step)
        if asked is not None and asked.verdict is not None and asked.verdict.eval_step == step:
            return asked.verdict  # a snapshot standing for this step outranks a later line's skip
        if verdict.eval_step == step:
            return verdict
        changed = self._control_version() != before
        return verdict if verdict.eval_step > step and changed else None

    def _periodic_due(self, control: Control, step: int) -> bool:
        every = control.every_steps
        return every is not None and step > 0 and step % every == 0 and step != self._last_periodic_step

    # -- capture ---------------------------------------------------------------------------

    def _prefault(self, staging: Path, nbytes: int, data_file: str) -> None:
        try:
            # The syscalls and page faults run outside the GIL. A free slot only: preparing
            # truncates, and a dead trainer's pending ack may still name slot 0.
            free = self._free_slots()
            if free:
                self._ready_slot(free[:1], staging, nbytes, data_file)
        except (SnapshotError, OSError) as exc:
            log.warning("ckptd: could not prepare a staging slot: %s", exc)

    def _finish_preparing(self) -> None:
        # A Slot is used by one thread at a time: a capture waits for the preparation.
        if self._preparing is not None:
            self._preparing.join()
            self._preparing = None

    def _serving(self, control: Control) -> bool:
        """Whether this client captures for the run: only the one holding ``.ckptd/client.lock``.

        Two clients on one run (a trainer under torchrun without a rank guard) would overwrite
        each other's slots under a mapping the other still writes to. The lock is an flock on an
        fd kept open for the client's life, so it goes with the process, however it ends.
        """
        if self._lock_fd is not None or self._passive:
            return not self._passive
        path = self.paths.client_lock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self._warn_once("lock", f"cannot open {path}: {exc}; snapshots paused")
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            self._passive = True
            log.warning(
                "ckptd: another CheckpointClient (pid %s) already serves %s (run %s); this one will "
                "not capture; guard it with `if rank == 0`",
                holder,
                self.paths.run_dir,
                control.run_id,
            )
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the other client's message
        self._lock_fd = fd
        self._lock_release = weakref.finalize(self, os.close, fd)
        _LOCK_HOLDERS.add(self)
        return True

    def _become_passive_copy(self) -> None:
        """In a forked child: drop our copy of the lock fd and the slot mappings, capture nothing."""
        if self._lock_release is not None:
            self._lock_release()  # our copy of the fd; the parent's keeps the lock
            self._lock_fd = self._lock_release = None
        self._passive = True
        self._slots.clear()  # without unlinking: the files are the parent's
        self._preparing = None
        self._staging = None  # the parent's thread: not in this process

    def _capture(
        self, control: Control, step: int, verdict: Verdict | None, periodic: bool, state_fn: StateFn
    ) -> bool:
        self.wait_staged()  # one capture at a time: the last one's copy ends first
        self._finish_preparing()
        first = self._captures_tried == 0
        self._captures_tried += 1
        state = state_fn()  # the user's code: its errors are the user's to see
        try:
            payload = _Payload.of(state, step)
        except UnsupportedLeafError as exc:
            if first:
                raise  # fail loudly while the user is watching, not hours into the run
            return self._skip(step, "unsupported", str(exc))
        try:
            return self._stage(control, step, verdict, periodic, payload)
        except Exception as exc:  # staging trouble must never kill the training run
            return self._skip(step, type(exc).__name__, f"{type(exc).__name__}: {exc}")

    def _stage(
        self,
        control: Control,
        step: int,
        verdict: Verdict | None,
        periodic: bool,
        payload: _Payload,
    ) -> bool:
        name = Ack.name_for(control.seq if verdict else None, step)
        # A fresh token per capture, in the slot's header and in the ack: the daemon copies a
        # slot only while it still holds the capture the ack names.
        token = secrets.token_hex(8)
        layout = payload.layout(token, name)
        wait = 0.0 if verdict is None else self._slot_wait()
        slot = self._acquire_slot(staging_dir_for(control.run_id), layout.total, wait, payload.data_file)
        if slot is None:
            return self._skip(
                step,
                "no-free-slot",
                f"all {self._slot_count} staging slots are held by acks the daemon has not "
                "committed (store full or unwritable, or their slots gone?)",
            )
        tags = (*(verdict.tags if verdict else ()), *(("periodic",) if periodic else ()))
        ack = Ack(
            name=name,
            captured_step=step,
            slot=slot.name,
            files={
                payload.data_file: layout.total,
                **{file: len(content) for file, content in payload.files.items()},
            },
            seq=control.seq if verdict else None,
            requested_step=verdict.eval_step if verdict else step,
            tags=tags,
            reason=verdict.reason if verdict else f"every {control.every_steps} steps",
            metrics=dict(verdict.metrics) if verdict else {},
            token=token,
            token_file=payload.data_file,
            shard_bytes=payload.shard_bytes,
        )

        def finish() -> None:
            slot.seal(layout)  # the token last: only a whole capture is ever acknowledged
            write_ack(self.paths, ack)

        deferred = self._copy_now(slot, layout, payload)
        if not deferred:
            finish()
            return True
        job = BackgroundCopy(slot, deferred, finish)
        job.start()
        self._staging = (job, step)
        return True

    def _copy_now(self, slot: Slot, layout: Layout, payload: _Payload) -> list[Deferred]:
        """Copy what must be copied before the trainer goes on; return what may follow in the
        background: the tensors a tracked optimizer owns, which only its next step changes."""
        owned = self._optimizers.owned() - self._touched if self._optimizers else set()
        slot.begin(payload.files)
        deferred: list[Deferred] = []
        for offset, (_, tensor) in zip(layout.offsets, payload.tensors, strict=True):
            version = version_of(tensor) if owned and storage_key(tensor) in owned else None
            if version is None:
                slot.copy_tensor(offset, tensor)
            else:
                deferred.append(Deferred(offset, tensor, version))
        return deferred

    def _slot_wait(self) -> float:
        return self.rendezvous_timeout if self.slot_timeout is None else self.slot_timeout

    def _acquire_slot(self, staging: Path, nbytes: int, wait: float, data_file: str) -> Slot | None:
        """A slot no pending ack holds, grown to ``nbytes``; None if none frees up within ``wait`` s."""
        deadline = time.monotonic() + wait
        while True:
            free = self._free_slots()
            # Prefer a slot we hold mapped and large enough: no new page faults, no new memory.
            free.sort(key=lambda i: (not self._fits(i, nbytes, data_file), not self._mapped(i)))
            problem: SnapshotError | None = None
            if free:
                try:
                    return self._ready_slot(free, staging, nbytes, data_file)
                except SnapshotError as exc:  # no room: a busy slot, once free, makes room
                    problem = exc
            if time.monotonic() >= deadline:
                if problem is not None:
                    raise problem
                return None
            time.sleep(0.01)

    def _free_slots(self) -> list[int]:
        busy = busy_slots(self.paths)
        return [i for i in range(self._slot_count) if self._name_of(i) not in busy]

    def _ready_slot(self, indices: Sequence[int], staging: Path, nbytes: int, data_file: str) -> Slot:
        """The first of the free slots ``indices`` that can hold ``nbytes``: in shared memory
        while it has room, else on local disk. Raises ``SnapshotError`` when neither has."""
        problem: SnapshotError | None = None
        for index in indices:
            slot = self._slot(staging, self._name_of(index))
            try:
                slot.ensure_capacity(nbytes, data_file)
                return slot
            except SnapshotError as exc:
                problem = exc
        assert problem is not None, "no slot to try"
        if self._on_disk or self._room_once_freed(staging, nbytes):
            raise problem  # the caller waits (a best) for a busy slot to make room
        # Shared memory cannot take it (a container's 64 MB /dev/shm, the host's memory
        # reserve): from now on this run stages on local disk.
        self._on_disk = True
        busy = busy_slots(self.paths)
        for name in [n for n, s in self._slots.items() if s.in_memory and n not in busy]:
            self._slots.pop(name).unlink()
        log.warning(
            "ckptd: shared memory cannot hold this capture (%s); staging on local disk in %s "
            "instead (slower; every best is still captured)",
            problem,
            disk_staging_dir(self.paths),
        )
        self._write_counters()  # `ckptd status` shows where the run stages
        free = self._free_slots()
        if not free:
            raise problem
        return self._ready_slot(free, staging, nbytes, data_file)

    def _room_once_freed(self, staging: Path, nbytes: int) -> bool:
        """Whether shared memory holds ``nbytes`` once every slot of ours in it is gone."""
        ours = sum(slot.allocated() for slot in self._slots.values() if slot.in_memory)
        return no_room(staging, nbytes, in_memory=True, reusing=ours) is None

    def _name_of(self, index: int) -> str:
        return disk_slot_name(index) if self._on_disk else slot_name(index)

    def _mapped(self, index: int) -> bool:
        return self._name_of(index) in self._slots

    def _fits(self, index: int, nbytes: int, data_file: str) -> bool:
        slot = self._slots.get(self._name_of(index))
        return slot is not None and slot.capacity >= nbytes and slot.data_file == data_file

    def _skip(self, step: int, kind: str, reason: str) -> bool:
        """A capture not taken: said once per kind of cause, counted in client.json every time."""
        self._skipped += 1
        self._skips[kind] = self._skips.get(kind, 0) + 1
        self._warn_once(
            f"skip:{kind}",
            f"snapshot of step {step} not taken: {reason} (later skips of this kind are only "
            f"counted, in {self.paths.client_report})",
        )
        self._last_skip = (step, reason)
        self._write_counters()
        return False

    def _write_counters(self) -> None:
        # Written only when a count or the staging place changes, never on the per-step path;
        # the daemon shows it in its status.
        step, reason = self._last_skip
        document = {
            "protocol": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "skipped_captures": self._skipped,
            "skipped_by_cause": dict(self._skips),
            "staging": "disk" if self._on_disk else "shm",
            "last_skip_reason": reason,
            "last_skip_step": step if step >= 0 else None,
            "updated": time.time(),
        }
        try:
            atomic_write_json(self.paths.client_report, document)
        except OSError as exc:
            self._warn_once("client-file", f"cannot write {self.paths.client_report}: {exc}")

    def _slot(self, staging: Path, name: str) -> Slot:
        directory = slot_dir(staging, self.paths, name)
        slot = self._slots.get(name)
        if slot is None or slot.directory != directory:
            in_memory = not name.startswith(DISK_SLOT_PREFIX)
            slot = self._slots[name] = Slot(directory, in_memory=in_memory)
        return slot

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("ckptd: %s", message)


def _as_list(optimizer: object | Sequence[object] | None) -> list[object]:
    if optimizer is None:
        return []
    if isinstance(optimizer, (list, tuple)):
        return list(optimizer)
    return [optimizer]
