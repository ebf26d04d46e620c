"""Trainer stall of a ckptd snapshot vs ``torch.save``, and persist throughput vs ``dd``.

Run by hand, not part of the test suite::

    .venv/bin/python benchmarks/snapshot_stall.py [--gib 1.0] [--dir PATH] [--repeats 3] [--json]

In one run, on one disk, with one in-memory training state (an ``nn.Module`` of
large ``Linear`` layers plus Adam state after one step, about ``--gib`` GiB):

1. ckptd: a real ``ckptd run`` daemon subprocess (``--every-steps 1 --keep-last 1``);
   the time the trainer spends inside ``CheckpointClient.maybe_snapshot`` for
   steps 1..repeats+1. Step 1 is cold (the shared-memory slot is created and
   faulted in); the later ones reuse the slot (warm). After each capture the
   script waits until the daemon has committed it (ack written -> ack released:
   written, hashed, fsynced, renamed) and retention has run, so captures never
   queue, and records that time as the persist time.
2. ``torch.save`` of the same state to the same disk, and ``torch.save`` + fsync.
3. ``dd if=/dev/zero conv=fsync`` of the same number of bytes to the same disk.
4. For scale, a plain copy of the same tensors into an already faulted-in
   buffer: the floor a warm capture cannot beat.

Round 0 is the cold capture; each later round does one of each (warm capture,
copy, torch.save, dd), so a drifting disk or a busy neighbour hits all methods
alike. Medians are reported with min-max.

The stall is broken down into phases by timing wrappers this script puts
around ckptd functions in its own process (nothing in ckptd is changed), and
the minor page faults of each call are counted, so a slow cold or warm call
can be explained from the output. GB/s means 10^9 bytes per second.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import benchlib
import torch
from benchlib import (
    LoadMeter,
    daemon_status,
    filesystem_of,
    progress,
    scratch_dir,
)

import ckptd.client.client as client_module
from ckptd.client import CheckpointClient
from ckptd.client.snapshot import Slot
from ckptd.protocol import RunPaths, daemon_alive, pending_ack_paths
from ckptd.store import Store

HIDDEN = 4096  # width of the large Linear layers: 64 MiB of fp32 weights each
DD_BLOCK = 64 << 20
StateFn = Callable[[], dict[str, Any]]


# -- the machine and the disk ---------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    return benchlib.machine_info(torch=torch.__version__, torch_threads=torch.get_num_threads())


# -- the training state ---------------------------------------------------------------------------


class Model(torch.nn.Module):
    """A stack of large square Linear layers with small LayerNorms, an embedding and a small head."""

    def __init__(self, layers: int, vocab: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, HIDDEN)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(HIDDEN), torch.nn.Linear(HIDDEN, HIDDEN))
            for _ in range(layers)
        )
        self.head = torch.nn.Linear(HIDDEN, 16)


def build_state(gib: float) -> tuple[StateFn, int, int]:
    """Model + Adam after one step sized to about ``gib`` GiB: weights, exp_avg, exp_avg_sq (3 x 4 bytes)."""
    target = gib * 2**30
    per_layer = 12 * (HIDDEN * HIDDEN + 3 * HIDDEN)
    layers = int(target // per_layer)  # 0 for small states: then the embedding carries them
    vocab = max(1, round((target - layers * per_layer) / (12 * HIDDEN)))
    torch.manual_seed(0)
    model = Model(layers, vocab)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    def state_fn() -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    tensors = _tensors(state_fn())
    return state_fn, sum(t.numel() * t.element_size() for t in tensors), len(tensors)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


# -- 1. ckptd ---------------------------------------------------------------------------------------


class PhaseTimer:
    """Wraps ckptd functions of this process with timers; ``undo`` puts the originals back."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attr: str, phase: str) -> None:
        original = getattr(owner, attr, None)
        if original is None:
            progress(f"  (no {attr} to time in {owner.__name__}: phase {phase!r} not measured)")
            return
        phases = self.current

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - started

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, original))

    def undo(self) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        self._undo.clear()


@contextmanager
def instrumented() -> Iterator[PhaseTimer]:
    timer = PhaseTimer()
    for name, phase in (
        ("flatten_state", "flatten"),
        ("layout_for", "flatten"),
        ("encode_structure", "flatten"),
        ("write_ack", "ack"),
    ):
        timer.wrap(client_module, name, phase)
    timer.wrap(CheckpointClient, "_acquire_slot", "acquire")
    timer.wrap(Slot, "_create", "create")
    timer.wrap(Slot, "write", "copy")
    try:
        yield timer
    finally:
        timer.undo()


