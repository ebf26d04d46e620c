"""``ckptd gc`` and a daemon's start sweep staging dirs no run can use: a run gone or reset, or
a run with no live daemon and no pending ack. A dir holding an acknowledged snapshot, or one
whose run cannot be told, is never swept; nothing is followed through a link."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ckptd import sweep
from ckptd.protocol import Ack, RunPaths, write_ack
from ckptd.staging import disk_staging_dir
from ckptd.sweep import MARKER, NO_DAEMON, mark

SLOT_BYTES = b"acknowledged snapshot bytes" * 100


def gc(*args: str) -> subprocess.CompletedProcess[str]:
    # CKPTD_SHM_ROOT (the shm_root fixture) tells it where to look.
    command = [sys.executable, "-m", "ckptd", "gc", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=os.environ)


def staging(
    shm: Path,
    run_id: str,
    run_dir: Path | None,
    *,
    slots: tuple[str, ...] = ("slot-0",),
    slot_bytes: int = 4096,
) -> Path:
    folder = shm / f"ckptd-{run_id}"
    folder.mkdir()
    for slot in slots:
        (folder / slot).mkdir()
        (folder / slot / "tensors.safetensors").write_bytes(b"\0" * slot_bytes)
    if run_dir is not None:
        mark(folder, run_dir, run_id)
    return folder


def run_with_state(path: Path, run_id: str, heartbeat: str | None = None) -> Path:
    """A run dir whose state names ``run_id``; ``heartbeat``: None (no status.json: never
    started, or a very old daemon), "stale" (a daemon killed a minute ago), "fresh"."""
    paths = RunPaths(path)
    paths.meta.mkdir(parents=True)
    paths.state.write_text(json.dumps({"run_id": run_id}))
    if heartbeat is not None:
        paths.status.write_text(json.dumps({"protocol": 1, "state": "running", "pid": 1}))
        if heartbeat == "stale":
            old = time.time() - 60
            os.utime(paths.status, (old, old))
    return path


def ack(run_dir: Path, slot: str, name: str = "5") -> Path:
    paths = RunPaths(run_dir)
    paths.acks.mkdir(parents=True, exist_ok=True)
    return write_ack(
        paths,
        Ack(
            name=name,
            captured_step=100,
            slot=slot,
            files={"tensors.safetensors": len(SLOT_BYTES)},
            token="tok",
        ),
    )


def dead_run(
    tmp_path: Path, shm: Path, run_id: str, *, slots: tuple[str, ...] = ("slot-0",)
) -> tuple[Path, Path]:
    """A run dir that exists, its state naming ``run_id``, its daemon's heartbeat stale."""
    run = run_with_state(tmp_path / run_id, run_id, "stale")
    return run, staging(shm, run_id, run, slots=slots)


@contextmanager
def flocked(path: Path) -> Iterator[None]:
    """Hold an flock on ``path`` as a daemon (``.ckptd/lock``) or a client (``client.lock``) does."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def swept_paths(root: Path) -> list[Path]:
    orphans, _unknown = sweep.find_orphans(root, grace=0)
    return sorted(o.path for o in orphans)


# -- the run is gone or reset (the rule before the daemon check) ---------------------------------


def test_only_dirs_no_run_can_use_are_swept(tmp_path: Path, shm_root: Path) -> None:
    alive = staging(shm_root, "alive", run_with_state(tmp_path / "alive", "alive", "fresh"))
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


def test_a_slot_being_written_counts_as_a_touch(tmp_path: Path, shm_root: Path) -> None:
    """The dir's own time and its slots' do not move while a slot file is written: the
    files' times are looked at too."""
    _run, folder = dead_run(tmp_path, shm_root, "writing")
    old = time.time() - 3600
    for path in (folder / "slot-0" / "tensors.safetensors", folder / "slot-0", folder / MARKER, folder):
        os.utime(path, (old, old))
    assert [o.path for o in sweep.find_orphans(shm_root, grace=60)[0]] == [folder]
    (folder / "slot-0" / "tensors.safetensors").write_bytes(b"being written")
    assert sweep.find_orphans(shm_root, grace=60)[0] == []


# -- (a) a run with no live daemon and no pending ack ----------------------------------------------


@pytest.mark.parametrize("heartbeat", ["stale", None])
def test_a_dead_runs_staging_dir_is_swept(tmp_path: Path, shm_root: Path, heartbeat: str | None) -> None:
    run = run_with_state(tmp_path / "run", "dead", heartbeat)
    folder = staging(shm_root, "dead", run, slots=("slot-0", "slot-1"))

    done = gc("--grace", "0")
    assert done.returncode == 0, done.stderr
    assert not folder.exists()
    assert f"removed {folder}" in done.stdout and NO_DAEMON in done.stdout, done.stdout
    assert run.is_dir() and RunPaths(run).state.exists(), "the run dir itself is not touched"


