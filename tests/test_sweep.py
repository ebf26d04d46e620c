"""``ckptd gc``: staging dirs of runs that are gone are swept; nothing else ever is."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from ckptd.protocol import RunPaths
from ckptd.sweep import MARKER, mark


def gc(*args: str) -> subprocess.CompletedProcess[str]:
    # CKPTD_SHM_ROOT (the shm_root fixture) tells it where to look.
    command = [sys.executable, "-m", "ckptd", "gc", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=os.environ)


def staging(shm: Path, run_id: str, run_dir: Path | None, *, slot_bytes: int = 4096) -> Path:
    folder = shm / f"ckptd-{run_id}"
    (folder / "slot-0").mkdir(parents=True)
    (folder / "slot-0" / "tensors.safetensors").write_bytes(b"\0" * slot_bytes)
    if run_dir is not None:
        mark(folder, run_dir, run_id)
    return folder


def run_with_state(path: Path, run_id: str) -> Path:
    RunPaths(path).meta.mkdir(parents=True)
    RunPaths(path).state.write_text(json.dumps({"run_id": run_id}))
    return path


def test_only_dirs_whose_run_is_gone_or_reset_are_swept(tmp_path: Path, shm_root: Path) -> None:
    alive = staging(shm_root, "alive", run_with_state(tmp_path / "alive", "alive"))
    gone = staging(shm_root, "gone", tmp_path / "deleted-run")
    reset = staging(shm_root, "old", run_with_state(tmp_path / "reset", "new"))
    unmarked = staging(shm_root, "unmarked", None)
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / "data").write_text("keep me")
    (shm_root / "ckptd-link").symlink_to(elsewhere)
    (shm_root / "not-ours").mkdir()

    dry = gc("--grace", "0", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert sorted(row["path"] for row in json.loads(dry.stdout)) == sorted([str(gone), str(reset)])
    assert gone.exists() and reset.exists(), "a dry run removes nothing"

    done = gc("--grace", "0")
    assert done.returncode == 0, done.stderr
    assert not gone.exists() and not reset.exists()
    assert alive.exists() and unmarked.exists() and (shm_root / "not-ours").exists()
    assert (elsewhere / "data").read_text() == "keep me" and (shm_root / "ckptd-link").is_symlink()
    assert str(unmarked) in done.stderr, "a dir that does not say whose it is gets reported"


def test_a_recently_touched_dir_is_left_for_the_grace_period(tmp_path: Path, shm_root: Path) -> None:
    gone = staging(shm_root, "fresh", tmp_path / "deleted-run")
    assert "nothing to sweep" in gc().stdout and gone.exists()


def test_a_killed_daemons_slots_go_once_its_run_dir_is_deleted(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run)
    (folder,) = [p for p in shm_root.iterdir() if p.name.startswith("ckptd-")]
    assert json.loads((folder / MARKER).read_text())["run_dir"] == str(run)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    assert "nothing to sweep" in gc("--grace", "0").stdout, "the run still exists: its slots may matter"
    shutil.rmtree(run)
    assert gc("--grace", "0").returncode == 0 and not folder.exists()
