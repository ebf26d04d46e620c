"""Faults a GPU node meets: a full disk under the store, a hostile ack. The daemon says what
happened, keeps running, loses nothing, and writes nowhere it should not."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptd.protocol import RunPaths, atomic_write_json, pending_ack_paths
from ckptd.store import TMP_PREFIX, Store
from tests.conftest import PROGRAMS, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs to hold the store: a disk that fills up for real (needs root to mount)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount_point)], check=False)
    if done.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def status(run: Path) -> dict[str, object]:
    return json.loads(RunPaths(run).status.read_text())


def test_a_full_disk_is_reported_retried_and_loses_nothing(
    tmp_path: Path, daemons, shm_root: Path, small_disk: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run, "--every-steps", "1", "--store", str(small_disk / "checkpoints"))
    store = Store(small_disk / "checkpoints")
    trainer = subprocess.run(
        [sys.executable, str(PROGRAMS / "stage_and_crash.py"), str(run), "4"], timeout=60
    )
    assert trainer.returncode == 0  # 4 MiB staged and acked; the store has 1 MiB
    wait_for(
        lambda: "No space left on device" in str(status(run).get("last_error")), what="the ENOSPC report"
    )
    assert daemon.proc.poll() is None, "a full disk must not stop the daemon"
    assert store.list() == []
    assert not [p for p in store.root.iterdir() if p.name.startswith((TMP_PREFIX, "step-"))], (
        "no partial left"
    )
    assert len(pending_ack_paths(RunPaths(run))) == 1, "the acked snapshot is kept for the retry"

    subprocess.run(["mount", "-o", "remount,size=64M", str(small_disk)], check=True)  # space freed
    wait_for(lambda: len(store.list()) == 1, timeout=30, what="the retried persist")
    assert store.verify(store.list()[0].name) == []
    assert not pending_ack_paths(RunPaths(run))
    assert daemon.stop() == 0, daemon.log()


def test_a_hostile_ack_is_set_aside_and_nothing_is_read_or_written_outside(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "tensors.safetensors").write_bytes(b"not yours")
    daemon = daemons(run)
    paths = RunPaths(run)
    hostile = {
        "protocol": 1,
        "name": "7",
        "captured_step": 7,
        "slot": "../../../secret",
        "files": {"tensors.safetensors": 9},
        "created": 1.0,
    }
    atomic_write_json(paths.acks / "7.json", hostile)
    wait_for(lambda: (paths.acks / "7.json.rejected").exists(), what="the ack to be set aside")
    wait_for(lambda: "rejected ack 7.json" in str(status(run).get("last_error")), what="the report")
    assert daemon.proc.poll() is None
    assert Store(run / "checkpoints").list() == []
    assert (secret / "tensors.safetensors").read_bytes() == b"not yours"
    assert daemon.stop() == 0
