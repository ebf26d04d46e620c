"""The remote tier's upload against plain s3fs, and the daemon's memory while it uploads.

Run by hand, not part of the test suite::

    .venv/bin/python benchmarks/remote_upload.py [--mb 1024,256] [--file-mb 256] [--repeats 3]
        [--reads] [--daemon-mb 1024] [--no-daemon] [--dir PATH] [--json]

The script starts its own S3-speaking server (``python -m moto.server`` on a free localhost port;
moto keeps objects over 5 MiB in temp files) and points every client at it the way a user's
environment would: ``AWS_ENDPOINT_URL`` and ``AWS_*`` (as ``tests/test_remote.py`` does).

1. Upload throughput. For each size of ``--mb`` a committed local checkpoint is made with
   ``ckptd.store.Store`` (``Store.writing`` -> ``PendingCheckpoint.copy_in`` -> ``Store.commit``)
   from random bytes, in a temp dir on the repo's disk (``--dir``), cut into files of
   ``--file-mb`` MiB (by default 1024 MiB: 4 files of 256 MiB; 256 MiB: one file). Then
   ``--repeats`` rounds, each uploading the same files once per method, the order alternating
   from round to round (a-b-c then c-b-a); each upload goes to a fresh prefix, deleted (untimed)
   after it:

   (a) plain: ``s3fs.S3FileSystem().put_file(file, key)`` for each file, nothing else;
   (b) ckptd: ``RemoteStore(url).upload(store, name)`` as the uploader thread calls it: each file
       ``put_file``, read back through ``fs.open(block_size=8 MiB)`` and hashed (xxh3_128) against
       the local manifest, then ``MANIFEST.json`` (``pipe_file``);
   (c) ckptd without verification: the same ``put_file`` calls and manifest ``pipe_file`` done by
       hand (RemoteStore's paths and payload), no read-back. With ``--reads``, right after it and
       outside (c)'s time, two read timings of what (c) uploaded: (d) ``RemoteStore._check`` of
       each file, the read-back + xxh3 that (b) adds, and (e) plain ``fs.cat_file`` of each file
       (s3fs reads large objects with concurrent ranged GETs), the bytes discarded.

   Caveat, the server: moto 5 answers every GET, ranged or not, by reading the whole object out
   of its temp file and slicing it, so ckptd's read-back (8 MiB ranged GETs, one after another)
   costs the server O(object size) per 8 MiB: quadratic in the file size (a 1 GiB file: 128 reads
   of 1 GiB). That is why files are 256 MiB here; on a real object store a ranged GET costs what
   it returns, so (b) - (c) here overstates verification for large files.

   MiB/s is checkpoint bytes (manifest excluded) over seconds; medians over the rounds (min-max in
   the JSON). Ratio: ckptd seconds / plain seconds of the medians (above 1: ckptd is slower). CPU
   seconds of this process (the client) and of the moto server are recorded per upload: on a
   small machine the server is part of what is measured.

2. The daemon's memory during an upload. A real ``python -m ckptd run RUN --metric loss
   --keep-last 1 --remote s3://BUCKET/x`` (``CKPTD_SHM_ROOT`` a fresh folder under ``/dev/shm``)
   and ``tests/programs/scripted_trainer.py RUN '[{"step": 100, "loss": 0.5}]' --mb N``
   (``--daemon-mb``; its state is N MiB of zeros plus a tiny tensor, one safetensors file). A
   thread samples the daemon's ``RssAnon`` (and ``RssFile``, ``RssShmem``) from
   ``/proc/PID/status`` every 50 ms, from before the trainer starts until 2 s after
   ``.ckptd/status.json``'s ``remote`` report shows ``uploaded`` 1 and nothing pending (refreshed
   at the 1 s heartbeat). Reported: idle, peak while persisting (trainer start -> commit), at the
   commit, peak while uploading (commit -> the report), after; the daemon's own upload seconds
   (its log line ``uploaded ... (X MiB in Y s)`` and ``last_upload``), and its CPU seconds.
   Expect RssAnon to grow by about 2 x max_concurrency (10) x the s3fs part size (50 MiB): s3fs's
   ``put_file`` reads 10 parts at once and aiohttp copies each part's body again (seen with
   tracemalloc: 500 MiB at ``s3fs/core.py`` ``f0.read(chunksize)``, 500 MiB in aiohttp's
   ``BytesIOPayload``). The trainer's state is one 1 GiB file, so the read-back pays the moto
   caveat above in full: this part takes about 2 minutes of the run.

Everything (the server, the daemon, the trainer, the temp dir, the /dev/shm folder) is removed at
the end whatever happens. Time on the 2-core development VM with the defaults: about 7 minutes
(433 s on 2026-12-03), 2 of them the daemon part (``--no-daemon`` skips it); the server, not
ckptd, sets most of that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = REPO / "tests" / "programs"
METHODS = ("plain", "ckptd", "ckptd_noverify")
LABELS = {
    "plain": "(a) plain s3fs put_file",
    "ckptd": "(b) ckptd RemoteStore.upload",
    "ckptd_noverify": "(c) ckptd minus verification (put_file + manifest by hand)",
}
_TICKS = os.sysconf("SC_CLK_TCK")


# -- the server -------------------------------------------------------------------------------------


class S3Server:
    """``python -m moto.server`` on a free localhost port."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit("the moto server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- /proc ------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (threads included)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """RssAnon, RssFile, RssShmem, VmHWM of ``pid`` in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


class Sampler:
    """A thread reading ``memory_kib(pid)`` every ``interval`` s until stopped."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.samples.append((time.monotonic(), memory_kib(self.pid)))
            self._stop.wait(self.interval)

    def between(self, start: float, end: float) -> list[dict[str, int]]:
        return [s for t, s in self.samples if start <= t <= end]


