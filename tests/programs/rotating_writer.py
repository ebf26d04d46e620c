"""Write eval lines like a trainer, rotating and truncating the log under the daemon's feet.

``rotating_writer.py LOG EVALS_JSON``: EVALS_JSON is a list of ``[step, eval_loss]``.
Every 7th line the log is renamed away and a new one started (rename-rotation);
every 11th it is copied aside and truncated in place (copytruncate). Before each,
it waits until the daemon has judged the last line written, as a real rotation
(daily, by size) happens long after the daemon read the lines: lines a rotation
takes away unread are out of any follower's reach. After it, lines race the
daemon's next read.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path


def main() -> None:
    log, evals = Path(sys.argv[1]), json.loads(sys.argv[2])
    handle = log.open("a")
    for index, (step, loss) in enumerate(evals, start=1):
        handle.write(json.dumps({"step": step, "loss": 1.0, "eval_loss": loss}) + "\n")
        handle.flush()
        if index % 7 == 0 or index % 11 == 0:
            wait_judged(log.parent / ".ckptd" / "state.json", step)
        if index % 7 == 0:
            handle.close()
            os.rename(log, log.with_name(f"{log.name}.{index}"))
            handle = log.open("a")
        elif index % 11 == 0:
            shutil.copy(log, log.with_name(f"{log.name}.{index}"))
            handle.truncate(0)
            handle.seek(0)
        time.sleep(0.002 * (index % 3))
    handle.close()


def wait_judged(state: Path, step: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if json.loads(state.read_text())["judged_step"] >= step:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.001)
    sys.exit(f"the daemon did not judge step {step} in 20 s")


if __name__ == "__main__":
    main()
