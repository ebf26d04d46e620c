"""Regression tests for the daemon-side defects of issue 7, each against a real daemon.

Each test is named after its finding (``issue7_NN``) and fails on the code before the fix:
the best lost after a crash, shared and copied stores, hostile ids, badly typed files, lost
slots, evals at one step, resumed runs.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ckptd.protocol import PROTOCOL_VERSION, RunPaths, atomic_write_json, pending_ack_paths, read_control
from ckptd.store import TMP_PREFIX, Store
from tests.conftest import PROGRAMS, wait_for

pytestmark = pytest.mark.slow


def append_lines(log: Path, *records: dict[str, object]) -> None:
    with log.open("a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def verdict(paths: RunPaths) -> tuple[int, str] | None:
    try:
        control = read_control(paths.control)
    except (FileNotFoundError, ValueError):
        return None
    return None if control.verdict is None else (control.verdict.eval_step, control.verdict.action)


def status(run: Path) -> dict[str, object]:
    return json.loads(RunPaths(run).status.read_text())


def ckptd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptd", *args], capture_output=True, text=True, timeout=60)


def scripted(run: Path, evals: list[dict[str, object]]) -> list[int]:
    done = subprocess.run(
        [sys.executable, str(PROGRAMS / "scripted_trainer.py"), str(run), json.dumps(evals)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


# -- 1: the best survives a crash mid-persist ---------------------------------------------------


def test_issue7_01_best_killed_mid_persist_stays_best_through_worse_periodic_captures(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    store = Store(run / "checkpoints")
    args = ("--keep-last", "1", "--every-steps", "10")
    daemon = daemons(run, *args)
    capture = subprocess.run(
        [sys.executable, str(PROGRAMS / "capture_eval.py"), str(run), "5", "0.25", "512"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert capture.returncode == 0, capture.stderr
    wait_for(lambda: any(p.name.startswith(TMP_PREFIX) for p in store.root.iterdir()), what="persist")
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    assert store.list() == []

    restarted = daemons(run, *args)
    wait_for(lambda: len(store.list()) == 1, timeout=60, what="the redone persist")
    (best,) = store.list()
    assert best.step == 5 and best.metrics == {"eval_loss": 0.25}, "the manifest must keep the eval"
    assert "best:eval_loss" in best.tags
    # Worse evals, and periodic captures that push keep-last past the best.
    captured = scripted(run, [{"step": s, "eval_loss": 0.5 + s / 1000} for s in (10, 20, 30)])
    assert captured == [10, 20, 30]
    wait_for(lambda: not pending_ack_paths(RunPaths(run)), what="the periodic persists")
    assert restarted.stop() == 0, restarted.log()
    assert {r.step for r in store.list()} == {5, 30}, restarted.log()
    shown = ckptd("best", str(run))
    assert shown.returncode == 0 and shown.stdout.strip() == str(store.path_of(best.name))


def test_issue7_01_retention_never_deletes_the_state_best_even_without_metrics(tmp_path: Path) -> None:
    from ckptd.daemon.persister import Persister
    from ckptd.policy import LatestN

    store = Store(tmp_path / "store")
    for step in (5, 10, 20):
        with store.writing(step) as pending:
            store.commit(pending, {"run_id": "run1", "tags": [], "metrics": {}})
    persister = Persister(
        store,
        tmp_path / "staging",
        LatestN(1),
        "run1",
        lambda outcome: None,
        criteria={"eval_loss": "min"},
        lineage=frozenset({"run1"}),
        best_steps=lambda: frozenset({5}),
    )
    assert persister.rotate() == ("step-00000010",)
    assert [r.step for r in store.list()] == [5, 20]


def test_issue7_01_an_eval_at_step_zero_is_the_ack_eval_step() -> None:
    from ckptd.protocol import Ack

    late = Ack(name="3", captured_step=2, slot="slot-0", files={}, requested_step=0)
    assert late.eval_step == 0


# -- 2: one store, two runs -----------------------------------------------------------------------


def test_issue7_02_a_second_run_on_the_same_store_is_refused(tmp_path: Path, daemons, shm_root: Path) -> None:
    shared = tmp_path / "shared-store"
    run_a, run_b = tmp_path / "runA", tmp_path / "runB"
    run_a.mkdir()
    run_b.mkdir()
    first = daemons(run_a, "--store", str(shared))
    refused = ckptd("run", str(run_b), "--store", str(shared))
    assert refused.returncode == 2, refused.stderr
    assert "belongs to run" in refused.stderr and str(run_a) in refused.stderr
    assert first.proc.poll() is None
    assert len(list(shm_root.iterdir())) == 1, "the refused run left a staging dir behind"


def test_issue7_02_retention_only_touches_its_own_runs_checkpoints(tmp_path: Path) -> None:
    from ckptd.daemon.persister import Persister
    from ckptd.policy import LatestN

    store = Store(tmp_path / "store")
    for step, run_id in ((1, "other"), (2, "mine"), (3, "mine")):
        with store.writing(step) as pending:
            store.commit(pending, {"run_id": run_id, "tags": [], "metrics": {}})
    persister = Persister(
        store,
        tmp_path / "staging",
        LatestN(1),
        "mine",
        lambda outcome: None,
        criteria={},
        lineage=frozenset({"mine"}),
        best_steps=frozenset,
    )
    assert persister.rotate() == ("step-00000002",)
    assert [r.step for r in store.list()] == [1, 3]


def test_issue7_02_a_store_whose_run_dir_is_gone_is_adopted(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.ensure()
    gone = tmp_path / "gone"
    gone.mkdir()
    assert store.claim("aaa", gone) == {"aaa"}
    gone.rmdir()
    assert store.claim("bbb", tmp_path / "new") == {"aaa", "bbb"}


# -- 3: a copied run dir -------------------------------------------------------------------------


def test_issue7_03_a_copied_run_gets_its_own_id_and_sets_the_copied_acks_aside(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    original = tmp_path / "run"
    original.mkdir()
    daemons(original).stop()
    first_id = json.loads(RunPaths(original).state.read_text())["run_id"]
    ack = {
        "protocol": PROTOCOL_VERSION,
        "name": "7",
        "seq": 7,
        "requested_step": 20,
        "captured_step": 20,
        "slot": "slot-0",
        "files": {"tensors.safetensors": 8},
        "tags": ["best:eval_loss"],
        "reason": "",
        "metrics": {"eval_loss": 0.1},
        "token": "abc",
        "created": 1.0,
    }
    atomic_write_json(RunPaths(original).acks / "7.json", ack)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    second = daemons(copy)
    copy_id = json.loads(RunPaths(copy).state.read_text())["run_id"]
    assert copy_id != first_id
    assert read_control(RunPaths(copy).control).run_id == copy_id
    assert (RunPaths(copy).acks / "7.json.rejected").exists()
    assert "is a copy of" in second.log()
    assert (RunPaths(original).acks / "7.json").exists(), "the original run is untouched"
    assert second.stop() == 0


# -- 4: identifiers read from disk never become a path outside the roots ------------------------


def test_issue7_04_a_hostile_run_id_deletes_nothing_outside(tmp_path: Path, daemons, shm_root: Path) -> None:
    victim = shm_root / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    run = tmp_path / "run"
    RunPaths(run).meta.mkdir(parents=True)
    hostile = {"format": 1, "run_id": "x/../victim", "store": str(run / "checkpoints"), "seq": 0}
    RunPaths(run).state.write_text(json.dumps(hostile))
    daemon = daemons(run)
    assert daemon.stop() == 0
    assert (victim / "precious").read_text() == "keep me"
    assert "run_id" in daemon.log() and list(RunPaths(run).meta.glob("state.json.corrupt-*"))


# -- 5, 6: badly typed acks and state ------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [{"created": "yesterday"}, {"tags": 5}, {"metrics": [1]}, {"captured_step": 1e999}, {"name": "../x"}],
    ids=["created-str", "tags-int", "metrics-list", "step-inf", "name-path"],
)
def test_issue7_05_a_badly_typed_ack_is_set_aside_and_the_daemon_lives(
    tmp_path: Path, daemons, shm_root: Path, change: dict[str, object]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run)
    ack = {
        "protocol": PROTOCOL_VERSION,
        "name": "step-1",
        "captured_step": 1,
        "slot": "slot-0",
        "files": {},
        "created": 1.0,
        **change,
    }
    (RunPaths(run).acks / "step-1.json").write_text(json.dumps(ack).replace("Infinity", "1e999"))
    wait_for(lambda: (RunPaths(run).acks / "step-1.json.rejected").exists(), what="the ack set aside")
    wait_for(lambda: "rejected ack step-1.json" in str(status(run)["last_error"]), what="the report")
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0, daemon.log()


@pytest.mark.parametrize(
    "content",
    [
        "[1, 2]",
        '{"format": 1, "run_id": "abc", "store": "s", "judged_step": 1e999}',
        '{"format": 1}',
        "nul\0l",
    ],
    ids=["list", "judged-inf", "missing-fields", "garbage"],
)
def test_issue7_06_a_corrupt_state_is_set_aside(
    tmp_path: Path, daemons, shm_root: Path, content: str
) -> None:
    run = tmp_path / "run"
    RunPaths(run).meta.mkdir(parents=True)
    RunPaths(run).state.write_text(content)
    daemon = daemons(run)
    assert daemon.stop() == 0, daemon.log()
    (aside,) = RunPaths(run).meta.glob("state.json.corrupt-*")
    assert aside.read_text() == content
    assert json.loads(RunPaths(run).state.read_text())["format"] == 1


# -- 8: an ack whose slot is gone does not hold on forever ---------------------------------------


def test_issue7_08_an_ack_whose_slot_is_gone_is_set_aside_after_a_few_tries(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run)
    ack = {
        "protocol": PROTOCOL_VERSION,
        "name": "step-4",
        "captured_step": 4,
        "slot": "slot-1",
        "files": {"tensors.safetensors": 1024},
        "created": 1.0,
    }
    atomic_write_json(RunPaths(run).acks / "step-4.json", ack)
    wait_for(lambda: (RunPaths(run).acks / "step-4.json.rejected").exists(), timeout=15, what="set aside")
    assert "3 tries" in str(status(run)["last_error"]) or "3 tries" in daemon.log()
    assert Store(run / "checkpoints").list() == []
    assert daemon.stop() == 0


# -- 9, 10, 18: every new line judged once, by position -------------------------------------------


def test_issue7_09_a_second_metric_on_its_own_line_at_the_same_step_is_judged(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    log, paths = run / "logging.jsonl", RunPaths(run)
    daemon = daemons(run, "--best", "eval_a_loss:min", "--best", "eval_b_loss:min")
    append_lines(log, {"step": 100, "eval_a_loss": 0.5})
    wait_for(lambda: verdict(paths) == (100, "snapshot"), what="eval_a")
    seq = read_control(paths.control).seq
    append_lines(log, {"step": 100, "eval_b_loss": 0.9})
    wait_for(lambda: read_control(paths.control).seq > seq, what="eval_b judged")
    control = read_control(paths.control)
    assert control.verdict is not None and control.verdict.tags == ("best:eval_b_loss",)
    wait_for(lambda: set(status(run)["bests"]) == {"eval_a_loss", "eval_b_loss"}, what="both bests")
    assert daemon.stop() == 0


def test_issue7_10_a_bogus_huge_step_and_a_resume_do_not_silence_the_daemon(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    log, paths = run / "logging.jsonl", RunPaths(run)
    daemon = daemons(run)
    append_lines(log, {"step": 1000, "eval_loss": 0.5}, {"step": 10**15, "eval_loss": 0.9})
    wait_for(lambda: verdict(paths) == (10**15, "skip"), what="the bogus step judged")
    append_lines(log, {"step": 850, "eval_loss": 0.3})  # resumed from an earlier checkpoint
    wait_for(lambda: verdict(paths) == (850, "snapshot"), what="the resumed best")
    assert daemon.stop() == 0
    assert "resumed" in daemon.log()

    again = daemons(run)  # across a restart: nothing re-judged, the next line judged
    assert read_control(paths.control).verdict is None
    append_lines(log, {"step": 900, "eval_loss": 0.2})
    wait_for(lambda: verdict(paths) == (900, "snapshot"), what="judged after a restart")
    assert again.stop() == 0


def test_issue7_18_a_new_run_overwriting_the_log_is_judged(tmp_path: Path, daemons, shm_root: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    log, paths = run / "logging.jsonl", RunPaths(run)
    daemon = daemons(run)
    append_lines(log, *({"step": s, "eval_loss": 1.0 - s / 1000} for s in (100, 200, 300)))
    wait_for(lambda: verdict(paths) == (300, "snapshot"), what="the first run")
    log.write_text(json.dumps({"step": 50, "eval_loss": 0.1}) + "\n")  # `python train.py > log` again
    wait_for(lambda: verdict(paths) == (50, "snapshot"), what="the new run's better eval")
    assert daemon.stop() == 0


def test_issue7_11_status_shows_the_watched_criteria_with_their_mode(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run, "--metric", "eval_wer", "--mode", "min", "--best", "eval_acc:max:2")
    assert status(run)["criteria"] == [
        {"metric": "eval_wer", "mode": "min", "keep": 1},
        {"metric": "eval_acc", "mode": "max", "keep": 2},
    ]
    assert daemon.stop() == 0


def test_issue7_15_a_watched_metric_that_never_appears_is_named(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    log = run / "logging.jsonl"
    daemon = daemons(run, "--metric", "eval_wer")
    append_lines(log, *({"step": s, "loss": 1.0, "eval_loss": 0.5} for s in (10, 20, 30)))
    wait_for(lambda: "eval_wer" in str(status(run)["last_error"]), what="the warning")
    assert "eval_loss" in str(status(run)["last_error"])
    assert daemon.stop() == 0