# -- part 1: upload throughput ----------------------------------------------------------------------


def make_checkpoint(store: Any, step: int, nbytes: int, file_bytes: int, scratch: Path) -> str:
    """A committed checkpoint of random bytes, ``nbytes`` in all, in files of ``file_bytes``."""
    source = scratch / f"src-{step}"
    with store.writing(step) as pending:
        for index, start in enumerate(range(0, nbytes, file_bytes)):
            each = min(file_bytes, nbytes - start)
            with source.open("wb") as out:
                left = each
                while left:
                    piece = min(left, 16 << 20)
                    out.write(os.urandom(piece))
                    left -= piece
            pending.copy_in(f"part-{index:02d}.bin", source, each)
            source.unlink()
        record = store.commit(pending, {"tags": ["periodic"], "metrics": {}, "run_id": "bench"})
    return str(record.name)


def timed(action: Callable[[], Any], moto_pid: int) -> dict[str, float]:
    own, moto = os.times(), cpu_seconds(moto_pid)
    started = time.perf_counter()
    action()
    seconds = time.perf_counter() - started
    after = os.times()
    return {
        "seconds": seconds,
        "client_cpu_s": (after.user + after.system) - (own.user + own.system),
        "server_cpu_s": cpu_seconds(moto_pid) - moto,
    }


