"""What the trainer pays per step when nothing is asked: one stat, counted by strace."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ckptd.protocol import Control, RunPaths, atomic_write_json, write_control
from ckptd.staging import staging_dir_for

PROBE = """
import os, sys
from ckptd import CheckpointClient
client = CheckpointClient(sys.argv[1])
for step in range(1, 11):          # warm up: imports, first read of the control file
    client.maybe_snapshot(step, lambda: {})
client.wait_staged()  # the slot the first quiet step prepares, in the background
os.write(2, b"BEGIN\\n")
for step in range(11, 1011):
    client.maybe_snapshot(step, lambda: {})
os.write(2, b"END\\n")
"""

_ALLOCATOR = {"mmap", "munmap", "brk", "madvise", "mprotect", "mremap"}


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_maybe_snapshot_costs_exactly_one_stat_when_nothing_is_due(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path / "run")
    paths.meta.mkdir(parents=True)
    # A live daemon with a schedule that falls on none of the probed steps.
    # (The staging dir the client computes itself: a control file pointing elsewhere is ignored.)
    staging = str(staging_dir_for("cost"))
    write_control(paths, Control(seq=1, run_id="cost", staging=staging, every_steps=10**6))
    atomic_write_json(paths.status, {"protocol": 1})
    trace = tmp_path / "trace"
    done = subprocess.run(
        ["strace", "-f", "-o", str(trace), sys.executable, "-c", PROBE, str(paths.run_dir)],
        capture_output=True,
        timeout=120,
    )
    if done.returncode != 0 and b"ptrace" in done.stderr:
        pytest.skip("ptrace is not permitted here")
    assert done.returncode == 0, done.stderr
    text = trace.read_text()
    begin = next(line for line in text.splitlines() if "BEGIN" in line)
    trainer = begin.split(None, 1)[0]  # the pid of the thread that runs the loop
    window = text.split("BEGIN")[1].split("END")[0].splitlines()[1:-1]
    # Only the training thread's calls: a finished background thread (the slot the first quiet
    # step prepared) may still be tearing itself down.
    mine = [line for line in window if line.split(None, 1)[0] == trainer and "(" in line]
    calls = Counter(line.split(None, 1)[1].split("(")[0] for line in mine)
    # The interpreter's allocator may return an arena now and then: not ckptd's doing.
    calls = Counter({name: n for name, n in calls.items() if name not in _ALLOCATOR})
    assert sum(calls.values()) == 1000, calls
    assert len(calls) == 1 and next(iter(calls)) in ("newfstatat", "stat", "statx", "fstatat64"), calls
