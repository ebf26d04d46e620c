"""Following a training log: parse throughput vs ``json.loads``, detection latency, daemon RSS.

Run by hand, not part of the test suite::

    .venv/bin/python benchmarks/follow_bench.py [--lines 1000000] [--evals 1000] [--dir PATH] [--json]

In one run, on one disk:

1. **Parse throughput.** Two ms-swift ``logging.jsonl`` files of ``--lines`` lines are
   generated (lines modelled on ms-swift's: a training line every logging step, an
   eval line every 5 logging steps as in the project's fixture, and a second file
   with one eval every 50 logging steps, a common production ratio). Each file is
   read, page cache warm, by ``wc -l`` (a subprocess), by a plain
   ``for line in f: json.loads(line)`` loop, by an ``orjson.loads`` loop (for
   reference), and by ckptd's reader as the daemon drives it: a fresh ``LineSource(path,
   JsonlFormat(watched=["eval_loss"]))`` whose ``read_events()`` (the events of about
   1 MiB of log per call) is called until ``source.behind`` is False; the events are
   counted and must equal the eval lines. Rounds are interleaved; medians of
   ``--repeats`` are reported.
2. **Detection latency.** A real ``ckptd run RUN_DIR -q`` daemon subprocess (inotify,
   then ``--poll --poll-interval 0.05``). For each eval the script pauses (2-8 ms,
   random: the daemon is idle when the eval comes, as in training; with polling, a
   random phase of the poll ticks), appends one line ``{"step": s, "eval_loss": v}``
   (improving and non-improving in turn, so both ``snapshot`` and ``skip`` verdicts
   occur), takes t0, and spins on ``os.stat(control.json)`` and ``read_control`` until
   the verdict for step ``s`` is there: t1 - t0. Each round also times one eval read
   by napping 0.1 ms between stats (the spinning reader holds a CPU the daemon may
   need). Separately: what a trainer sees, through ``CheckpointClient.wait_verdict(s)``
   (its backoff sleeps included); a diagnostic run with the daemon and the spinning
   reader pinned to separate CPUs (``taskset``); and the daemon's steps (wake-up,
   read, judge, control.json, state.json) timed one by one in this process with
   ckptd's own pieces.
3. **Daemon RSS.** Sampled with psutil during the inotify latency run, and while a
   daemon catches up on each generated 1M-line file and then follows it; the peak is
   the kernel's high-water mark (``VmHWM``). The floor: a bare ``python -c "import
   time; time.sleep(5)"`` with the same interpreter, and the same with the daemon's
   imports. The daemon judges a backlog a stretch at a time, so its peak should stay
   near the floor however long the log is.

Section 1 also splits ckptd's reading path into stages (cumulative timings), so a
missed target can be explained from the output.

Everything it starts is stopped (SIGTERM) and everything it creates is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import benchlib
import orjson
import psutil
from benchlib import (
    LoadMeter,
    daemon_status,
    filesystem_of,
    progress,
    scratch_dir,
)

from ckptd.daemon.state import DaemonState, save_state
from ckptd.logs.follow import ChangeWatcher, LogFollower
from ckptd.logs.jsonl import JsonlFormat
from ckptd.logs.source import LineSource
from ckptd.policy import judge
from ckptd.protocol import Control, RunPaths, daemon_alive, read_control, write_control
from ckptd.records import Criterion

LOGGING_STEPS = 10  # ms-swift's logging_steps in the generated logs (the fixture's)
DENSE_EVERY = 5  # eval_steps / logging_steps of the fixture (50 / 10)
SPARSE_EVERY = 50  # a common production ratio: one eval per 50 logged training lines
POLL_INTERVAL = 0.05
STOP_TIMEOUT_S = 15.0  # no persist is ever in flight here: a daemon stops in well under a second
PAUSE_S = (0.002, 0.008)  # the trainer's time between evals (uniform): the daemon is idle when one comes
NAP_S = 0.0001  # the napping reader's sleep between two stats of control.json
VERDICT_TIMEOUT_S = 10.0
MB = 1e6
MIB = 2**20

TARGETS = {
    "lines_per_s": 1_000_000,
    "ratio_over_json": 4.0,
    "inotify_p50_ms": 2.0,
    "inotify_p99_ms": 10.0,
    # "bounded by the interval": the interval plus the inotify p99 target for the work after waking.
    "poll_p99_ms": POLL_INTERVAL * 1e3 + 10.0,
    "rss_mb": 40.0,
}


NOTES: list[str] = []  # anything odd the run saw (a daemon that would not stop, a leftover): reported


def note(message: str) -> None:
    NOTES.append(message)
    progress(f"  NOTE: {message}")


# -- the machine and the disk (as in snapshot_stall.py) -------------------------------------------


def machine_info() -> dict[str, Any]:
    versions = {}
    for package in ("orjson", "watchdog", "psutil"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "?"
    return benchlib.machine_info(packages=versions)


# -- 1. the logs and their parse throughput ---------------------------------------------------------

_TRAIN = (
    '{"loss": %.8f, "grad_norm": %.8f, "learning_rate": %.8g, "token_acc": %.8f, "epoch": %.4f, '
    '"global_step/max_steps": "%d/%d", "percentage": "%.2f%%", "elapsed_time": "%s", '
    '"remaining_time": "%s", "memory(GiB)": %.2f, "train_speed(iter/s)": %.6f}\n'
)
_EVAL = (
    '{"eval_loss": %.8f, "eval_runtime": %.4f, "eval_samples_per_second": %.3f, '
    '"eval_steps_per_second": %.3f, "eval_token_acc": %.8f, "epoch": %.4f, '
    '"global_step/max_steps": "%d/%d", "percentage": "%.2f%%", "elapsed_time": "%s", '
    '"remaining_time": "%s", "memory(GiB)": %.2f, "train_speed(iter/s)": %.6f}\n'
)


def _duration(seconds: float) -> str:
    """ms-swift's format: ``1h 2m 3s``, ``4m 5s``, ``6s``."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def write_log(path: Path, lines: int, eval_every: int, seed: int) -> dict[str, Any]:
    """An ms-swift logging.jsonl of exactly ``lines`` lines: a training line every logging step,
    after every ``eval_every``-th one an eval line for the same step. Returns its shape."""
    rnd = random.Random(seed)
    cycle = eval_every + 1
    evals = lines // cycle + (1 if lines % cycle > eval_every else 0)
    train_lines = lines - evals
    max_steps = train_lines * LOGGING_STEPS
    it_per_s = 0.21
    chunk: list[str] = []
    written = eval_lines = 0
    with path.open("w") as handle:
        for index in range(train_lines):
            step = (index + 1) * LOGGING_STEPS
            done = step / max_steps
            elapsed = step / it_per_s
            loss = 2.0 * math.exp(-3 * done) + 0.1 + rnd.random() * 0.05
            chunk.append(
                _TRAIN
                % (
                    loss,
                    0.5 + rnd.random(),
                    1e-4 * (1 - done),
                    0.6 + 0.3 * done + rnd.random() * 0.02,
                    3 * done,
                    step,
                    max_steps,
                    100 * done,
                    _duration(elapsed),
                    _duration(elapsed / done - elapsed),
                    17.5 + rnd.random(),
                    it_per_s + rnd.random() * 0.01,
                )
            )
            written += 1
            if (index + 1) % eval_every == 0 and written < lines:
                chunk.append(
                    _EVAL
                    % (
                        loss + 0.05 + rnd.random() * 0.02,
                        30 + rnd.random() * 5,
                        13 + rnd.random(),
                        1.6 + rnd.random() * 0.1,
                        0.6 + 0.3 * done + rnd.random() * 0.02,
                        3 * done,
                        step,
                        max_steps,
                        100 * done,
                        _duration(elapsed),
                        _duration(elapsed / done - elapsed),
                        18.5 + rnd.random(),
                        it_per_s,
                    )
                )
                written += 1
                eval_lines += 1
            if len(chunk) >= 8192:
                handle.write("".join(chunk))
                chunk.clear()
        handle.write("".join(chunk))
    assert written == lines and eval_lines == evals, (written, eval_lines, evals)
    return {"path": str(path), "lines": lines, "evals": evals, "bytes": path.stat().st_size}


