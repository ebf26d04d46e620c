"""The ``ckptd`` command line as a user meets it: exit codes, messages, --json, several criteria."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ckptd.config import RunConfig, parse_best
from ckptd.errors import ConfigError
from ckptd.records import Criterion
from ckptd.store import Store
from tests.conftest import PROGRAMS, wait_for


def ckptd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptd", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("eval_loss", (Criterion("eval_loss", "min"), 1)),
        ("eval_accuracy", (Criterion("eval_accuracy", "max"), 1)),
        ("eval_loss:max", (Criterion("eval_loss", "max"), 1)),
        ("eval_acc:max:3", (Criterion("eval_acc", "max"), 3)),
        ("eval_loss:2", (Criterion("eval_loss", "min"), 2)),
        ("eval/loss:min", (Criterion("eval/loss", "min"), 1)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_best_specs_parse(spec: str, expected: tuple[Criterion, int]) -> None:
    assert parse_best(spec) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"best": ["eval_loss:sideways"]}, "mode must be 'min' or 'max'"),
        ({"best": ["eval_loss:min:0"]}, "keep at least 1"),
        ({"best": ["eval_loss", "eval_loss:max"]}, "each metric may be watched once"),
        ({"best": []}, "watch at least one metric"),
        ({"keep_last": -1}, "--keep-last must be >= 0"),
        ({"every_steps": 0}, "--every-steps must be >= 1"),
        ({"keep_every": 0}, "--keep-every must be >= 1"),
        ({"poll_interval": 0}, "--poll-interval must be a number of seconds > 0"),
        ({"min_delta": -1.0}, "--min-delta must be a finite number >= 0"),
        ({"store": "."}, "cannot be the run directory"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_settings_are_refused_with_a_clear_message(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.build(tmp_path, **kwargs)  # type: ignore[arg-type]


def test_help_teaches_the_options() -> None:
    done = ckptd("run", "--help")
    assert done.returncode == 0
    for option in ("--best", "--keep-best", "--keep-last", "--every-steps", "--store", "--poll", "--format"):
        assert option in done.stdout
    assert "examples:" in ckptd("--help").stdout


def test_bad_option_value_exits_2_and_says_why(tmp_path: Path) -> None:
    done = ckptd("run", str(tmp_path), "--keep-last", "-3")
    assert done.returncode == 2
    assert "--keep-last must be >= 0" in done.stderr


def test_queries_on_a_missing_run_dir_exit_2(tmp_path: Path) -> None:
    for command in ("ls", "best"):
        done = ckptd(command, str(tmp_path / "nope"))
        assert done.returncode == 2, command
        assert "does not exist" in done.stderr


def test_best_without_checkpoints_exits_1_with_a_message(tmp_path: Path) -> None:
    done = ckptd("best", str(tmp_path))
    assert done.returncode == 1
    assert done.stdout == ""
    assert "no checkpoint with a finite eval_loss" in done.stderr


def test_two_criteria_share_one_checkpoint_and_keep_their_own_bests(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run, "--best", "eval_loss:min", "--best", "eval_acc:max:2", "--keep-last", "0")
    evals = [
        {"step": 10, "eval_loss": 1.0, "eval_acc": 0.5},  # best on both: stored once, two tags
        {"step": 20, "eval_loss": 0.8, "eval_acc": 0.4},  # best loss only
        {"step": 30, "eval_loss": 0.9, "eval_acc": 0.7},  # best acc only
        {"step": 40, "eval_loss": 0.95, "eval_acc": 0.6},  # neither
    ]
    trainer = subprocess.run(
        [sys.executable, str(PROGRAMS / "scripted_trainer.py"), str(run), json.dumps(evals)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert trainer.returncode == 0, trainer.stderr
    assert json.loads(trainer.stdout) == [10, 20, 30]
    assert daemon.stop() == 0, daemon.log()
    kept = {r.step: r for r in Store(run / "checkpoints").list()}
    # eval_loss keeps its best (20); eval_acc keeps its best 2 (30 and 10); 40 was never captured.
    assert set(kept) == {10, 20, 30}
    assert kept[10].tags == ("best:eval_loss", "best:eval_acc")
    assert kept[20].tags == ("best:eval_loss",)
    assert kept[30].tags == ("best:eval_acc",)
    best_acc = ckptd("best", str(run), "--metric", "eval_acc:max")
    assert best_acc.stdout.strip().endswith("step-00000030")
    assert ckptd("best", str(run)).stdout.strip().endswith("step-00000020")  # the first criterion


def test_status_tells_a_live_daemon_from_a_stopped_one(tmp_path: Path, daemons, shm_root: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert ckptd("status", str(run)).returncode == 1  # never followed
    daemon = daemons(run)
    (run / "logging.jsonl").write_text(json.dumps({"step": 5, "eval_loss": 0.5}) + "\n")

    def reported() -> dict[str, object]:
        return json.loads(ckptd("status", str(run), "--json").stdout)

    wait_for(lambda: reported().get("bests", {}).get("eval_loss", {}).get("step") == 5, what="a heartbeat")
    live = ckptd("status", str(run))
    assert live.returncode == 0 and "running" in live.stdout and "eval_loss 0.5 at step 5" in live.stdout
    assert reported()["pid"] == daemon.proc.pid and reported()["alive"] is True
    assert daemon.stop() == 0
    stopped = ckptd("status", str(run), "--json")
    assert stopped.returncode == 1
    assert json.loads(stopped.stdout)["alive"] is False and json.loads(stopped.stdout)["state"] == "stopped"


def test_verify_finds_a_flipped_byte(tmp_path: Path) -> None:
    store = Store(tmp_path / "checkpoints")
    source = tmp_path / "blob"
    source.write_bytes(b"x" * 1000)
    for step in (100, 200):
        with store.writing(step) as pending:
            pending.copy_in("tensors.safetensors", source, 1000)
            store.commit(pending, {"tags": []})
    assert ckptd("verify", str(tmp_path)).returncode == 0
    target = store.path_of("step-00000200") / "tensors.safetensors"
    data = bytearray(target.read_bytes())
    data[500] ^= 1
    target.write_bytes(bytes(data))
    done = ckptd("verify", str(tmp_path))
    assert done.returncode == 5
    assert "step-00000100  ok" in done.stdout
    assert "step-00000200  CORRUPT: tensors.safetensors: xxh3_128 mismatch" in done.stdout
    report = json.loads(ckptd("verify", str(tmp_path), "step-00000200", "--json").stdout)
    assert report == [
        {"name": "step-00000200", "ok": False, "problems": ["tensors.safetensors: xxh3_128 mismatch"]}
    ]


def test_verify_checks_a_checkpoint_an_older_ckptd_wrote_with_sha256(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints" / "step-00000100"
    folder.mkdir(parents=True)
    data = bytes(range(256)) * 40
    (folder / "tensors.safetensors").write_bytes(data)
    entry = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"format": 1, "step": 100, "tags": [], "metrics": {}, "bytes": len(data), "created": 1.0}
    (folder / "MANIFEST.json").write_text(json.dumps({**manifest, "files": {"tensors.safetensors": entry}}))
    done = ckptd("verify", str(tmp_path))
    assert done.returncode == 0 and "step-00000100  ok" in done.stdout, done.stdout + done.stderr
    (folder / "tensors.safetensors").write_bytes(data[:100] + b"\xff" + data[101:])
    done = ckptd("verify", str(tmp_path))
    assert done.returncode == 5
    assert "step-00000100  CORRUPT: tensors.safetensors: sha256 mismatch" in done.stdout


def test_verify_help_names_both_checksums() -> None:
    text = " ".join(ckptd("verify", "--help").stdout.split())
    assert "xxh3_128" in text and "sha256" in text
