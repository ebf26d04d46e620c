"""The crash harness's trainer: a real ``CheckpointClient`` driven by a seeded eval schedule.

``crash_trainer.py RUN_DIR CONTROL_DIR --seed N --mib M --eval-every E --step-delay S``

torch is imported once, here; each *life* of the trainer is a forked child, so a trainer
killed right after its ack is followed by a fresh one (a new client, the old slot still
acked in shared memory) in milliseconds rather than a second import of torch. The child logs
an eval every E steps (seeded values with frequent new bests), waits for the verdict and calls
``maybe_snapshot`` at every step with a state of about M MiB whose tensors hold the step, so
the harness can tell which step a checkpoint holds.

It talks to the harness through CONTROL_DIR:

* ``journal.jsonl``: every ack this trainer wrote, appended right after ``write_ack`` returned;
* ``die``: when present at an ack, the child removes it, journals the ack with ``"die": true``
  and SIGKILLs itself; ``both:PID`` SIGKILLs the daemon PID first (both die "at once");
* ``stop``: the child ends its loop and closes its client; the parent exits;
* ``child.pid``: the pid of the life now running (the harness pauses it with SIGSTOP).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import signal
import struct
import sys
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any

import torch

import ckptd.client.client as client_module
from ckptd import CheckpointClient
from ckptd.protocol import Ack, RunPaths

METRIC = "eval_loss"


def eval_value(seed: int, step: int) -> float:
    """The eval at ``step``: a 0.5 % decline per 3 steps times up to 10 % of seeded noise, so
    about a third of the evals (every 3 steps) are a new best, and the best is often older than
    the last periodic captures (retention must keep it). A pure function of (seed, step): a new
    life of the trainer logs the same values a dead one would have."""
    noise = random.Random(seed * 1_000_003 + step).uniform(0.0, 0.1)
    return float(0.995 ** (step / 3) * (1.0 + noise))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("control", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mib", type=int, default=8, help="size of the state's pad tensor")
    parser.add_argument("--eval-every", type=int, default=3)
    parser.add_argument("--step-delay", type=float, default=0.03)
    return parser.parse_args(argv)


class Journal:
    """Wraps the client's ``write_ack``: each ack is journaled once it is written, and the
    harness's ``die`` request is carried out right there, after the ack and before anything
    else the trainer does."""

    def __init__(self, control: Path) -> None:
        self.control = control
        self.handle = (control / "journal.jsonl").open("a")
        self.real = client_module.write_ack

    def install(self) -> None:
        client_module.write_ack = self.write_ack  # the client calls it through its module

    def write_ack(self, paths: RunPaths, ack: Ack) -> Path:
        written = self.real(paths, ack)
        order = self._take_die_order()
        entry: dict[str, Any] = {**ack.to_json(), "pid": os.getpid(), "die": order is not None}
        self.handle.write(json.dumps(entry) + "\n")
        self.handle.flush()
        if order is not None:
            _die(order)
        return written

    def _take_die_order(self) -> str | None:
        path = self.control / "die"
        try:
            order = path.read_text()
            path.unlink()
        except FileNotFoundError:
            return None
        return order


def _die(order: str) -> None:
    """SIGKILL ourselves right after the ack (and the daemon first, for ``both:PID``)."""
    if order.startswith("both:"):
        os.kill(int(order.split(":", 1)[1]), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def life(args: argparse.Namespace, counter: mmap.mmap) -> int:
    """One trainer process: from the step after the last one any life reached, until ``stop``."""
    torch.set_num_threads(1)  # a loaded 2-core machine: no intra-op thread pool
    (args.control / "child.pid").write_text(str(os.getpid()))
    Journal(args.control).install()
    pad = torch.empty(args.mib << 18)  # float32: 4 bytes each
    (last,) = struct.unpack_from("q", counter)
    step = last + 1
    stop = args.control / "stop"
    with (args.run_dir / "logging.jsonl").open("a") as log, CheckpointClient(args.run_dir) as ckpt:
        while not stop.exists():
            if step % args.eval_every == 0:
                log.write(json.dumps({"step": step, METRIC: eval_value(args.seed, step)}) + "\n")
                log.flush()
                ckpt.wait_verdict(step)
            # Counted before the capture: a life killed right after its ack is followed by one
            # starting at the next step, so no two acks ever name one captured step.
            struct.pack_into("q", counter, 0, step)
            ckpt.maybe_snapshot(step, partial(state_at, step, pad))
            step += 1
            time.sleep(args.step_delay)
    return 0


def state_at(step: int, pad: torch.Tensor) -> dict[str, object]:
    """Every tensor holds the step: a checkpoint's bytes say which capture they came from."""
    pad.fill_(float(step))
    return {"w": torch.full((4,), float(step)), "pad": pad, "step": step}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counter = mmap.mmap(-1, 8)  # shared with every forked life: the last step reached
    while True:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = life(args, counter)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)  # never return into the parent's loop
        _, status = os.waitpid(pid, 0)
        if (args.control / "stop").exists() or not os.WIFSIGNALED(status):
            return os.waitstatus_to_exitcode(status)
        print(f"trainer life {pid} killed by signal {os.WTERMSIG(status)}; starting another", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
