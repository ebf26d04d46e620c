"""Training wall time of a Hugging Face ``Trainer`` with and without ``CkptdCallback`` + daemon.

Run by hand, not part of the test suite::

    .venv/bin/python benchmarks/hf_overhead.py [--repeats 3] [--max-steps 300] [--threads 1] [--json]

The model and data are the test suite's (``tests/programs/hf_tiny.py``: a 2-layer GPT-2 of
width 32 on CPU, eval every 50 steps, ``save_steps=200``). Each round trains it from scratch
twice in this process, alternating which goes first: once plain, once with ``CkptdCallback``
and a real ``ckptd run --log ckptd-metrics.jsonl --metric eval_loss`` daemon subprocess beside
it (its verdict waits and best captures included). Only ``trainer.train()`` is timed; the
daemon is started and alive before it. Medians are reported with min-max, and the ratio.

On a model this small every fixed cost shows: the figures are an upper bound for the relative
overhead, not a typical one (a real model's steps take far longer, the per-step cost is the same).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "programs"))
sys.path.insert(0, str(ROOT))

import hf_tiny  # noqa: E402
import torch  # noqa: E402
from benchlib import start_daemon  # noqa: E402

from ckptd.integrations.hf import CkptdCallback  # noqa: E402
from ckptd.store import Store  # noqa: E402

LOG = "ckptd-metrics.jsonl"


def train_once(folder: Path, max_steps: int, with_ckptd: bool) -> dict[str, Any]:
    run = folder / ("ckptd" if with_ckptd else "plain")
    run.mkdir(parents=True)
    daemon = None
    env = dict(os.environ, CKPTD_SHM_ROOT=str(folder / "shm"))
    os.environ["CKPTD_SHM_ROOT"] = env["CKPTD_SHM_ROOT"]
    (folder / "shm").mkdir(exist_ok=True)
    trainer = hf_tiny.trainer(run, max_steps=max_steps)
    if with_ckptd:
        argv = [sys.executable, "-m", "ckptd", "run", str(run), "--log", LOG, "--metric", "eval_loss", "-q"]
        daemon = start_daemon(argv, run, env, ROOT)
        trainer.add_callback(CkptdCallback(run))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    kept: list[int] = []
    if daemon is not None:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        kept = [record.step for record in Store(run / "checkpoints").list()]
    return {"seconds": seconds, "kept": kept}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    times: dict[str, list[float]] = {"plain": [], "ckptd": []}
    kept: list[int] = []
    with tempfile.TemporaryDirectory(prefix="ckptd-hf-bench-") as scratch:
        # Round 0 warms up imports and allocator for both; it is not counted.
        for round_ in range(options.repeats + 1):
            order = [False, True] if round_ % 2 == 0 else [True, False]
            for with_ckptd in order:
                result = train_once(Path(scratch, f"r{round_}"), options.max_steps, with_ckptd)
                if round_:
                    times["ckptd" if with_ckptd else "plain"].append(result["seconds"])
                if with_ckptd:
                    kept = result["kept"]
                print(
                    f"round {round_} {'ckptd' if with_ckptd else 'plain'}: {result['seconds']:.2f} s",
                    file=sys.stderr,
                )
    plain, ckptd = statistics.median(times["plain"]), statistics.median(times["ckptd"])
    summary = {
        "max_steps": options.max_steps,
        "threads": options.threads,
        "repeats": options.repeats,
        "plain_s": times["plain"],
        "ckptd_s": times["ckptd"],
        "plain_median_s": plain,
        "ckptd_median_s": ckptd,
        "ratio": ckptd / plain,
        "kept_steps_last_round": kept,
    }
    if options.json:
        print(json.dumps(summary))
        return
    print(f"train() wall time, {options.max_steps} steps, median of {options.repeats} (min-max):")
    for name in ("plain", "ckptd"):
        values = times[name]
        print(f"  {name:6s} {statistics.median(values):7.2f} s  ({min(values):.2f}-{max(values):.2f})")
    print(f"  ratio ckptd/plain: {ckptd / plain:.3f}   checkpoints kept: {kept}")


if __name__ == "__main__":
    main()
