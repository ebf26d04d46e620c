"""Persist throughput of the store vs ``dd conv=fsync``, the checksums' speed, the persist's memory.

Run by hand, not part of the test suite::

    .venv/bin/python benchmarks/persist_speed.py [--gib 1.0] [--rounds 5] [--shards 4] [--dir PATH]

A slot file of ``--gib`` GiB of random bytes is written to shared memory (``--shm``,
default ``/dev/shm``), as a trainer's capture leaves it. Then, in interleaved rounds
in one directory on one disk (each round: one of each, the previous outputs deleted
first as ``--keep-last 1`` does, so a drifting disk hits every method alike):

1. ``persist``: what the daemon's persister does with a one-file slot:
   ``Store.writing`` -> ``PendingCheckpoint.copy_in`` -> ``Store.commit`` (copy from a
   mapping of the slot, xxh3_128 beside it, fsync, manifest, rename, fsync the store).
2. ``persist, N shards``: the same bytes as a safetensors file the persister cuts into
   ``--shards`` shards plus an index (``Persister._copy_files``, several files at once).
3. ``persist, before``: 1. as ckptd did before xxh3_128: sha256, no early writeback
   (this module swaps ``ckptd.store.CHECKSUM`` and ``_start_writeback`` for the call).
4. ``dd if=/dev/zero of=X bs=1M conv=fsync`` of the same size into the same directory.

Then, on one core over a warm mapping of the slot: sha256 (what manifests recorded
before) and xxh3_128 (what they record now), in GB/s. While the persists run, a
thread samples the process's ``RssAnon`` (``/proc/self/status``) every 2 ms: the
persister maps the slot (shared pages) and must not copy it into its own memory.
GB/s means 10^9 bytes per second; medians over the rounds, with min-max.
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import xxhash
from benchlib import LoadMeter, filesystem_of, machine_info, progress, scratch_dir

import ckptd.store
from ckptd.daemon.persister import Persister
from ckptd.protocol import Ack
from ckptd.staging import TensorEntry, plan_layout
from ckptd.store import Store

SLOT_FILE = "model.safetensors"
_CHUNK = 16 << 20


def rss_anon() -> int:
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


@contextmanager
def peak_rss_anon(peaks: list[int]) -> Iterator[None]:
    """Append the highest ``RssAnon`` seen while the block ran (sampled every 2 ms)."""
    stop = threading.Event()
    peak = [rss_anon()]

    def sample() -> None:
        while not stop.wait(0.002):
            peak[0] = max(peak[0], rss_anon())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join()
        peaks.append(max(peak[0], rss_anon()))


def write_slot(folder: Path, nbytes: int, shards: int) -> tuple[Path, int, int]:
    """A slot's safetensors file of about ``nbytes`` random bytes in ``4 * shards`` tensors;
    returns its path, valid bytes, and a shard bound that cuts it into ``shards`` shards."""
    count = 4 * max(shards, 1)
    each = nbytes // count // 4 * 4
    entries = [TensorEntry(f"t{i}", "F32", (each // 4,), each) for i in range(count)]
    layout = plan_layout(entries, {"format": "pt", "token": "benchtoken", "ack": "1"})
    path = folder / SLOT_FILE
    with path.open("wb") as handle:
        handle.write(layout.header)
        left = layout.total - len(layout.header)
        while left:
            block = os.urandom(min(left, _CHUNK))
            handle.write(block)
            left -= len(block)
    return path, layout.total, 4 * each


def persist_one(store: Store, slot: Path, nbytes: int) -> str:
    with store.writing(1) as pending:
        pending.copy_in(SLOT_FILE, slot / SLOT_FILE, nbytes)
        return store.commit(pending, {"tags": [], "run_id": "bench"}).name


@contextmanager
def as_before() -> Iterator[None]:
    """The store as it was before xxh3_128: sha256 beside the copy, writeback left to fsync."""
    checksum, writeback = ckptd.store.CHECKSUM, ckptd.store._start_writeback
    ckptd.store.CHECKSUM, ckptd.store._start_writeback = "sha256", lambda fd, offset, nbytes: None
    try:
        yield
    finally:
        ckptd.store.CHECKSUM, ckptd.store._start_writeback = checksum, writeback


def persist_sharded(store: Store, slot: Path, ack: Ack) -> str:
    with store.writing(1) as pending:
        Persister._copy_files(ack, slot, pending)
        return store.commit(pending, {"tags": [], "run_id": "bench"}).name


def dd(target: Path, nbytes: int) -> None:
    mib = max(1, round(nbytes / 2**20))
    command = ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={mib}", "conv=fsync"]
    subprocess.run(command, check=True, capture_output=True)


def hash_speed(path: Path, nbytes: int, make: Callable[[], object]) -> float:
    """GB/s of one checksum over a warm mapping of ``path`` on one core (best of 3)."""
    best = 0.0
    with (
        path.open("rb") as handle,
        mmap.mmap(handle.fileno(), nbytes, prot=mmap.PROT_READ) as mapped,
        memoryview(mapped) as view,
    ):
        for _ in range(3):
            digest = make()
            started = time.perf_counter()
            for offset in range(0, nbytes, _CHUNK):
                digest.update(view[offset : offset + _CHUNK])  # type: ignore[attr-defined]
            best = max(best, nbytes / (time.perf_counter() - started) / 1e9)
    return best


def run(args: argparse.Namespace) -> int:
    nbytes = int(args.gib * 2**30)
    meter = LoadMeter()
    with (
        scratch_dir(args.dir, "ckptd-persist-") as root,
        tempfile.TemporaryDirectory(prefix="ckptd-bench-", dir=args.shm) as shm,
    ):
        slot = Path(shm) / "slot-0"
        slot.mkdir()
        progress(f"writing a {nbytes / 2**30:.2f} GiB slot file in {slot} ...")
        _, valid, bound = write_slot(slot, nbytes, args.shards)
        ack = Ack(
            name="1",
            captured_step=1,
            slot="slot-0",
            files={SLOT_FILE: valid},
            token="benchtoken",
            token_file=SLOT_FILE,
            shard_bytes=bound,
            created=time.time(),
        )
        store = Store(root / "checkpoints")
        store.ensure()
        methods: dict[str, Callable[[], object]] = {
            "persist": lambda: persist_one(store, slot, valid),
            f"persist, {args.shards} shards": lambda: persist_sharded(store, slot, ack),
            "persist, before": lambda: persist_one(store, slot, valid),
            "dd conv=fsync": lambda: dd(root / "dd.out", valid),
        }
        if args.shards <= 1:
            del methods[f"persist, {args.shards} shards"]
        times: dict[str, list[float]] = {name: [] for name in methods}
        peaks: list[int] = []
        baseline = rss_anon()
        for round_ in range(args.rounds):
            progress(f"round {round_ + 1}/{args.rounds}")
            for name, method in methods.items():
                for leftover in store.checkpoint_dirs():
                    store.delete(leftover)
                (root / "dd.out").unlink(missing_ok=True)
                os.sync()
                started = time.perf_counter()
                if name.startswith("persist"):
                    with peak_rss_anon(peaks), as_before() if name.endswith("before") else nullcontext():
                        method()
                else:
                    method()
                times[name].append(time.perf_counter() - started)
        for leftover in store.checkpoint_dirs():
            store.delete(leftover)
        progress("hashing ...")
        speeds = {
            "sha256": hash_speed(slot / SLOT_FILE, valid, hashlib.sha256),
            "xxh3_128": hash_speed(slot / SLOT_FILE, valid, xxhash.xxh3_128),
        }
        disk = filesystem_of(root)
    load = meter.report()
    info = machine_info(xxhash=xxhash.VERSION)

    def gbps(seconds: float) -> float:
        return valid / seconds / 1e9

    dd_median = statistics.median(times["dd conv=fsync"])
    print(f"\npersist_speed  {load['date']}  {valid / 2**30:.2f} GiB, {args.rounds} rounds")
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_bytes'] / 2**30:.1f} GiB RAM,")
    print(f"         Linux {info['kernel']}, Python {info['python']}, xxhash {info['xxhash']}")
    print(f"disk:    {disk['device']} {disk['fstype']} at {disk['mount']} (bench dir {disk['path']})")
    print(f"load:    1-min {load['load_avg_1min']['start']:.2f} -> {load['load_avg_1min']['end']:.2f},")
    print(f"         other processes {100 * load['others_cpu_share']:.0f}% of the CPUs")
    print(f"\n  {'':<22} {'median s':>9} {'min-max s':>13} {'GB/s':>7} {'/ dd':>6}")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        spread = f"{min(seconds):.2f}-{max(seconds):.2f}"
        print(f"  {name:<22} {median:>9.3f} {spread:>13} {gbps(median):>7.2f} {dd_median / median:>6.2f}")
    for name, speed in speeds.items():
        print(f"  {name + ' on one core':<22} {'':>9} {'':>13} {speed:>7.2f}")
    print(
        f"  {'peak RssAnon, persist':<22} {max(peaks) / 2**20:>8.1f} MiB"
        f"  (before: {baseline / 2**20:.1f} MiB, +{(max(peaks) - baseline) / 2**20:.1f})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the slot file (1.0 GiB)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    parser.add_argument("--shards", type=int, default=4, help="shards of the sharded persist (4; 1: none)")
    parser.add_argument("--dir", help="where to write (default: a temp dir on the repo's filesystem)")
    parser.add_argument("--shm", default="/dev/shm", help="where the slot file goes (/dev/shm)")
    args = parser.parse_args(argv)
    if args.gib <= 0 or args.rounds < 1:
        parser.error("--gib must be > 0 and --rounds >= 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