def time_wc(path: Path) -> tuple[float, int]:
    started = time.perf_counter()
    result = subprocess.run(["wc", "-l", str(path)], capture_output=True, text=True, check=True)
    return time.perf_counter() - started, int(result.stdout.split()[0])


def time_json(path: Path) -> tuple[float, int]:
    # Text mode: the faster of the two naive loops here (json.loads of bytes decodes them itself).
    count = 0
    loads = json.loads
    started = time.perf_counter()
    with path.open() as handle:
        for line in handle:
            loads(line)
            count += 1
    return time.perf_counter() - started, count


def time_orjson(path: Path) -> tuple[float, int]:
    count = 0
    loads = orjson.loads
    started = time.perf_counter()
    with path.open("rb") as handle:
        for line in handle:
            loads(line)
            count += 1
    return time.perf_counter() - started, count


def read_all_events(path: Path) -> int:
    """ckptd's reader as the daemon drives it: ``read_events()`` (about 1 MiB of log per call)
    until the source is no longer behind. Returns the number of events."""
    source = LineSource(path, JsonlFormat(watched=["eval_loss"]))
    count = 0
    try:
        while True:
            count += len(source.read_events())
            if not source.behind:
                return count
    finally:
        source.close()


def time_ckptd(path: Path) -> tuple[float, int]:
    started = time.perf_counter()
    count = read_all_events(path)
    return time.perf_counter() - started, count


READERS: dict[str, Callable[[Path], tuple[float, int]]] = {
    "wc": time_wc,
    "json": time_json,
    "orjson": time_orjson,
    "ckptd": time_ckptd,
}


