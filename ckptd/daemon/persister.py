"""The persister: a worker thread that moves acknowledged slots into the store, then rotates.

It is the only thread that writes the store, so "never delete the one in
flight" holds by construction: retention runs between two persists. A slot is
released (its ack deleted) only once its checkpoint is committed, so a daemon
killed mid-copy finds the ack again on restart and redoes the work.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ckptd.daemon.uploader import Uploader
from ckptd.errors import ProtocolError, SnapshotError
from ckptd.policy import PreservationPolicy, early_deletions, plan_deletions
from ckptd.protocol import Ack, RunPaths, format_bytes
from ckptd.records import CheckpointRecord
from ckptd.shards import ShardPlan, plan_shards, read_header
from ckptd.staging import read_capture_token, read_slot_token, slot_dir
from ckptd.store import PendingCheckpoint, Store

log = logging.getLogger("ckptd.daemon")


@dataclass(frozen=True)
class Job:
    ack_path: Path
    ack: Ack
    metrics: Mapping[str, float]  # the daemon's memory of that eval, for acks that carry none


class SlotLost(SnapshotError):
    """The slot an ack names is gone, short, or holds another capture: retrying cannot help."""


class NoRoom(OSError):
    """The store's filesystem lacks room for a capture, even after early pruning: no write
    bound to fail was started. An ``OSError`` (ENOSPC), so it is retried like a full disk."""

    def __str__(self) -> str:
        return str(self.strerror)


# Room asked for beyond a capture's own bytes: its manifest, a block rounded up per file,
# directory entries and the filesystem's metadata; and 0.1 % more, for a big one's extents.
_ROOM_MARGIN = 1 << 20
_INCOMING = "(incoming)"  # the capture being written, as retention sees it: no store name


@dataclass(frozen=True)
class Outcome:
    job: Job | None  # None: a sharded checkpoint committed (or abandoned) by a shard check
    record: CheckpointRecord | None = None
    deleted: tuple[str, ...] = ()
    error: str | None = None
    slot_lost: bool = False
    seconds: float = 0.0


class _RotateNow:
    """Put on the job queue by ``set_policy``: rotate on the worker thread, between persists."""


class _CheckShards:
    """Put on the job queue by ``check_shards``: commit the sharded captures now whole."""


_ROTATE = _RotateNow()
_CHECK_SHARDS = _CheckShards()


class Persister:
    """Runs jobs one at a time on its own thread and reports each outcome through ``done``."""

    def __init__(
        self,
        store: Store,
        staging: Path,
        policy: PreservationPolicy,
        run_id: str,
        done: Callable[[Outcome], None],
        *,
        criteria: Mapping[str, str],
        lineage: frozenset[str],
        best_steps: Callable[[], frozenset[int]],
        paths: RunPaths,
        shard_timeout: float = 600.0,
        uploader: Uploader | None = None,
    ) -> None:
        self.store = store
        self.staging = staging
        self.paths = paths  # a disk slot (``disk-N``) lives in the run's .ckptd/staging/
        self.policy = policy
        self.run_id = run_id
        self.criteria = dict(criteria)  # metric -> mode, recorded in every manifest
        self.lineage = lineage  # run ids whose checkpoints retention may delete
        self._best_steps = best_steps  # steps the daemon's state names as a best
        self._done = done
        # A sharded capture some rank's part of which is still missing this long after the
        # last part arrived is removed: that node's daemon is gone, or its slot was lost.
        self.shard_timeout = shard_timeout
        # The remote tier: told of each commit before retention runs, and what it still has to
        # upload is kept locally.
        self.uploader = uploader
        self._checking = threading.Event()  # a shard check is queued and not done yet
        self._looked: dict[str, float] = {}  # capture -> its newest mtime when last tried
        self._jobs: queue.Queue[Job | _RotateNow | _CheckShards | None] = queue.Queue()
        # Named after the thread that makes it: in a node daemon that is the run dir, so a
        # persist's log lines name their run.
        name = f"{threading.current_thread().name} persister"
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        """Finish every submitted job, then stop: acknowledged snapshots are not dropped."""
        self._jobs.put(None)
        self._thread.join()

    def set_policy(self, policy: PreservationPolicy) -> None:
        """A new policy (a reload), applied at once: retention runs next on this thread,
        between two persists, so it never meets a checkpoint in flight."""
        self.policy = policy  # one reference swap; the worker reads it at its next rotation
        self._jobs.put(_ROTATE)

    def rotate_soon(self) -> None:
        """Rotate on the worker thread (the uploader released a checkpoint it held)."""
        self._jobs.put(_ROTATE)

    def check_shards(self) -> None:
        """Have the worker commit sharded captures that became whole (another node's daemon
        stored the last part) and abandon those that timed out; one check queued at a time."""
        if not self._checking.is_set():
            self._checking.set()
            self._jobs.put(_CHECK_SHARDS)

    def rotate(self) -> tuple[str, ...]:
        """Delete what the policy does not keep, under the store lock shared with the CLI.

        Only this run's checkpoints are candidates, and never one at a step the state
        names as a best: defence in depth should a manifest ever lack its metrics.
        """
        with self.store.lock(timeout=60):
            records = [r for r in self.store.list() if r.run_id in self.lineage]
            best_steps = self._best_steps()
            held = self.uploader.held() if self.uploader is not None else frozenset()
            if held is None:  # the uploader has not yet compared the store with the remote
                return ()
            protected = [r.name for r in records if r.step in best_steps or r.name in held]
            doomed = plan_deletions(records, self.policy, protected)
            for record in doomed:
                self.store.delete(record.name)
                log.info("rotated out %s", record.name)
        return tuple(r.name for r in doomed)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if isinstance(job, _RotateNow):
                self._rotate_now()
                continue
            if isinstance(job, _CheckShards):
                self._check_shards()
                continue
            started = time.monotonic()
            try:
                record = self._persist(job)
                if record is not None:
                    self._offer(record)
                deleted = self.rotate() if record is not None else ()
            except SlotLost as exc:
                outcome = Outcome(job, error=str(exc), slot_lost=True)
            except Exception as exc:  # a dead worker would silently stop all persists: report, go on
                if not isinstance(exc, (OSError, ValueError)):
                    log.exception("unexpected error persisting %s", job.ack_path.name)
                outcome = Outcome(job, error=f"{type(exc).__name__}: {exc}")
            else:
                outcome = Outcome(job, record, deleted, seconds=time.monotonic() - started)
            self._done(outcome)

    def _offer(self, record: CheckpointRecord) -> None:
        if self.uploader is not None:
            self.uploader.offer(record)

    def _rotate_now(self) -> None:
        """A rotation asked for between persists (a new policy, a checkpoint the uploader no
        longer holds); ``rotate`` logs what it deletes."""
        try:
            self.rotate()
        except Exception as exc:  # the next persist rotates again; the worker must go on
            log.error("rotation failed: %s: %s", type(exc).__name__, exc)

    def _check_shards(self) -> None:
        self._checking.clear()
        waiting = self.store.shard_captures()
        # A capture nothing was added to since the last look cannot have become whole: only its
        # timeout is checked (thousands of them must not cost a core every beat).
        present = {capture for capture, _ in waiting}
        self._looked = {c: t for c, t in self._looked.items() if c in present}
        for capture, newest in waiting:
            quiet_s = max(0.0, time.time() - newest)
            if self._looked.get(capture) == newest and quiet_s <= self.shard_timeout:
                continue
            self._looked[capture] = newest
            try:
                record = self.store.commit_shards(capture)
                if record is not None:
                    self._offer(record)
                    self._done(Outcome(None, record, self.rotate()))
                elif quiet_s > self.shard_timeout:
                    self._abandon(capture, quiet_s)
            except Exception as exc:  # one bad capture must not stop the others, or the worker
                if quiet_s > self.shard_timeout:
                    self._abandon(capture, quiet_s, f" ({exc})")
                else:
                    log.warning("sharded capture %s cannot be committed yet: %s", capture, exc)

    def _abandon(self, capture: str, quiet_s: float, why: str = "") -> None:
        missing = self.store.missing_ranks(capture)
        self.store.abandon_shards(capture)
        if missing:
            shown = ", ".join(map(str, missing[:20])) + (
                f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            )
            what = f"ranks missing: {shown}; is the daemon of every node running (ckptd status)?"
        else:
            what = "its parts do not make one checkpoint"
        late = f"{quiet_s:.0f} s after its last part"
        self._done(Outcome(None, error=f"sharded capture {capture} not whole {late} ({what}){why}; removed"))

    def _persist(self, job: Job) -> CheckpointRecord | None:
        if job.ack.sharded:
            return self._persist_part(job)
        ack = job.ack
        committed = self._already_committed(ack)
        if committed is None:
            committed = self._copy_and_commit(job)
        # Only now is the slot free for the trainer to reuse.
        job.ack_path.unlink(missing_ok=True)
        return committed

    def _persist_part(self, job: Job) -> CheckpointRecord | None:
        """One rank's part of a sharded capture into the store's shared directory; then, if
        it was the last one missing, the commit. None: other ranks' parts are still missing."""
        ack = job.ack
        committed = committed_capture(self.store, ack.capture)
        if committed is None:
            store_part(self.store, job, slot_dir(self.staging, self.paths, ack.slot), self._manifest(job))
            committed = self.store.commit_shards(ack.capture)
        job.ack_path.unlink(missing_ok=True)
        return committed


    def _copy_and_commit(self, job: Job) -> CheckpointRecord:
        ack = job.ack
        slot = slot_dir(self.staging, self.paths, ack.slot)
        check_slot(ack, slot)  # first: a lost slot must not cost a checkpoint pruned early
        self._make_room(job)
        with self.store.writing(ack.captured_step) as pending:
            self._copy_files(ack, slot, pending)
            # Checked again after the copy: a writer that touched the slot meanwhile changed it.
            check_slot(ack, slot)
            return self.store.commit(pending, self._manifest(job))

    def _make_room(self, job: Job) -> None:
        """Room for the capture plus a margin, before anything is written; short of it, first
        delete what retention drops anyway once this capture is committed. Still short: no
        write bound to fail is started (``NoRoom``), and the persist is retried later."""
        need = room_needed(job.ack)
        free = free_bytes(self.store.root)
        if free is None or free >= need:
            return
        pruned = self._prune_early(job, need, free)
        free = free_bytes(self.store.root)
        if free is not None and free < need:
            raise NoRoom(errno.ENOSPC, _no_room(job.ack, self.store.root, need, free, pruned))

    def _prune_early(self, job: Job, need: int, free: int) -> list[str]:
        """Delete, oldest first and only until there is room, the checkpoints ``early_deletions``
        lets go: never a best, the newest, one ``keep_every`` keeps or the uploader holds."""
        step = job.ack.captured_step
        pruned: list[str] = []
        with self.store.lock(timeout=60):
            records = [r for r in self.store.list() if r.run_id in self.lineage]
            best_steps = self._best_steps()
            held = self.uploader.held() if self.uploader is not None else frozenset()
            if held is None:  # the uploader has not compared the store with the remote yet
                return pruned
            protected = [r.name for r in records if r.step in best_steps or r.name in held]
            early = early_deletions(records, self.policy, self._incoming(job), protected)
            if free + sum(r.nbytes for r in early) < need:
                # Even all of them would not make room: the capture is not written, so they would
                # be lost for nothing (retention keeps them while it is not committed).
                return pruned
            for record in early:
                self.store.delete(record.name)
                pruned.append(record.name)
                why = f"{format_bytes(need)} needed, {format_bytes(free)} free"
                log.warning(
                    "pruned %s early to make room for step %d (%s): retention rotates it out once "
                    "that step is committed",
                    record.name,
                    step,
                    why,
                )
                free = free_bytes(self.store.root) or 0
                if free >= need:
                    break
        return pruned

    def _incoming(self, job: Job) -> CheckpointRecord:
        """The capture about to be written, as a record retention can rank with the others."""
        ack = job.ack
        return CheckpointRecord(
            name=_INCOMING,
            step=ack.captured_step,
            tags=tuple(ack.tags),
            metrics={**job.metrics, **ack.metrics},
            requested_step=ack.requested_step,
            nbytes=sum(ack.files.values()),
            created=time.time(),  # the newest at its step, as it will be once committed
            run_id=self.run_id,
        )

    @staticmethod
    def _copy_files(ack: Ack, slot: Path, pending: PendingCheckpoint) -> None:
        """Every file of the slot into ``pending``; the tensors file as shards and an index
        when the ack asks for shards and it does not fit one. Up to ``_WRITERS`` files are
        written at once, the biggest first; the first error is raised once none is being
        written any more (``Store.writing`` then removes the temp dir whole)."""
        plan = _shard_plan(ack, slot)
        writes: list[tuple[int, Callable[[], object]]] = []
        for name, nbytes in sorted(ack.files.items()):
            if plan is not None and name == ack.token_file:
                for shard in plan.shards:
                    size = len(shard.header) + sum(end - start for start, end in shard.ranges)
                    write = partial(pending.write_shard, shard.name, shard.header, slot / name, shard.ranges)
                    writes.append((size, write))
                writes.append((len(plan.index), partial(pending.add_file, plan.index_name, plan.index)))
            else:
                writes.append((nbytes, partial(pending.copy_in, name, slot / name, nbytes)))
        writes.sort(key=lambda sized: -sized[0])  # stable: equal sizes keep name order
        _write_concurrently([write for _, write in writes])

    def _manifest(self, job: Job) -> dict[str, object]:
        ack = job.ack
        return {
            "requested_step": ack.requested_step,
            "exact": ack.requested_step in (None, ack.captured_step),
            "tags": list(ack.tags),
            "reason": ack.reason,
            "metrics": {**job.metrics, **ack.metrics},
            "criteria": self.criteria,
            "run_id": self.run_id,
            "ack": {"name": ack.name, "seq": ack.seq, "created": ack.created},
            "captured_at": ack.created,
        }

    def _already_committed(self, ack: Ack) -> CheckpointRecord | None:
        """A daemon killed between commit and ack removal must not store the snapshot twice."""
        for record in self.store.list():
            if record.step != ack.captured_step:
                continue
            stamp = self.store.manifest(record.name).get("ack")
            if isinstance(stamp, dict) and (stamp.get("name"), stamp.get("created")) == (
                ack.name,
                ack.created,
            ):
                return record
        return None


