"""What the benchmark scripts share: the machine, the disk, the load, and where to run.

Every figure is reported with the machine it ran on and how busy that machine was,
so these helpers live in one place.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ckptd.protocol import RunPaths, daemon_alive

REPO = Path(__file__).resolve().parents[1]


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine_info(**extra: Any) -> dict[str, Any]:
    """CPU model, cores, RAM, kernel, Python, plus what the caller adds (library versions)."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_total = 0
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
                break
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "ram_bytes": mem_total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        **extra,
    }


def filesystem_of(path: Path) -> dict[str, Any]:
    """The mount holding ``path`` (longest matching mount point in /proc/mounts) and its size."""
    real = os.path.realpath(path)
    best = ("?", "/", "?")
    with open("/proc/mounts") as handle:
        for line in handle:
            device, mount, fstype = line.split()[:3]
            mount = mount.replace("\\040", " ")
            inside = real == mount or real.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best[1]):
                best = (device, mount, fstype)
    vfs = os.statvfs(real)
    return {
        "path": real,
        "device": best[0],
        "mount": best[1],
        "fstype": best[2],
        "size_bytes": vfs.f_frsize * vfs.f_blocks,
        "free_bytes": vfs.f_frsize * vfs.f_bavail,
    }


def cpu_busy_seconds() -> float:
    """CPU seconds all processes spent busy (user, system, irq, steal: not idle, not iowait)."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its waited-for children (daemons, dd, wc)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def default_parent() -> Path:
    """The system temp dir when it is on the repo's filesystem (not tmpfs), else the repo itself."""
    tmp = Path(tempfile.gettempdir())
    if tmp.stat().st_dev == REPO.stat().st_dev and filesystem_of(tmp)["fstype"] not in ("tmpfs", "ramfs"):
        return tmp
    return REPO


def daemon_status(paths: RunPaths) -> dict[str, Any]:
    try:
        return json.loads(paths.status.read_bytes())
    except (OSError, ValueError):
        return {}


def start_daemon(argv: list[str], run: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """A ``ckptd run`` subprocess, returned once its heartbeat shows (30 s at most)."""
    daemon = subprocess.Popen(argv, env=env, cwd=cwd)
    deadline = time.monotonic() + 30
    while not daemon_alive(RunPaths(run)):
        if time.monotonic() > deadline or daemon.poll() is not None:
            raise SystemExit("the daemon did not start")
        time.sleep(0.01)
    return daemon


@contextlib.contextmanager
def scratch_dir(requested: str | None, prefix: str) -> Iterator[Path]:
    """A temp dir under ``--dir`` (default: :func:`default_parent`), removed afterwards, with
    the parent too when this run created it."""
    parent = Path(requested) if requested else default_parent()
    created = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                parent.rmdir()


class LoadMeter:
    """How busy the machine was while a benchmark ran: other processes make every figure noisier."""

    def __init__(self) -> None:
        self._load = os.getloadavg()[0]
        self._wall, self._busy, self._own = time.monotonic(), cpu_busy_seconds(), own_cpu_seconds()

    def report(self) -> dict[str, Any]:
        wall = time.monotonic() - self._wall
        others = (cpu_busy_seconds() - self._busy) - (own_cpu_seconds() - self._own)
        return {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_avg_1min": {"start": self._load, "end": os.getloadavg()[0]},
            "others_cpu_share": max(0.0, others / (wall * len(os.sched_getaffinity(0)))),
            "wall_s": wall,
        }
