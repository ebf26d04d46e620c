"""What a hostile round against ``ckptd serve`` and its operations found, each kept fixed.

Every test here failed on the code before its fix (the finding's number from the round is in
the test's comment).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd import CheckpointClient
from ckptd.node.discover import find_runs
from ckptd.protocol import RunPaths, daemon_alive, read_control
from ckptd.settings import ServeSettings
from ckptd.store import Store
from tests.conftest import wait_for
from tests.test_ops import ckptd, evals, steps, train
from tests.test_serve import Node, make_run, node_config, state_of

pytestmark = pytest.mark.slow


def runs_found(root: Path, *adopt: str) -> list[Path]:
    return [c.run_dir for c in find_runs(ServeSettings(roots=(root,), adopt=adopt))]


def test_only_runs_their_owner_alone_controls_are_found(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    ok = make_run(root, "ok")
    shared = make_run(root, "shared")
    shared.chmod(0o777)  # (1) a 1777 scratch dir: anyone could have written its ckptd.toml
    (root / "ckptd.toml").write_text("")  # (1) a run file in the root would hide every run below
    make_run(root, "x/.ckptd/inner")  # (15) ckptd's own folders are no runs
    (root / "alias").symlink_to(ok)  # (14) two paths to one run are one run
    (ok / "logging.jsonl").write_text("")
    found = runs_found(root, "**/logging.jsonl")
    assert found == [ok.resolve()], found


@pytest.mark.skipif(os.geteuid() != 0, reason="a run file of another owner needs root to make")
def test_a_run_file_another_user_wrote_is_not_obeyed(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    run = make_run(root, "mine")
    os.chown(run / "ckptd.toml", 65534, 65534)  # (1) nobody wrote the run's settings
    assert runs_found(root) == []


def test_config_files_that_are_no_config_are_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # (11) would hang the start and every reload
    deep = tmp_path / "deep.toml"
    deep.write_text("[serve]\nroots = [\"/x\"]\n[run]\nbest = " + "[" * 5000 + "]" * 5000 + "\n")
    huge = tmp_path / "huge.toml"
    huge.write_text("[serve]\nroots = [\"/x\"]\ndrain_timeout = 1e300\n")  # (11) overflowed the drain
    for path, said in ((fifo, "not a regular file"), (deep, "not valid TOML"), (huge, "drain_timeout")):
        started = time.monotonic()
        done = ckptd("serve", "--check", "--config", str(path))
        assert done.returncode == 2 and said in done.stderr, (path, done.stderr)
        assert time.monotonic() - started < 20


def test_gc_neither_hangs_on_a_planted_fifo_nor_sweeps_what_it_cannot_see(
    tmp_path: Path, shm_root: Path
) -> None:
    run = tmp_path / "run"
    RunPaths(run).meta.mkdir(parents=True)
    os.mkfifo(RunPaths(run).state)  # (3) a marker naming a run whose state is a FIFO
    staging = shm_root / "ckptd-planted"
    staging.mkdir()
    (staging / "run.json").write_text(json.dumps({"run_dir": str(run), "run_id": "planted"}))
    started = time.monotonic()
    done = ckptd("gc", "--grace", "0")
    assert done.returncode == 0 and time.monotonic() - started < 20, done.stderr
    assert staging.exists(), "nothing proven about that run: its slots stay"


def test_a_request_before_any_eval_keeps_the_schedule_and_is_captured(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemons(run, "--every-steps", "5", "--keep-last", "10")
    with CheckpointClient(run) as client:  # a trainer that is running: it takes the request
        assert ckptd("request", str(run), "--tag", "early").returncode == 0  # (7) eval_step was -1
        wait_for(lambda: read_control(RunPaths(run).control).standing is not None)
        assert read_control(RunPaths(run).control).standing.verdict.eval_step == 0
        captured = [s for s in range(1, 12) if client.maybe_snapshot(s, lambda: {"w": torch.ones(2)})]
    assert captured[:2] == [1, 5] and 10 in captured, captured  # the request, then the schedule
    wait_for(lambda: steps(run) == captured, what=str(steps(run)))
    (early,) = [r for r in Store(run / "checkpoints").list() if "early" in r.tags]
    assert early.step == 1


def test_a_request_after_a_best_does_not_rank_as_that_best(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemons(run, "--keep-best", "2", "--keep-last", "0")
    assert train(run, evals(2.0, 1.0)) == [10, 20]
    wait_for(lambda: steps(run) == [10, 20])
    with CheckpointClient(run) as client:
        assert ckptd("request", str(run), "--tag", "manual").returncode == 0
        wait_for(lambda: "manual" in read_control(RunPaths(run).control).standing.verdict.tags)
        took = client.maybe_snapshot(38, lambda: {"w": torch.ones(2)})
        assert took, read_control(RunPaths(run).control)
    # (6) with the eval's metrics the capture at 38 ranked as the second best and pushed out
    # step 10; a request's capture holds later weights and has no eval of its own.
    wait_for(lambda: not list(RunPaths(run).acks.glob("*.json")))
    time.sleep(1.0)
    kept = {r.step: r for r in Store(run / "checkpoints").list()}
    assert {10, 20} <= set(kept), kept
    assert kept.get(38) is None or "eval_loss" not in kept[38].metrics


def test_prune_refuses_another_runs_store(tmp_path: Path, daemons: Any, shm_root: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        run.mkdir()
        daemon = daemons(run, "--every-steps", "10", "--keep-last", "10")
        train(run, evals(1.0, 2.0, 3.0))
        wait_for(lambda run=run: len(steps(run)) == 3)
        assert daemon.stop() == 0
    refused = ckptd("prune", str(a), "--store", str(b / "checkpoints"), "--keep-last", "0")  # (8)
    assert refused.returncode == 2 and "is the store of" in refused.stderr, refused.stderr
    assert steps(b) == [10, 20, 30]


def test_requests_are_never_read_through_a_link(tmp_path: Path, daemons: Any, shm_root: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.json").write_text(json.dumps({"tag": "x"}))
    daemon = daemons(run)
    RunPaths(run).requests.symlink_to(elsewhere)  # (18)
    time.sleep(2.5)
    assert (elsewhere / "keep.json").exists()
    assert daemon.stop() == 0 and "symbolic link" in daemon.log()


def test_a_run_that_opts_out_is_let_go(tmp_path: Path, shm_root: Path) -> None:
    root = tmp_path / "runs"
    run = make_run(root, "r")
    node = Node(tmp_path, node_config(root))
    try:
        wait_for(lambda: daemon_alive(RunPaths(run)), what=node.log())
        (run / "ckptd.toml").unlink()  # (13) it was served forever
        wait_for(lambda: state_of(run) == "stopped", what=node.log())
    finally:
        assert node.stop() == 0, node.log()
    adoptions = node.log().count("adopted")
    assert adoptions == 1, node.log()


def test_a_run_another_daemon_follows_is_not_tried_again_at_every_scan(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    root = tmp_path / "runs"
    run = make_run(root, "theirs")
    solo = daemons(run)
    node = Node(tmp_path, node_config(root))  # scans every 0.2 s
    try:
        wait_for(lambda: "left to it" in node.log(), what=node.log())
        time.sleep(2.0)
    finally:
        assert node.stop() == 0, node.log()
    assert node.log().count("adopted") == 0 and node.log().count("left to it") == 1, node.log()  # (14)
    assert solo.stop() == 0
