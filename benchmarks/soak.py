"""Soak: a real daemon and a real trainer-side client for thousands of evals; does anything grow?

Run by hand, not part of the test suite::

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--evals 10000] [--best-every 4]
        [--train-lines 4] [--state-kib 256] [--dir PATH] [--json]

A real ``ckptd run RUN_DIR -q --keep-last 2`` daemon (keep-best 1) follows a JSONL log that
this process writes as a trainer would, paced evenly over ``--minutes``: ``--train-lines``
training lines, then one eval line, every ``minutes * 60 / evals`` seconds. Every
``--best-every``-th eval is a new best (``eval_loss`` 0.001 lower than the last best), the
others are worse (skips). After each eval line the script takes t0, stats ``control.json``
(napping 0.2 ms between stats) until its verdict names that eval's step: t1 - t0 is the
**verdict lag**. Then a real ``CheckpointClient.maybe_snapshot`` captures a best (a small real
torch state: one float32 tensor of ``--state-kib`` KiB filled with the step, plus a few small
leaves) into a shared-memory slot and acks it; the daemon persists and rotates it.

A sampler thread reads, every ``--sample-s`` seconds, the daemon's ``VmRSS`` and ``RssAnon``
(``/proc/PID/status``), its open fds (``/proc/PID/fd``), threads, CPU time
(``/proc/PID/stat``), and ``status.json`` (persisted, pending acks, checkpoints in the store).
The run is cut into 10 windows of equal time (a minute each at the default 10 minutes; evals
that run late are counted in the last one); each gets a row. The final line compares the first
window (start) with the last (end).

Bounds (the exit status is 1 when one is passed, 0 otherwise; each is printed):

- **RSS end / start <= 1.5** (medians of the windows). The daemon's memory is bounded by
  design (a ~1 MiB read buffer, the last 4096 evals' metrics, ~2.4 MB): after start-up it
  should be flat. 1.5x of its ~30 MB leaves 15 MB for allocator slack; more is a leak.
- **RssAnon growth over the second half <= 4 MB** (window 6's median to window 10's). By half
  way through the default run the 4096 remembered evals are full; a leak of 1 KiB per eval
  (or 4 KiB per persist at one best in four) would add 4 MB over the second half.
- **fds do not grow**: the fewest fds open in the last window must not exceed the most open in
  the first. Every persist opens the slot, the temp files and the store directory; leaking one
  per persist would show as thousands.
- **verdict lag p50 end <= 2 x start + 1 ms**. Judging is constant work per line: a median
  that doubles means work that grows with the run's history. The machine's load moves it too
  (the load average is printed per window): a failure here on a busy machine needs a rerun.
- **correctness**: every best captured (a best not captured means persists fell behind), every
  capture persisted (``status.json``'s ``persisted`` equals the captures; no ack pending once
  drained), the store holds at most keep-last + keep-best checkpoints (rotation ran), each
  verifies, the last best is there holding its step, no error reported, and the daemon exits
  0 on SIGTERM.

Everything it starts is stopped and everything it creates (run dir, store, shared-memory
staging root) is removed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import benchlib
import torch
from benchlib import LoadMeter, daemon_status, progress, scratch_dir

from ckptd.client import CheckpointClient, load_snapshot
from ckptd.protocol import RunPaths, daemon_alive, pending_ack_paths, read_control
from ckptd.store import Store

WINDOWS = 10
KEEP_LAST = 2
KEEP_BEST = 1
NAP_S = 0.0002  # between two stats of control.json while waiting for a verdict
VERDICT_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
MB = 1e6

BOUNDS = {
    "rss_end_over_start": 1.5,
    "anon_second_half_growth_mb": 4.0,
    "lag_p50_end_over_start": 2.0,
    "lag_p50_slack_ms": 1.0,
}


# -- the daemon, seen from /proc --------------------------------------------------------------------


def proc_sample(pid: int) -> dict[str, Any] | None:
    """VmRSS, RssAnon, threads (bytes, counts), open fds and CPU seconds of ``pid``; None if gone."""
    try:
        fields: dict[str, Any] = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                fields[key] = int(value.split()[0]) * 1024
            elif key == "Threads":
                fields[key] = int(value)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        stat = Path(f"/proc/{pid}/stat").read_text()
        utime, stime = stat.rsplit(")", 1)[1].split()[11:13]
    except (OSError, ValueError, IndexError):
        return None
    return {
        "rss": fields.get("VmRSS"),
        "anon": fields.get("RssAnon"),
        "threads": fields.get("Threads"),
        "fds": fds,
        "cpu_s": (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK"),
    }


class Sampler:
    """A thread sampling the daemon every ``interval`` seconds until stopped."""

    def __init__(self, pid: int, paths: RunPaths, t0: float, interval: float) -> None:
        self.pid, self.paths, self.t0, self.interval = pid, paths, t0, interval
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        found = proc_sample(self.pid)
        if found is None:
            return
        status = daemon_status(self.paths)
        found.update(
            t=time.monotonic() - self.t0,
            load=os.getloadavg()[0],
            persisted=status.get("persisted"),
            pending_acks=status.get("pending_acks"),
            store_checkpoints=status.get("store_checkpoints"),
            staged_bytes=status.get("staged_bytes"),
            last_error=status.get("last_error"),
        )
        self.samples.append(found)


# -- the trainer --------------------------------------------------------------------------------------


class Trainer:
    """The log's writer and the capturing client, in this process."""

    def __init__(self, run_dir: Path, args: argparse.Namespace) -> None:
        self.paths = RunPaths(run_dir)
        self.log = (run_dir / "logging.jsonl").open("ab", buffering=0)  # one write(2) per call
        self.args = args
        self.best = 10.0
        self.signature = (0, 0, 0)
        self.floats = max(1, args.state_kib * 256)
        self.client = CheckpointClient(run_dir, rendezvous_timeout=5.0)

    def state(self, step: int) -> dict[str, Any]:
        return {
            "w": torch.full((self.floats,), float(step)),
            "b": torch.arange(64, dtype=torch.float32),
            "meta": {"step": step, "lr": 1e-4},
        }

    def train_lines(self, step: int) -> None:
        if self.args.train_lines:
            lines = b"".join(
                b'{"step": %d, "loss": %.6f, "learning_rate": 1e-4}\n'
                % (step - self.args.train_lines + k, 1.0)
                for k in range(self.args.train_lines)
            )
            self.log.write(lines)

    def eval(self, index: int) -> dict[str, Any]:
        """One eval: its line, the wait for its verdict (the lag), the capture of a best."""
        step = (index + 1) * 10
        is_best = index % self.args.best_every == 0
        if is_best:
            self.best -= 0.001
        value = self.best if is_best else self.best + 0.5
        self.log.write(b'{"step": %d, "eval_loss": %.6f}\n' % (step, value))
        started = time.perf_counter()
        action = self._wait_verdict(step)
        lag = time.perf_counter() - started
        captured = self.client.maybe_snapshot(step, lambda: self.state(step))
        return {"step": step, "best": is_best, "action": action, "lag_s": lag, "captured": captured}

    def _wait_verdict(self, step: int) -> str:
        control = self.paths.control
        deadline = time.perf_counter() + VERDICT_TIMEOUT_S
        while True:
            try:
                st = os.stat(control)
                current = (st.st_ino, st.st_mtime_ns, st.st_size)
                if current != self.signature:
                    self.signature = current
                    found = read_control(control).verdict
                    if found is not None and found.eval_step == step:
                        return found.action
            except (OSError, ValueError):
                pass
            if time.perf_counter() > deadline:
                raise RuntimeError(f"no verdict for step {step} within {VERDICT_TIMEOUT_S:.0f} s")
            time.sleep(NAP_S)

    def close(self) -> None:
        self.client.close()
        self.log.close()


