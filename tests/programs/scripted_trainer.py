"""A trainer whose evals are scripted: it logs the given records and captures when asked.

``scripted_trainer.py RUN_DIR EVALS_JSON [--log NAME]``: EVALS_JSON is a list of
objects with a ``step`` and metrics. For each, it logs the line, waits for the
verdict and calls ``maybe_snapshot`` with a state whose tensor is filled with
the step, so a test can tell which step a checkpoint holds (``--mb`` makes it larger).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ckptd import CheckpointClient


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("evals", type=json.loads)
    parser.add_argument("--log", default="logging.jsonl")
    parser.add_argument("--mb", type=int, default=0, help="add this many MiB of zeros to the state")
    args = parser.parse_args()
    extra = {"pad": torch.zeros(args.mb << 18)} if args.mb else {}
    captured = []
    with (args.run_dir / args.log).open("a") as log, CheckpointClient(args.run_dir) as ckpt:
        for record in args.evals:
            step = record["step"]
            log.write(json.dumps(record) + "\n")
            log.flush()
            ckpt.wait_verdict(step)
            if ckpt.maybe_snapshot(step, lambda step=step: {"w": torch.full((4,), float(step)), **extra}):
                captured.append(step)
    print(json.dumps(captured))


if __name__ == "__main__":
    main()