def room_needed(ack: Ack) -> int:
    """Bytes of free space a capture asks for in the store: its files, and a margin."""
    nbytes = sum(ack.files.values())
    return nbytes + _ROOM_MARGIN + nbytes // 1000


def free_bytes(root: Path) -> int | None:
    """Bytes that may still be written under ``root`` (root may use the reserved blocks too).
    None when the filesystem does not say: statvfs failed, or it reports no size at all (some
    FUSE and network filesystems): then no check is made and the write finds out."""
    try:
        info = os.statvfs(root)
    except OSError:
        return None
    if info.f_blocks == 0:
        return None
    blocks = info.f_bfree if os.geteuid() == 0 else info.f_bavail
    return blocks * info.f_frsize


def _no_room(ack: Ack, root: Path, need: int, free: int, pruned: Sequence[str]) -> str:
    """What ``NoRoom`` says: how much is needed against how much is free, and what was tried."""
    nbytes = sum(ack.files.values())
    tried = (
        f" after pruning {', '.join(pruned)}"
        if pruned
        else "; nothing was pruned: retention lets nothing go before it is committed (the bests, "
        "the newest, what --keep-every or the uploader keeps), or what it lets go would not make room"
    )
    return (
        f"No space left on device for step {ack.captured_step} in {root}: it needs "
        f"{format_bytes(need)} (its {format_bytes(nbytes)} and a margin), {format_bytes(free)} "
        f"free{tried}; no write started (free space, or lower --keep-last)"
    )


