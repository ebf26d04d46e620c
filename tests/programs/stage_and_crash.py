"""Stage one large snapshot through CheckpointClient, then die without cleaning up.

Used to kill the daemon in the middle of a persist and to show that a trainer
crashing right after its ack still gets its snapshot persisted. The state is
a function of its size only, so the test can rebuild it to compare.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from ckptd import CheckpointClient


def big_state(mib: int) -> dict[str, object]:
    n = mib * 2**20 // 4
    return {"big": torch.arange(n, dtype=torch.float32) * 0.5, "note": "crash test", "step": 1}


def main() -> None:
    run_dir, mib = Path(sys.argv[1]), int(sys.argv[2])
    client = CheckpointClient(run_dir)
    deadline = time.monotonic() + 30
    while not client.maybe_snapshot(1, lambda: big_state(mib)):
        if time.monotonic() > deadline:
            sys.exit("no capture was asked for in 30 s")
        time.sleep(0.01)
    os._exit(0)  # a crash: no close(), the slot stays in shared memory with its ack


if __name__ == "__main__":
    main()
