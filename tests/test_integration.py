"""The whole path with real processes: a ``ckptd run`` daemon and a torch trainer beside it.

These are the tests that would catch the product failing its promise: the best
eval step retained bit for bit, exactly best + last N kept, nothing partial
visible after a SIGKILL mid-persist, and a restarted daemon that neither
forgets the best nor re-issues old verdicts.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckptd import load_snapshot
from ckptd.protocol import RunPaths, daemon_alive, pending_ack_paths, read_control
from ckptd.store import TMP_PREFIX, Store
from tests.conftest import PROGRAMS, append_lines, verdict, wait_for

pytestmark = pytest.mark.slow


def run_trainer(run_dir: Path, *args: str, timeout: float = 120) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, str(PROGRAMS / "trainer.py"), str(run_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return json.loads((run_dir / "trainer-summary.json").read_text())


def test_best_eval_step_is_retained_bit_identical_with_exactly_best_plus_last_n(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run, "--every-steps", "200", "--keep-best", "1", "--keep-last", "2")
    summary = run_trainer(run)
    assert daemon.stop() == 0, daemon.log()

    evals = {int(k): v for k, v in summary["evals"].items()}
    best_step = min(evals, key=evals.__getitem__)
    assert best_step % 200 != 0, "the scenario needs a best that periodic saving misses"
    store = Store(run / "checkpoints")
    kept = {r.step: r for r in store.list()}
    assert set(kept) == {best_step, 1800, 2000}, daemon.log()

    best = kept[best_step]
    assert "best:eval_loss" in best.tags
    assert best.requested_step == best_step  # captured at the exact eval step, not later
    assert best.metrics["eval_loss"] == evals[best_step]
    snapshot = load_snapshot(store.path_of(best.name))
    reference = torch.load(run / "reference" / f"{best_step}.pt")
    assert reference.keys() == snapshot["model"].keys()
    for key, tensor in reference.items():
        assert torch.equal(snapshot["model"][key], tensor), key
    assert snapshot["step"] == best_step
    assert isinstance(snapshot["optimizer"]["param_groups"][0]["betas"], tuple)
    for record in kept.values():
        assert store.verify(record.name) == []
    assert not pending_ack_paths(RunPaths(run))
    assert not list(shm_root.iterdir()), "slots must not outlive the run in shared memory"


def test_cli_answers_from_the_store_with_and_without_a_daemon(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run, "--every-steps", "500", "--keep-last", "1", "--store", "ckpts")
    run_trainer(run, "--steps", "1000", "--eval-every", "100")
    ls_live = subprocess.run([sys.executable, "-m", "ckptd", "ls", str(run), "--json"], capture_output=True)
    assert daemon.stop() == 0
    ls_after = subprocess.run([sys.executable, "-m", "ckptd", "ls", str(run), "--json"], capture_output=True)
    assert ls_live.returncode == ls_after.returncode == 0
    listed = json.loads(ls_after.stdout)
    assert json.loads(ls_live.stdout) == listed
    assert [r["path"] for r in listed] == [str(run / "ckpts" / f"step-{r['step']:08d}") for r in listed]
    assert {"step", "path", "tags", "metrics", "bytes"} <= set(listed[0])
    best = subprocess.run([sys.executable, "-m", "ckptd", "best", str(run)], capture_output=True, text=True)
    assert best.returncode == 0
    by_loss = min((r for r in listed if "eval_loss" in r["metrics"]), key=lambda r: r["metrics"]["eval_loss"])
    assert best.stdout.strip() == by_loss["path"]


def test_sigkill_mid_persist_leaves_nothing_partial_and_restart_finishes(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    store = Store(run / "checkpoints")
    daemon = daemons(run, "--every-steps", "1")
    trainer = subprocess.run(
        [sys.executable, str(PROGRAMS / "stage_and_crash.py"), str(run), "768"], timeout=60
    )
    assert trainer.returncode == 0

    def writing() -> bool:
        return any(p.name.startswith(TMP_PREFIX) for p in store.root.iterdir())

    wait_for(writing, what="the persist to start")
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    assert store.list() == [], "a killed persist must not be visible as a checkpoint"
    assert [p.name for p in store.root.iterdir() if p.name.startswith("step-")] == []
    assert len(pending_ack_paths(RunPaths(run))) == 1, "the ack must survive to be redone"

    restarted = daemons(run, "--every-steps", "1")
    wait_for(lambda: len(store.list()) == 1, what="the restarted daemon to persist")
    assert restarted.stop() == 0, restarted.log()
    assert "removed .tmp-" in restarted.log()
    assert not writing()
    record = store.list()[0]
    assert record.step == 1 and store.verify(record.name) == []
    snapshot = load_snapshot(store.path_of(record.name))
    n = 768 * 2**20 // 4
    assert torch.equal(snapshot["big"], torch.arange(n, dtype=torch.float32) * 0.5)
    assert snapshot["note"] == "crash test"


def test_second_daemon_for_the_same_run_refuses_clearly(tmp_path: Path, daemons, shm_root: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    first = daemons(run)
    second = subprocess.run(
        [sys.executable, "-m", "ckptd", "run", str(run)], capture_output=True, text=True, timeout=30
    )
    assert second.returncode == 3
    assert "another ckptd daemon already follows" in second.stderr
    assert f"pid {first.proc.pid}" in second.stderr
    assert first.proc.poll() is None, "the refused start must not disturb the running daemon"


def test_restart_remembers_the_best_and_never_reissues_verdicts(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    log, paths = run / "logging.jsonl", RunPaths(run)
    first = daemons(run)
    append_lines(log, {"step": 50, "eval_loss": 1.0}, {"step": 100, "eval_loss": 0.5})
    wait_for(lambda: verdict(paths) == (100, "snapshot"), what="verdict for step 100")
    asked = read_control(paths.control)
    assert first.stop() == 0

    second = daemons(run)
    control = read_control(paths.control)
    assert control.seq > asked.seq, "seq must only grow across restarts"
    assert control.verdict is None, "a restart must not re-issue the last verdict"
    # No trainer captured step 100, so it still stands, with its first write time: a trainer
    # started after it ignores it (a new trainer must never capture a stale verdict).
    assert control.standing is not None and asked.standing is not None
    assert control.standing.verdict == asked.verdict and control.standing.written == asked.standing.written
    append_lines(log, {"step": 150, "eval_loss": 0.7})
    wait_for(lambda: verdict(paths) == (150, "skip"), what="verdict for step 150")
    append_lines(log, {"step": 200, "eval_loss": 0.4})
    wait_for(lambda: verdict(paths) == (200, "snapshot"), what="verdict for step 200")
    assert second.stop() == 0
    state = json.loads(paths.state.read_text())
    assert state["bests"]["eval_loss"] == {"step": 200, "value": 0.4}


def test_late_daemon_catches_up_on_history_without_judging_it(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    log, paths = run / "logging.jsonl", RunPaths(run)
    append_lines(log, {"step": 50, "eval_loss": 0.3}, {"step": 100, "eval_loss": 0.6})
    daemon = daemons(run)
    assert read_control(paths.control).verdict is None
    append_lines(log, {"step": 150, "eval_loss": 0.35})
    wait_for(lambda: verdict(paths) == (150, "skip"), what="verdict for step 150")
    assert "0.3 @50" in read_control(paths.control).verdict.reason  # the best came from history
    assert daemon.stop() == 0


def test_bad_lines_and_nan_never_stop_the_daemon_nor_become_best(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    log, paths = run / "logging.jsonl", RunPaths(run)
    daemon = daemons(run)
    append_lines(log, {"step": 50, "eval_loss": 0.5})
    with log.open("ab") as handle:
        handle.write(b'{"step": 60, "eval_loss": \n')  # truncated JSON
        handle.write(b"\xff\xfe not utf-8\n")
        handle.write(b'{"step": 100, "eval_loss": NaN}\n')
    wait_for(lambda: verdict(paths) == (100, "skip"), what="verdict for the NaN eval")
    append_lines(log, {"step": 150, "eval_loss": 0.4})
    wait_for(lambda: verdict(paths) == (150, "snapshot"), what="a real best after the bad lines")

    def status_caught_up() -> bool:  # status.json is a heartbeat: wait for the beat after step 150
        status = json.loads(paths.status.read_text())
        return status["bests"].get("eval_loss", {}).get("step") == 150

    wait_for(status_caught_up, what="a heartbeat after step 150")
    status = json.loads(paths.status.read_text())
    assert status["malformed_lines"] == {"json": 1, "utf8": 1}
    assert status["bests"]["eval_loss"]["value"] == 0.4
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0


def test_client_picks_up_a_daemon_started_after_the_trainer(tmp_path: Path, daemons, shm_root: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    trainer = subprocess.Popen(
        [sys.executable, str(PROGRAMS / "trainer.py"), str(run), "--steps", "1500", "--step-delay", "0.004"],
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: (run / "logging.jsonl").exists(), what="the trainer to log")
    daemon = daemons(run, "--every-steps", "100", "--keep-last", "10")
    assert trainer.wait(timeout=120) == 0, trainer.stderr.read() if trainer.stderr else ""
    assert daemon.stop() == 0
    summary = json.loads((run / "trainer-summary.json").read_text())
    assert summary["captured"], "the client never noticed the daemon"
    assert {r.step for r in Store(run / "checkpoints").list()} >= {1500}


def test_a_stopped_daemon_releases_waiting_clients_at_once(tmp_path: Path, daemons, shm_root: Path) -> None:
    from ckptd import CheckpointClient

    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run)
    assert daemon_alive(RunPaths(run))
    assert daemon.stop() == 0
    with CheckpointClient(run) as client:
        started = time.monotonic()
        assert client.wait_verdict(50, timeout=2.0) is None
        assert time.monotonic() - started < 0.5


def test_importing_the_daemon_and_cli_never_imports_torch() -> None:
    probe = "import ckptd.daemon, ckptd.cli, sys; assert 'torch' not in sys.modules, 'torch leaked'"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_demo_keeps_the_best_at_its_exact_step(tmp_path: Path, shm_root: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ckptd", "demo", "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo passed" in done.stdout
    proof = re.search(r"weights bit-identical to step (\d+): True", done.stdout)
    assert proof, done.stdout
    assert int(proof.group(1)) % 200 != 0, "the demo must show a best that periodic saving misses"
    assert re.search(r"eval_loss recomputed (\S+) == logged \1: True", done.stdout), done.stdout


@pytest.mark.parametrize("mode", [[], ["--poll", "--poll-interval", "0.02"]], ids=["inotify", "polling"])
def test_every_best_is_judged_once_through_rotation_and_truncation(
    tmp_path: Path, daemons, shm_root: Path, mode: list[str]
) -> None:
    import random

    rng = random.Random(7)
    evals = [[step, round(rng.uniform(0.1, 2.0) / (1 + step / 500), 6)] for step in range(10, 1210, 10)]
    bests, best = [], float("inf")
    for step, loss in evals:
        if loss < best:
            bests.append(step)
            best = loss
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run, *mode)
    writer = subprocess.run(
        [sys.executable, str(PROGRAMS / "rotating_writer.py"), str(run / "logging.jsonl"), json.dumps(evals)],
        timeout=60,
    )
    assert writer.returncode == 0
    last = evals[-1][0]
    wait_for(lambda: json.loads(RunPaths(run).state.read_text())["judged_step"] == last, what="the last eval")
    assert daemon.stop() == 0
    verdicts = re.findall(r"step (\d+): (snapshot|skip)", daemon.log())
    judged = [int(step) for step, _ in verdicts]
    assert judged == [step for step, _ in evals], "every eval judged exactly once, in order"
    assert [int(step) for step, action in verdicts if action == "snapshot"] == bests
    state = json.loads(RunPaths(run).state.read_text())
    assert state["bests"]["eval_loss"] == {"step": bests[-1], "value": dict(evals)[bests[-1]]}


def test_daemon_follows_hf_tensorboard_runs_into_a_new_run_folder(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    import shutil

    from tests.conftest import FIXTURES

    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(FIXTURES / "hf-trainer" / "runs", run / "runs")
    paths = RunPaths(run)
    daemon = daemons(run, "--log", "runs")
    wait_for(lambda: json.loads(paths.status.read_text())["log_format"] == "tensorboard")
    state = json.loads(paths.state.read_text())
    assert state["bests"]["eval_loss"]["step"] == 200  # caught up on the history, judged nothing
    assert read_control(paths.control).verdict is None
    writer_code = (
        "import sys; from torch.utils.tensorboard import SummaryWriter\n"
        "w = SummaryWriter(sys.argv[1]); w.add_scalar('eval/loss', 1.5, 220); w.flush(); w.close()"
    )
    done = subprocess.run(
        [sys.executable, "-c", writer_code, str(run / "runs" / "Nov28_resumed")], timeout=60
    )
    assert done.returncode == 0
    wait_for(lambda: verdict(paths) == (220, "snapshot"), what="the verdict on the new run folder")
    assert daemon.stop() == 0


def test_daemon_follows_lightning_csv_through_its_header_rewrites(
    tmp_path: Path, daemons, shm_root: Path
) -> None:
    from tests.conftest import FIXTURES

    lightning = FIXTURES / "lightning"
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    metrics = run / "logs" / "metrics.csv"
    daemon = daemons(run, "--log", "logs/metrics.csv", "--metric", "val_loss")
    paths = RunPaths(run)
    for version in ("metrics_before_first_val.csv", "metrics_before_rewrite.csv"):
        metrics.write_bytes((lightning / version).read_bytes())  # Lightning rewrites in place
        time.sleep(0.3)
    metrics.write_bytes((lightning / "lightning_logs" / "version_0" / "metrics.csv").read_bytes())
    expected = _val_losses(lightning / "lightning_logs" / "version_0" / "metrics.csv")
    last = max(expected)
    wait_for(lambda: json.loads(paths.state.read_text())["judged_step"] == last, what="the last validation")
    assert daemon.stop() == 0
    judged = [int(s) for s, _ in re.findall(r"step (\d+): (snapshot|skip)", daemon.log())]
    assert judged == sorted(expected), "each validation judged once, the rewrites not re-judged"
    best = min(expected, key=expected.__getitem__)
    assert json.loads(paths.state.read_text())["bests"]["val_loss"] == {"step": best, "value": expected[best]}


def _val_losses(csv_path: Path) -> dict[int, float]:
    import csv

    with csv_path.open() as handle:
        return {int(row["step"]): float(row["val_loss"]) for row in csv.DictReader(handle) if row["val_loss"]}
