"""prepare(): the first capture finds its shared-memory slot already faulted in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ckptd.protocol import Control, RunPaths, atomic_write_json, write_control

PROBE = """
import json, resource, sys, time
import torch
from ckptd import CheckpointClient
state = {"w": torch.ones(16 * 2**20)}  # 64 MiB: 16,384 pages of 4 KiB
client = CheckpointClient(sys.argv[1])
prepared = client.prepare(lambda: state) if sys.argv[2] == "prepare" else False
time.sleep(1.0)  # the trainer's first steps, while the slot is faulted in behind them
# Faults of this thread only, the trainer's: a preparation still running faults on its own.
before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
started = time.perf_counter()
staged = client.maybe_snapshot(5, lambda: state)
seconds = time.perf_counter() - started
faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
print(json.dumps({"prepared": prepared, "staged": staged, "faults": faults, "seconds": seconds}))
"""


def capture(run: Path, mode: str) -> dict[str, object]:
    atomic_write_json(RunPaths(run).status, {"protocol": 1})
    beating = threading.Event()

    def heartbeat() -> None:
        # A live daemon's heartbeat for as long as the trainer runs: on a loaded machine its
        # import of torch alone can outlast one written heartbeat, and a stale one pauses captures.
        while not beating.wait(0.5):
            os.utime(RunPaths(run).status)

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, str(run), mode], capture_output=True, text=True, timeout=120
        )
    finally:
        beating.set()
        beat.join()
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def run(tmp_path: Path, shm_root: Path) -> Path:
    """A run whose control file asks for a capture every 5 steps, with a live heartbeat."""
    paths = RunPaths(tmp_path / "run")
    paths.acks.mkdir(parents=True)
    write_control(paths, Control(seq=1, run_id="prep", staging=str(shm_root / "ckptd-prep"), every_steps=5))
    return paths.run_dir


def test_a_prepared_slot_spares_the_first_capture_its_page_faults(run: Path, shm_root: Path) -> None:
    cold = capture(run, "cold")
    for ack in (run / ".ckptd" / "acks").iterdir():
        ack.unlink()  # free the slot as a daemon would, then start over with a fresh slot
    slots = list(shm_root.glob("ckptd-prep/*/tensors.safetensors"))
    assert slots, "the cold capture staged into a slot"
    for slot in slots:
        slot.unlink()
    warm = capture(run, "prepare")
    assert cold["staged"] and warm["staged"] and warm["prepared"]
    assert int(cold["faults"]) > 16_000, cold  # every page of the new slot, in the trainer's call
    assert int(warm["faults"]) < int(cold["faults"]) // 4, (cold, warm)


def test_prepare_without_a_daemon_does_nothing(tmp_path: Path) -> None:
    from ckptd import CheckpointClient

    with CheckpointClient(tmp_path) as client:
        assert client.prepare(lambda: {"w": __import__("torch").ones(4)}) is False
    assert list(tmp_path.iterdir()) == []
