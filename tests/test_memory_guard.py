"""The memory guard: a shared memory too small for the state never costs the best, or a process.

On a real 64 MB tmpfs standing in for a container's default ``/dev/shm`` (mounting needs
root: skipped with the reason elsewhere), a real daemon and a 256 MiB state.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from ckptd import CheckpointClient, load_snapshot
from ckptd.client.snapshot import Slot
from ckptd.errors import SnapshotError
from ckptd.protocol import RunPaths
from ckptd.staging import RESERVE_ENV, disk_staging_dir, no_room
from ckptd.store import Store
from tests.conftest import Daemon, wait_for

MIB = 2**20


@pytest.fixture
def small_shm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A real 64 MB tmpfs as the shared-memory root."""
    mount = tmp_path / "shm64"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip() or done.returncode}")
    monkeypatch.setenv("CKPTD_SHM_ROOT", str(mount))
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def trainer_report(paths: RunPaths) -> dict[str, object]:
    """What the daemon's status.json says of the trainer (its client.json, checked)."""
    status = json.loads(paths.status.read_text())
    return status.get("trainer") or {}


def big_state(step: int) -> dict[str, object]:
    return {"big": torch.arange(64 * MIB, dtype=torch.float32) + step, "step": step}  # 256 MiB


def test_a_best_larger_than_shared_memory_is_staged_on_disk_and_persisted(
    tmp_path: Path, small_shm: Path, daemons: Callable[..., Daemon]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run, "--keep-last", "0")
    paths = RunPaths(run)
    with CheckpointClient(run, rendezvous_timeout=20) as client:
        with (run / "logging.jsonl").open("a") as log:
            log.write(json.dumps({"step": 10, "eval_loss": 0.5}) + "\n")
        verdict = client.wait_verdict(10)
        assert verdict is not None and verdict.action == "snapshot", daemon.log()
        assert client.maybe_snapshot(10, lambda: big_state(10))
        assert (disk_staging_dir(paths) / "disk-0").is_dir(), "the slot did not go to local disk"
        store = Store(run / "checkpoints")
        wait_for(lambda: [r.step for r in store.list()] == [10], what=f"the best persisted\n{daemon.log()}")
        wait_for(lambda: trainer_report(paths).get("staging") == "disk", what="status names disk staging")
    assert daemon.proc.poll() is None, "the daemon died"
    record = store.list()[0]
    assert "best:eval_loss" in record.tags
    assert store.verify(record.name) == []
    assert torch.equal(load_snapshot(store.path_of(record.name))["big"], big_state(10)["big"])
    assert not [p for p in small_shm.rglob("*") if p.is_file() and p.name != "run.json"]
    assert daemon.stop() == 0, daemon.log()
    assert not disk_staging_dir(paths).exists(), "the disk slot outlived the run"


def test_a_slot_the_tmpfs_cannot_hold_is_refused_before_any_byte_is_written(small_shm: Path) -> None:
    slot = Slot(small_shm / "ckptd-x" / "slot-0")
    with pytest.raises(SnapshotError, match="MiB free"):
        slot.ensure_capacity(100 * MIB)
    assert not list(small_shm.rglob("*.safetensors")), "a partial slot was left behind"


def test_the_memory_reserve_refuses_shared_memory_the_host_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psutil

    available = psutil.virtual_memory().available
    monkeypatch.setenv(RESERVE_ENV, str(available))  # any staging in memory would eat into it
    assert "reserve" in (no_room(tmp_path, 64 * MIB, in_memory=True) or "")
    assert no_room(tmp_path, 64 * MIB, in_memory=False) is None  # local disk is not RAM
    monkeypatch.setenv(RESERVE_ENV, "0")
    assert no_room(tmp_path, 64 * MIB, in_memory=True) is None
