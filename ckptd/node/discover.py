"""Which runs under a node daemon's roots opt in, who owns them, and whether they are done.

A run opts in with a run file (``ckptd.toml``) in its directory, or by a log that matches
one of the ``adopt`` globs (its folder is then the run dir). Nothing here follows a symbolic
link out of a root: a user who can write under a root must not make the daemon (which may be
root) manage a directory elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from ckptd.protocol import RunPaths, flock_held
from ckptd.settings import ServeSettings

MAX_DEPTH = 4  # run files are looked for this many folders below a root, no deeper
_SKIPPED = {".ckptd", "checkpoints", "__pycache__", ".git"}


@dataclass(frozen=True)
class Candidate:
    """A run that opted in, as found on disk."""

    run_dir: Path
    uid: int
    gid: int
    log: Path | None = None  # the log an adopt glob matched; None: the run's settings say
    how: str = "run file"



def fingerprint(log: Path) -> tuple[int, int]:
    """(size, mtime) of a run's log: what changes when the run is active; (0, 0) if none."""
    try:
        info = log.stat()
    except OSError:
        return (0, 0)
    return (info.st_size, info.st_mtime_ns)


def find_runs(settings: ServeSettings) -> list[Candidate]:
    """Every run that opts in under the roots, once each (a run file wins over a glob)."""
    found: dict[Path, Candidate] = {}
    for root in settings.roots:
        for candidate in _globbed(root, settings.adopt, settings.run_file):
            found.setdefault(candidate.run_dir, candidate)
        for candidate in _with_run_file(root, settings.run_file):
            found[candidate.run_dir] = candidate
    return sorted(found.values(), key=lambda c: str(c.run_dir))


def _with_run_file(root: Path, name: str) -> list[Candidate]:
    out: list[Candidate] = []
    base = len(root.parts)
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        # The root itself is no run: a run file there would hide every run below it.
        candidate = _candidate(here, root, name, "run file") if here != root and name in files else None
        if candidate is not None:
            out.append(candidate)
            dirs[:] = []  # a run's own folders are not runs
            continue
        depth = len(here.parts) - base
        dirs[:] = [] if depth >= MAX_DEPTH else [d for d in dirs if d not in _SKIPPED]
    return out


def _globbed(root: Path, patterns: tuple[str, ...], run_file: str) -> list[Candidate]:
    out: list[Candidate] = []
    for pattern in patterns:
        with contextlib.suppress(OSError, ValueError):  # a root gone, a pattern glob refuses
            for log in root.glob(pattern):
                if _skipped(log.relative_to(root)):
                    continue  # ckptd's own folders (.ckptd, a store) and hidden ones are no runs
                candidate = _candidate(log.parent, root, run_file, f"log matches {pattern!r}", log)
                if candidate is not None and _is_plain_file(log):
                    out.append(candidate)
    return out


def _skipped(relative: Path) -> bool:
    return any(part in _SKIPPED or part.startswith(".") for part in relative.parts[:-1])


def _candidate(
    run_dir: Path, root: Path, run_file: str, how: str, log: Path | None = None
) -> Candidate | None:
    """The run at ``run_dir`` if it is a real directory inside ``root`` (no link on the way),
    named by its real path (two ways to one folder are one run), and trusted (``trusted``)."""
    try:
        real = run_dir.resolve()
        info = real.lstat()
        inside = real.is_relative_to(root.resolve()) and real != root.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop on the way
        return None
    if not stat.S_ISDIR(info.st_mode) or not inside or not trusted(real, info, run_file):
        return None
    if log is not None:
        log = real / log.name
    return Candidate(real, info.st_uid, info.st_gid, log, how)


def trusted(run_dir: Path, info: os.stat_result, run_file: str) -> bool:
    """Whether the run dir's owner alone decides what it holds: a folder others may write
    (a shared 1777 scratch dir) or a run file another user wrote could make the daemon, which
    acts with the folder owner's rights (root's, for a root-owned one), follow and write what
    that other user chose."""
    if info.st_mode & 0o022:
        return False
    try:
        owner = os.lstat(run_dir / run_file).st_uid
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return owner == info.st_uid


def _is_plain_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def trainer_alive(run_dir: Path) -> bool | None:
    """Whether a trainer's capturing client holds the run's client lock (``flock_held``: read
    without taking the lock, which could make a starting trainer think another client serves
    the run). None where that cannot be told."""
    return flock_held(RunPaths(run_dir).client_lock)


def idle_for(candidate: Candidate, log: Path) -> float:
    """Seconds since the run's log last changed (its folder's when there is no log yet)."""
    for path in (log, candidate.run_dir):
        with contextlib.suppress(OSError):
            return max(0.0, time.time() - path.stat().st_mtime)
    return 0.0