def measure_parse(logs: dict[str, dict[str, Any]], repeats: int) -> dict[str, Any]:
    """Per log: every reader once per round, ``repeats`` rounds, after one untimed warm-up read."""
    for log in logs.values():
        time_wc(Path(log["path"]))  # warm the page cache (the file was just written: it is)
    seconds: dict[str, dict[str, list[float]]] = {name: {r: [] for r in READERS} for name in logs}
    for round_ in range(1, repeats + 1):
        for name, log in logs.items():
            path = Path(log["path"])
            cells = []
            for reader, function in READERS.items():
                gc.collect()
                took, count = function(path)
                expected = log["evals"] if reader == "ckptd" else log["lines"]
                if count != expected:
                    raise RuntimeError(f"{reader} on {name} counted {count}, expected {expected}")
                seconds[name][reader].append(took)
                cells.append(f"{reader} {took:.2f} s")
            progress(f"  round {round_}, {name}: " + ", ".join(cells))
    result: dict[str, Any] = {}
    for name, log in logs.items():
        medians = {r: statistics.median(v) for r, v in seconds[name].items()}
        result[name] = {
            **log,
            "seconds": seconds[name],
            "median_s": medians,
            "lines_per_s": {r: log["lines"] / s for r, s in medians.items()},
            "ckptd_over_json": medians["json"] / medians["ckptd"],
            "ckptd_over_orjson": medians["orjson"] / medians["ckptd"],
        }
    return result


# -- the daemon -------------------------------------------------------------------------------------


def daemon_command(run_dir: Path, *extra: str) -> list[str]:
    # -X faulthandler: a daemon that ignores SIGTERM gets SIGABRT, which prints every thread's stack.
    return [sys.executable, "-X", "faulthandler", "-m", "ckptd", "run", str(run_dir), "-q", *extra]


def start_daemon(
    run_dir: Path, *extra: str, prefix: tuple[str, ...] = (), timeout: float = 60.0
) -> subprocess.Popen[bytes]:
    """``ckptd run RUN_DIR -q``; returns once it is alive and its watchers run (status says which)."""
    command = [*prefix, *daemon_command(run_dir, *extra)]
    with (run_dir.parent / f"{run_dir.name}.daemon.log").open("ab") as daemon_log:
        daemon = subprocess.Popen(command, stdout=daemon_log, stderr=subprocess.STDOUT)
    paths = RunPaths(run_dir)
    deadline = time.monotonic() + timeout
    # Alive, and its log watcher running: the status written before the watchers start has none.
    while not (daemon_alive(paths) and daemon_status(paths).get("watcher")):
        if daemon.poll() is not None or time.monotonic() > deadline:
            stop_daemon(daemon, run_dir)
            raise RuntimeError(f"the ckptd daemon did not start:\n{_daemon_log(run_dir)}")
        time.sleep(0.005)
    return daemon


def _daemon_log(run_dir: Path, lines: int = 20) -> str:
    path = run_dir.parent / f"{run_dir.name}.daemon.log"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


def stop_daemon(daemon: subprocess.Popen[bytes], run_dir: Path) -> int | None:
    """SIGTERM, wait; then remove its /dev/shm staging dir if it left one (saying so)."""
    staging = None
    with contextlib.suppress(Exception):
        staging = read_control(RunPaths(run_dir).control).staging
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            daemon.send_signal(signal.SIGABRT)  # faulthandler prints the stacks into the daemon log
            try:
                daemon.wait(timeout=5)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
            note(
                f"daemon {daemon.pid} ({run_dir.name}) ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s; "
                f"aborted it. Its stacks:\n{_daemon_log(run_dir, 60)}"
            )
    if staging is not None:
        leftover = Path(staging)
        if leftover.name.startswith("ckptd-") and leftover.exists():
            note(f"{leftover} was still there after the daemon stopped; removed it")
            shutil.rmtree(leftover, ignore_errors=True)
    if daemon.returncode not in (0, -signal.SIGABRT, -signal.SIGKILL):
        note(f"daemon {daemon.pid} ({run_dir.name}) exited with {daemon.returncode}:\n{_daemon_log(run_dir)}")
    return daemon.returncode


