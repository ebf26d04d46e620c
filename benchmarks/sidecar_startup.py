"""``ckptd sidecar`` start-up: from launch until the command starts, and the hook's cost.

Run by hand, not part of the test suite::

    .venv/bin/python benchmarks/sidecar_startup.py [--repeats 7] [--json]

Rounds are interleaved; medians (and min-max) of ``--repeats`` are reported:

1. **sidecar → command**: t0, then ``python -m ckptd sidecar --run-dir FRESH -q -- date
   +%s.%N``; the command prints the wall clock when it runs. The sidecar starts the daemon,
   waits for its first heartbeat, then starts the command: this is what a training job waits.
   Baseline, same round: ``date +%s.%N`` launched directly (the command's own start).
2. **the parts**: a bare ``python -c pass``; ``python -m ckptd --version`` (the CLI's
   imports); ``python -m ckptd run FRESH -q`` until its first heartbeat (``daemon_alive``
   polled every 1 ms).
3. **sidecar, whole**: launch until the sidecar exits with ``true`` as the command (daemon
   started, command run, daemon stopped, summary).
4. **the hook in every Python process**: ``python -c pass`` with ``CKPTD_HOOK=1`` and the hook
   first on PYTHONPATH, against the same without (5 alternating pairs a round); and the hook's own import time
   (``-X importtime``, self microseconds of ``sitecustomize``).

Children run without ``PYTHONDONTWRITEBYTECODE`` (an installed package has its ``.pyc``
files; compiling ckptd on every start would be measured otherwise); the script says so when
it removed it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import machine_info, progress

from ckptd.protocol import RunPaths, daemon_alive
from ckptd.sidecar import HOOK_DIR

PY = sys.executable


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, **extra}


def sidecar_to_command(parent: Path, env: dict[str, str]) -> float:
    run_dir = Path(tempfile.mkdtemp(dir=parent)) / "run"
    t0 = time.time()
    out = subprocess.run(
        [PY, "-m", "ckptd", "sidecar", "--run-dir", str(run_dir), "-q", "--", "date", "+%s.%N"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    return float(out.split()[0]) - t0


def direct_command(env: dict[str, str]) -> float:
    t0 = time.time()
    out = subprocess.run(["date", "+%s.%N"], capture_output=True, text=True, env=env, check=True).stdout
    return float(out.split()[0]) - t0


def sidecar_whole(parent: Path, env: dict[str, str]) -> float:
    run_dir = Path(tempfile.mkdtemp(dir=parent)) / "run"
    t0 = time.perf_counter()
    subprocess.run(
        [PY, "-m", "ckptd", "sidecar", "--run-dir", str(run_dir), "-q", "--", "true"],
        capture_output=True,
        env=env,
        check=True,
    )
    return time.perf_counter() - t0


def daemon_to_heartbeat(parent: Path, env: dict[str, str]) -> float:
    run_dir = Path(tempfile.mkdtemp(dir=parent)) / "run"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [PY, "-m", "ckptd", "run", str(run_dir), "-q"], env=env, stderr=subprocess.DEVNULL
    )
    try:
        while not daemon_alive(RunPaths(run_dir)):
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {proc.returncode}")
            time.sleep(0.001)
        return time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait()


def python_run(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([PY, *argv], env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def hook_import_us(env: dict[str, str]) -> float:
    err = subprocess.run(
        [PY, "-X", "importtime", "-c", "pass"], env=env, capture_output=True, text=True, check=True
    ).stderr
    for line in err.splitlines():
        if line.rstrip().endswith("| sitecustomize") or line.rstrip().endswith("|   sitecustomize"):
            return float(line.split("|")[0].split(":")[1])
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print every figure as JSON on stdout")
    args = parser.parse_args()
    if "PYTHONDONTWRITEBYTECODE" in os.environ:
        progress("note: PYTHONDONTWRITEBYTECODE removed for the children (.pyc files as installed)")
    plain = _env()
    hooked = _env(
        CKPTD_HOOK="1", PYTHONPATH=os.pathsep.join(filter(None, [str(HOOK_DIR), plain.get("PYTHONPATH")]))
    )
    measures: dict[str, Callable[[Path], float]] = {
        "sidecar launch -> command starts": lambda p: sidecar_to_command(p, plain),
        "baseline: the command launched directly": lambda _p: direct_command(plain),
        "python -m ckptd --version": lambda _p: python_run(["-m", "ckptd", "--version"], plain),
        "ckptd run: launch -> first heartbeat": lambda p: daemon_to_heartbeat(p, plain),
        "sidecar whole, command `true`": lambda p: sidecar_whole(p, plain),
    }
    pair = ("python -c pass", "python -c pass, hooked")
    samples: dict[str, list[float]] = {name: [] for name in (*measures, *pair)}
    hook_us: list[float] = []
    with tempfile.TemporaryDirectory(prefix="ckptd-sidecar-bench-") as scratch:
        parent = Path(scratch)
        python_run(["-m", "ckptd", "--version"], plain)  # writes the .pyc files once
        python_run(["-c", "pass"], hooked)
        for round_ in range(args.repeats):
            progress(f"round {round_ + 1}/{args.repeats}")
            for name, measure in measures.items():
                samples[name].append(measure(parent))
            for _ in range(5):  # a few ms apart: many alternating pairs, or noise hides them
                samples[pair[0]].append(python_run(["-c", "pass"], plain))
                samples[pair[1]].append(python_run(["-c", "pass"], hooked))
            hook_us.append(hook_import_us(hooked))
    figures = {
        name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)}
        for name, v in samples.items()
    }
    figures["hook import (sitecustomize self)"] = {
        "median_s": statistics.median(hook_us) / 1e6,
        "min_s": min(hook_us) / 1e6,
        "max_s": max(hook_us) / 1e6,
    }
    if args.json:
        print(json.dumps({"machine": machine_info(), "repeats": args.repeats, "figures": figures}, indent=1))
        return
    print(f"machine: {machine_info()}")
    width = max(map(len, figures))
    print(f"{'what':<{width}}  {'median':>9}  {'min-max':>17}")
    for name, f in figures.items():
        print(
            f"{name:<{width}}  {f['median_s'] * 1e3:7.1f}ms  "
            f"{f['min_s'] * 1e3:7.1f}-{f['max_s'] * 1e3:.1f} ms"
        )
    hooked, plain = figures["python -c pass, hooked"], figures["python -c pass"]
    print(
        "hook's cost per Python process (hooked - plain): "
        f"medians {(hooked['median_s'] - plain['median_s']) * 1e3:.1f} ms, "
        f"minima {(hooked['min_s'] - plain['min_s']) * 1e3:.1f} ms (the minima are the less noisy)"
    )


if __name__ == "__main__":
    main()