def test_a_live_daemon_keeps_its_dir_and_a_killed_ones_goes_once_its_heartbeat_is_stale(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run)
    (folder,) = [p for p in shm_root.iterdir() if p.name.startswith("ckptd-")]
    assert json.loads((folder / MARKER).read_text())["run_dir"] == str(run)
    (folder / "slot-0").mkdir()
    (folder / "slot-0" / "tensors.safetensors").write_bytes(SLOT_BYTES)
    # (c) a live daemon: its fresh heartbeat keeps its staging dir, for gc and another's start.
    assert "nothing to sweep" in gc("--grace", "0").stdout and folder.exists()
    other = run_with_state(tmp_path / "other", "other")
    assert sweep.sweep_at_start(other, shm_root / "ckptd-other", root=shm_root, grace=0) == []
    assert (folder / "slot-0" / "tensors.safetensors").read_bytes() == SLOT_BYTES

    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    old = time.time() - 60  # as if STALE_AFTER_S had passed since the kill
    os.utime(RunPaths(run).status, (old, old))
    done = gc("--grace", "0")
    assert done.returncode == 0 and not folder.exists(), done.stdout + done.stderr
    assert NO_DAEMON in done.stdout
    assert run.is_dir(), "the run still exists: only its slots went"


# -- (b) a pending ack keeps what it names --------------------------------------------------------


def test_a_pending_ack_keeps_its_slot_and_the_dir(tmp_path: Path, shm_root: Path) -> None:
    run, folder = dead_run(tmp_path, shm_root, "acked", slots=("slot-0", "slot-1"))
    (folder / "slot-0" / "tensors.safetensors").write_bytes(SLOT_BYTES)
    (folder / "slot-0" / "structure.json").write_text('{"format": 1}')
    pending = ack(run, "slot-0")

    done = gc("--grace", "0")
    assert done.returncode == 0, done.stderr
    assert not (folder / "slot-1").exists(), "a slot no ack names goes"
    assert f"removed {folder / 'slot-1'}" in done.stdout and NO_DAEMON in done.stdout
    assert (folder / "slot-0" / "tensors.safetensors").read_bytes() == SLOT_BYTES
    assert (folder / "slot-0" / "structure.json").read_text() == '{"format": 1}'
    assert (folder / MARKER).exists() and pending.exists()

    assert "nothing to sweep" in gc("--grace", "0").stdout, "never the dir holding an acked snapshot"
    assert (folder / "slot-0" / "tensors.safetensors").read_bytes() == SLOT_BYTES

    pending.unlink()  # what a daemon does once the snapshot is in the store
    assert gc("--grace", "0").returncode == 0 and not folder.exists()


def test_an_ack_naming_a_disk_slot_does_not_keep_the_shm_dir(tmp_path: Path, shm_root: Path) -> None:
    run, folder = dead_run(tmp_path, shm_root, "ondisk")
    ack(run, "disk-0")
    orphans, _unknown = sweep.find_orphans(shm_root, grace=0)
    assert [o.path for o in orphans] == [folder] and NO_DAEMON in orphans[0].why


# -- (c) a live daemon or trainer, or one that cannot be told ---------------------------------------


def test_a_daemon_holding_the_run_lock_keeps_it_without_a_heartbeat(tmp_path: Path, shm_root: Path) -> None:
    """A daemon catching up on a long log holds the lock and has written no heartbeat yet."""
    run, folder = dead_run(tmp_path, shm_root, "catchup")
    with flocked(RunPaths(run).lock):
        assert swept_paths(shm_root) == []
    assert swept_paths(shm_root) == [folder]


def test_a_trainer_holding_the_client_lock_keeps_it(tmp_path: Path, shm_root: Path) -> None:
    """A trainer may be filling a slot (its mappings pin the memory anyway)."""
    run, folder = dead_run(tmp_path, shm_root, "trainer")
    with flocked(RunPaths(run).client_lock):
        assert swept_paths(shm_root) == []
    assert swept_paths(shm_root) == [folder]


def test_a_fresh_heartbeat_keeps_it(tmp_path: Path, shm_root: Path) -> None:
    staging(shm_root, "beating", run_with_state(tmp_path / "beating", "beating", "fresh"))
    assert swept_paths(shm_root) == []


@pytest.mark.parametrize(
    "state",
    [b"{not json", b'{"run_id": 7}', b"[]", b'{"other": 1}'],
    ids=["garbage", "ill-typed", "list", "no-id"],
)
def test_a_state_that_cannot_be_read_keeps_it(tmp_path: Path, shm_root: Path, state: bytes) -> None:
    run, _folder = dead_run(tmp_path, shm_root, "unsure")
    RunPaths(run).state.write_bytes(state)
    assert swept_paths(shm_root) == []


