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
import torch

from ckptd import CheckpointClient
from ckptd.protocol import PROTOCOL_VERSION, RunPaths, atomic_write_json, pending_ack_paths, read_control
from ckptd.store import TMP_PREFIX, Store
from tests.conftest import PROGRAMS, append_lines, verdict, wait_for

pytestmark = pytest.mark.slow


def write_scheduled_ack(run: Path, step: int, slot: str, files: dict[str, int]) -> Path:
    """An ack as a trainer writes it for a scheduled capture, naming ``slot`` (which the test
    makes, or not, as it likes); returns where its ``.rejected`` copy would appear."""
    ack = {"protocol": PROTOCOL_VERSION, "name": f"step-{step}", "captured_step": step}
    atomic_write_json(
        RunPaths(run).acks / f"step-{step}.json", {**ack, "slot": slot, "files": files, "created": 1.0}
    )
    return RunPaths(run).acks / f"step-{step}.json.rejected"


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
        paths=RunPaths(tmp_path / "run"),
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
        paths=RunPaths(tmp_path / "run"),
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
    rejected = write_scheduled_ack(run, 4, "slot-1", {"tensors.safetensors": 1024})  # no such slot
    wait_for(rejected.exists, timeout=15, what="set aside")
    # The rename comes first, the message a moment later: wait for it, do not race it.
    wait_for(lambda: "3 tries" in daemon.log(), timeout=5, what="the reason logged")
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
    # Joined with the snapshot standing for step 100: one capture, best on both.
    assert control.verdict is not None
    assert control.verdict.tags == ("best:eval_a_loss", "best:eval_b_loss")
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
    control = read_control(paths.control)
    assert control.verdict is None, "nothing re-judged"
    assert control.standing is not None and control.standing.verdict.eval_step == 850, "unanswered: stands"
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


# -- found by hostile testing after the fixes above -------------------------------------------


