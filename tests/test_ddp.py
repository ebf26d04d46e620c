"""DDP and torchrun: rank 0 alone reads the control file and stages, and every rank agrees.

Real processes: ``torch.distributed.run`` starts two CPU ranks (gloo) of a plain DDP loop
(``programs/ddp_train.py``) beside a real ``ckptd run`` daemon. At every eval rank 0 waits for
the verdict and captures a best; ``ckptd.client.collective.agree`` broadcasts whether it did.
Both ranks must record the same decision at every eval, and each captured step must be in the
store exactly once (only rank 0 staged). Without a process group ``agree`` changes nothing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ckptd.client.collective import agree, distributed, is_leader
from ckptd.protocol import RunPaths, pending_ack_paths
from ckptd.store import Store
from tests.conftest import PROGRAMS

STEPS, EVERY = 40, 4


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def torchrun(
    program: str, *args: str, nproc: int = 2, timeout: float = 120
) -> subprocess.CompletedProcess[Any]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", "1",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(PROGRAMS / program), *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def decisions(run: Path, rank: int) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / f"decisions-rank{rank}.jsonl").read_text().splitlines()]


def test_without_a_process_group_agree_returns_the_decision_as_it_is() -> None:
    assert not distributed()
    assert is_leader()
    assert agree(True) is True
    assert agree(False) is False


@pytest.mark.slow
def test_two_ddp_ranks_agree_on_every_capture_and_rank_zero_alone_stages(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(
        run, "--log", "metrics.jsonl", "--metric", "val_loss", "--mode", "min",
        "--keep-best", "100", "--keep-last", "100",
    )  # fmt: skip
    done = torchrun("ddp_train.py", str(run), str(STEPS), str(EVERY))
    assert done.returncode == 0, done.stdout + done.stderr
    assert daemon.stop() == 0, daemon.log()

    zero, one = decisions(run, 0), decisions(run, 1)
    evals = list(range(EVERY, STEPS + 1, EVERY))
    assert [d["step"] for d in zero] == evals and [d["step"] for d in one] == evals
    # Every rank agrees on every eval, and what they agree on is what rank 0 did.
    assert [d["captured"] for d in zero] == [d["captured"] for d in one]
    assert all(d["captured"] == d["mine"] for d in zero)
    assert not any(d["mine"] for d in one), "a rank other than 0 staged"
    captured = [d["step"] for d in zero if d["captured"]]
    assert captured and len(captured) < len(evals), f"the scenario needs bests and non-bests: {zero}"

    # The overfitting run's val loss falls, then rises: a capture is exactly a new best.
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best, bests = float("inf"), []
    for line in logged:
        if line["val_loss"] < best:
            best = line["val_loss"]
            bests.append(line["step"])
    assert captured == bests, logged

    records = Store(run / "checkpoints").list()
    per_step = Counter(record.step for record in records)
    assert sorted(per_step) == captured, daemon.log()
    assert set(per_step.values()) == {1}, f"a step staged twice: {per_step}"
    assert all(record.requested_step == record.step for record in records)
    assert not pending_ack_paths(RunPaths(run))
    assert not list(shm_root.iterdir()), "slots must not outlive the run in shared memory"


@pytest.mark.slow
def test_a_hf_trainer_under_torchrun_keeps_each_best_once_and_both_callbacks_agree(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    pytest.importorskip("transformers")
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(
        run, "--log", "ckptd-metrics.jsonl", "--metric", "eval_loss", "--mode", "min",
        "--keep-best", "100", "--keep-last", "100",
    )  # fmt: skip
    done = torchrun("ddp_hf_train.py", str(run), "150", "25")
    assert done.returncode == 0, done.stdout + done.stderr
    assert daemon.stop() == 0, daemon.log()

    zero, one = decisions(run, 0), decisions(run, 1)
    evals = list(range(25, 151, 25))
    assert [d["step"] for d in zero] == evals and zero == one  # the same step and decision on both
    captured = [d["step"] for d in zero if d["captured"]]

    logged = [json.loads(line) for line in (run / "ckptd-metrics.jsonl").read_text().splitlines()]
    losses = {line["step"]: line["eval_loss"] for line in logged if "eval_loss" in line}
    assert sorted(losses) == evals  # rank 0 alone wrote the log: one line per eval
    best, bests = float("inf"), []
    for step in evals:
        if losses[step] < best:
            best, bests = losses[step], [*bests, step]
    assert captured == bests and len(bests) < len(evals), losses

    store = Store(run / "checkpoints")
    records = store.list()
    per_step = Counter(record.step for record in records)
    assert sorted(per_step) == captured and set(per_step.values()) == {1}, daemon.log()
    best_step = min(losses, key=losses.__getitem__)
    best_record = next(record for record in records if record.step == best_step)
    assert (store.path_of(best_record.name) / "model.safetensors").is_file()
    assert not pending_ack_paths(RunPaths(run))
    assert not list(shm_root.iterdir()), "slots must not outlive the run in shared memory"