@contextmanager
def running_daemon(
    run_dir: Path, *extra: str, prefix: tuple[str, ...] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    daemon = start_daemon(run_dir, *extra, prefix=prefix)
    try:
        yield daemon
    finally:
        stop_daemon(daemon, run_dir)


def peak_rss(pid: int) -> int | None:
    """The kernel's high-water mark of the process's RSS (VmHWM), bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss(process: psutil.Process) -> int | None:
    try:
        return process.memory_info().rss
    except psutil.Error:
        return None


# -- 2. detection latency ---------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float]:
    """Nearest-rank percentiles, in ms, of seconds."""
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1e3

    return {
        "n": len(ordered),
        "p50_ms": rank(0.50),
        "p90_ms": rank(0.90),
        "p99_ms": rank(0.99),
        "max_ms": ordered[-1] * 1e3,
        "mean_ms": statistics.fmean(ordered) * 1e3,
    }


class EvalWriter:
    """The trainer's side of the log: one eval line per call, steps growing, values alternating
    between a new best (snapshot) and a worse one (skip)."""

    def __init__(self, log: Path) -> None:
        self._handle = log.open("ab", buffering=0)  # each write is one write(2): flushed
        self.step = 0
        self._best = 10.0
        self.actions: dict[str, int] = {}

    def append(self) -> int:
        """Append the next eval line; returns its step."""
        self.step += 10
        if (self.step // 10) % 2:
            self._best -= 0.001
            value = self._best
        else:
            value = self._best + 1.0
        self._handle.write(b'{"step": %d, "eval_loss": %.6f}\n' % (self.step, value))
        return self.step

    def count(self, action: str) -> None:
        self.actions[action] = self.actions.get(action, 0) + 1

    def close(self) -> None:
        self._handle.close()


Signature = tuple[int, int, int]


def control_signature(control: Path) -> Signature:
    st = os.stat(control)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def wait_for_verdict(
    control: Path, step: int, signature: Signature, nap: float = 0.0
) -> tuple[Any, Signature]:
    """Stat control.json until it changes, read it, until the verdict for ``step`` is in it.

    ``nap`` 0 spins (one core busy); otherwise sleeps ``nap`` seconds between stats.
    Returns (the Control, its signature).
    """
    deadline = time.perf_counter() + VERDICT_TIMEOUT_S
    while True:
        current = control_signature(control)
        if current != signature:
            signature = current
            found = read_control(control)
            if found.verdict is not None and found.verdict.eval_step == step:
                return found, signature
        if time.perf_counter() > deadline:
            raise RuntimeError(f"no verdict for step {step} within {VERDICT_TIMEOUT_S:.0f} s")
        if nap:
            time.sleep(nap)


def measure_latency(
    run_dir: Path, evals: int, client_evals: int, *, poll: bool, seed: int, pin: bool = False
) -> dict[str, Any]:
    """Append -> verdict visible; each eval after a random pause, so the daemon is idle when it comes.

    With inotify, every round times one eval spinning on stat and one napping 0.1 ms
    between stats; then ``client_evals`` through CheckpointClient.wait_verdict. With
    polling, the pause is uniform over one poll interval (a random phase of the ticks).
    ``pin``: the daemon runs on the first CPU (taskset), this process on the others, and
    only the spinning reader is timed.
    """
    run_dir.mkdir()
    log = run_dir / "logging.jsonl"
    log.touch()
    extra = ("--poll", "--poll-interval", str(POLL_INTERVAL)) if poll else ()
    rnd = random.Random(seed)
    low, high = (0.0, POLL_INTERVAL) if poll else PAUSE_S
    methods = {"spin": 0.0} if poll or pin else {"spin": 0.0, "nap": NAP_S}
    cpus = sorted(os.sched_getaffinity(0))
    prefix = ("taskset", "-c", str(cpus[0])) if pin else ()
    writer = EvalWriter(log)
    paths = RunPaths(run_dir)
    samples: list[int] = []
    seconds: dict[str, list[float]] = {method: [] for method in methods}
    client: list[float] = []
    try:
        with running_daemon(run_dir, *extra, prefix=prefix) as daemon:
            mode = daemon_status(paths).get("watcher")
            process = psutil.Process(daemon.pid)
            signature = control_signature(paths.control)
            if pin:
                os.sched_setaffinity(0, cpus[1:])
            for index in range(evals):
                for method, nap in methods.items():
                    time.sleep(rnd.uniform(low, high))
                    step = writer.append()
                    started = time.perf_counter()
                    found, signature = wait_for_verdict(paths.control, step, signature, nap)
                    seconds[method].append(time.perf_counter() - started)
                    writer.count(found.verdict.action)
                if index % 20 == 0 and (value := rss(process)) is not None:
                    samples.append(value)
            if client_evals:
                client = _client_latency(run_dir, writer, client_evals, rnd)
            peak = peak_rss(daemon.pid)
            if (value := rss(process)) is not None:
                samples.append(value)
    finally:
        os.sched_setaffinity(0, cpus)
        writer.close()
    return {
        "mode": mode,
        "pinned": {"daemon_cpu": cpus[0], "reader_cpus": cpus[1:]} if pin else None,
        "poll_interval_s": POLL_INTERVAL if poll else None,
        "pause_s": [low, high],
        **{method: percentiles(values) for method, values in seconds.items()},
        "client": percentiles(client) if client else None,
        "actions": writer.actions,
        "rss_samples_bytes": samples,
        "rss_steady_bytes": statistics.median(samples) if samples else None,
        "rss_peak_bytes": peak,
    }


def _client_latency(run_dir: Path, writer: EvalWriter, evals: int, rnd: random.Random) -> list[float]:
    from ckptd.client import CheckpointClient  # imports torch: only now, after the other timings

    seconds = []
    with CheckpointClient(run_dir, rendezvous_timeout=VERDICT_TIMEOUT_S) as client:
        for _ in range(evals):
            time.sleep(rnd.uniform(*PAUSE_S))
            step = writer.append()
            started = time.perf_counter()
            verdict = client.wait_verdict(step)
            seconds.append(time.perf_counter() - started)
            if verdict is None or verdict.eval_step != step:
                raise RuntimeError(f"wait_verdict({step}) returned {verdict}")
            writer.count(verdict.action)
    return seconds


# -- 3. RSS: catching up on a big log, then following it ----------------------------------------------


def measure_catch_up(run_dir: Path, follow_evals: int = 20) -> dict[str, Any]:
    """A daemon started on ``run_dir`` whose logging.jsonl is one of the generated logs."""
    paths = RunPaths(run_dir)
    command = daemon_command(run_dir)
    with (run_dir.parent / f"{run_dir.name}.daemon.log").open("ab") as daemon_log:
        started = time.perf_counter()
        daemon = subprocess.Popen(command, stdout=daemon_log, stderr=subprocess.STDOUT)
    try:
        process = psutil.Process(daemon.pid)
        during: list[int] = []
        deadline = time.monotonic() + 120
        while not (daemon_alive(paths) and daemon_status(paths).get("watcher")):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not catch up:\n{_daemon_log(run_dir)}")
            if (value := rss(process)) is not None:
                during.append(value)
            time.sleep(0.01)
        caught_up = time.perf_counter() - started
        status = daemon_status(paths)
        # Following: a few live evals, each waited for, then RSS sampled for a second.
        writer = EvalWriter(run_dir / "logging.jsonl")
        writer.step = 10**9  # past every step of the log: judged, never a replay
        try:
            signature = control_signature(paths.control)
            for _ in range(follow_evals):
                time.sleep(0.005)
                _found, signature = wait_for_verdict(paths.control, writer.append(), signature, NAP_S)
        finally:
            writer.close()
        steady: list[int] = []
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            if (value := rss(process)) is not None:
                steady.append(value)
            time.sleep(0.02)
        peak = peak_rss(daemon.pid)
    finally:
        stop_daemon(daemon, run_dir)
    return {
        "catch_up_s": caught_up,
        "log_lag_bytes": status.get("log_lag_bytes"),
        "rss_sampled_max_bytes": max(during + steady),
        "rss_steady_bytes": statistics.median(steady),
        "rss_peak_bytes": peak,
    }


def measure_floors() -> dict[str, int | None]:
    """RSS of interpreters that only sleep: bare, and after the daemon's imports (sampled for 1.5 s)."""
    imports = "import ckptd.cli, ckptd.daemon.run, watchdog.observers.inotify; "
    commands = {
        "bare": "import time; time.sleep(5)",
        "imports": imports + "import time; time.sleep(5)",
    }
    floors = {name: subprocess.Popen([sys.executable, "-c", code]) for name, code in commands.items()}
    result: dict[str, int | None] = dict.fromkeys(floors)
    try:
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            for name, process in floors.items():
                with contextlib.suppress(psutil.Error):
                    result[name] = psutil.Process(process.pid).memory_info().rss
            time.sleep(0.05)
    finally:
        for process in floors.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            process.wait()
    return result


# -- where the time goes ----------------------------------------------------------------------------


def parse_stages(path: Path, repeats: int) -> dict[str, float]:
    """ckptd's reading path on ``path``, stage by stage, cumulative (median seconds)."""
    fmt = JsonlFormat(watched=["eval_loss"])

    def blocks_only() -> None:
        follower = LogFollower(path)
        while follower.read_blocks():
            pass

    def candidates() -> None:
        follower = LogFollower(path)
        while blocks := follower.read_blocks():
            for block in blocks:
                for raw in fmt.candidate_lines(block):
                    follower.accept(raw)

    def decoded() -> None:
        follower = LogFollower(path)
        while blocks := follower.read_blocks():
            for block in blocks:
                for raw in fmt.candidate_lines(block):
                    orjson.loads(follower.accept(raw) or b"{}")

    def events_dropped() -> None:
        follower = LogFollower(path)
        while blocks := follower.read_blocks():
            for block in blocks:
                for raw in fmt.candidate_lines(block):
                    fmt.parse_candidate(follower.accept(raw) or b"")

    stages = {
        "read_blocks": blocks_only,
        "candidate_lines": candidates,
        "orjson.loads": decoded,
        "parse_candidate": events_dropped,
        "read_events": lambda: read_all_events(path),
    }
    seconds: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(repeats):
        for name, function in stages.items():
            gc.collect()
            started = time.perf_counter()
            function()
            seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in seconds.items()}