def test_remove_judges_again(tmp_path: Path, shm_root: Path) -> None:
    """A daemon started (or an ack written) between finding and removing keeps the dir."""
    run, folder = dead_run(tmp_path, shm_root, "restarted")
    (orphan,), _unknown = sweep.find_orphans(shm_root, grace=0)
    ack(run, "slot-0")
    assert sweep.remove(orphan) is False and (folder / "slot-0").exists()
    RunPaths(run).acks.joinpath("5.json").unlink()
    os.utime(RunPaths(run).status)  # a fresh heartbeat
    assert sweep.remove(orphan) is False and folder.exists()
    old = time.time() - 60
    os.utime(RunPaths(run).status, (old, old))
    assert sweep.remove(orphan) is True and not folder.exists()


# -- (d) a daemon's start ---------------------------------------------------------------------------


def test_sweep_at_start_never_removes_its_own_staging_dir(tmp_path: Path, shm_root: Path) -> None:
    own_run = run_with_state(tmp_path / "own", "own")  # starting: no heartbeat yet
    # Its own dir, whatever its marker says (here: a run that is gone, which gc would sweep).
    own = staging(shm_root, "own", tmp_path / "deleted-run")
    # A dir naming the caller's run and run id: the caller is that run's live daemon.
    alias = shm_root / "ckptd-alias"
    alias.mkdir()
    mark(alias, own_run, "own")
    _other_run, other = dead_run(tmp_path, shm_root, "other")
    gone = staging(shm_root, "gone", tmp_path / "also-deleted")

    removed = sweep.sweep_at_start(own_run, own, root=shm_root, grace=0)
    assert sorted(o.path for o in removed) == sorted([other, gone])
    assert own.exists() and (own / "slot-0" / "tensors.safetensors").exists()
    assert alias.exists()
    assert not other.exists() and not gone.exists()
    assert sweep.sweep_at_start(own_run, own, root=shm_root, grace=0) == []


def test_sweep_at_start_keeps_the_grace_period(tmp_path: Path, shm_root: Path) -> None:
    own_run = run_with_state(tmp_path / "own", "own")
    _run, other = dead_run(tmp_path, shm_root, "other")
    assert sweep.sweep_at_start(own_run, shm_root / "ckptd-own", root=shm_root) == []
    assert other.exists()


def test_sweep_at_start_removes_its_runs_idle_disk_slots(tmp_path: Path, shm_root: Path) -> None:
    own_run = run_with_state(tmp_path / "own", "own")
    disk = disk_staging_dir(RunPaths(own_run))
    assert disk == own_run / ".ckptd" / "staging"
    for name in ("disk-0", "disk-1", "keep-me"):
        (disk / name).mkdir(parents=True)
        (disk / name / "tensors.safetensors").write_bytes(SLOT_BYTES)
    ack(own_run, "disk-0")
    own = staging(shm_root, "own", own_run)

    with flocked(RunPaths(own_run).client_lock):  # a trainer is running: it may be filling one
        assert sweep.sweep_at_start(own_run, own, root=shm_root, grace=0) == []
    assert (disk / "disk-1").exists()

    removed = sweep.sweep_at_start(own_run, own, root=shm_root, grace=0)
    assert [o.path for o in removed] == [disk / "disk-1"]
    assert (disk / "disk-0" / "tensors.safetensors").read_bytes() == SLOT_BYTES, "an acked disk slot stays"
    assert (disk / "keep-me").exists() and own.exists()


