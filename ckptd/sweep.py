"""Sweeping shared memory: staging dirs whose run is gone (``ckptd gc``, and ``ckptd serve``).

A daemon removes its run's idle slots when it stops; one killed (OOM, SIGKILL, a node
drained) leaves them, and ``/dev/shm`` is memory. Each staging dir holds ``run.json`` naming
its run dir (the daemon writes it on start). A dir is swept only when that run can no longer
use it: the run dir is gone, or its state now names another run id (the run was reset), and
nothing touched the dir for a grace period. A staging dir of a run that still exists is never
swept, even with no daemon: its slots may hold acknowledged snapshots the next start persists.
A dir without ``run.json`` (ckptd before 0.2) is left alone and reported. Nothing is followed
through a symbolic link, and only ``ckptd-*`` directories of the shm root are considered.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ckptd.protocol import RunPaths, atomic_write_json, read_small_json
from ckptd.staging import allocated_bytes, default_shm_root

MARKER = "run.json"
PREFIX = "ckptd-"
GRACE_S = 600.0  # a dir touched this recently is left alone: a run being set up, a slow copy
_MARKER_BYTES = 65536


@dataclass(frozen=True)
class Orphan:
    """A staging dir that can go, and why."""

    path: Path
    run_dir: str
    why: str
    nbytes: int


def mark(staging: Path, run_dir: Path, run_id: str) -> None:
    """Record which run a staging dir belongs to (the daemon calls it when it makes the dir)."""
    atomic_write_json(staging / MARKER, {"run_dir": str(run_dir), "run_id": run_id})


def find_orphans(root: Path | None = None, *, grace: float = GRACE_S) -> tuple[list[Orphan], list[Path]]:
    """(staging dirs whose run is gone, ``ckptd-*`` dirs whose run cannot be told)."""
    orphans: list[Orphan] = []
    unknown: list[Path] = []
    for path in _staging_dirs(root or default_shm_root()):
        if _touched_within(path, grace):
            continue
        marker = _read_marker(path)
        if marker is None:
            unknown.append(path)
            continue
        run_dir, run_id = marker
        why = _gone(Path(run_dir), run_id)
        if why is not None:
            orphans.append(Orphan(path, run_dir, why, allocated_bytes(path)))
    return orphans, unknown


def remove(orphan: Orphan) -> None:
    """Remove one orphan (shutil.rmtree does not follow links inside, and the dir itself was
    checked to be a real directory, not a link)."""
    if stat.S_ISDIR(orphan.path.lstat().st_mode):
        shutil.rmtree(orphan.path)


def _staging_dirs(root: Path) -> Iterator[Path]:
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(PREFIX) and entry.is_dir(follow_symlinks=False):
            yield Path(entry.path)


def _touched_within(path: Path, grace: float) -> bool:
    newest = 0.0
    with contextlib.suppress(OSError):
        newest = path.lstat().st_mtime
        for child in path.iterdir():
            newest = max(newest, child.lstat().st_mtime)
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


def _gone(run_dir: Path, run_id: str) -> str | None:
    """Why the run can no longer use its staging dir, or None while it might (or when that
    cannot be told: an unreadable run dir is not a gone one)."""
    try:
        if not stat.S_ISDIR(os.lstat(run_dir).st_mode):
            return f"its run dir {run_dir} is gone"
    except FileNotFoundError:
        return f"its run dir {run_dir} is gone"
    except OSError:
        return None  # not ours to see (another user's 0700 folder): nothing proven
    try:
        state = read_small_json(RunPaths(run_dir).state, _MARKER_BYTES)
    except FileNotFoundError:
        return f"{run_dir} has no ckptd state any more"
    except (OSError, ValueError, RecursionError):
        return None  # unreadable now, perhaps being replaced: not proof of anything
    current = state.get("run_id") if isinstance(state, dict) else None
    if isinstance(current, str) and current != run_id:
        return f"{run_dir} is now run {current}"
    return None
