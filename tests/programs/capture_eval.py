"""Log one eval, wait for its verdict, capture a large state for it, then die.

``capture_eval.py RUN_DIR STEP LOSS MIB``: the state is a function of STEP and MIB
only, so a test can rebuild it to compare. Dying with ``os._exit`` right after the
ack is a trainer crash: no ``close()``, the slot stays in shared memory.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from ckptd import CheckpointClient


def big_state(step: int, mib: int) -> dict[str, object]:
    n = mib * 2**20 // 4
    return {"big": torch.full((n,), float(step)), "step": step}


def main() -> None:
    run_dir, step, loss, mib = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    client = CheckpointClient(run_dir, rendezvous_timeout=20)
    with (run_dir / "logging.jsonl").open("a") as log:
        log.write(json.dumps({"step": step, "eval_loss": loss}) + "\n")
    verdict = client.wait_verdict(step)
    if verdict is None or verdict.action != "snapshot":
        sys.exit(f"expected a snapshot verdict for step {step}, got {verdict}")
    if not client.maybe_snapshot(step, lambda: big_state(step, mib)):
        sys.exit("the capture was not staged")
    os._exit(0)


if __name__ == "__main__":
    main()