def one_upload(
    method: str, store: Any, name: str, bucket: str, prefix: str, moto_pid: int, reads: bool = False
) -> dict[str, Any]:
    import json as json_

    import s3fs

    from ckptd.remote import RemoteStore
    from ckptd.store import MANIFEST

    url = f"s3://{bucket}/{prefix}"
    remote = RemoteStore(url)
    manifest = store.manifest(name)
    files = manifest["files"]
    result: dict[str, Any] = {}
    if method == "plain":
        fs = s3fs.S3FileSystem()

        def plain() -> None:
            for file in files:
                fs.put_file(str(store.path_of(name) / file), remote.path(name, file))

        result = timed(plain, moto_pid)
        result["same_fs_as_ckptd"] = fs is remote.fs
    elif method == "ckptd":
        result = timed(lambda: RemoteStore(url).upload(store, name), moto_pid)
    else:
        timings: dict[str, float] = {}

        def by_hand() -> None:
            started = time.perf_counter()
            for file in files:
                remote.fs.put_file(str(store.path_of(name) / file), remote.path(name, file))
            timings["put_s"] = time.perf_counter() - started
            payload = json_.dumps(manifest, indent=1, sort_keys=True).encode()
            started = time.perf_counter()
            remote.fs.pipe_file(remote.path(name, MANIFEST), payload)
            timings["manifest_s"] = time.perf_counter() - started

        result = {**timed(by_hand, moto_pid), **timings}
    if method == "ckptd_noverify" and reads:
        # (d) the read-back ckptd adds, and (e) a plain read of the same objects, for reference.
        check = timed(lambda: [remote._check(remote.path(name, f), e) for f, e in files.items()], moto_pid)
        result["readback"] = check
        result["cat_file"] = timed(
            lambda: [len(remote.fs.cat_file(remote.path(name, f))) for f in files], moto_pid
        )
    remote.fs.rm(f"{bucket}/{prefix}", recursive=True)
    remote.fs.invalidate_cache()
    return result


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def throughput(args: argparse.Namespace, bucket: str, scratch: Path, moto_pid: int) -> list[dict[str, Any]]:
    from benchlib import progress
    from s3fs.core import calculate_chunksize

    from ckptd.store import Store

    store = Store(scratch / "store")
    progress("warm-up: one 1 MiB ckptd upload (connections, imports)")
    warm = make_checkpoint(store, 1, 1 << 20, 1 << 20, scratch)
    one_upload("ckptd", store, warm, bucket, "warmup", moto_pid)
    shutil.rmtree(store.path_of(warm))
    sizes = []
    for index, mb in enumerate(args.mb):
        nbytes = mb << 20
        step = 1000 * (index + 1)
        file_bytes = min(nbytes, args.file_mb << 20)
        files = -(-nbytes // file_bytes)
        progress(f"== {mb} MiB in {files} file(s): writing the checkpoint")
        name = make_checkpoint(store, step, nbytes, file_bytes, scratch)
        rounds = []
        for r in range(args.repeats):
            order = METHODS if r % 2 == 0 else tuple(reversed(METHODS))
            one_round = {}
            for method in order:
                one_round[method] = one_upload(
                    method, store, name, bucket, f"{method}-{mb}-{r}", moto_pid, args.reads
                )
                progress(f"  round {r + 1}: {method:15s} {one_round[method]['seconds']:.2f} s")
            rounds.append(one_round)
        shutil.rmtree(store.path_of(name))
        summary: dict[str, Any] = {}
        for method in METHODS:
            for key in ("seconds", "client_cpu_s", "server_cpu_s"):
                summary[f"{method}_{key}"] = spread([r[method][key] for r in rounds])
        for key in ("put_s", "manifest_s"):
            summary[f"ckptd_noverify_{key}"] = spread([r["ckptd_noverify"][key] for r in rounds])
        for read in ("readback", "cat_file") if args.reads else ():
            for key in ("seconds", "client_cpu_s", "server_cpu_s"):
                summary[f"{read}_{key}"] = spread([r["ckptd_noverify"][read][key] for r in rounds])
        plain = summary["plain_seconds"]["median"]
        summary["ratio_ckptd_plain"] = summary["ckptd_seconds"]["median"] / plain
        summary["ratio_noverify_plain"] = summary["ckptd_noverify_seconds"]["median"] / plain
        sizes.append({
            "mb": mb,
            "files": files,
            "file_bytes": file_bytes,
            "bytes": nbytes,
            "s3fs_chunksize": calculate_chunksize(file_bytes),
            "rounds": rounds,
            "summary": summary,
        })  # fmt: skip
    return sizes


# -- part 2: the daemon's memory --------------------------------------------------------------------


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, SIGKILL after 60 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def daemon_memory(args: argparse.Namespace, bucket: str, scratch: Path) -> dict[str, Any]:
    from benchlib import daemon_status, progress
    from s3fs.core import calculate_chunksize

    from ckptd.protocol import RunPaths, daemon_alive

    run = scratch / "run"
    run.mkdir()
    paths = RunPaths(run)
    shm = Path("/dev/shm") / f"ckptd-bench-remote-{os.getpid()}-{time.monotonic_ns()}"
    shm.mkdir(mode=0o700)
    env = {
        **os.environ,
        "CKPTD_SHM_ROOT": str(shm),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }
    daemon: subprocess.Popen[bytes] | None = None
    trainer: subprocess.Popen[bytes] | None = None
    log_path = scratch / "daemon.log"
    url = f"s3://{bucket}/x"
    try:
        with log_path.open("wb") as out:
            argv = [sys.executable, "-m", "ckptd", "run", str(run), "--metric", "loss",
                    "--keep-last", "1", "--remote", url]  # fmt: skip
            daemon = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + 30
        while not daemon_alive(paths):
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit(f"the daemon did not start:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.01)
        progress(f"== daemon: {args.daemon_mb} MiB trainer state, upload to {url}")
        with Sampler(daemon.pid) as sampler:
            time.sleep(1.0)
            t_trainer = time.monotonic()
            cpu_trainer = cpu_seconds(daemon.pid)
            evals = json.dumps([{"step": 100, "loss": 0.5}])
            command = [sys.executable, str(PROGRAMS / "scripted_trainer.py"), str(run), evals,
                       "--mb", str(args.daemon_mb)]  # fmt: skip
            trainer = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=sys.stderr)
            manifest = run / "checkpoints" / "step-00000100" / "MANIFEST.json"
            t_commit = t_done = t_uploading = None
            cpu_commit = cpu_done = 0.0
            last_upload: dict[str, Any] = {}
            deadline = time.monotonic() + args.timeout
            while t_done is None:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-4000:]
                    raise SystemExit(f"no upload within {args.timeout} s; daemon log:\n{tail}")
                now = time.monotonic()
                if t_commit is None and manifest.exists():
                    t_commit, cpu_commit = now, cpu_seconds(daemon.pid)
                report = daemon_status(paths).get("remote") or {}
                if t_uploading is None and report.get("uploading"):
                    t_uploading = now
                if t_commit is not None and report.get("uploaded") == 1 and not report.get("pending"):
                    t_done, cpu_done = now, cpu_seconds(daemon.pid)
                    last_upload = report.get("last_upload") or {}
                time.sleep(0.02)
            time.sleep(2.0)
            t_end = time.monotonic()
        trainer_out = trainer.communicate(timeout=60)[0].decode(errors="replace").strip()
        assert t_commit is not None
        log_text = log_path.read_text(errors="replace")
        match = re.search(r"uploaded (\S+) to \S+ \(([\d.]+) MiB in ([\d.]+) s\)", log_text)

        def anon(samples: list[dict[str, int]], pick: Callable[[list[int]], float]) -> float:
            return pick([s["RssAnon"] for s in samples]) / 1024 if samples else float("nan")

        idle = sampler.between(0.0, t_trainer)
        persisting = sampler.between(t_trainer, t_commit)
        uploading = sampler.between(t_commit, t_done)
        after = sampler.between(t_done + 1.5, t_end)
        timed_upload = [(t, s["RssAnon"]) for t, s in sampler.samples if t_commit <= t <= t_done]
        peak_at = max(timed_upload, key=lambda p: p[1], default=(t_commit, 0))[0] - t_commit
        return {
            "mb": args.daemon_mb,
            "s3fs_chunksize": calculate_chunksize(args.daemon_mb << 20),
            "url": url,
            "trainer_output": trainer_out,
            "samples": len(sampler.samples),
            "rss_anon_mib": {
                "idle": anon(idle, statistics.median),
                "persist_peak": anon(persisting, max),
                "at_commit": anon(persisting[-1:], max),
                "upload_peak": anon(uploading, max),
                "upload_peak_s_after_commit": peak_at,
                "after": anon(after, statistics.median),
            },
            "rss_file_mib_upload_peak": max((s["RssFile"] for s in uploading), default=0) / 1024,
            "rss_shmem_mib_upload_peak": max((s["RssShmem"] for s in uploading), default=0) / 1024,
            "vm_hwm_mib": max((s["VmHWM"] for _, s in sampler.samples), default=0) / 1024,
            "trainer_start_to_commit_s": t_commit - t_trainer,
            "commit_to_report_s": t_done - t_commit,  # up to a 1 s heartbeat late
            "uploading_seen_s_after_commit": None if t_uploading is None else t_uploading - t_commit,
            "daemon_cpu_s_persist": cpu_commit - cpu_trainer,
            "daemon_cpu_s_upload": cpu_done - cpu_commit,
            "log_upload": None if match is None else {"mib": float(match[2]), "seconds": float(match[3])},
            "last_upload": last_upload,
            "timeline": [(round(t - t_commit, 3), s["RssAnon"]) for t, s in sampler.samples],
        }
    finally:
        if trainer is not None and trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        if daemon is not None:
            stop(daemon)
        shutil.rmtree(shm, ignore_errors=True)


