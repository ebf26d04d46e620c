"""How ``ckptd serve`` scales with the runs it serves: memory, CPU, eval-to-verdict latency.

Three measurements, one node daemon each, on the same machine in one run:

1. 1 idle run: the daemon's RSS and CPU share over ``--idle`` seconds once it serves it.
2. 20 idle runs (``--runs``): the same; the ratio to (1) is the cost of a run.
3. 20 active runs: a writer appends a training line to every run's log ten times a second;
   meanwhile, one run at a time, an eval line is appended and the time until that run's
   control.json holds the verdict for its step is measured (``--samples`` times).

Run it by hand: ``.venv/bin/python benchmarks/serve_scale.py [--runs 20] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from benchlib import machine_info, progress

from ckptd.protocol import RunPaths, daemon_alive, read_control


def make_runs(root: Path, count: int) -> list[Path]:
    runs = []
    for index in range(count):
        run = root / f"run-{index:03d}"
        run.mkdir(parents=True)
        (run / "ckptd.toml").write_text("")
        (run / "logging.jsonl").write_text(json.dumps({"step": 0, "loss": 1.0}) + "\n")
        runs.append(run)
    return runs


def start_node(folder: Path, root: Path) -> subprocess.Popen[bytes]:
    config = folder / "node.toml"
    config.write_text(
        f'[serve]\nroots = ["{root}"]\nscan_interval = 1\nlog_level = "warning"\n'
        '[run]\nmetric = "eval_loss"\nkeep_last = 1\n'
    )
    return subprocess.Popen([sys.executable, "-m", "ckptd", "serve", "--config", str(config)])


def wait_served(runs: list[Path], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(daemon_alive(RunPaths(run)) for run in runs):
        if time.monotonic() > deadline:
            raise SystemExit("the node daemon did not adopt every run in time")
        time.sleep(0.1)


def idle_cost(runs: list[Path], node: subprocess.Popen[bytes], seconds: float) -> dict[str, float]:
    process = psutil.Process(node.pid)
    time.sleep(2.0)  # settle after adoption
    before, start = process.cpu_times(), time.monotonic()
    time.sleep(seconds)
    after, elapsed = process.cpu_times(), time.monotonic() - start
    cpu = (after.user + after.system - before.user - before.system) / elapsed
    return {
        "runs": len(runs),
        "rss_mib": process.memory_info().rss / 2**20,
        "cpu_percent_of_one_core": 100 * cpu,
        "threads": process.num_threads(),
    }


def latency(runs: list[Path], samples: int) -> dict[str, float]:
    stop = threading.Event()

    def train_lines() -> None:
        step = 1
        while not stop.is_set():
            for run in runs:
                with (run / "logging.jsonl").open("a") as log:
                    log.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
            step += 1
            time.sleep(0.1)

    writer = threading.Thread(target=train_lines, daemon=True)
    writer.start()
    seconds = []
    try:
        for sample in range(samples):
            run = runs[sample % len(runs)]
            step = 10_000_000 + sample
            started = time.perf_counter()
            with (run / "logging.jsonl").open("a") as log:
                log.write(json.dumps({"step": step, "eval_loss": 1.0 / (sample + 2)}) + "\n")
            while True:
                try:
                    control = read_control(RunPaths(run).control)
                except (OSError, ValueError):
                    control = None
                if control is not None and control.verdict is not None and control.verdict.eval_step == step:
                    break
                if time.perf_counter() - started > 30:
                    raise SystemExit(f"no verdict for {run} step {step} within 30 s")
                time.sleep(0.001)
            seconds.append(time.perf_counter() - started)
    finally:
        stop.set()
        writer.join()
    ms = sorted(1000 * s for s in seconds)
    return {
        "runs": len(runs),
        "samples": len(ms),
        "p50_ms": statistics.median(ms),
        "p95_ms": ms[int(0.95 * (len(ms) - 1))],
        "max_ms": ms[-1],
    }


def measure(count: int, idle: float, samples: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="ckptd-serve-bench-"))
    node = None
    try:
        runs = make_runs(folder / "runs", count)
        node = start_node(folder, folder / "runs")
        wait_served(runs)
        result: dict[str, Any] = {"idle": idle_cost(runs, node, idle)}
        if samples:
            result["latency"] = latency(runs, samples)
        return result
    finally:
        if node is not None:
            node.send_signal(signal.SIGTERM)
            node.wait(120)
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle measured")
    parser.add_argument("--samples", type=int, default=100, help="evals timed with every run active")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    progress("1 idle run ...")
    one = measure(1, args.idle, 0)
    progress(f"{args.runs} runs: idle, then active ...")
    many = measure(args.runs, args.idle, args.samples)
    report = {"machine": machine_info(loadavg=os.getloadavg()), "one": one, "many": many}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    for label, result in (("1 run", one), (f"{args.runs} runs", many)):
        idle = result["idle"]
        print(
            f"{label:>8} idle: RSS {idle['rss_mib']:.0f} MiB, CPU {idle['cpu_percent_of_one_core']:.2f}% "
            f"of a core, {idle['threads']} threads"
        )
    print(f"RSS ratio {args.runs} runs / 1 run: {many['idle']['rss_mib'] / one['idle']['rss_mib']:.2f}")
    lat = many["latency"]
    print(
        f"eval-to-verdict with {args.runs} active runs: p50 {lat['p50_ms']:.1f} ms, "
        f"p95 {lat['p95_ms']:.1f} ms, max {lat['max_ms']:.1f} ms ({lat['samples']} samples)"
    )


if __name__ == "__main__":
    main()