def start_daemon(run_dir: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "ckptd", "run", str(run_dir), "--every-steps", "1"]
    command += ["--keep-last", "1", "-q"]
    with (run_dir / "daemon.log").open("ab") as daemon_log:
        daemon = subprocess.Popen(command, stdout=daemon_log, stderr=subprocess.STDOUT)
    paths = RunPaths(run_dir)
    deadline = time.monotonic() + 30
    # Alive, and its ack watcher running: the status written before the watchers start has none.
    while not (daemon_alive(paths) and daemon_status(paths).get("watcher")):
        if daemon.poll() is not None or time.monotonic() > deadline:
            stop_daemon(daemon)
            raise RuntimeError(f"the ckptd daemon did not start:\n{_tail(run_dir / 'daemon.log')}")
        time.sleep(0.01)
    return daemon


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


def stop_daemon(daemon: subprocess.Popen[bytes]) -> int | None:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            progress(f"  daemon {daemon.pid} ignored SIGTERM for 60 s; killing it")
            daemon.kill()
            daemon.wait()
    return daemon.returncode


def _peak_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def wait_committed(
    paths: RunPaths, store: Store, step: int, daemon: subprocess.Popen[bytes], since: float
) -> float:
    """Seconds from ``since`` until the ack is released (the checkpoint is committed, fsynced)."""
    deadline = time.monotonic() + 300
    while pending_ack_paths(paths):
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"step {step} was not committed:\n{_tail(paths.run_dir / 'daemon.log')}")
        time.sleep(0.005)
    seconds = time.perf_counter() - since
    # Then let retention (keep-last 1) finish, so no deletion overlaps the next capture.
    deadline = time.monotonic() + 10
    while [r.step for r in store.list()] != [step] and time.monotonic() < deadline:
        time.sleep(0.005)
    return seconds


class CkptdBench:
    """A real daemon subprocess and a client in this process; ``capture`` times one snapshot."""

    def __init__(self, run_dir: Path, state_fn: StateFn) -> None:
        self.run_dir = run_dir
        self.paths = RunPaths(run_dir)
        self.store = Store(self.paths.default_store)
        self.state_fn = state_fn
        self.captures: list[dict[str, Any]] = []
        self.staging: str | None = None
        self.peak_rss: int | None = None
        self._stack = ExitStack()

    def __enter__(self) -> CkptdBench:
        self.run_dir.mkdir()
        self.daemon = start_daemon(self.run_dir)
        self._stack.callback(self._stop)
        try:
            self.staging = json.loads(self.paths.control.read_bytes()).get("staging")
            # Closed before the daemon stops: the client unlinks the slots no ack holds.
            self.client = self._stack.enter_context(CheckpointClient(self.run_dir))
            self.timer = self._stack.enter_context(instrumented())
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.peak_rss = _peak_rss(self.daemon.pid)
        self._stack.close()

    def _stop(self) -> None:
        status = stop_daemon(self.daemon)
        leftover = Path(self.staging) if self.staging else None
        if leftover is not None and leftover.name.startswith("ckptd-") and leftover.exists():
            progress(f"  note: {leftover} was still there after the daemon stopped; removing it")
            shutil.rmtree(leftover, ignore_errors=True)
        if status != 0:
            raise RuntimeError(f"the daemon exited with {status}:\n{_tail(self.run_dir / 'daemon.log')}")

    def capture(self, step: int) -> dict[str, Any]:
        phases = self.timer.current
        phases.clear()
        state_fn = self.state_fn

        def timed_state_fn() -> dict[str, Any]:
            started = time.perf_counter()
            try:
                return state_fn()
            finally:
                phases["state_fn"] = time.perf_counter() - started

        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        staged = self.client.maybe_snapshot(step, timed_state_fn)
        stall = time.perf_counter() - started
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        if not staged:
            log = _tail(self.run_dir / "daemon.log")
            raise RuntimeError(f"maybe_snapshot({step}) staged nothing; daemon log:\n{log}")
        persist = wait_committed(self.paths, self.store, step, self.daemon, started + stall)
        record = next(r for r in self.store.list() if r.step == step)
        manifest = self.store.manifest(record.name)
        spent = dict(phases)
        spent["other"] = stall - sum(v for k, v in spent.items() if k != "create")
        capture = {
            "step": step,
            "stall_s": stall,
            "phases_s": spent,
            "minor_faults": faults,
            "slot_created": "create" in spent,
            "persist_s": persist,
            "persist_manifest_s": manifest["created"] - manifest["captured_at"],
            "bytes": record.nbytes,
        }
        self.captures.append(capture)
        return capture

    def summary(self) -> dict[str, Any]:
        captures = self.captures
        nbytes = captures[0]["bytes"]
        persist = statistics.median(c["persist_s"] for c in captures)
        warm = [c["stall_s"] for c in captures[1:]]
        return {
            "captures": captures,
            "bytes": nbytes,
            "stall_cold_s": captures[0]["stall_s"],
            "stall_warm_s": statistics.median(warm),
            "stall_warm_min_s": min(warm),
            "stall_warm_max_s": max(warm),
            "persist_s": persist,
            "persist_min_s": min(c["persist_s"] for c in captures),
            "persist_max_s": max(c["persist_s"] for c in captures),
            "persist_gbps": nbytes / persist / 1e9,
            "slot_reused": not any(c["slot_created"] for c in captures[1:]),
            "daemon_peak_rss_bytes": self.peak_rss,
            "staging_dir": self.staging,
        }


