"""Issue 7, the CLI's part: what a user sees when the mode, the store or an option is wrong.

Each test is named after its item (``issue7_NN``) and runs the real ``ckptd`` in a subprocess
against real files; none would pass on the code before the fix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ckptd.protocol import RunPaths
from ckptd.store import MANIFEST, Store


def ckptd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptd", *args], capture_output=True, text=True, timeout=timeout
    )


def commit(store: Store, step: int, metrics: dict[str, float], **manifest: Any) -> str:
    source = store.root.parent / "blob"
    source.write_bytes(b"w" * 64)
    with store.writing(step) as pending:
        pending.copy_in("tensors.safetensors", source, 64)
        return store.commit(pending, {"tags": [], "metrics": metrics, **manifest}).name


def write_state(run: Path, criteria: list[str]) -> None:
    RunPaths(run).meta.mkdir(parents=True, exist_ok=True)
    RunPaths(run).state.write_text(json.dumps({"format": 1, "criteria": criteria}))


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def wer_run(tmp_path: Path) -> Path:
    """A run whose eval_wer is best (lowest) at step 200 and worst at step 300."""
    run = tmp_path / "run"
    run.mkdir()
    store = Store(RunPaths(run).default_store)
    for step, wer in ((100, 0.30), (200, 0.10), (300, 0.50)):
        commit(store, step, {"eval_wer": wer, "eval_acc": 1 - wer})
    return run


# -- 11: best follows the daemon's mode, not the metric's name --------------------------------


def test_issue7_11_best_uses_the_mode_recorded_in_state_json(wer_run: Path) -> None:
    write_state(wer_run, ["eval_acc:max", "eval_wer:min"])
    done = ckptd("best", str(wer_run), "--metric", "eval_wer")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("step-00000200")  # the name alone would say max: step 300
    assert "guess" not in done.stderr


def test_issue7_11_best_uses_the_mode_in_the_newest_manifest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    store = Store(RunPaths(run).default_store)
    commit(store, 100, {"eval_wer": 0.3}, criteria={"eval_wer": "max"})  # older, overruled
    commit(store, 200, {"eval_wer": 0.1}, criteria={"eval_wer": "min"})
    commit(store, 300, {"eval_wer": 0.5})  # newest, but records no criteria
    done = ckptd("best", str(run), "--metric", "eval_wer")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("step-00000200")
    assert "guess" not in done.stderr


def test_issue7_11_best_falls_back_to_the_name_and_says_so(wer_run: Path) -> None:
    done = ckptd("best", str(wer_run), "--metric", "eval_wer")
    assert done.returncode == 0
    assert done.stdout.strip().endswith("step-00000300")  # max, from the name
    assert "no mode recorded for eval_wer" in done.stderr and "guessing max" in done.stderr


def test_issue7_11_an_explicit_mode_wins_over_what_was_recorded(wer_run: Path) -> None:
    write_state(wer_run, ["eval_wer:min"])
    assert ckptd("best", str(wer_run), "--mode", "max").stdout.strip().endswith("step-00000300")
    by_metric = ckptd("best", str(wer_run), "--metric", "eval_wer:max", "--json")
    assert json.loads(by_metric.stdout)["step"] == 300
    assert ckptd("best", str(wer_run)).stdout.strip().endswith("step-00000200")  # the state's first
    clash = ckptd("best", str(wer_run), "--metric", "eval_wer:min", "--mode", "max")
    assert clash.returncode == 2 and "disagree" in clash.stderr


# -- 12: a corrupt manifest is a verification failure ----------------------------------------


def _garbage(path: Path) -> None:
    path.write_text("{not json")


def _unknown_format(path: Path) -> None:
    path.write_text('{"format": 99}')


def _bad_step(path: Path) -> None:
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, "step": "two hundred"}))


def _missing(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize("damage", [_garbage, _unknown_format, _bad_step, _missing], ids=lambda f: f.__name__)
def test_issue7_12_corrupt_manifest_fails_verify(wer_run: Path, damage: Any) -> None:
    store = Store(RunPaths(wer_run).default_store)
    damage(store.path_of("step-00000200") / MANIFEST)
    done = ckptd("verify", str(wer_run))
    assert done.returncode == 5, done.stdout + done.stderr
    assert "step-00000100  ok" in done.stdout and "step-00000300  ok" in done.stdout
    assert "step-00000200  CORRUPT: manifest" in done.stdout
    report = json.loads(ckptd("verify", str(wer_run), "--json").stdout)
    assert [(r["name"], r["ok"]) for r in report] == [
        ("step-00000100", True),
        ("step-00000200", False),
        ("step-00000300", True),
    ]
    assert report[1]["problems"][0].startswith("manifest")
    named = ckptd("verify", str(wer_run), "step-00000200")
    assert named.returncode == 5 and "CORRUPT: manifest" in named.stdout


def test_issue7_12_verify_of_a_name_not_in_the_store_is_a_usage_error(wer_run: Path) -> None:
    done = ckptd("verify", str(wer_run), "step-00000999")
    assert done.returncode == 2
    assert "no checkpoint named step-00000999" in done.stderr


# -- 14: every option is checked before anything is created ----------------------------------

BAD_OPTIONS = [
    ("--step-key", "a..b"),
    ("--step-key", ".step"),
    ("--step-key", "step."),
    ("--step-key", ""),
    ("--poll-interval", "nan"),
    ("--poll-interval", "inf"),
    ("--poll-interval", "0"),
    ("--poll-interval", "-1"),
    ("--poll-interval", "3600"),
    ("--min-delta", "nan"),
    ("--min-delta", "inf"),
    ("--min-delta", "-1"),
    ("--keep-best", "0"),
]

SAYS = {  # what each refusal explains
    "--step-key": "no empty part",
    "--poll-interval": "> 0 and <= 60",
    "--min-delta": "finite number >= 0",
    "--keep-best": "keep at least 1",
}


@pytest.mark.parametrize(("option", "value"), BAD_OPTIONS, ids=[f"{o}={v}" for o, v in BAD_OPTIONS])
def test_issue7_14_a_bad_option_exits_2_and_creates_nothing(
    tmp_path: Path, shm_root: Path, option: str, value: str
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "logging.jsonl").write_text('{"step": 1, "eval_loss": 0.5}\n')
    before = tree(tmp_path)
    # Before the fix some of these started a daemon that never stopped: the timeout tells.
    done = ckptd("run", str(run), option, value, timeout=15)
    assert done.returncode == 2, done.stderr
    assert f"ckptd: {option}" in done.stderr and SAYS[option] in done.stderr
    assert tree(tmp_path) == before
    assert list(shm_root.iterdir()) == []


def test_issue7_14_a_bad_option_does_not_create_a_missing_run_dir(tmp_path: Path, shm_root: Path) -> None:
    done = ckptd("run", str(tmp_path / "run"), "--step-key", "a..b", timeout=15)
    assert done.returncode == 2 and "--step-key" in done.stderr
    assert not (tmp_path / "run").exists()
    assert list(shm_root.iterdir()) == []


# -- 16: messages that mislead --------------------------------------------------------------


def test_issue7_16_second_daemon_is_told_to_stop_the_first_never_to_remove_the_lock(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    first = daemons(run)
    second = ckptd("run", str(run))
    assert second.returncode == 3
    assert f"stop it first (pid {first.proc.pid} on " in second.stderr
    assert "remove" not in second.stderr and "lock" not in second.stderr


@pytest.mark.parametrize("command", ["ls", "best", "status", "verify"])
def test_issue7_16_a_file_as_run_dir_is_called_a_file(tmp_path: Path, command: str) -> None:
    not_a_dir = tmp_path / "logging.jsonl"
    not_a_dir.write_text("")
    done = ckptd(command, str(not_a_dir))
    assert done.returncode == 2
    assert "is a file, not a run directory" in done.stderr


def test_issue7_16_keep_best_0_names_keep_best(tmp_path: Path) -> None:
    done = ckptd("run", str(tmp_path), "--keep-best", "0")
    assert done.returncode == 2
    assert "--keep-best" in done.stderr and "--best" not in done.stderr.replace("--keep-best", "")


def test_issue7_16_store_errors_name_the_operation_and_the_path(tmp_path: Path) -> None:
    (tmp_path / "not-a-store").write_text("")
    for command in ("ls", "best", "verify"):
        done = ckptd(command, str(tmp_path), "--store", "not-a-store")
        assert done.returncode == 4, command
        assert f"cannot list the store {tmp_path / 'not-a-store'}: Not a directory" in done.stderr
        assert "[Errno" not in done.stderr


def test_issue7_16_status_after_a_kill_says_it_was_killed_or_crashed(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemons(run).stop(signal.SIGKILL)
    # The heartbeat goes stale on its own after 5 s; ageing the file says the same sooner.
    old = time.time() - 60
    os.utime(RunPaths(run).status, (old, old))
    done = ckptd("status", str(run))
    assert done.returncode == 1
    assert "not running (the daemon stopped without saying so: killed or crashed; last heartbeat 6" in (
        done.stdout
    )
    assert "(running)" not in done.stdout


@pytest.mark.parametrize("command", ["ls", "verify"])
def test_issue7_16_an_empty_store_exits_1_for_people_and_scripts(tmp_path: Path, command: str) -> None:
    table = ckptd(command, str(tmp_path))
    assert table.returncode == 1 and "no checkpoints in" in table.stderr and table.stdout == ""
    as_json = ckptd(command, str(tmp_path), "--json")
    assert as_json.returncode == 1 and json.loads(as_json.stdout) == []


def test_issue7_16_run_on_a_missing_run_dir_warns_and_waits(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "typo"
    daemon = daemons(run)
    assert daemon.stop() == 0
    assert f"WARNING {run} does not exist yet; created it and waiting for {run / 'logging.jsonl'}" in (
        daemon.log()
    )


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs: root ignores permission bits, not a read-only mount."""
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(mount_point)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.parametrize("store_name", ["", "checkpoints"], ids=["store-is-the-mount", "store-to-create"])
def test_issue7_16_a_read_only_store_is_refused_at_start(
    tmp_path: Path, read_only_dir: Path, shm_root: Path, store_name: str
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    store = read_only_dir / store_name
    done = ckptd("run", str(run), "--store", str(store), timeout=15)
    assert done.returncode == 2, done.stderr
    assert f"cannot write the store {store.resolve()}" in done.stderr
    assert list(run.iterdir()) == [] and list(shm_root.iterdir()) == []


@pytest.mark.parametrize("command", ["run", "ls", "best", "status", "verify"])
def test_issue7_help_says_the_exit_codes(command: str) -> None:
    done = ckptd(command, "--help")
    assert done.returncode == 0
    assert "exit status:" in done.stdout and "  2  " in done.stdout