# -- the run --------------------------------------------------------------------------------------------


def percentile(ordered: list[float], q: float) -> float:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else float("nan")


def windows(evals: list[dict[str, Any]], samples: list[dict[str, Any]], span: float) -> list[dict[str, Any]]:
    width = span / WINDOWS

    def index(t: float) -> int:
        return min(WINDOWS - 1, max(0, int(t // width)))

    rows: list[dict[str, Any]] = []
    for k in range(WINDOWS):
        mine = [e for e in evals if index(e["t"]) == k]
        taken = [s for s in samples if index(s["t"]) == k]
        lags = sorted(e["lag_s"] * 1e3 for e in mine)
        row: dict[str, Any] = {
            "window": k + 1,
            "from_s": k * width,
            "evals": len(mine),
            "bests": sum(e["best"] for e in mine),
            "captured": sum(e["captured"] for e in mine),
            "lag_p50_ms": percentile(lags, 0.5),
            "lag_p99_ms": percentile(lags, 0.99),
            "lag_max_ms": lags[-1] if lags else float("nan"),
            "samples": len(taken),
        }
        if taken:
            first, last = taken[0], taken[-1]
            elapsed = last["t"] - first["t"]
            row.update(
                rss_mb=statistics.median(s["rss"] for s in taken) / MB,
                rss_max_mb=max(s["rss"] for s in taken) / MB,
                anon_mb=statistics.median(s["anon"] for s in taken) / MB,
                anon_max_mb=max(s["anon"] for s in taken) / MB,
                fds_min=min(s["fds"] for s in taken),
                fds_max=max(s["fds"] for s in taken),
                threads_max=max(s["threads"] for s in taken),
                daemon_cpu_pct=100 * (last["cpu_s"] - first["cpu_s"]) / elapsed if elapsed > 0 else None,
                persisted=last["persisted"],
                store_checkpoints=last["store_checkpoints"],
                load=last["load"],
            )
        rows.append(row)
    return rows


def checks(rows: list[dict[str, Any]], end: dict[str, Any]) -> list[dict[str, Any]]:
    """Each bound: its name, the figure, the limit, passed or not."""
    start, last = rows[0], rows[-1]
    mid = rows[WINDOWS // 2]
    found: list[dict[str, Any]] = []

    def check(name: str, ok: bool, figure: str) -> None:
        found.append({"check": name, "ok": bool(ok), "figure": figure})

    if "rss_mb" in start and "rss_mb" in last:
        ratio = last["rss_mb"] / start["rss_mb"]
        check(
            f"RSS end / start <= {BOUNDS['rss_end_over_start']}",
            ratio <= BOUNDS["rss_end_over_start"],
            f"{start['rss_mb']:.1f} -> {last['rss_mb']:.1f} MB ({ratio:.3f}x)",
        )
    if "anon_mb" in mid and "anon_mb" in last:
        growth = last["anon_mb"] - mid["anon_mb"]
        check(
            f"RssAnon growth over the second half <= {BOUNDS['anon_second_half_growth_mb']:.0f} MB",
            growth <= BOUNDS["anon_second_half_growth_mb"],
            f"window {mid['window']} {mid['anon_mb']:.1f} -> window {last['window']} "
            f"{last['anon_mb']:.1f} MB ({growth:+.2f} MB)",
        )
    if "fds_max" in start and "fds_min" in last:
        check(
            "fds: last window's fewest <= first window's most",
            last["fds_min"] <= start["fds_max"],
            f"first {start['fds_min']}-{start['fds_max']}, last {last['fds_min']}-{last['fds_max']}",
        )
    limit = BOUNDS["lag_p50_end_over_start"] * start["lag_p50_ms"] + BOUNDS["lag_p50_slack_ms"]
    check(
        "verdict lag p50 end <= 2 x start + 1 ms",
        last["lag_p50_ms"] <= limit,
        f"{start['lag_p50_ms']:.2f} -> {last['lag_p50_ms']:.2f} ms (limit {limit:.2f})",
    )
    check(
        "every best captured",
        end["bests_captured"] == end["bests"],
        f"{end['bests_captured']} of {end['bests']} bests",
    )
    check(
        "every capture persisted, nothing pending",
        end["persisted"] == end["captures"] and end["pending_acks"] == 0,
        f"persisted {end['persisted']} of {end['captures']} captures; {end['pending_acks']} acks pending",
    )
    check(
        f"store rotated: <= {KEEP_LAST + KEEP_BEST} checkpoints, each verifies",
        len(end["store"]) <= KEEP_LAST + KEEP_BEST and not end["verify_problems"],
        f"{len(end['store'])} kept ({', '.join(end['store'])}); problems: {end['verify_problems'] or 'none'}",
    )
    check(
        "the last best is kept and holds its step",
        end["last_best_ok"],
        f"step {end['last_best_step']}",
    )
    check("no error reported", not end["last_error"], str(end["last_error"] or "none"))
    check("the daemon exits 0 on SIGTERM", end["daemon_rc"] == 0, f"exit {end['daemon_rc']}")
    return found


def drain(paths: RunPaths, captures: int) -> dict[str, Any]:
    """Wait until the daemon has persisted every capture (or says it is stuck)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    status = daemon_status(paths)
    while time.monotonic() < deadline:
        status = daemon_status(paths)
        if status.get("persisted") == captures and not pending_ack_paths(paths):
            break
        time.sleep(0.2)
    return status


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    meter = LoadMeter()
    span = args.minutes * 60.0
    interval = span / args.evals
    with scratch_dir(args.dir, "ckptd-soak-") as root:
        run_dir = root / "run"
        run_dir.mkdir()
        (run_dir / "logging.jsonl").touch()
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else root
        shm_root = shm / f"ckptd-soak-{os.getpid()}"
        shm_root.mkdir()
        os.environ["CKPTD_SHM_ROOT"] = str(shm_root)  # the client (this process) and the daemon
        paths = RunPaths(run_dir)
        command = [
            sys.executable, "-X", "faulthandler", "-m", "ckptd", "run", str(run_dir), "-q",
            "--keep-last", str(KEEP_LAST), "--keep-best", str(KEEP_BEST),
        ]  # fmt: skip
        daemon_log = root / "daemon.log"
        with daemon_log.open("ab") as out:
            daemon = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        trainer: Trainer | None = None
        sampler: Sampler | None = None
        records: list[dict[str, Any]] = []
        try:
            deadline = time.monotonic() + 60
            while not (daemon_alive(paths) and daemon_status(paths).get("watcher")):
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon did not start:\n{daemon_log.read_text(errors='replace')}")
                time.sleep(0.01)
            trainer = Trainer(run_dir, args)
            t0 = time.monotonic()
            sampler = Sampler(daemon.pid, paths, t0, args.sample_s)
            sampler.start()
            reported = 0
            for index in range(args.evals):
                due = t0 + index * interval
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                trainer.train_lines((index + 1) * 10)
                at = time.monotonic() - t0
                record = trainer.eval(index)
                record["t"] = at
                records.append(record)
                if daemon.poll() is not None:
                    raise RuntimeError(f"the daemon died:\n{daemon_log.read_text(errors='replace')[-4000:]}")
                if at >= (reported + 1) * span / WINDOWS:
                    reported = int(at // (span / WINDOWS))
                    done = sum(r["captured"] for r in records)
                    progress(f"  {at:6.0f} s: {index + 1} evals, {done} captured")
            fed_s = time.monotonic() - t0
            captures = sum(r["captured"] for r in records)
            status = drain(paths, captures)
            sampler.sample()
            sampler.stop()
            trainer.close()
            trainer = None
        finally:
            if sampler is not None:
                sampler.stop()
            if trainer is not None:
                trainer.close()
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
            try:
                rc = daemon.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                daemon.send_signal(signal.SIGABRT)  # faulthandler prints the stacks into the log
                rc = daemon.wait()
            shutil.rmtree(shm_root, ignore_errors=True)
        store = Store(run_dir / "checkpoints")
        kept = store.list()
        problems = {r.name: list(store.verify(r.name)) for r in kept}
        best_steps = [r["step"] for r in records if r["best"] and r["captured"]]
        last_best = best_steps[-1] if best_steps else None
        last_best_ok = False
        for record in kept:
            if record.step == last_best:
                state = load_snapshot(store.path_of(record.name))
                last_best_ok = (
                    bool(torch.all(state["w"] == float(last_best))) and state["meta"]["step"] == last_best
                )
        end = {
            "evals": len(records),
            "fed_s": fed_s,
            "bests": sum(r["best"] for r in records),
            "bests_captured": sum(r["best"] and r["captured"] for r in records),
            "captures": captures,
            "persisted": status.get("persisted"),
            "pending_acks": len(pending_ack_paths(paths)),
            "store": [r.name for r in kept],
            "verify_problems": {k: v for k, v in problems.items() if v},
            "last_best_step": last_best,
            "last_best_ok": last_best_ok,
            "last_error": status.get("last_error"),
            "trainer": status.get("trainer"),
            "daemon_rc": rc,
        }
        samples = sampler.samples if sampler else []
        rows = windows(records, samples, span)
        lags = sorted(r["lag_s"] * 1e3 for r in records)
        actions: dict[str, int] = {}
        for r in records:
            actions[r["action"]] = actions.get(r["action"], 0) + 1
        return {
            "config": {
                "minutes": args.minutes,
                "evals": args.evals,
                "best_every": args.best_every,
                "train_lines": args.train_lines,
                "state_kib": args.state_kib,
                "keep_last": KEEP_LAST,
                "keep_best": KEEP_BEST,
                "sample_s": args.sample_s,
                "interval_s": interval,
            },
            "machine": benchlib.machine_info(torch=torch.__version__),
            "disk": benchlib.filesystem_of(run_dir),
            "load": meter.report(),
            "actions": actions,
            "lag_all": {
                "p50_ms": percentile(lags, 0.5),
                "p99_ms": percentile(lags, 0.99),
                "max_ms": lags[-1] if lags else None,
            },
            "end": end,
            "windows": rows,
            "checks": checks(rows, end),
            "samples": samples,
        }


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_table(result: dict[str, Any]) -> None:
    cfg, load, end = result["config"], result["load"], result["end"]
    m = result["machine"]
    print(f"soak  {load['date']}")
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, "
        f"Linux {m['kernel']}, Python {m['python']}, torch {m['torch']}; "
        f"disk {result['disk']['device']} {result['disk']['fstype']}; "
        f"load {load['load_avg_1min']['start']:.2f} -> {load['load_avg_1min']['end']:.2f}, "
        f"other processes {100 * load['others_cpu_share']:.0f}% of the CPUs"
    )
    print(
        f"{end['evals']} evals in {end['fed_s']:.0f} s (planned {cfg['minutes'] * 60:.0f} s, one per "
        f"{cfg['interval_s'] * 1e3:.0f} ms), a best every {cfg['best_every']}, {cfg['train_lines']} training "
        f"lines per eval, state {cfg['state_kib']} KiB; "
        f"keep-last {cfg['keep_last']}, keep-best {cfg['keep_best']}"
    )
    print(
        f"verdicts {result['actions']}; bests captured {end['bests_captured']} of {end['bests']}; "
        f"captures {end['captures']}, persisted {end['persisted']}; kept {', '.join(end['store'])}"
    )
    header = (
        f"{'win':>3} {'from':>6} {'evals':>5} {'capt':>4} {'lag p50':>8} {'p99':>7} {'max':>7} "
        f"{'RSS MB':>7} {'max':>6} {'anon MB':>7} {'max':>6} {'fds':>7} {'thr':>3} {'cpu%':>5} "
        f"{'persist':>7} {'kept':>4} {'load':>5}"
    )
    print("\n" + header)
    for r in result["windows"]:
        fds = f"{r['fds_min']}-{r['fds_max']}" if "fds_min" in r else "-"
        print(
            f"{r['window']:>3} {r['from_s']:>5.0f}s {r['evals']:>5} {r['captured']:>4} "
            f"{_fmt(r['lag_p50_ms'], '8.2f')} {_fmt(r['lag_p99_ms'], '7.2f')} "
            f"{_fmt(r['lag_max_ms'], '7.1f')} "
            f"{_fmt(r.get('rss_mb'), '7.1f')} {_fmt(r.get('rss_max_mb'), '6.1f')} "
            f"{_fmt(r.get('anon_mb'), '7.1f')} {_fmt(r.get('anon_max_mb'), '6.1f')} {fds:>7} "
            f"{_fmt(r.get('threads_max'), '3d')} {_fmt(r.get('daemon_cpu_pct'), '5.1f')} "
            f"{_fmt(r.get('persisted'), '7d')} {_fmt(r.get('store_checkpoints'), '4d')} "
            f"{_fmt(r.get('load'), '5.2f')}"
        )
    print()
    for c in result["checks"]:
        print(f"  {'PASS' if c['ok'] else 'FAIL'}  {c['check']}: {c['figure']}")
    first, last = result["windows"][0], result["windows"][-1]
    print(
        f"\nstart -> end (window 1 -> {last['window']}): "
        f"RSS {_fmt(first.get('rss_mb'), '.1f')} -> {_fmt(last.get('rss_mb'), '.1f')} MB, "
        f"RssAnon {_fmt(first.get('anon_mb'), '.1f')} -> {_fmt(last.get('anon_mb'), '.1f')} MB, "
        f"fds {first.get('fds_min', '-')}-{first.get('fds_max', '-')} -> "
        f"{last.get('fds_min', '-')}-{last.get('fds_max', '-')}, "
        f"lag p50 {_fmt(first['lag_p50_ms'], '.2f')} -> {_fmt(last['lag_p50_ms'], '.2f')} ms, "
        f"p99 {_fmt(first['lag_p99_ms'], '.2f')} -> {_fmt(last['lag_p99_ms'], '.2f')} ms: "
        f"{'PASS' if all(c['ok'] for c in result['checks']) else 'FAIL'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the evals are spread over (10)")
    parser.add_argument("--evals", type=int, default=10_000, help="eval lines in all (10000)")
    parser.add_argument("--best-every", type=int, default=4, help="every N-th eval is a new best (4)")
    parser.add_argument("--train-lines", type=int, default=4, help="training lines before each eval (4)")
    parser.add_argument("--state-kib", type=int, default=256, help="the captured tensor's size, KiB (256)")
    parser.add_argument("--sample-s", type=float, default=1.0, help="seconds between samples (1)")
    parser.add_argument("--dir", help="where to write (default: a temp dir on the repo's filesystem)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.evals < WINDOWS or args.best_every < 1 or args.train_lines < 0:
        parser.error(f"--minutes > 0, --evals >= {WINDOWS}, --best-every >= 1, --train-lines >= 0")
    if args.state_kib < 1 or args.sample_s <= 0:
        parser.error("--state-kib >= 1, --sample-s > 0")
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
