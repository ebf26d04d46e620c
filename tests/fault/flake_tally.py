"""The flake tally: the whole suite run again and again, two runs at a time, and every failure counted.

    python -m tests.fault.flake_tally --runs 20 [--parallel 2] [--out DIR] [-- PYTEST ARGS]

Each run is its own ``pytest -q`` process with its own ``--basetemp`` (two runs at once must
share nothing but the machine, which is the point: the second one is the load). A failure
that shows up in one run and not in the others is a race until shown otherwise. The tally
prints each run's outcome and, per failing test, in how many runs it failed; each run's full
output stays in ``--out``. Exits 1 if any run failed. Not part of CI: 20 runs of the suite
take hours on a 2-core machine.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# pytest -q's summary lines under -ra: "FAILED tests/x.py::test_y - AssertionError..."
_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)
# The last line of -q: "1 failed, 1304 passed, 10 skipped in 1146.22s (0:19:06)" (no "=" under -q).
_SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed|error).*?) in ([\d.]+)s", re.MULTILINE)


@dataclass(frozen=True)
class RunOutcome:
    """One run of the suite: its exit status, its failing test ids, its summary line."""

    index: int
    returncode: int
    failed: tuple[str, ...]
    summary: str
    seconds: float


def run_suite(index: int, out_dir: Path, pytest_args: list[str]) -> RunOutcome:
    output = out_dir / f"run-{index:02d}.txt"
    basetemp = Path(tempfile.mkdtemp(prefix=f"flake-{index:02d}-"))
    started = time.monotonic()
    with output.open("w") as handle:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                f"--basetemp={basetemp}",
                *pytest_args,
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=False,
        )
    subprocess.run(["rm", "-rf", str(basetemp)], check=False)
    text = output.read_text(errors="replace")
    summary = _SUMMARY.findall(text)
    return RunOutcome(
        index=index,
        returncode=done.returncode,
        failed=tuple(sorted(set(_FAILED.findall(text)))),
        summary=summary[-1][0] if summary else "(no summary: see the output)",
        seconds=time.monotonic() - started,
    )


def report(outcomes: list[RunOutcome]) -> str:
    lines = [f"{'run':>4}  {'status':>6}  {'minutes':>7}  summary"]
    for o in sorted(outcomes, key=lambda o: o.index):
        lines.append(f"{o.index:>4}  {o.returncode:>6}  {o.seconds / 60:>7.1f}  {o.summary}")
    counts = collections.Counter(test for o in outcomes for test in o.failed)
    failed_runs = sum(1 for o in outcomes if o.returncode != 0)
    lines.append(f"\n{len(outcomes)} runs, {failed_runs} with a failure")
    for test, n in counts.most_common():
        lines.append(f"  failed in {n}/{len(outcomes)} runs: {test}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20, help="how many runs of the suite (default 20)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for each run's output (default: a temp dir)"
    )
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest after --")
    args = parser.parse_args(argv)
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="flake-tally-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"{args.runs} runs, {args.parallel} at a time; outputs in {out_dir}", flush=True)
    outcomes: list[RunOutcome] = []
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = [pool.submit(run_suite, i + 1, out_dir, args.pytest_args) for i in range(args.runs)]
        for future in futures:
            outcome = future.result()
            outcomes.append(outcome)
            print(f"run {outcome.index}: status {outcome.returncode}, {outcome.summary}", flush=True)
    text = report(outcomes)
    (out_dir / "tally.txt").write_text(text + "\n")
    print(text)
    return 1 if any(o.returncode for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