def check_slot(ack: Ack, slot: Path) -> None:
    """The slot must still hold this ack's capture: not gone (a reboot cleared /dev/shm),
    not shorter than the ack says, not overwritten by another writer."""
    for folder in (slot.parent, slot):
        # The link test first: exists() follows a link, and raises PermissionError on one into
        # another user's folder (retried for ever, the ack never set aside) instead of False.
        if not folder.is_symlink() and not folder.exists():
            elsewhere = (
                ", or the rank that wrote it runs on another node with the same node id (give "
                "each node its own CKPTD_NODE_ID)"
                if ack.sharded
                else ""
            )
            raise SlotLost(f"{folder} does not exist here: shared memory cleared (a reboot?){elsewhere}")
        if folder.is_symlink() or not folder.is_dir():
            raise SlotLost(f"{folder} is not a plain directory (a symlink?); refusing to read it")
    for name, nbytes in ack.files.items():
        try:
            info = (slot / name).lstat()
        except FileNotFoundError:
            raise SlotLost(f"slot {slot} has no {name} (shared memory cleared?)") from None
        if not stat.S_ISREG(info.st_mode):  # a link to /etc/passwd will not become a slot
            raise SlotLost(f"{slot / name} is not a regular file (a symlink?); refusing to read it")
        size = info.st_size
        if size < nbytes:
            raise SlotLost(f"{slot / name} holds {size} of the {nbytes} bytes the ack names")
    token = read_capture_token(slot) if ack.sharded else read_slot_token(slot, ack.token_file)
    if ack.token and token != ack.token:
        raise SlotLost(f"slot {slot} holds another capture than ack {ack.name} (token mismatch)")


