"""Sweeping staging dirs a run can no longer use (``ckptd gc``, ``ckptd serve``, a daemon's start).

A daemon removes its run's idle slots when it stops; one killed (OOM, SIGKILL, a node
drained) leaves them, and ``/dev/shm`` is memory. Each staging dir holds ``run.json`` naming
its run dir and run id (the daemon writes it on start). A dir nothing touched for a grace
period (the dir, its entries and the files of its slots) goes when:

- its run can no longer use it: the run dir is gone, or its state now names another run id
  (the run was reset); or
- its run has no live daemon and no pending ack: the run's state names this run id, no daemon
  heartbeat is fresh (``protocol.daemon_alive``) and no process holds the run's daemon lock
  (a daemon still catching up has written no heartbeat yet), no trainer holds the run's client
  lock (it may be filling a slot; its mappings pin the memory anyway), and no pending ack in
  ``.ckptd/acks/`` names one of the dir's slots.

A dir whose run has a pending ack naming one of its slots is never removed: the next daemon
start persists that snapshot. Its other slots, the ones no ack names, go (the dir stays).
Whenever something cannot be told (a run dir, state, heartbeat, acks folder or ack that cannot
be read, an ack file that is not a plain file of this protocol version), the dir is kept. A
dir without ``run.json`` (ckptd before 0.2) is left alone and reported. Nothing is followed
through a symbolic link (a linked staging dir, slot, ``.ckptd``, acks folder or ack is never
read or removed through), and only ``ckptd-*`` directories directly in the shm root are
considered. ``remove`` judges an orphan again just before removing it, so a daemon started or
an ack written since it was found keeps it.

A run may also stage on disk, in ``<run dir>/.ckptd/staging/`` (slots ``disk-N``) when
``/dev/shm`` is too small. ``ckptd gc`` cannot find those (it knows no run dirs); a daemon's
start (``sweep_at_start``) removes its own run's ``disk-*`` slots that no pending ack names,
under the same grace and trainer rules.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ckptd.protocol import (
    PROTOCOL_VERSION,
    Ack,
    RunPaths,
    atomic_write_json,
    daemon_alive,
    flock_held,
    pending_ack_paths,
    read_small_file,
    read_small_json,
)
from ckptd.staging import DISK_SLOT_PREFIX, allocated_bytes, default_shm_root, disk_staging_dir

log = logging.getLogger("ckptd.sweep")

MARKER = "run.json"
PREFIX = "ckptd-"
GRACE_S = 600.0  # a dir touched this recently is left alone: a run being set up, a slow copy
NO_DAEMON = "no live daemon and no pending ack"
_MARKER_BYTES = 65536
_ACK_BYTES = 1 << 20  # an ack is a few KiB; anything larger is not one


@dataclass(frozen=True)
class Orphan:
    """A staging dir (or one slot of it) that can go, and why."""

    path: Path
    run_dir: str
    why: str
    nbytes: int
    grace: float = GRACE_S  # the grace it was found with; ``remove`` judges it again with it
    within: Path | None = None  # the staging dir holding this slot; None: ``path`` is a staging dir


def mark(staging: Path, run_dir: Path, run_id: str) -> None:
    """Record which run a staging dir belongs to (the daemon calls it when it makes the dir)."""
    atomic_write_json(staging / MARKER, {"run_dir": str(run_dir), "run_id": run_id})


def find_orphans(root: Path | None = None, *, grace: float = GRACE_S) -> tuple[list[Orphan], list[Path]]:
    """(staging dirs, or slots of them, that can go; ``ckptd-*`` dirs whose run cannot be told)."""
    return _find(root or default_shm_root(), grace)


def remove(orphan: Orphan) -> bool:
    """Judge ``orphan`` again and remove it if it still may go: True when it was removed, False
    when it no longer may (a daemon started, an ack was written) or is gone already. Never
    through a link: the path must be a real directory, and shutil.rmtree follows no link inside.
    Raises OSError when it cannot be removed."""
    staging = orphan.within or orphan.path
    return _remove(orphan, lambda: _judge(staging, orphan.grace))


def sweep_at_start(
    own_run_dir: Path, own_staging: Path, *, root: Path | None = None, grace: float = GRACE_S
) -> list[Orphan]:
    """What a daemon's start sweeps: returns what was removed (for the caller to log).

    In the shm root (``root``, default ``staging.default_shm_root()``): this user's ``ckptd-*``
    dirs that ``find_orphans`` finds with ``grace``, and the slots no pending ack names of dirs
    whose dead run still has acks; never ``own_staging`` (the caller's own staging dir, whatever
    its ``run.json`` says), and never a dir whose ``run.json`` names ``own_run_dir`` with the
    run id its state holds (the caller is that run's live daemon). On disk: the ``disk-*`` slots
    of ``disk_staging_dir(RunPaths(own_run_dir))`` that no pending ack names, untouched for
    ``grace`` and with no trainer holding the client lock (the caller holds the run's lock, so
    no other daemon serves it).

    Call it after the staging dir is made (``mark``) and the state naming the current run id
    is saved. It never raises: what fails is logged (warning) and the sweep goes on.
    """
    removed: list[Orphan] = []
    try:
        orphans, _unknown = _find(root or default_shm_root(), grace, own_run_dir, own_staging, mine_only=True)
    except Exception as exc:  # a planted marker must never stop a daemon's start
        log.warning("sweeping shared memory failed: %s: %s", type(exc).__name__, exc)
        orphans = []
    for orphan in orphans:
        if _same_entry(orphan.within or orphan.path, own_staging):
            continue

        def again(orphan: Orphan = orphan) -> list[Orphan] | None:
            return _judge(orphan.within or orphan.path, orphan.grace, own_run_dir)

        _remove_logged(orphan, again, removed)
    try:
        on_disk = _disk_orphans(own_run_dir, grace)
    except Exception as exc:
        log.warning("sweeping %s failed: %s: %s", own_run_dir, type(exc).__name__, exc)
        on_disk = []
    for orphan in on_disk:
        _remove_logged(orphan, lambda: _disk_orphans(own_run_dir, grace), removed)
    return removed


def _remove_logged(orphan: Orphan, judge: Callable[[], list[Orphan] | None], removed: list[Orphan]) -> None:
    try:
        if _remove(orphan, judge):
            removed.append(orphan)
    except Exception as exc:
        log.warning("cannot sweep %s (%s): %s: %s", orphan.path, orphan.why, type(exc).__name__, exc)


def _remove(orphan: Orphan, judge: Callable[[], list[Orphan] | None]) -> bool:
    still = {o.path for o in judge() or []}
    if orphan.path not in still and (orphan.within is None or orphan.within not in still):
        return False
    try:
        if not stat.S_ISDIR(orphan.path.lstat().st_mode):
            return False
    except FileNotFoundError:
        return False
    with contextlib.suppress(FileNotFoundError):  # removed meanwhile by another sweeper
        shutil.rmtree(orphan.path)
    return True


def _find(
    root: Path,
    grace: float,
    own_run_dir: Path | None = None,
    own_staging: Path | None = None,
    *,
    mine_only: bool = False,
) -> tuple[list[Orphan], list[Path]]:
    orphans: list[Orphan] = []
    unknown: list[Path] = []
    for path in _staging_dirs(root):
        if own_staging is not None and _same_entry(path, own_staging):
            continue
        if mine_only and not _owned(path):
            continue
        judged = _judge(path, grace, own_run_dir)
        if judged is None:
            unknown.append(path)
        else:
            orphans.extend(judged)
    return orphans, unknown


def _judge(path: Path, grace: float, own_run_dir: Path | None = None) -> list[Orphan] | None:
    """What of the staging dir ``path`` can go: nothing, the dir, or some of its slots; None
    when it does not say whose it is."""
    if _touched_within(path, grace):
        return []
    marker = _read_marker(path)
    if marker is None:
        return None
    run_dir, run_id = marker
    why, current = _gone(Path(run_dir), run_id)
    if why is not None:
        return [Orphan(path, run_dir, why, allocated_bytes(path), grace)]
    if not current or (own_run_dir is not None and _same_entry(Path(run_dir), own_run_dir, follow=True)):
        return []  # unsure whose it is now, or the caller is its run's live daemon
    acked = _unused(RunPaths(Path(run_dir)), daemon=True)
    if acked is None:
        return []
    entries = _entries(path)
    if entries is None:
        return []
    held = sorted(acked.intersection(entries))
    if not held:
        why = f"its run {run_dir} has {NO_DAEMON}" + (" for a slot here" if acked else "")
        return [Orphan(path, run_dir, why, allocated_bytes(path), grace)]
    why = f"its run {run_dir} has {NO_DAEMON} for this slot (acks hold {', '.join(held)})"
    return [
        Orphan(path / name, run_dir, why, allocated_bytes(path / name), grace, within=path)
        for name, real_dir in entries.items()
        if real_dir and name not in acked
    ]


def _disk_orphans(run_dir: Path, grace: float) -> list[Orphan]:
    """The ``disk-*`` slots of a run's disk staging dir that no pending ack names, when no
    trainer holds its client lock (its daemon is the caller)."""
    paths = RunPaths(run_dir)
    folder = disk_staging_dir(paths)
    if not (_real_dir(paths.meta) and _real_dir(folder)):
        return []
    acked = _unused(paths, daemon=False)
    entries = _entries(folder)
    if acked is None or entries is None:
        return []
    why = f"no pending ack of {run_dir} names this disk slot"
    return [
        Orphan(folder / name, str(run_dir), why, allocated_bytes(folder / name), grace, within=folder)
        for name, real_dir in entries.items()
        if real_dir
        and name.startswith(DISK_SLOT_PREFIX)
        and name not in acked
        and not _touched_within(folder / name, grace)
    ]


def _unused(paths: RunPaths, *, daemon: bool) -> frozenset[str] | None:
    """The slots the run's pending acks name, when nothing else may use its staging: no live
    daemon (checked when ``daemon``), no trainer holding its client lock. None while something
    may, or when that cannot be told: in doubt, a staging dir is kept."""
    try:
        if not _real_dir(paths.meta):
            return None
        if flock_held(paths.client_lock):
            return None
        # A multi-node job's follower daemons have their own heartbeat, lock and acks: a slot
        # one of their pending acks names is as busy as one the leader's names.
        slots: set[str] = set()
        for each in (paths, *_followers(paths)):
            if daemon and (daemon_alive(each) or flock_held(each.lock)):
                return None
            slots |= _acked_slots(each)
        return frozenset(slots)
    except (OSError, ValueError, RecursionError):
        return None


def _followers(paths: RunPaths) -> list[RunPaths]:
    """The follower nodes' files of a run (``.ckptd/nodes/<node>/``), never through a link."""
    nodes = paths.meta / "nodes"
    if not _real_dir(nodes):
        return []
    found: list[RunPaths] = []
    for name in sorted(os.listdir(nodes)):
        try:
            node = paths.node(name)
        except ValueError:
            continue  # not a node id: not ours
        if _real_dir(node.meta):
            found.append(node)
    return found


def _acked_slots(paths: RunPaths) -> frozenset[str]:
    """The slots named by the run's pending acks; OSError or ValueError when one of them (or
    the acks folder) cannot be read: an ack that cannot be read may still name a slot."""
    try:
        info = os.lstat(paths.acks)
    except FileNotFoundError:
        return frozenset()
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{paths.acks} is not a directory")
    slots: set[str] = set()
    for path in pending_ack_paths(paths):
        try:
            slots.add(_ack_slot(path))
        except FileNotFoundError:
            continue  # committed (or set aside) meanwhile
    return frozenset(slots)


def _ack_slot(path: Path) -> str:
    """The slot an ack names, read as a file someone may have planted: bounded, a regular
    file, no link followed (``read_small_file``). ProtocolError is a ValueError."""
    document = json.loads(read_small_file(path, _ACK_BYTES))
    if not isinstance(document, dict) or document.get("protocol") != PROTOCOL_VERSION:
        raise ValueError(f"{path}: not a protocol {PROTOCOL_VERSION} ack")
    return Ack.from_json(path, document).slot


def _staging_dirs(root: Path) -> Iterator[Path]:
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(PREFIX) and entry.is_dir(follow_symlinks=False):
            yield Path(entry.path)


def _entries(folder: Path) -> dict[str, bool] | None:
    """{name: whether it is a real directory (not a link)} of ``folder``; None if unreadable."""
    try:
        with os.scandir(folder) as entries:
            return {e.name: e.is_dir(follow_symlinks=False) for e in entries}
    except OSError:
        return None


def _touched_within(path: Path, grace: float) -> bool:
    """Whether ``path``, one of its entries or an entry of one of its folders changed within
    ``grace`` seconds: a slot being written moves its files' times, not the slot's own."""
    newest = 0.0
    with contextlib.suppress(OSError):
        newest = path.lstat().st_mtime
        with os.scandir(path) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    info = entry.stat(follow_symlinks=False)
                    newest = max(newest, info.st_mtime)
                    if stat.S_ISDIR(info.st_mode):
                        with os.scandir(entry.path) as inner:
                            for item in inner:
                                newest = max(newest, item.stat(follow_symlinks=False).st_mtime)
    return time.time() - newest < grace


def _read_marker(path: Path) -> tuple[str, str] | None:
    try:
        document = read_small_json(path / MARKER, _MARKER_BYTES)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    run_dir, run_id = document.get("run_dir"), document.get("run_id")
    if not isinstance(run_dir, str) or not isinstance(run_id, str) or not os.path.isabs(run_dir):
        return None
    return run_dir, run_id


def _gone(run_dir: Path, run_id: str) -> tuple[str | None, bool]:
    """(why the run can no longer use its staging dir, or None while it might or when that
    cannot be told: an unreadable run dir is not a gone one; whether its state, read, names
    ``run_id``)."""
    try:
        if not stat.S_ISDIR(os.lstat(run_dir).st_mode):
            return f"its run dir {run_dir} is gone", False
    except FileNotFoundError:
        return f"its run dir {run_dir} is gone", False
    except OSError:
        return None, False  # not ours to see (another user's 0700 folder): nothing proven
    try:
        state = read_small_json(RunPaths(run_dir).state, _MARKER_BYTES)
    except FileNotFoundError:
        return f"{run_dir} has no ckptd state any more", False
    except (OSError, ValueError, RecursionError):
        return None, False  # unreadable now, perhaps being replaced: not proof of anything
    current = state.get("run_id") if isinstance(state, dict) else None
    if isinstance(current, str) and current != run_id:
        return f"{run_dir} is now run {current}", False
    return None, current == run_id


def _real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _owned(path: Path) -> bool:
    try:
        return os.lstat(path).st_uid == os.geteuid()
    except OSError:
        return False


def _same_entry(a: Path, b: Path, *, follow: bool = False) -> bool:
    """Whether ``a`` and ``b`` are one file (the same path, or the same device and inode)."""
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        first, second = (os.stat(p) if follow else os.lstat(p) for p in (a, b))
    except OSError:
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)