def latency_parts(root: Path, evals: int, seed: int) -> dict[str, dict[str, float]]:
    """The daemon's steps between an append and control.json, timed one by one in this process.

    With ckptd's own pieces (no daemon): the inotify wake-up through watchdog to a callback,
    reading the new line, judging it, writing control.json, then state.json (non-durable,
    as the daemon does after each verdict; durable for comparison, as the heartbeat does).
    """
    run_dir = root / "parts"
    (run_dir / ".ckptd").mkdir(parents=True)
    log = run_dir / "logging.jsonl"
    log.touch()
    paths = RunPaths(run_dir)
    writer = EvalWriter(log)
    woke = threading.Event()
    woke_at = [0.0]

    def wake() -> None:
        woke_at[0] = time.perf_counter()
        woke.set()

    watcher = ChangeWatcher(log, wake)
    source = LineSource(log, JsonlFormat(watched=["eval_loss"]))
    criteria = (Criterion.parse("eval_loss"),)
    state = DaemonState.fresh(run_dir / "checkpoints", ("eval_loss:min",))
    bests: dict[str, Any] = {}
    rnd = random.Random(seed)
    parts: dict[str, list[float]] = {
        k: [] for k in ("wake", "read", "judge", "control", "state", "state_durable")
    }
    watcher.start()
    try:
        time.sleep(0.1)
        for index in range(evals):
            time.sleep(rnd.uniform(*PAUSE_S))
            woke.clear()
            writer.append()
            started = time.perf_counter()
            if not woke.wait(VERDICT_TIMEOUT_S):
                raise RuntimeError("the ChangeWatcher did not wake")
            parts["wake"].append(woke_at[0] - started)
            time.sleep(0.001)  # let watchdog's thread go idle before timing this one
            t0 = time.perf_counter()
            event = source.read_events()[-1]
            t1 = time.perf_counter()
            judgement = judge(criteria, bests, event)
            bests = dict(judgement.bests)
            t2 = time.perf_counter()
            control = Control(
                seq=index + 1, run_id=state.run_id, staging="/dev/shm/x", verdict=judgement.verdict
            )
            write_control(paths, control)
            t3 = time.perf_counter()
            state = state.with_(seq=index + 1, bests=bests, judged_step=event.step, cursor=source.cursor())
            save_state(paths.state, state, durable=False)
            t4 = time.perf_counter()
            save_state(paths.state, state, durable=True)
            t5 = time.perf_counter()
            parts["read"].append(t1 - t0)
            parts["judge"].append(t2 - t1)
            parts["control"].append(t3 - t2)
            parts["state"].append(t4 - t3)
            parts["state_durable"].append(t5 - t4)
    finally:
        watcher.stop()
        source.close()
        writer.close()
    return {name: percentiles(values) for name, values in parts.items()}