def committed_capture(store: Store, capture: str) -> CheckpointRecord | None:
    """The committed checkpoint of a sharded capture, if there is one (its manifest names it)."""
    for record in reversed(store.list()):
        if store.manifest(record.name).get("capture") == capture:
            return record
    return None


def store_part(store: Store, job: Job, slot: Path, manifest: Mapping[str, object]) -> None:
    """One rank's files of a sharded capture into ``store``'s shared directory, then its marker.
    Used by the leader's persister and by a follower node's daemon alike; a part already
    marked (a daemon killed before it removed the ack) is not written twice."""
    ack = job.ack
    assert ack.rank is not None and ack.world_size is not None
    if store.rank_stored(ack.capture, ack.rank):
        return
    if not store.shard_dir(ack.capture).exists() and committed_capture(store, ack.capture):
        return  # stored and committed before a restart: writing it again would start it anew
    check_slot(ack, slot)
    with store.writing_rank(ack.capture, ack.captured_step, sorted(ack.files)) as pending:
        biggest_first = sorted(ack.files.items(), key=lambda item: -item[1])
        _write_concurrently([partial(pending.copy_in, name, slot / name, n) for name, n in biggest_first])
        check_slot(ack, slot)  # again: a writer that touched the slot meanwhile changed it
        store.mark_rank(pending, ack.capture, ack.rank, ack.world_size, manifest)