def test_a_restart_asks_again_for_a_snapshot_the_trainer_had_not_captured(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    log, paths = run / "logging.jsonl", RunPaths(run)
    first = daemons(run)
    client = CheckpointClient(run)  # the trainer, running across the daemon's crash
    append_lines(log, {"step": 10, "eval_loss": 0.5})
    assert client.wait_verdict(10) is not None
    assert client.maybe_snapshot(10, lambda: {"w": torch.full((4,), 10.0)})
    append_lines(log, {"step": 20, "eval_loss": 0.1})
    wait_for(lambda: verdict(paths) == (20, "snapshot"), what="the verdict for step 20")
    first.proc.send_signal(signal.SIGKILL)  # before the trainer reached maybe_snapshot(20)
    first.proc.wait()

    second = daemons(run)
    assert client.maybe_snapshot(20, lambda: {"w": torch.full((4,), 20.0)})
    store = Store(run / "checkpoints")
    wait_for(lambda: {r.step for r in store.list()} == {10, 20}, what="both persisted")
    client.close()
    assert second.stop() == 0
    shown = ckptd("best", str(run))
    assert shown.stdout.strip() == str(store.path_of("step-00000020"))


def test_a_line_logged_while_the_daemon_was_down_is_judged_at_restart(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    log, paths = run / "logging.jsonl", RunPaths(run)
    daemons(run).stop()
    append_lines(log, {"step": 10, "eval_loss": 0.5})  # the daemon is down (a crash, a restart)
    again = daemons(run)
    wait_for(lambda: verdict(paths) == (10, "snapshot"), what="the verdict at restart")
    assert again.stop() == 0


def test_a_periodic_capture_of_the_best_step_is_ranked_after_a_restart(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    log, paths = run / "logging.jsonl", RunPaths(run)
    first = daemons(run, "--every-steps", "10")
    append_lines(log, {"step": 20, "eval_loss": 0.1})
    wait_for(lambda: verdict(paths) == (20, "snapshot"), what="the verdict")
    assert first.stop() == 0
    second = daemons(run, "--every-steps", "10")
    with CheckpointClient(run) as client:  # started after the verdict: captures by schedule only
        assert client.maybe_snapshot(20, lambda: {"w": torch.zeros(2)})
        wait_for(lambda: not pending_ack_paths(paths), what="the persist")
    assert second.stop() == 0
    (record,) = Store(run / "checkpoints").list()
    assert record.metrics == {"eval_loss": 0.1}, "the state's best names the metric of its step"
    assert ckptd("best", str(run)).returncode == 0


def test_a_symlinked_or_foreign_staging_dir_is_never_used_and_nothing_is_deleted_through_it(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemons(run).stop()
    run_id = json.loads(RunPaths(run).state.read_text())["run_id"]
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "keep.txt").write_text("keep")
    (shm_root / f"ckptd-{run_id}").symlink_to(victim)  # squatted: /dev/shm is everyone's
    daemon = daemons(run)
    fresh = json.loads(RunPaths(run).state.read_text())["run_id"]
    assert fresh != run_id, "a new run id, so a staging dir nobody prepared"
    assert daemon.stop() == 0
    assert "not private" in daemon.log() and "symbolic link" in daemon.log()
    assert (victim / "sub" / "keep.txt").read_text() == "keep"
    assert (shm_root / f"ckptd-{run_id}").is_symlink(), "left alone, not removed through"

    squat = shm_root / f"ckptd-{fresh}"
    squat.mkdir()
    squat.chmod(0o777)  # another user's folder would be: open to the squatter
    again = daemons(run)
    assert json.loads(RunPaths(run).state.read_text())["run_id"] not in (run_id, fresh)
    assert again.stop() == 0 and "writable by other users" in again.log()


def test_a_slot_that_links_outside_is_never_copied(tmp_path: Path, daemons, shm_root: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the store " * 10)
    daemon = daemons(run)
    run_id = json.loads(RunPaths(run).state.read_text())["run_id"]
    slot = shm_root / f"ckptd-{run_id}" / "slot-7"
    slot.mkdir(parents=True)
    (slot / "tensors.safetensors").symlink_to(secret)
    rejected = write_scheduled_ack(run, 5, "slot-7", {"tensors.safetensors": 100})
    wait_for(rejected.exists, timeout=15, what="set aside")
    assert Store(run / "checkpoints").list() == []
    assert daemon.stop() == 0
    assert secret.exists()


def test_deeply_nested_files_stop_neither_the_daemon_nor_the_cli(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run)
    deep = "[" * 200_000
    (RunPaths(run).meta / "client.json").write_text(deep)
    store = Store(run / "checkpoints")
    bad = store.root / "step-00000001"
    bad.mkdir()
    (bad / "MANIFEST.json").write_text(deep)
    append_lines(run / "logging.jsonl", {"step": 1, "eval_loss": 0.5})
    wait_for(lambda: verdict(RunPaths(run)) == (1, "snapshot"), what="judged")
    verified = ckptd("verify", str(run))
    assert verified.returncode == 5 and "Traceback" not in verified.stderr, verified.stderr
    assert ckptd("ls", str(run)).returncode == 1
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0, daemon.log()


def test_an_ack_written_in_place_is_read_once_complete(tmp_path: Path, daemons, shm_root: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run)
    ack = RunPaths(run).acks / "step-3.json"
    ack.write_text("")  # `echo ... > acks/step-3.json`: the daemon may look before it is filled
    import time

    time.sleep(1.0)
    assert ack.exists(), "an ack still being written must not be set aside at once"
    wait_for(lambda: (RunPaths(run).acks / "step-3.json.rejected").exists(), timeout=15, what="set aside")
    assert daemon.stop() == 0


def test_cli_small_ones_found_by_hostile_testing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert ckptd("run", str(run), "--metric", "").returncode == 2
    (run / "checkpoints").mkdir()
    best = ckptd("best", str(run), "--json")
    assert best.returncode == 1 and json.loads(best.stdout) is None


def test_two_criteria_on_separate_lines_at_one_step_give_one_capture_with_both(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    paths = RunPaths(run)
    daemon = daemons(run, "--best", "eval_loss:min", "--best", "eval_acc:max")
    evals = [{"step": 10, "eval_loss": 0.5}, {"step": 10, "eval_acc": 0.6}]
    append_lines(run / "logging.jsonl", *evals)  # HF: one line per eval dataset, one flush
    wait_for(lambda: set(status(run)["bests"]) == {"eval_loss", "eval_acc"}, what="both judged")
    append_lines(run / "logging.jsonl", {"step": 20, "eval_loss": 0.4}, {"step": 20, "eval_acc": 0.1})
    wait_for(lambda: status(run)["bests"]["eval_loss"]["step"] == 20, what="step 20 judged")
    wait_for(lambda: verdict(paths) == (20, "skip"), what="the eval_acc line's skip")
    standing = read_control(paths.control).standing
    assert standing is not None, "the skip took the best of step 20 away"
    assert (standing.verdict.eval_step, standing.verdict.tags) == (20, ("best:eval_loss",))
    assert daemon.stop() == 0


def test_a_best_stands_through_a_later_skip_until_the_trainer_captures_it(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    paths = RunPaths(run)
    daemon = daemons(run)
    with CheckpointClient(run) as client:
        # Two evals land before the trainer looks (a burst, or a restart judging a backlog).
        append_lines(run / "logging.jsonl", {"step": 300, "eval_loss": 0.1}, {"step": 310, "eval_loss": 0.5})
        wait_for(lambda: verdict(paths) == (310, "skip"), what="both judged")
        assert client.maybe_snapshot(311, lambda: {"w": torch.full((2,), 311.0)})
        wait_for(lambda: not pending_ack_paths(paths), what="the persist")
    assert daemon.stop() == 0
    (record,) = Store(run / "checkpoints").list()
    assert (record.requested_step, record.step, record.tags) == (300, 311, ("best:eval_loss",))
    shown = ckptd("best", str(run))
    assert shown.returncode == 0 and "captured after the eval at step 300" in shown.stderr


def test_two_criteria_snapshots_at_one_step_are_joined(tmp_path: Path, daemons, shm_root: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run, "--best", "eval_loss:min", "--best", "eval_acc:max")
    append_lines(run / "logging.jsonl", {"step": 10, "eval_loss": 0.5}, {"step": 10, "eval_acc": 0.6})
    wait_for(
        lambda: (c := read_control(RunPaths(run).control).verdict) is not None and len(c.tags) == 2,
        what="one verdict with both tags",
    )
    joined = read_control(RunPaths(run).control).verdict
    assert joined is not None and joined.metrics == {"eval_loss": 0.5, "eval_acc": 0.6}
    assert daemon.stop() == 0


def test_a_line_equal_to_an_earlier_one_is_judged_again(tmp_path: Path, daemons, shm_root: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    paths = RunPaths(run)
    daemon = daemons(run)
    lines = [{"step": 10, "eval_loss": 0.5}, {"step": 20, "eval_loss": 0.4}]
    append_lines(run / "logging.jsonl", *lines)
    wait_for(lambda: verdict(paths) == (20, "snapshot"), what="the first pass")
    seq = read_control(paths.control).seq
    append_lines(run / "logging.jsonl", *lines)  # a deterministic resume logs the same values
    wait_for(lambda: read_control(paths.control).seq >= seq + 2, what="both judged again")
    # No trainer captured step 20: logged again, its best is asked for anew.
    assert verdict(paths) == (20, "snapshot")
    assert daemon.stop() == 0


def test_a_resumed_trainer_relogging_an_uncaptured_best_is_asked_for_it(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    paths = RunPaths(run)
    first = daemons(run)
    append_lines(run / "logging.jsonl", {"step": 100, "eval_loss": 0.2})
    wait_for(lambda: verdict(paths) == (100, "snapshot"), what="the verdict")
    first.proc.send_signal(signal.SIGKILL)  # trainer A died before capturing; the daemon too
    first.proc.wait()
    with CheckpointClient(run) as client:  # trainer B, resumed from step 0, deterministic
        second = daemons(run)
        append_lines(run / "logging.jsonl", {"step": 100, "eval_loss": 0.2})
        asked = client.wait_verdict(100)
        assert asked is not None and asked.action == "snapshot", asked
        assert client.maybe_snapshot(100, lambda: {"w": torch.ones(2)})
        wait_for(lambda: not pending_ack_paths(paths), what="the persist")
    assert second.stop() == 0
    (record,) = Store(run / "checkpoints").list()
    assert (record.step, record.tags) == (100, ("best:eval_loss",))