# -- the run ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    meter = LoadMeter()
    with scratch_dir(args.dir, "ckptd-follow-") as root:
        disk = filesystem_of(root)
        progress(
            f"disk: {disk['path']} on {disk['device']} ({disk['fstype']}, mounted at {disk['mount']}, "
            f"{disk['free_bytes'] / 2**30:.0f} GiB free)"
        )
        if disk["fstype"] in ("tmpfs", "ramfs"):
            progress("  note: that is memory, not a disk")
        need = 2 * 330 * args.lines
        if disk["free_bytes"] < need:
            free = disk["free_bytes"] / 2**30
            raise SystemExit(f"{disk['path']} has {free:.1f} GiB free; need {need / 2**30:.1f}")
        logs = {}
        for name, every, seed in (("dense", DENSE_EVERY, 1), ("sparse", SPARSE_EVERY, 2)):
            run_dir = root / f"log-{name}"
            run_dir.mkdir()
            started = time.perf_counter()
            logs[name] = write_log(run_dir / "logging.jsonl", args.lines, every, seed)
            logs[name]["eval_every"] = every
            progress(
                f"wrote {name} log: {logs[name]['lines']:,} lines ({logs[name]['evals']:,} evals, "
                f"{logs[name]['bytes'] / 1e6:.0f} MB) in {time.perf_counter() - started:.1f} s"
            )
        progress(f"parse throughput, {args.repeats} rounds:")
        parse = measure_parse(logs, args.repeats)
        progress("  where the time goes (dense log, ckptd's stages, cumulative)...")
        stages = parse_stages(Path(logs["dense"]["path"]), args.repeats)

        progress(f"detection latency, inotify: {args.evals} evals, {args.client_evals} via wait_verdict...")
        inotify = measure_latency(root / "lat-inotify", args.evals, args.client_evals, poll=False, seed=3)
        _print_latency(inotify)
        pinned = None
        if args.pinned_evals and len(os.sched_getaffinity(0)) > 1 and shutil.which("taskset"):
            progress(
                f"detection latency, inotify, daemon and reader on separate CPUs: {args.pinned_evals} evals"
            )
            pinned = measure_latency(root / "lat-pinned", args.pinned_evals, 0, poll=False, seed=6, pin=True)
            _print_latency(pinned)
        progress(f"detection latency, --poll --poll-interval {POLL_INTERVAL}: {args.poll_evals} evals...")
        polling = measure_latency(root / "lat-poll", args.poll_evals, 0, poll=True, seed=4)
        _print_latency(polling)

        progress("  where the time goes (the daemon's steps, timed in this process)...")
        parts = latency_parts(root, args.parts_evals, seed=5)

        progress("daemon RSS: floors, then catching up on each log and following it...")
        floor = measure_floors()
        catch_up = {}
        for name in logs:
            catch_up[name] = measure_catch_up(root / f"log-{name}")
            c = catch_up[name]
            progress(
                f"  {name}: caught up in {c['catch_up_s']:.2f} s; RSS peak "
                f"{c['rss_peak_bytes'] / MIB:.1f} MiB, following {c['rss_steady_bytes'] / MIB:.1f} MiB"
            )
    return {
        "benchmark": "follow_bench",
        **meter.report(),
        "machine": machine_info(),
        "disk": disk,
        "config": {
            "lines": args.lines,
            "repeats": args.repeats,
            "evals": args.evals,
            "poll_evals": args.poll_evals,
            "client_evals": args.client_evals,
            "parts_evals": args.parts_evals,
            "pinned_evals": args.pinned_evals,
            "poll_interval_s": POLL_INTERVAL,
        },
        "targets": TARGETS,
        "parse": parse,
        "parse_stages_dense_s": stages,
        "latency": {"inotify": inotify, "pinned": pinned, "poll": polling},
        "notes": NOTES,
        "latency_parts": parts,
        "rss": {"catch_up": catch_up, "floor_bytes": floor},
    }


