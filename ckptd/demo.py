"""``ckptd demo``: the seed scenario, end to end, on a tiny real model in seconds.

A small MLP overfits a small regression set: its eval loss falls, bottoms out
at a step that is no multiple of 200, then rises. Training evaluates every 50
steps and asks for a periodic capture every 200, the way ``eval_steps=50,
save_steps=200`` would. A real ``ckptd run`` subprocess follows the log. At the
end the demo shows what periodic saving alone would have kept, what ckptd kept,
and proves the kept best is the model of that step: its weights equal the ones
held in memory at that step, and its eval loss recomputed from the loaded
snapshot equals the logged one.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ckptd._torch import torch_required

with torch_required():  # without torch: say which extra to install
    import torch

from ckptd import plot
from ckptd.client import CheckpointClient, load_snapshot
from ckptd.protocol import RunPaths, daemon_alive
from ckptd.store import Store

STEPS, EVAL_EVERY, SAVE_EVERY, KEEP_LAST = 2000, 50, 200, 2
SEED, TRAIN_SIZE, LR = 12, 96, 3e-3


@dataclass(frozen=True)
class Task:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    batches: torch.Generator


def make_task() -> Task:
    gen = torch.Generator().manual_seed(SEED)
    weights = torch.randn(8, 1, generator=gen)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 8, generator=gen)
        return x, torch.sin(x @ weights) + 0.3 * torch.randn(n, 1, generator=gen)

    x_train, y_train = sample(TRAIN_SIZE)
    x_eval, y_eval = sample(256)
    return Task(x_train, y_train, x_eval, y_eval, gen)


def make_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))


def eval_loss(model: torch.nn.Module, task: Task) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(task.x_eval), task.y_eval))


def run_demo(run_dir: Path | None = None) -> int:
    torch.set_num_threads(1)  # same arithmetic every run: the proof compares floats exactly
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="ckptd-demo-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"ckptd demo: tiny MLP, {STEPS} steps, eval every {EVAL_EVERY}, capture every {SAVE_EVERY},")
    print(f"            keep best 1 + last {KEEP_LAST}; run dir {run_dir}")
    daemon = _start_daemon(run_dir)
    try:
        evals, weights, stall = _train(run_dir)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    return _report(run_dir, evals, weights, stall, daemon.returncode)


def _start_daemon(run_dir: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "ckptd", "run", str(run_dir), "--every-steps", str(SAVE_EVERY)]
    command += ["--keep-best", "1", "--keep-last", str(KEEP_LAST)]
    with (run_dir / "daemon.log").open("ab") as daemon_log:
        daemon = subprocess.Popen(command, stdout=daemon_log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not daemon_alive(RunPaths(run_dir)):
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the ckptd daemon did not start; see {run_dir / 'daemon.log'}")
        time.sleep(0.02)
    print(f"daemon: pid {daemon.pid}, a real subprocess (log: {run_dir / 'daemon.log'})\n")
    return daemon


def _train(run_dir: Path) -> tuple[dict[int, float], dict[int, dict[str, torch.Tensor]], float]:
    task, model = make_task(), make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    evals: dict[int, float] = {}
    weights: dict[int, dict[str, torch.Tensor]] = {}
    stall = 0.0
    with (
        (run_dir / "logging.jsonl").open("a") as log,
        CheckpointClient(run_dir, optimizer=optimizer) as ckpt,
    ):
        for step in range(1, STEPS + 1):
            batch = torch.randint(0, TRAIN_SIZE, (16,), generator=task.batches)
            loss = torch.nn.functional.mse_loss(model(task.x_train[batch]), task.y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step == 1:
                ckpt.prepare(lambda: {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
            if step % EVAL_EVERY == 0:
                evals[step] = eval_loss(model, task)
                weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
                log.write(json.dumps({"step": step, "loss": loss.item(), "eval_loss": evals[step]}) + "\n")
                log.flush()
                ckpt.wait_verdict(step)
            started = time.perf_counter()
            ckpt.maybe_snapshot(
                step, lambda: {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            )
            stall += time.perf_counter() - started
    return evals, weights, stall


def _report(
    run_dir: Path,
    evals: dict[int, float],
    weights: dict[int, dict[str, torch.Tensor]],
    stall: float,
    daemon_status: int | None,
) -> int:
    best_step = min(evals, key=evals.__getitem__)
    periodic = [s for s in evals if s % SAVE_EVERY == 0]
    best_periodic = min(periodic, key=evals.__getitem__)
    print(f"best eval: step {best_step}, eval_loss {evals[best_step]:.6f}")
    print(f"\nwhat save_steps={SAVE_EVERY} with save_total_limit={KEEP_LAST} would have kept:")
    for step in periodic[-KEEP_LAST:]:
        print(f"  step {step:>5}  eval_loss {evals[step]:.6f}")
    verdict = "lost" if best_step % SAVE_EVERY else "saved by luck"
    print(f"  -> the best, step {best_step}, is {verdict}; the best a periodic save ever held was")
    print(f"     step {best_periodic} (eval_loss {evals[best_periodic]:.6f})")
    store = Store(RunPaths(run_dir).default_store)
    kept = store.list()
    print("\nwhat ckptd kept:")
    for record in kept:
        print(f"  step {record.step:>5}  {','.join(record.tags):<24} {store.path_of(record.name)}")
    expected = {best_step, *periodic[-KEEP_LAST:]}
    ok = {r.step for r in kept} == expected and daemon_status == 0
    best_record = next((r for r in kept if r.step == best_step), None)
    if best_record is None:
        print(f"\nFAILED: the best step {best_step} is not in the store")
        return 1
    ok &= _prove(store.path_of(best_record.name), best_step, evals, weights)
    print(f"\ntrainer time inside maybe_snapshot: {stall * 1e3:.1f} ms over {STEPS} steps")
    print(
        "demo passed" if ok else f"demo FAILED (kept {sorted(r.step for r in kept)}, want {sorted(expected)})"
    )
    print(f"look around: ckptd ls {run_dir}; ckptd best {run_dir}; ckptd verify {run_dir}")
    _picture(run_dir, store)
    return 0 if ok else 1


def _picture(run_dir: Path, store: Store) -> None:
    """The run as ``ckptd plot`` draws it, at the terminal's width, in colour only on a terminal."""
    data = plot.load_plot(run_dir, store)
    width = max(shutil.get_terminal_size().columns, plot.MIN_WIDTH)
    print()
    for panel in data.panels:
        print("\n".join(plot.render_text(panel, width, colour=sys.stdout.isatty())))


def _prove(
    path: Path, step: int, evals: dict[int, float], weights: dict[int, dict[str, torch.Tensor]]
) -> bool:
    snapshot = load_snapshot(path)
    identical = all(torch.equal(snapshot["model"][k], v) for k, v in weights[step].items())
    model = make_model()
    model.load_state_dict(snapshot["model"])
    recomputed = eval_loss(model, make_task())
    print(f"\nproof: {path.name} loaded back; weights bit-identical to step {step}: {identical}")
    print(
        f"       eval_loss recomputed {recomputed!r} == logged {evals[step]!r}: {recomputed == evals[step]}"
    )
    return identical and recomputed == evals[step]


if __name__ == "__main__":
    sys.exit(run_demo(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