# -- 2. torch.save ----------------------------------------------------------------------------------


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save_once(state_fn: StateFn, root: Path) -> tuple[float, float, int]:
    """(seconds to return from torch.save, seconds until the file and its entry are fsynced, bytes)."""
    path = root / "torch-save.pt"
    try:
        started = time.perf_counter()
        torch.save(state_fn(), path)
        saved = time.perf_counter()
        fsync_path(path)
        fsync_path(root, directory=True)
        done = time.perf_counter()
        return saved - started, done - started, path.stat().st_size
    finally:
        path.unlink(missing_ok=True)


def summarize_saves(runs: list[tuple[float, float, int]]) -> dict[str, Any]:
    saves, durable = [r[0] for r in runs], [r[1] for r in runs]
    nbytes = runs[0][2]
    return {
        "save_s": saves,
        "save_fsync_s": durable,
        "file_bytes": nbytes,
        "save_median_s": statistics.median(saves),
        "save_fsync_median_s": statistics.median(durable),
        "save_gbps": nbytes / statistics.median(saves) / 1e9,
        "save_fsync_gbps": nbytes / statistics.median(durable) / 1e9,
    }


# -- 3. dd ------------------------------------------------------------------------------------------


def dd_once(nbytes: int, root: Path) -> tuple[float, int]:
    """(seconds dd reports for writing ``nbytes`` rounded up to 64 MiB blocks, then fsync; bytes)."""
    count = max(1, math.ceil(nbytes / DD_BLOCK))
    path = root / "dd.bin"
    command = ["dd", "if=/dev/zero", f"of={path}", "bs=64M", f"count={count}", "conv=fsync"]
    try:
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
        wall = time.perf_counter() - started
    finally:
        path.unlink(missing_ok=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    found = re.search(r"copied, ([0-9.]+) s", result.stderr)
    return (float(found.group(1)) if found else wall), count * DD_BLOCK


def summarize_dd(runs: list[tuple[float, int]]) -> dict[str, Any]:
    seconds = [r[0] for r in runs]
    median = statistics.median(seconds)
    return {"seconds": seconds, "bytes": runs[0][1], "median_s": median, "gbps": runs[0][1] / median / 1e9}


# -- the floor: one warm copy of the same tensors ---------------------------------------------------


def memcpy_once(state_fn: StateFn, buffer: torch.Tensor) -> float:
    """Seconds to copy every tensor of the state, back to back, into an already faulted-in buffer.

    What a warm ``maybe_snapshot`` cannot beat: it does this same copy into shared memory.
    """
    started = time.perf_counter()
    offset = 0
    for tensor in _tensors(state_fn()):
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        buffer[offset : offset + flat.numel()].copy_(flat)
        offset += flat.numel()
    return time.perf_counter() - started


def measure(
    state_fn: StateFn, nbytes: int, root: Path, repeats: int
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Round 0: the cold capture. Rounds 1..repeats: a warm capture, a memcpy, a torch.save, a dd.

    Interleaving keeps a drifting disk (or a VM's host, or a neighbour process)
    from favouring whichever method happens to run last.
    """
    saves: list[tuple[float, float, int]] = []
    dds: list[tuple[float, int]] = []
    copies: list[float] = []
    buffer = torch.ones(nbytes, dtype=torch.uint8)  # written once: faulted in before any timing
    with CkptdBench(root / "ckptd-run", state_fn) as ckptd:
        progress("round 0 (cold):")
        _print_capture(ckptd.capture(1))
        for round_ in range(1, repeats + 1):
            progress(f"round {round_}:")
            _print_capture(ckptd.capture(round_ + 1))
            copies.append(memcpy_once(state_fn, buffer))
            progress(f"  memcpy of the same tensors into a warm buffer {copies[-1] * 1e3:.1f} ms")
            saves.append(torch_save_once(state_fn, root))
            progress(f"  torch.save {saves[-1][0]:.2f} s, with fsync {saves[-1][1]:.2f} s")
            dds.append(dd_once(nbytes, root))
            progress(f"  dd conv=fsync {dds[-1][0]:.2f} s")
    del buffer
    median = statistics.median(copies)
    memcpy = {"seconds": copies, "median_s": median, "gbps": nbytes / median / 1e9}
    return ckptd.summary(), memcpy, summarize_saves(saves), summarize_dd(dds)


def _print_capture(capture: dict[str, Any]) -> None:
    progress(
        f"  ckptd step {capture['step']}: stall {capture['stall_s'] * 1e3:.1f} ms "
        f"({capture['minor_faults']} minor faults, "
        f"{'slot created' if capture['slot_created'] else 'slot reused'}), "
        f"committed {capture['persist_s']:.2f} s later"
    )


# -- report -----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    meter = LoadMeter()
    with scratch_dir(args.dir, "ckptd-bench-") as root:
        disk = filesystem_of(root)
        shm = filesystem_of(Path("/dev/shm")) if Path("/dev/shm").is_dir() else None
        progress(
            f"disk: {disk['path']} on {disk['device']} ({disk['fstype']}, mounted at {disk['mount']}, "
            f"{disk['free_bytes'] / 2**30:.0f} GiB free)"
        )
        if disk["fstype"] in ("tmpfs", "ramfs"):
            progress("  WARNING: that is memory, not a disk: the durable figures mean nothing there")
        progress(f"building the state (~{args.gib} GiB: model + Adam after one step)...")
        state_fn, nbytes, count = build_state(args.gib)
        progress(f"  {nbytes / 2**30:.3f} GiB in {count} tensors")
        need = 3 * nbytes
        if disk["free_bytes"] < need:
            raise SystemExit(
                f"{disk['path']} has {disk['free_bytes'] / 2**30:.1f} GiB free; need {need / 2**30:.1f}"
            )
        if shm is not None and shm["free_bytes"] < nbytes + (128 << 20):
            raise SystemExit(f"/dev/shm has {shm['free_bytes'] / 2**30:.1f} GiB free; the slot needs more")
        ckptd, memcpy, save, dd = measure(state_fn, nbytes, root, args.repeats)
    return {
        "benchmark": "snapshot_stall",
        **meter.report(),
        "machine": machine_info(),
        "disk": disk,
        "shm": shm,
        "config": {"gib": args.gib, "repeats": args.repeats, "state_bytes": nbytes, "tensors": count},
        "ckptd": ckptd,
        "memcpy": memcpy,
        "torch_save": save,
        "dd": dd,
        "ratios": {
            "stall_warm_over_torch_save": ckptd["stall_warm_s"] / save["save_median_s"],
            "stall_warm_over_torch_save_fsync": ckptd["stall_warm_s"] / save["save_fsync_median_s"],
            "stall_cold_over_torch_save": ckptd["stall_cold_s"] / save["save_median_s"],
            "stall_warm_over_stall_cold": ckptd["stall_warm_s"] / ckptd["stall_cold_s"],
            "stall_warm_over_memcpy": ckptd["stall_warm_s"] / memcpy["median_s"],
            "persist_gbps_over_dd_gbps": ckptd["persist_gbps"] / dd["gbps"],
        },
    }


def print_table(result: dict[str, Any]) -> None:
    m, d, c = result["machine"], result["disk"], result["ckptd"]
    s, dd, r = result["torch_save"], result["dd"], result["ratios"]
    nbytes = result["config"]["state_bytes"]
    print(f"\nsnapshot_stall  {result['date']}")
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, "
        f"Linux {m['kernel']}, Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads)"
    )
    load = result["load_avg_1min"]
    print(
        f"load:    1-min load average {load['start']:.2f} at start, {load['end']:.2f} at end; "
        f"other processes used {result['others_cpu_share']:.0%} of the CPUs during the run"
    )
    print(f"disk:    {d['device']} {d['fstype']} at {d['mount']} (bench dir {d['path']})")
    print(
        f"state:   {nbytes / 2**30:.3f} GiB in {result['config']['tensors']} tensors "
        f"(model + Adam state), repeats {result['config']['repeats']}\n"
    )
    ms = 1e3

    def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
        return f"{min(values) * scale:.{digits}f}-{max(values) * scale:.{digits}f}"

    warm = [cap["stall_s"] for cap in c["captures"][1:]]
    persists = [cap["persist_s"] for cap in c["captures"]]
    rows = [
        ("ckptd stall, cold (step 1)", f"{c['stall_cold_s'] * ms:8.1f} ms", "", "one-time: slot created"),
        (
            f"ckptd stall, warm (median of {len(warm)})",
            f"{c['stall_warm_s'] * ms:8.1f} ms",
            spread(warm, ms, 1) + " ms",
            "slot reused" if c["slot_reused"] else "SLOT NOT REUSED",
        ),
        (
            "memcpy of the same tensors (warm)",
            f"{result['memcpy']['median_s'] * ms:8.1f} ms",
            spread(result["memcpy"]["seconds"], ms, 1) + " ms",
            f"{result['memcpy']['gbps']:.3f} GB/s",
        ),
        (
            f"ckptd persist, ack->commit (median of {len(persists)})",
            f"{c['persist_s']:8.2f} s ",
            spread(persists) + " s",
            f"{c['persist_gbps']:.3f} GB/s",
        ),
        (
            "torch.save, returns (page cache)",
            f"{s['save_median_s']:8.2f} s ",
            spread(s["save_s"]) + " s",
            f"{s['save_gbps']:.3f} GB/s",
        ),
        (
            "torch.save + fsync (durable)",
            f"{s['save_fsync_median_s']:8.2f} s ",
            spread(s["save_fsync_s"]) + " s",
            f"{s['save_fsync_gbps']:.3f} GB/s",
        ),
        (
            "dd if=/dev/zero conv=fsync",
            f"{dd['median_s']:8.2f} s ",
            spread(dd["seconds"]) + " s",
            f"{dd['gbps']:.3f} GB/s ({dd['bytes'] / 2**30:.3f} GiB)",
        ),
    ]
    width = max(len(row[0]) for row in rows)
    print(f"  {'':<{width}}  {'median':>11}  {'min-max':<15}")
    for name, value, low_high, note in rows:
        print(f"  {name:<{width}}  {value}  {low_high:<15}  {note}")
    print("\nratios:")
    print(f"  stall_warm / torch.save          {r['stall_warm_over_torch_save']:.3f}")
    print(f"  stall_warm / (torch.save+fsync)  {r['stall_warm_over_torch_save_fsync']:.3f}")
    print(f"  stall_cold / torch.save          {r['stall_cold_over_torch_save']:.3f}")
    print(f"  stall_warm / stall_cold          {r['stall_warm_over_stall_cold']:.3f}")
    print(f"  stall_warm / memcpy              {r['stall_warm_over_memcpy']:.3f}")
    print(f"  persist GB/s / dd GB/s           {r['persist_gbps_over_dd_gbps']:.3f}")
    print("\nper capture (ms; 'acquire' includes 'create'):")
    names = ["state_fn", "flatten", "acquire", "create", "copy", "ack", "other"]
    print("  step   stall  " + "".join(f"{n:>9}" for n in names) + "  minor faults  persist")
    for cap in c["captures"]:
        cells = "".join(f"{cap['phases_s'].get(n, 0.0) * 1e3:9.1f}" for n in names)
        print(
            f"  {cap['step']:>4} {cap['stall_s'] * 1e3:7.1f}  {cells}  {cap['minor_faults']:>12}"
            f"  {cap['persist_s']:6.2f} s"
        )
    if c["daemon_peak_rss_bytes"]:
        print(f"\ndaemon peak RSS: {c['daemon_peak_rss_bytes'] / 2**20:.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the training state (1.0 GiB)")
    parser.add_argument("--dir", help="where to write (default: a temp dir on the repo's filesystem)")
    parser.add_argument("--repeats", type=int, default=3, help="warm captures and save/dd runs (3)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.gib <= 0 or args.repeats < 1:
        parser.error("--gib must be > 0 and --repeats >= 1")
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