def _print_latency(result: dict[str, Any]) -> None:
    parts = []
    for key, label in (("spin", "spinning"), ("nap", "napping"), ("client", "wait_verdict")):
        if result.get(key):
            p = result[key]
            parts.append(f"{label} p50 {p['p50_ms']:.2f} / p99 {p['p99_ms']:.2f} / max {p['max_ms']:.2f} ms")
    progress(f"  {result['mode']}: " + "; ".join(parts) + f"; verdicts {result['actions']}")


# -- report -----------------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_table(result: dict[str, Any]) -> None:
    m, d, t = result["machine"], result["disk"], result["targets"]
    cfg = result["config"]
    print(f"\nfollow_bench  {result['date']}")
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, "
        f"Linux {m['kernel']}, Python {m['python']} ({packages})"
    )
    load = result["load_avg_1min"]
    print(
        f"load:    1-min load average {load['start']:.2f} at start, {load['end']:.2f} at end; "
        f"other processes used {result['others_cpu_share']:.0%} of the CPUs during the run "
        f"({result['wall_s']:.0f} s)"
    )
    print(f"disk:    {d['device']} {d['fstype']} at {d['mount']} (bench dir {d['path']})")

    print(f"\n1. parse throughput, page cache warm, median of {cfg['repeats']} (lines/s; min-max s)")
    for name, p in result["parse"].items():
        print(
            f"  {name} log: {p['lines']:,} lines, {p['bytes'] / 1e6:.0f} MB, {p['evals']:,} eval lines "
            f"(one every {p['eval_every']} logging steps)"
        )
        rows = [
            ("wc -l (subprocess)", "wc", ""),
            ("for line in f: json.loads(line)", "json", ""),
            ("for line in f: orjson.loads(line)", "orjson", "reference"),
            ("ckptd read_events() until not behind", "ckptd", ""),
        ]
        for label, key, note in rows:
            rate = p["lines_per_s"][key]
            spread = f"{min(p['seconds'][key]):.3f}-{max(p['seconds'][key]):.3f} s"
            if key == "ckptd":
                target = f"target >= {t['lines_per_s'] / 1e6:.1f} M/s   {_verdict(rate >= t['lines_per_s'])}"
            else:
                target = note
            print(f"    {label:<36} {rate / 1e6:7.3f} M lines/s  {spread:<15}  {target}")
        ratio = p["ckptd_over_json"]
        print(
            f"    {'ckptd / json.loads':<36} {ratio:7.2f} x                         "
            f"target >= {t['ratio_over_json']:.0f} x      {_verdict(ratio >= t['ratio_over_json'])}"
        )
        print(f"    {'ckptd / orjson.loads':<36} {p['ckptd_over_orjson']:7.2f} x")

    stages = result["parse_stages_dense_s"]
    dense = result["parse"]["dense"]
    print(f"  where the time goes, dense log (ckptd's reading path, cumulative, median of {cfg['repeats']}):")
    labels = {
        "read_blocks": "LogFollower.read_blocks (pread, cut at newlines)",
        "candidate_lines": "+ candidate_lines (find eval_loss) + accept",
        "orjson.loads": "+ orjson.loads of each candidate",
        "parse_candidate": "+ step, metrics dict, LogEvent (events dropped)",
        "read_events": "read_events() until not behind (ckptd's reader)",
    }
    previous = 0.0
    for key, label in labels.items():
        value = stages[key]
        spent = value - previous
        if key in ("read_blocks", "candidate_lines"):  # they scan every byte: per byte
            unit = f"{dense['bytes'] / spent / 1e9:5.2f} GB/s of log" if spent > 0 else ""
        else:
            unit = f"{spent / dense['evals'] * 1e6:5.2f} us per eval line"
        print(f"    {label:<50} {value:6.3f} s  {spent:+7.3f} s  ({unit})")
        previous = value

    ino, pol = result["latency"]["inotify"], result["latency"]["poll"]
    low, high = (v * 1e3 for v in ino["pause_s"])
    print(
        "\n2. detection latency: line appended -> verdict visible in control.json (ms); "
        f"{low:.0f}-{high:.0f} ms pauses between evals"
    )
    print(f"  {'':<50} {'n':>5} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}  target")

    def row(label: str, s: dict[str, float], target: str) -> None:
        print(
            f"  {label:<50} {s['n']:>5} {s['p50_ms']:7.2f} {s['p90_ms']:7.2f} {s['p99_ms']:7.2f} "
            f"{s['max_ms']:7.2f}  {target}"
        )

    for key, label in (("spin", "spinning on stat"), ("nap", f"stat every {NAP_S * 1e3:.1f} ms (napping)")):
        ok = ino[key]["p50_ms"] <= t["inotify_p50_ms"] and ino[key]["p99_ms"] <= t["inotify_p99_ms"]
        target = f"p50 <= {t['inotify_p50_ms']:.0f}, p99 <= {t['inotify_p99_ms']:.0f}  {_verdict(ok)}"
        row(f"{ino['mode']}, {label}", ino[key], target)
    if ino["client"]:
        row(f"{ino['mode']}, CheckpointClient.wait_verdict", ino["client"], "what a trainer sees")
    pinned = result["latency"].get("pinned")
    if pinned:
        ok = (
            pinned["spin"]["p50_ms"] <= t["inotify_p50_ms"]
            and pinned["spin"]["p99_ms"] <= t["inotify_p99_ms"]
        )
        row(
            f"{pinned['mode']}, spinning, daemon on CPU {pinned['pinned']['daemon_cpu']} only",
            pinned["spin"],
            f"diagnostic (taskset)  {_verdict(ok)}",
        )
    ok = pol["spin"]["p99_ms"] <= t["poll_p99_ms"]
    row(
        f"{pol['mode']} every {POLL_INTERVAL * 1e3:.0f} ms, spinning, random phase",
        pol["spin"],
        f"p99 <= {t['poll_p99_ms']:.0f} (interval + 10)  {_verdict(ok)}",
    )
    print(f"  verdicts issued: inotify {ino['actions']}, polling {pol['actions']}")

    parts = result["latency_parts"]
    print(f"  where the time goes: the daemon's steps, timed one by one here ({cfg['parts_evals']} evals)")
    labels = {
        "wake": "inotify -> watchdog -> wake callback",
        "read": "read_events (the new line)",
        "judge": "judge",
        "control": "write control.json (atomic replace)",
        "state": "then state.json, not durable (per verdict)",
        "state_durable": "state.json durable, for comparison (heartbeat)",
    }
    for key, label in labels.items():
        row(f"  {label}", parts[key], "")

    print(f"\n3. daemon RSS{'MB':>50}      MiB  target")
    limit = t["rss_mb"]

    def rss_row(label: str, value: int | None, judged: bool = True) -> None:
        if value is None:
            print(f"  {label:<52}      n/a")
            return
        verdict = f"<= {limit:.0f} MB  {_verdict(value / MB <= limit)}" if judged else ""
        print(f"  {label:<52} {value / MB:7.1f}  {value / MIB:7.1f}  {verdict}")

    rss_row(f"latency run ({2 * cfg['evals'] + cfg['client_evals']} evals), steady", ino["rss_steady_bytes"])
    rss_row("latency run, peak (VmHWM)", ino["rss_peak_bytes"])
    for name, c in result["rss"]["catch_up"].items():
        lines = result["parse"][name]["lines"]
        evals = result["parse"][name]["evals"]
        print(
            f"  {name} log ({lines:,} lines, {evals:,} evals), following {c['catch_up_s']:.1f} s after spawn:"
        )
        rss_row("    catching up, peak (VmHWM)", c["rss_peak_bytes"])
        rss_row("    then following, steady", c["rss_steady_bytes"])
    floor = result["rss"]["floor_bytes"]
    rss_row('floor: python -c "import time; time.sleep(5)"', floor.get("bare"), judged=False)
    rss_row("floor: the same after the daemon's imports", floor.get("imports"), judged=False)
    for message in result["notes"]:
        print(f"\nNOTE: {message}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--lines", type=int, default=1_000_000, help="lines per generated log (1000000)")
    parser.add_argument("--evals", type=int, default=1000, help="evals timed with inotify (1000)")
    parser.add_argument("--poll-evals", type=int, default=100, help="evals timed with --poll (100)")
    parser.add_argument(
        "--client-evals", type=int, default=200, help="evals timed through wait_verdict, inotify (200)"
    )
    parser.add_argument(
        "--parts-evals", type=int, default=300, help="evals for the in-process latency breakdown (300)"
    )
    parser.add_argument(
        "--pinned-evals",
        type=int,
        default=500,
        help="evals timed with the daemon and the spinning reader on separate CPUs (500; 0: skip)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="parse rounds; the median is reported (3)")
    parser.add_argument("--dir", help="where to write (default: a temp dir on the repo's filesystem)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if (
        args.lines < 100
        or args.evals < 1
        or args.poll_evals < 1
        or args.client_evals < 0
        or args.repeats < 1
        or args.parts_evals < 1
    ):
        parser.error("--lines >= 100, --evals and --poll-evals >= 1, --client-evals >= 0, --repeats >= 1")
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
