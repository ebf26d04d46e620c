"""Operations CLI against real daemons: ``prune``, ``request``, node ``status``, metrics.

Each test drives ``python -m ckptd`` as a user would, on runs a real daemon and a real
client wrote.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd import CheckpointClient
from ckptd.protocol import RunPaths, daemon_alive, pending_ack_paths
from ckptd.store import Store
from tests.conftest import PROGRAMS, append_lines, wait_for
from tests.test_serve import Node, evals, make_run, node_config

pytestmark = pytest.mark.slow


def ckptd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptd", *args], capture_output=True, text=True, timeout=60)


def train(run: Path, records: list[dict[str, float]]) -> list[int]:
    done = subprocess.run(
        [sys.executable, str(PROGRAMS / "scripted_trainer.py"), str(run), json.dumps(records)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    captured: list[int] = json.loads(done.stdout.splitlines()[-1])
    return captured


def steps(run: Path) -> list[int]:
    return sorted(r.step for r in Store(run / "checkpoints").list())


def test_prune_applies_the_recorded_policy_or_the_options_and_never_the_best(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run, "--every-steps", "10", "--keep-last", "10")
    captured = train(run, evals(5, 4, 1, 3, 3.5, 3.2))  # best at 30
    wait_for(lambda: not pending_ack_paths(RunPaths(run)) and steps(run) == captured)
    assert daemon.stop() == 0

    recorded = ckptd("prune", str(run))
    assert recorded.returncode == 0 and "nothing to prune" in recorded.stdout, recorded
    assert "last 10" in recorded.stdout, "the policy the daemon reported"

    dry = ckptd("prune", str(run), "--keep-last", "1", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    would = sorted(entry["step"] for entry in json.loads(dry.stdout))
    assert would == [s for s in captured[:-1] if s != 30]
    assert steps(run) == captured, "a dry run deletes nothing"

    done = ckptd("prune", str(run), "--keep-last", "1")
    assert done.returncode == 0, done.stderr
    assert steps(run) == sorted({30, captured[-1]})
    assert "deleted step-" in done.stdout


def test_prune_without_a_known_policy_asks_for_one(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    refused = ckptd("prune", str(tmp_path / "run"))
    assert refused.returncode == 2 and "--keep-last" in refused.stderr


def test_request_has_the_trainer_capture_its_next_step_with_the_tag(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemons(run, "--keep-last", "3")
    assert ckptd("request", str(run), "--tag", "no such/tag").returncode == 2
    with CheckpointClient(run) as client:
        append_lines(run / "logging.jsonl", {"step": 10, "eval_loss": 2.0})
        assert client.wait_verdict(10) is not None and client.maybe_snapshot(10, lambda: {"w": torch.ones(3)})
        assert not client.maybe_snapshot(11, lambda: {"w": torch.ones(3)}), "nothing asked yet"
        asked = ckptd("request", str(run), "--tag", "before-lr-change", "--json")
        assert asked.returncode == 0, asked.stderr
        assert json.loads(asked.stdout)["tag"] == "before-lr-change"
        wait_for(lambda: client.maybe_snapshot(12, lambda: {"w": torch.full((3,), 12.0)}), timeout=10)
    wait_for(lambda: steps(run) == [10, 12], what=str(steps(run)))
    (record,) = [r for r in Store(run / "checkpoints").list() if r.step == 12]
    assert "before-lr-change" in record.tags


def test_request_without_a_live_daemon_says_so(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    answer = ckptd("request", str(tmp_path / "run"))
    assert answer.returncode == 1 and "no live daemon" in answer.stderr
    assert not (tmp_path / "run" / ".ckptd" / "requests").exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_node_status_and_metrics_list_every_run_the_node_serves(
    tmp_path: Path, shm_root: Path
) -> None:
    root = tmp_path / "runs"
    run_a, run_b = make_run(root, "a"), make_run(root, "b")
    port = free_port()
    textfile = tmp_path / "ckptd.prom"
    node = Node(tmp_path, node_config(root, extra=f"metrics_port = {port}\nmetrics_textfile = '{textfile}'"))
    try:
        wait_for(lambda: daemon_alive(RunPaths(run_a)) and daemon_alive(RunPaths(run_b)), what=node.log())
        train(run_a, evals(3, 2))
        wait_for(lambda: steps(run_a) == [10, 20])
        listed = ckptd("status", "--config", str(node.config), "--json")
        assert listed.returncode == 0, listed.stderr
        rows = {row["run_dir"]: row for row in json.loads(listed.stdout)}
        assert set(rows) == {str(run_a), str(run_b)} and all(row["alive"] for row in rows.values())
        wait_for(lambda: rows_best(run_a) == 2.0)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        best_lines = [
            line for line in body.splitlines() if line.startswith("ckptd_best_value") and '/a"' in line
        ]
        assert best_lines and best_lines[0].endswith(" 2"), body
        wait_for(lambda: textfile.exists() and str(run_b) in textfile.read_text())
        text = ckptd("status", "--config", str(node.config))
        assert str(run_a) in text.stdout and "eval_loss=2@20" in text.stdout, text.stdout
    finally:
        assert node.stop() == 0, node.log()
    stopped = ckptd("status", "--config", str(node.config))
    assert stopped.returncode == 1 and "not followed" in stopped.stdout


def rows_best(run: Path) -> float | None:
    status = json.loads(RunPaths(run).status.read_text())
    best = status.get("bests", {}).get("eval_loss")
    return best.get("value") if best else None


def test_verify_shows_progress_on_a_terminal_and_not_in_a_pipe(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    import os
    import pty

    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run)
    with CheckpointClient(run) as client:
        append_lines(run / "logging.jsonl", {"step": 1, "eval_loss": 1.0})
        assert client.wait_verdict(1) is not None
        assert client.maybe_snapshot(1, lambda: {"w": torch.zeros(320 * 2**20 // 4)})  # 320 MiB
    wait_for(lambda: steps(run) == [1], timeout=60)
    assert daemon.stop() == 0
    primary, secondary = pty.openpty()
    with subprocess.Popen(
        [sys.executable, "-m", "ckptd", "verify", str(run)], stdout=subprocess.PIPE, stderr=secondary
    ) as proc:
        os.close(secondary)
        screen = b""
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the terminal's other end closed
                break
            if not chunk:
                break
            screen += chunk
        out = proc.stdout.read().decode() if proc.stdout else ""
    os.close(primary)
    assert proc.returncode == 0 and "ok" in out
    assert b"% of 320.0 MiB" in screen and b"\x1b[K" in screen, screen[-300:]
    piped = ckptd("verify", str(run))
    assert piped.returncode == 0 and "%" not in piped.stderr and "ok" in piped.stdout


def test_ls_marks_the_best_of_now_among_checkpoints_once_tagged_best(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run, "--keep-best", "3")
    assert train(run, evals(5, 4, 1, 2)) == [10, 20, 30]  # each an improvement, 40 is not
    wait_for(lambda: steps(run) == [10, 20, 30])
    assert daemon.stop() == 0
    assert all("best:eval_loss" in r.tags for r in Store(run / "checkpoints").list())
    table = ckptd("ls", str(run))
    marked = [line.split()[0] for line in table.stdout.splitlines() if " *" in line and line[0].isdigit()]
    assert marked == ["30"] and "* the best by eval_loss (min)" in table.stdout, table.stdout
    rows = json.loads(ckptd("ls", str(run), "--json").stdout)
    assert [row["step"] for row in rows if row["best"]] == [30]
