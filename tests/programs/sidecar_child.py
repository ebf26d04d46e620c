"""The command a ``ckptd sidecar`` test runs: one behaviour per first argument.

``exit N``: exit with status N. ``sigkill``: die of SIGKILL. ``trap READY MARKER``: a trainer
that, once it has written READY, waits for SIGTERM; then it logs an eval to the log the
sidecar's daemon follows, captures that step (a 32 MiB state) through ``CheckpointClient``,
writes MARKER (the signal's name) and exits 0 at once: the persist is still in flight when
the sidecar stops the daemon.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def trap(ready: Path, marker: Path) -> None:
    import torch

    from ckptd import CheckpointClient

    received: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: received.append(signum))
    run_dir = Path(os.environ["CKPTD_RUN_DIR"])
    client = CheckpointClient(run_dir, rendezvous_timeout=20)
    ready.write_text(str(os.getpid()))
    while not received:
        time.sleep(0.01)
    step = 40
    with (run_dir / "ckptd-metrics.jsonl").open("a") as log:
        log.write(json.dumps({"step": step, "eval_loss": 0.25}) + "\n")
    verdict = client.wait_verdict(step)
    if verdict is None or verdict.action != "snapshot":
        sys.exit(f"expected a snapshot verdict for step {step}, got {verdict}")
    state = {"w": torch.full((8 * 2**20,), 7.0), "step": step}
    if not client.maybe_snapshot(step, lambda: state):
        sys.exit("the capture was not staged")
    marker.write_text(signal.Signals(received[0]).name)
    os._exit(0)  # no clean-up: the daemon is stopped while it persists


def main() -> None:
    what = sys.argv[1]
    if what == "exit":
        sys.exit(int(sys.argv[2]))
    if what == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "trap":
        trap(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    sys.exit(f"unknown behaviour {what!r}")


if __name__ == "__main__":
    main()
