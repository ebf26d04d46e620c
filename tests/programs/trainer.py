"""A real training loop in its own process, driven by the tests.

It trains the demo's tiny MLP, evaluates every ``--eval-every`` steps, logs
JSONL, and uses ``CheckpointClient`` exactly as the README says. At every eval
step it also saves the model's weights with ``torch.save`` under
``RUN_DIR/reference/`` so a test can compare a retained checkpoint bit for bit.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ckptd import CheckpointClient
from ckptd.demo import eval_loss, make_model, make_task


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--step-delay", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    reference = args.run_dir / "reference"
    reference.mkdir(parents=True, exist_ok=True)
    task, model = make_task(), make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    evals: dict[int, float] = {}
    captured: list[int] = []
    with (
        (args.run_dir / "logging.jsonl").open("a") as log,
        CheckpointClient(args.run_dir, optimizer=optimizer) as ckpt,
    ):
        for step in range(1, args.steps + 1):
            batch = torch.randint(0, task.x_train.shape[0], (16,), generator=task.batches)
            loss = torch.nn.functional.mse_loss(model(task.x_train[batch]), task.y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % args.eval_every == 0:
                evals[step] = eval_loss(model, task)
                torch.save(model.state_dict(), reference / f"{step}.pt")
                log.write(json.dumps({"step": step, "loss": loss.item(), "eval_loss": evals[step]}) + "\n")
                log.flush()
                ckpt.wait_verdict(step)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
            if ckpt.maybe_snapshot(step, lambda state=state: state):
                captured.append(step)
            time.sleep(args.step_delay)
    summary = {"evals": {str(k): v for k, v in evals.items()}, "captured": captured}
    (args.run_dir / "trainer-summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