def test_sweep_at_start_never_raises(
    tmp_path: Path, shm_root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    own_run = run_with_state(tmp_path / "own", "own")
    dead_run(tmp_path, shm_root, "other")
    (disk_staging_dir(RunPaths(own_run)) / "disk-1").mkdir(parents=True)

    def broken(_path: Path) -> int:
        raise RuntimeError("planted")

    monkeypatch.setattr(sweep, "allocated_bytes", broken)
    with caplog.at_level(logging.WARNING, logger="ckptd.sweep"):
        assert sweep.sweep_at_start(own_run, shm_root / "ckptd-own", root=shm_root, grace=0) == []
    assert "planted" in caplog.text
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.undo()
    assert sweep.sweep_at_start(tmp_path / "nowhere", not_a_dir, root=not_a_dir, grace=0) == []


# -- (e) links are never followed ------------------------------------------------------------------


def test_a_linked_staging_dir_is_never_followed(tmp_path: Path, shm_root: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    # What the link points at looks like the staging dir of a dead run: followed, it would go.
    _run, target = dead_run(tmp_path, outside, "target")
    (shm_root / "ckptd-target").symlink_to(target)
    own_run = run_with_state(tmp_path / "own", "own")

    assert "nothing to sweep" in gc("--grace", "0").stdout
    assert sweep.sweep_at_start(own_run, shm_root / "ckptd-own", root=shm_root, grace=0) == []
    assert (target / "slot-0" / "tensors.safetensors").exists() and (shm_root / "ckptd-target").is_symlink()


@pytest.mark.parametrize("acked", [False, True], ids=["whole-dir", "slots-only"])
def test_a_linked_slot_is_never_followed(tmp_path: Path, shm_root: Path, acked: bool) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data").write_text("keep me")
    run, folder = dead_run(tmp_path, shm_root, "links")
    (folder / "slot-1").symlink_to(precious, target_is_directory=True)
    if acked:
        ack(run, "slot-0")

    assert gc("--grace", "0").returncode == 0
    assert (precious / "data").read_text() == "keep me"
    assert folder.exists() == acked
    if acked:
        assert (folder / "slot-1").is_symlink() and (folder / "slot-0").exists()


def test_linked_disk_staging_and_disk_slots_are_never_followed(tmp_path: Path, shm_root: Path) -> None:
    precious = tmp_path / "precious"
    (precious / "disk-1").mkdir(parents=True)
    (precious / "disk-1" / "data").write_text("keep me")
    own_run = run_with_state(tmp_path / "own", "own")
    disk = disk_staging_dir(RunPaths(own_run))
    disk.symlink_to(precious, target_is_directory=True)
    own = staging(shm_root, "own", own_run)
    assert sweep.sweep_at_start(own_run, own, root=shm_root, grace=0) == []
    assert (precious / "disk-1" / "data").read_text() == "keep me"

    disk.unlink()
    disk.mkdir()
    (disk / "disk-1").symlink_to(precious / "disk-1", target_is_directory=True)
    assert sweep.sweep_at_start(own_run, own, root=shm_root, grace=0) == []
    assert (precious / "disk-1" / "data").read_text() == "keep me" and (disk / "disk-1").is_symlink()


def test_a_linked_acks_folder_or_ack_keeps_the_dir(tmp_path: Path, shm_root: Path) -> None:
    run, folder = dead_run(tmp_path, shm_root, "linkedacks")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    RunPaths(run).acks.symlink_to(elsewhere, target_is_directory=True)
    assert swept_paths(shm_root) == []
    RunPaths(run).acks.unlink()
    RunPaths(run).acks.mkdir()
    (RunPaths(run).acks / "6.json").symlink_to(ack(tmp_path / "other-run", "slot-9", "6"))
    assert swept_paths(shm_root) == []
    (RunPaths(run).acks / "6.json").unlink()
    assert swept_paths(shm_root) == [folder]


# -- (f) an ack that cannot be read keeps the dir ----------------------------------------------------


def _garbage(acks: Path) -> None:
    (acks / "5.json").write_bytes(b"{not json")


def _other_version(acks: Path) -> None:
    (acks / "5.json").write_text(json.dumps({"protocol": 2, "slot": "slot-0"}))


def _no_slot(acks: Path) -> None:
    (acks / "5.json").write_text(json.dumps({"protocol": 1, "name": "5", "captured_step": 1, "files": {}}))


def _fifo(acks: Path) -> None:
    os.mkfifo(acks / "5.json")  # never waited on


def _huge(acks: Path) -> None:
    (acks / "5.json").write_bytes(b" " * (2 << 20))


@pytest.mark.parametrize("plant", [_garbage, _other_version, _no_slot, _fifo, _huge])
def test_an_ack_that_cannot_be_read_keeps_the_dir(
    tmp_path: Path, shm_root: Path, plant: Callable[[Path], None]
) -> None:
    run, folder = dead_run(tmp_path, shm_root, "corrupt", slots=("slot-0", "slot-1"))
    acks = RunPaths(run).acks
    acks.mkdir()
    plant(acks)

    assert "nothing to sweep" in gc("--grace", "0").stdout
    assert (folder / "slot-0").exists() and (folder / "slot-1").exists(), "no slot goes either"

    os.rename(acks / "5.json", acks / "5.json.rejected")  # what the next daemon start does
    assert gc("--grace", "0").returncode == 0 and not folder.exists()


def test_other_users_dirs_are_not_swept_at_start(
    tmp_path: Path, shm_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    own_run = run_with_state(tmp_path / "own", "own")
    _run, other = dead_run(tmp_path, shm_root, "other")
    monkeypatch.setattr(os, "geteuid", lambda: os.lstat(other).st_uid + 1)
    assert sweep.sweep_at_start(own_run, shm_root / "ckptd-own", root=shm_root, grace=0) == []
    assert other.exists()


def test_a_run_dir_deleted_still_sweeps_its_dir(tmp_path: Path, shm_root: Path) -> None:
    """The rule before this one still holds: acks of a run dir that is gone go with it."""
    run, folder = dead_run(tmp_path, shm_root, "deleted")
    ack(run, "slot-0")
    shutil.rmtree(run)
    assert swept_paths(shm_root) == [folder]