# -- driver -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def s3_environment(server: S3Server) -> Iterator[str]:
    """The AWS_* variables pointing at ``server``, and a fresh bucket there."""
    for key, value in {
        "AWS_ENDPOINT_URL": server.url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ[key] = value
    import s3fs

    bucket = f"bench{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    yield bucket


def print_table(result: dict[str, Any]) -> None:
    m, load, v = result["machine"], result["load_avg_1min"], result["versions"]
    print(f"\nremote_upload  {result['date']}")
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, "
        f"Linux {m['kernel']}, Python {m['python']}; s3fs {v['s3fs']}, fsspec {v['fsspec']}, "
        f"aiobotocore {v['aiobotocore']}, "
        f"botocore {v['botocore']}, moto {v['moto']} (server on localhost, same machine); store on "
        f"{result['disk']['device']} {result['disk']['fstype']}; load average (1 min) {load['start']:.2f} "
        f"at start -> {load['end']:.2f} at end, other processes {result['others_cpu_share']:.0%} of the "
        f"CPUs; {result['config']['repeats']} rounds, alternating order, medians; "
        f"wall {result['wall_s']:.0f} s"
    )
    if result["sizes"]:
        print()
        header = ["checkpoint", "method", "s (min-max)", "MiB/s", "x plain", "client CPU s", "moto CPU s"]
        print("| " + " | ".join(header) + " |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for size in result["sizes"]:
            s = size["summary"]
            mib = size["bytes"] / 2**20
            shape = f"{size['mb']} MiB ({size['files']} x {size['file_bytes'] / 2**20:.0f} MiB)"
            plain = s["plain_seconds"]["median"]
            rows = [(LABELS[m], m) for m in METHODS]
            if "readback_seconds" in s:
                rows += [
                    ("(d) read-back + xxh3 alone (RemoteStore._check)", "readback"),
                    ("(e) plain s3fs cat_file of the same objects", "cat_file"),
                ]
            for label, key in rows:
                sec = s[f"{key}_seconds"]
                cells = [
                    shape, label, f"{sec['median']:.2f} ({sec['min']:.2f}-{sec['max']:.2f})",
                    f"{mib / sec['median']:.0f}", f"{sec['median'] / plain:.2f}",
                    f"{s[f'{key}_client_cpu_s']['median']:.1f}", f"{s[f'{key}_server_cpu_s']['median']:.1f}",
                ]  # fmt: skip
                print("| " + " | ".join(cells) + " |")
        print(
            "\nx plain: seconds / (a)'s seconds (medians). (c) is (b)'s put_file calls and manifest done by "
            "hand without the read-back; (d) and (e) read what (c) uploaded (downloads, not uploads; "
            "MiB/s of reading). s3fs part size: "
            + ", ".join(f"{z['s3fs_chunksize'] / 2**20:.0f} MiB for {z['file_bytes'] / 2**20:.0f} MiB files"
                        for z in result["sizes"])
            + f", {result['s3fs_max_concurrency']} parts in flight (max_concurrency)."
        )  # fmt: skip
        print(
            "moto reads a whole object for every ranged GET: ckptd's read-back (8 MiB GETs) costs the "
            "server O(file size) per GET here, not on a real object store."
        )
    d = result.get("daemon")
    if d:
        r = d["rss_anon_mib"]
        upload_s = d["log_upload"]["seconds"] if d["log_upload"] else float("nan")
        print(f"\ndaemon ({d['mb']} MiB trainer state, one file, {d['url']}):\n")
        print("| daemon RssAnon | MiB |")
        print("|---|---:|")
        print(f"| idle, before the trainer | {r['idle']:.1f} |")
        print(f"| peak while persisting (trainer start -> commit, {d['trainer_start_to_commit_s']:.1f} s) "
              f"| {r['persist_peak']:.1f} |")  # fmt: skip
        print(f"| at the commit | {r['at_commit']:.1f} |")
        print(f"| peak while uploading ({r['upload_peak_s_after_commit']:.1f} s after the commit) "
              f"| {r['upload_peak']:.1f} |")  # fmt: skip
        print(f"| after the upload | {r['after']:.1f} |")
        print(
            f"\ndaemon's upload: {upload_s:.2f} s ({d['log_upload']['mib'] if d['log_upload'] else '?'} MiB, "
            f"{(d['log_upload']['mib'] / upload_s) if d['log_upload'] else float('nan'):.0f} MiB/s, its log "
            f"line; last_upload {d['last_upload'].get('seconds')} s); "
            f"daemon CPU {d['daemon_cpu_s_upload']:.1f} s "
            f"from the commit to the report ({d['commit_to_report_s']:.1f} s, heartbeat-late by up to 1 s); "
            f"VmHWM {d['vm_hwm_mib']:.0f} MiB; RssFile peak while uploading "
            f"{d['rss_file_mib_upload_peak']:.0f} MiB; {d['samples']} samples at 50 ms."
        )
        part = d["s3fs_chunksize"]
        print(
            f"RssAnon grew {r['upload_peak'] - r['at_commit']:.0f} MiB while uploading; s3fs put_file "
            f"holds up to {result['s3fs_max_concurrency']} parts of {part / 2**20:.0f} MiB at once "
            f"(here {min(d['mb'] << 20, result['s3fs_max_concurrency'] * part) / 2**20:.0f} MiB) and aiohttp "
            "copies each part's body once more: about twice that."
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mb", default="1024,256", help="checkpoint MiB, comma-separated (1024,256)")
    parser.add_argument("--file-mb", type=int, default=256, help="MiB per file of a checkpoint (256)")
    parser.add_argument("--reads", action="store_true", help="also time (d) and (e), the read-backs")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per size (3)")
    parser.add_argument("--daemon-mb", type=int, default=1024, help="MiB of the daemon part's state (1024)")
    parser.add_argument("--no-daemon", action="store_true", help="skip the daemon part")
    parser.add_argument("--timeout", type=float, default=180, help="seconds for the daemon's upload (180)")
    parser.add_argument("--dir", help="where temp files go (default: a temp dir on the repo's filesystem)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    try:
        args.mb = [int(v) for v in args.mb.split(",") if v.strip()]
    except ValueError:
        parser.error("--mb takes whole MiB, e.g. 1024,256")
    if min(args.mb, default=1) < 1 or args.file_mb < 1 or args.repeats < 1 or args.daemon_mb < 1:
        parser.error("--mb, --file-mb, --repeats and --daemon-mb must be >= 1")

    import aiobotocore
    import benchlib
    import botocore
    import fsspec
    import moto
    import s3fs
    from benchlib import LoadMeter, filesystem_of, progress, scratch_dir

    meter = LoadMeter()
    progress(f"cpus {os.cpu_count()}, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} at start")
    server = S3Server()
    try:
        server.start()
        assert server.proc is not None
        with s3_environment(server) as bucket, scratch_dir(args.dir, "ckptd-remote-") as scratch:
            sizes = throughput(args, bucket, scratch, server.proc.pid)
            daemon = None if args.no_daemon else daemon_memory(args, bucket, scratch)
            moto_rss = memory_kib(server.proc.pid)
            disk = filesystem_of(scratch)
    finally:
        server.stop()
    result = {
        "benchmark": "remote_upload",
        **meter.report(),
        "machine": benchlib.machine_info(),
        "versions": {
            "s3fs": s3fs.__version__,
            "fsspec": fsspec.__version__,
            "aiobotocore": aiobotocore.__version__,
            "botocore": botocore.__version__,
            "moto": moto.__version__,
        },
        "s3fs_max_concurrency": s3fs.S3FileSystem().max_concurrency,
        "moto_memory_kib_at_end": moto_rss,
        "disk": disk,
        "config": {
            "mb": args.mb,
            "file_mb": args.file_mb,
            "repeats": args.repeats,
            "reads": args.reads,
            "daemon_mb": args.daemon_mb,
        },
        "sizes": sizes,
        "daemon": daemon,
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