# Files of one checkpoint written at once (shards of one slot file, the small files beside it):
# one writer copies into the page cache at one core's memcpy speed, below a fast disk's. On the
# 2-vCPU development VM (virtio disk) a 1 GiB model in 4 shards took 1.07-1.10 s with 2-4
# writers, 1.31 s with one (median of 5), and no worse under load: the disk bounds it there.
# Each writer's hash runs on the store's hashing threads.
_WRITERS = 3


def _write_concurrently(writes: Sequence[Callable[[], object]]) -> None:
    """Run every write, up to ``_WRITERS`` at once; raise the first error (in the given order)
    only once every write that started has ended, and start none after one failed."""
    if len(writes) <= 1:
        for write in writes:
            write()
        return
    name = f"{threading.current_thread().name} writer"
    with ThreadPoolExecutor(min(_WRITERS, len(writes)), thread_name_prefix=name) as pool:
        futures = [pool.submit(write) for write in writes]
        wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            future.cancel()  # not started yet: the persist has failed, or all are done
    # Leaving the pool waited for the writes under way: no thread touches the temp dir now.
    for future in futures:
        if not future.cancelled():
            future.result()


def _shard_plan(ack: Ack, slot: Path) -> ShardPlan | None:
    """How to shard the ack's tensors file (None: copy it as it is).

    Read after the first slot check, whose token proved the header whole; a header that is
    malformed (the slot is the trainer's, not ours to trust), names another capture, or whose
    shard names collide with the ack's other files will not heal: the slot is lost.
    """
    if ack.shard_bytes is None:
        return None
    source = slot / ack.token_file
    try:
        header = read_header(source, ack.files[ack.token_file])
        if ack.token and header.metadata.get("token") != ack.token:
            raise ProtocolError(source, "holds another capture than the ack (token mismatch)")
        plan = plan_shards(header, ack.token_file, ack.shard_bytes)
        taken = set(ack.files) & {plan.index_name, *(s.name for s in plan.shards)} if plan else set()
        if taken:
            raise ProtocolError(source, f"its shards would replace the ack's own {sorted(taken)}")
    except ProtocolError as exc:
        raise SlotLost(f"cannot shard {source}: {exc.problem}") from exc
    return plan
