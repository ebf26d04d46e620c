"""Training wall time of a Lightning ``Trainer`` with and without ``CkptdCallback`` + daemon.

Run by hand, not part of the test suite::

    .venv/bin/python benchmarks/lightning_overhead.py [--repeats 3] [--max-steps 400] [--val-every 10]
        [--every-steps 0] [--threads 1] [--json]

The model and data are the test suite's (``tests/programs/lightning_tiny.py``: an MLP of width
64 on 16 noisy samples, CPU, no logger, no checkpointing). Each round trains it from scratch
twice in this process, alternating which goes first: once plain, once with ``CkptdCallback``
and a real ``ckptd run --log ckptd-metrics.jsonl --metric val_loss`` daemon subprocess beside it
(its verdict waits and best captures included; ``--every-steps`` adds scheduled captures). Only
``trainer.fit()`` is timed; the daemon is started and alive before it. Medians are reported
with min-max, and the ratio; also the callback's time per validation (the line, the verdict
wait and, for a new best, the capture), which following ``CSVLogger``'s ``metrics.csv``
instead made ~330 ms (Lightning writes the validation row late).

On a model this small every fixed cost shows: the figures are an upper bound for the relative
overhead, not a typical one.
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

import lightning_tiny  # noqa: E402
import torch  # noqa: E402
from benchlib import start_daemon  # noqa: E402

from ckptd.integrations.lightning import CkptdCallback  # noqa: E402
from ckptd.store import Store  # noqa: E402

LOG = "ckptd-metrics.jsonl"


class TimedCallback(CkptdCallback):
    """``CkptdCallback`` that records how long each of its validation rendezvous took."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rendezvous_s: list[float] = []
        self.step_s = 0.0  # all of on_train_batch_end: the stat, prepare, scheduled captures

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        start = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, *args)
        self.step_s += time.perf_counter() - start

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        start = time.perf_counter()
        super().on_validation_end(trainer, pl_module)
        if not trainer.sanity_checking:
            self.rendezvous_s.append(time.perf_counter() - start)


def train_once(folder: Path, options: argparse.Namespace, with_ckptd: bool) -> dict[str, Any]:
    run = folder / ("ckptd" if with_ckptd else "plain")
    run.mkdir(parents=True)
    daemon = None
    env = dict(os.environ, CKPTD_SHM_ROOT=str(folder / "shm"))
    os.environ["CKPTD_SHM_ROOT"] = env["CKPTD_SHM_ROOT"]
    (folder / "shm").mkdir(exist_ok=True)
    callbacks: list[Any] = []
    callback = None
    if with_ckptd:
        schedule = ["--every-steps", str(options.every_steps)] if options.every_steps else []
        argv = [sys.executable, "-m", "ckptd", "run", str(run), "--log", LOG, "--metric", "val_loss"]
        daemon = start_daemon([*argv, "-q", *schedule], run, env, ROOT)
        callback = TimedCallback(run)
        callbacks.append(callback)
    trainer = lightning_tiny.trainer(
        run, max_steps=options.max_steps, val_every=options.val_every, callbacks=callbacks
    )
    model = lightning_tiny.model()
    train, val = lightning_tiny.loaders()
    start = time.perf_counter()
    trainer.fit(model, train, val)
    seconds = time.perf_counter() - start
    kept: list[int] = []
    if daemon is not None:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        kept = [record.step for record in Store(run / "checkpoints").list()]
    return {
        "seconds": seconds,
        "kept": kept,
        "rendezvous_s": callback.rendezvous_s if callback else [],
        "step_hook_s": callback.step_s if callback else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--val-every", type=int, default=10)
    parser.add_argument("--every-steps", type=int, default=0, help="daemon schedule; 0: none")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    times: dict[str, list[float]] = {"plain": [], "ckptd": []}
    rendezvous: list[float] = []
    step_hook: list[float] = []
    kept: list[int] = []
    with tempfile.TemporaryDirectory(prefix="ckptd-lightning-bench-") as scratch:
        # Round 0 warms up imports and allocator for both; it is not counted.
        for round_ in range(options.repeats + 1):
            order = [False, True] if round_ % 2 == 0 else [True, False]
            for with_ckptd in order:
                result = train_once(Path(scratch, f"r{round_}"), options, with_ckptd)
                if round_:
                    times["ckptd" if with_ckptd else "plain"].append(result["seconds"])
                    rendezvous.extend(result["rendezvous_s"])
                    if with_ckptd:
                        step_hook.append(result["step_hook_s"])
                if with_ckptd:
                    kept = result["kept"]
                print(
                    f"round {round_} {'ckptd' if with_ckptd else 'plain'}: {result['seconds']:.2f} s",
                    file=sys.stderr,
                )
    plain, ckptd = statistics.median(times["plain"]), statistics.median(times["ckptd"])
    rendezvous.sort()
    summary = {
        "max_steps": options.max_steps,
        "val_every": options.val_every,
        "every_steps": options.every_steps,
        "threads": options.threads,
        "repeats": options.repeats,
        "plain_s": times["plain"],
        "ckptd_s": times["ckptd"],
        "plain_median_s": plain,
        "ckptd_median_s": ckptd,
        "ratio": ckptd / plain,
        "per_step_overhead_ms": (ckptd - plain) / options.max_steps * 1e3,
        "rendezvous_p50_ms": statistics.median(rendezvous) * 1e3,
        "rendezvous_max_ms": rendezvous[-1] * 1e3,
        "rendezvous_count": len(rendezvous),
        "step_hook_median_s": statistics.median(step_hook),
        "kept_steps_last_round": kept,
    }
    if options.json:
        print(json.dumps(summary))
        return
    print(
        f"fit() wall time, {options.max_steps} steps, validation every {options.val_every}, "
        f"median of {options.repeats} (min-max):"
    )
    for name in ("plain", "ckptd"):
        values = times[name]
        print(f"  {name:6s} {statistics.median(values):7.2f} s  ({min(values):.2f}-{max(values):.2f})")
    print(f"  ratio ckptd/plain: {ckptd / plain:.3f}   checkpoints kept: {kept}")
    print(
        f"  per validation (line + verdict wait + capture when best), {len(rendezvous)} of them: "
        f"p50 {summary['rendezvous_p50_ms']:.2f} ms, max {summary['rendezvous_max_ms']:.2f} ms"
    )
    hook = statistics.median(step_hook)
    print(f"  after each step (stat, prepare, scheduled captures), whole run: {hook:.3f} s")


if __name__ == "__main__":
    main()
