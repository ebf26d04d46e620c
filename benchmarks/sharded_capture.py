"""Sharded capture side by side: a two-rank FSDP2 job's ckptd captures against DCP ``async_save``.

Run by hand, not part of the test suite::

    .venv/bin/python benchmarks/sharded_capture.py [--mb 64,256] [--repeats N] [--warmup N] [--json]

For each size (``--mb``: MiB of parameters; the state is about 3x that, parameters + AdamW's
``exp_avg`` and ``exp_avg_sq``, half of it on each rank), the script starts a real daemon
(``python -m ckptd run RUN --keep-last 100 --keep-best 100``, with ``CKPTD_NODE_ID=a`` and
``CKPTD_SHM_ROOT`` a fresh folder under ``/dev/shm``) and then
``python -m torch.distributed.run --standalone --nproc-per-node 2`` of this same file in its rank
mode (``--rank-job``, gloo, ``OMP_NUM_THREADS=1``). Each rank shards a stack of square
``Linear(1024, 1024)`` layers with FSDP2 (``fully_shard`` per layer, then the root), trains two
AdamW steps so Adam's state exists, and measures, in the same process, on the same state
(``get_state_dict`` of the model and the optimizer) and into the same store directory
(``RUN/checkpoints``, on the disk of ``--dir``), ``--warmup`` untimed rounds then ``--repeats``
rounds of (the order alternating from round to round, a-b then b-a, for the page cache):

(a) ckptd: rank 0 appends an improving eval line (``eval_loss`` lower than the last one) to
    ``RUN/logging.jsonl`` and flushes it, then every rank calls
    ``ShardedClient.maybe_snapshot(S, state_fn, evaluated=True)``. **Blocked**: that call, on each
    rank. It includes the decision: rank 0 waits for the daemon's verdict on the eval it just
    logged, then broadcasts the plan, which rank 1 waits for; that part is reported separately
    ("verdict + broadcast": the call less ``ShardedClient.last_blocked_s``, which times the
    capture itself: slot check, all-reduce, ``get_state_dict``, DCP's ``save`` into the node-local
    shared-memory slot, the ack). **Persist**: from that call's return until the checkpoint
    ``step-S`` is committed in the store (its ``MANIFEST.json`` there, polled every 2 ms by each
    rank; confirmed with ``Store.list()``): the daemon copies both ranks' parts to the store,
    hashes and fsyncs them, writes the manifest and renames the directory.
(b) DCP: every rank calls ``dcp.async_save(state_fn(), checkpoint_id=RUN/checkpoints/dcp-S)``
    (thread-based, DCP's default stager and ``FileSystemWriter``, whose default ``sync_files=True``
    fsyncs every file it writes: kept). **Blocked**: ``get_state_dict`` plus the call until it
    returns its future (as for ckptd, where ``get_state_dict`` runs inside ``maybe_snapshot``).
    **Persist**: from that return until the future's ``result()`` returns on that rank (rank 0's
    includes DCP's ``.metadata``, written once every rank's data is).

A barrier separates every measurement. Each figure is the median over the rounds (min-max in the
JSON); the ratios are ckptd / DCP of the medians (below 1: ckptd is faster). Both checkpoints of a
round hold the same bytes; nothing is deleted until the size is done (the whole run dir and the
shared-memory folder are removed then, and the daemon stopped, whatever happens).
Time on the 2-core development VM with the defaults: about 1 minute (64 MiB ~16 s, 256 MiB ~40 s).
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
import time
from pathlib import Path
from typing import Any

WIDTH = 1024  # each layer a Linear(WIDTH, WIDTH): 4 MiB of float32 weights plus its bias
REPO = Path(__file__).resolve().parents[1]


# -- rank mode: runs under torchrun -----------------------------------------------------------------


def local_bytes(obj: Any) -> int:
    """Bytes of this rank's own tensors in a (nested) state dict: a DTensor's local shard only."""
    import torch
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return obj.to_local().nbytes
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(local_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(local_bytes(v) for v in obj)
    return 0


def rank_main(argv: list[str]) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    from ckptd.client import ShardedClient
    from ckptd.store import MANIFEST, Store

    parser = argparse.ArgumentParser()
    parser.add_argument("--rank-job", action="store_true")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--mb", type=int, required=True)
    parser.add_argument("--repeats", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    run = Path(args.run_dir)
    store_root = run / "checkpoints"

    layers = max(1, round(args.mb * 2**20 / ((WIDTH * WIDTH + WIDTH) * 4)))
    torch.manual_seed(0)
    blocks: list[torch.nn.Module] = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh()]
    model = torch.nn.Sequential(*blocks)
    for block in model:
        if isinstance(block, torch.nn.Linear):
            fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(2):  # so that exp_avg and exp_avg_sq exist
        x = torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(step * world + rank))
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    def state_fn() -> dict[str, Any]:
        model_state, optim_state = get_state_dict(model, optimizer)
        return {"model": model_state, "optim": optim_state}

    state_bytes = local_bytes(state_fn())
    client = ShardedClient(run)

    def say(message: str) -> None:
        if rank == 0:
            print(f"  [{args.mb} MiB] {message}", file=sys.stderr, flush=True)

    def ckptd_once(step: int, loss: float) -> dict[str, float]:
        if rank == 0:
            with (run / "logging.jsonl").open("a") as log:
                log.write(json.dumps({"global_step/max_steps": f"{step}/1000", "eval_loss": loss}) + "\n")
                log.flush()
        inner: dict[str, float] = {}

        def timed_state() -> dict[str, Any]:
            started = time.perf_counter()
            state = state_fn()
            inner["state_fn_s"] = time.perf_counter() - started
            return state

        started = time.perf_counter()
        staged = client.maybe_snapshot(step, timed_state, evaluated=True)
        returned = time.perf_counter()
        if not staged or client.last_blocked_s is None:
            raise RuntimeError(f"rank {rank}: ckptd did not capture step {step} (see the log above)")
        blocked = returned - started
        manifest = store_root / f"step-{step:08d}" / MANIFEST
        deadline = time.monotonic() + 300
        while not manifest.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank {rank}: step {step} not committed after 300 s")
            time.sleep(0.002)
        visible = time.perf_counter()
        if rank == 0 and step not in {record.step for record in Store(store_root).list()}:
            raise RuntimeError(f"step {step}: a manifest but no committed checkpoint in Store.list()")
        return {
            "blocked_s": blocked,
            "capture_s": client.last_blocked_s,
            "decide_s": blocked - client.last_blocked_s,
            "state_fn_s": inner["state_fn_s"],
            "persist_s": visible - returned,
            "total_s": visible - started,
        }

    def dcp_once(step: int) -> dict[str, float]:
        started = time.perf_counter()
        state = state_fn()
        built = time.perf_counter()
        response = dcp.async_save(state, checkpoint_id=str(store_root / f"dcp-{step}"))
        returned = time.perf_counter()
        getattr(response, "upload_completion", response).result()
        durable = time.perf_counter()
        return {
            "blocked_s": returned - started,
            "state_fn_s": built - started,
            "async_save_s": returned - built,
            "persist_s": durable - returned,
            "total_s": durable - started,
        }

    rounds: list[dict[str, Any]] = []
    for index in range(args.warmup + args.repeats):
        step = 10 * (index + 1)
        order = ("ckptd", "dcp") if index % 2 == 0 else ("dcp", "ckptd")
        record: dict[str, Any] = {"round": index, "warmup": index < args.warmup, "order": list(order)}
        for kind in order:
            dist.barrier()
            record[kind] = ckptd_once(step, 1.0 / (index + 1)) if kind == "ckptd" else dcp_once(step)
        dist.barrier()
        rounds.append(record)
        c, d = record["ckptd"], record["dcp"]
        say(
            f"round {index}{' (warm-up)' if record['warmup'] else ''}, {'-'.join(order)}: "
            f"rank 0 ckptd blocked {c['blocked_s'] * 1e3:.0f} ms (verdict+broadcast "
            f"{c['decide_s'] * 1e3:.0f}), persist {c['persist_s']:.2f} s; "
            f"DCP blocked {d['blocked_s'] * 1e3:.0f} ms, persist {d['persist_s']:.2f} s"
        )
    (run / f"bench-rank{rank}.json").write_text(
        json.dumps({"rank": rank, "layers": layers, "state_bytes": state_bytes, "rounds": rounds})
    )
    client.close()
    dist.barrier()
    dist.destroy_process_group()


# -- driver -----------------------------------------------------------------------------------------


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the daemon persists what it was handed, then exits), SIGKILL after 60 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def one_size(mb: int, args: argparse.Namespace) -> dict[str, Any]:
    from benchlib import progress, scratch_dir

    from ckptd.protocol import RunPaths, daemon_alive

    shm = Path("/dev/shm") / f"ckptd-bench-{os.getpid()}-{time.monotonic_ns()}"
    shm.mkdir(mode=0o700)
    daemon: subprocess.Popen[bytes] | None = None
    try:
        with scratch_dir(args.dir, "ckptd-sharded-") as root:
            run = root / "run"
            run.mkdir()
            env = {
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "CKPTD_NODE_ID": "a",
                "CKPTD_SHM_ROOT": str(shm),
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
            }
            daemon_log = root / "daemon.log"
            with daemon_log.open("wb") as out:
                argv = [
                    sys.executable,
                    "-m",
                    "ckptd",
                    "run",
                    str(run),
                    "--keep-last",
                    "100",
                    "--keep-best",
                    "100",
                ]
                daemon = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            deadline = time.monotonic() + 30
            while not daemon_alive(RunPaths(run)):
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise SystemExit(f"the daemon did not start:\n{daemon_log.read_text(errors='replace')}")
                time.sleep(0.01)
            command = [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                "--nproc-per-node", "2", str(Path(__file__).resolve()), "--rank-job", "--run-dir", str(run),
                "--mb", str(mb), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
            ]  # fmt: skip
            started = time.monotonic()
            # The ranks' output goes to stderr: stdout stays the table (or the JSON).
            job = subprocess.run(command, env=env, cwd=REPO, stdout=sys.stderr, timeout=args.timeout)
            if job.returncode != 0:
                tail = daemon_log.read_text(errors="replace")[-4000:]
                raise SystemExit(f"the torchrun job failed ({job.returncode}); daemon log:\n{tail}")
            ranks = [json.loads((run / f"bench-rank{r}.json").read_text()) for r in (0, 1)]
            progress(f"  [{mb} MiB] job done in {time.monotonic() - started:.0f} s")
            return {"mb": mb, "job_s": time.monotonic() - started, "ranks": ranks}
    finally:
        if daemon is not None:
            stop(daemon)
        shutil.rmtree(shm, ignore_errors=True)


def summary(rank: dict[str, Any]) -> dict[str, Any]:
    """Medians (and min-max) of every timed figure over the measured rounds, and the ratios."""
    measured = [r for r in rank["rounds"] if not r["warmup"]]
    out: dict[str, Any] = {"rank": rank["rank"], "state_bytes": rank["state_bytes"]}
    for kind in ("ckptd", "dcp"):
        for key in measured[0][kind]:
            values = [r[kind][key] for r in measured]
            spread = {"median": statistics.median(values), "min": min(values), "max": max(values)}
            out[f"{kind}_{key}"] = spread
    for key in ("blocked_s", "persist_s", "total_s"):
        out[f"ratio_{key}"] = out[f"ckptd_{key}"]["median"] / out[f"dcp_{key}"]["median"]
    return out


def print_table(result: dict[str, Any]) -> None:
    m, load = result["machine"], result["load_avg_1min"]
    print(f"\nsharded_capture  {result['date']}")
    print(
        f"machine: {m['cpu']}, {m['cores']} cores (os.cpu_count() {result['cpu_count']}), "
        f"{m['ram_bytes'] / 2**30:.1f} GiB RAM, Linux {m['kernel']}, Python {m['python']}, "
        f"torch {m['torch']}; "
        f"store on {result['disk']['device']} {result['disk']['fstype']}; load average (1 min) "
        f"{load['start']:.2f} at start -> {load['end']:.2f} at end, other processes "
        f"{result['others_cpu_share']:.0%} of the CPUs; 2 ranks (gloo, 1 thread each); "
        f"{result['config']['repeats']} rounds (+{result['config']['warmup']} warm-up), medians; "
        f"wall {result['wall_s']:.0f} s"
    )
    print()
    header = [
        "params", "rank", "state/rank", "ckptd blocked ms", "of which verdict+bcast ms",
        "DCP async_save blocked ms", "ratio", "ckptd persist->visible s", "DCP return->durable s", "ratio",
        "ckptd call->visible s", "DCP call->durable s", "ratio",
    ]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for size in result["sizes"]:
        for s in size["summary"]:

            def med(key: str, scale: float, digits: int, s: dict[str, Any] = s) -> str:
                return f"{s[key]['median'] * scale:.{digits}f}"

            cells = [
                f"{size['mb']} MiB", str(s["rank"]), f"{s['state_bytes'] / 2**20:.0f} MiB",
                med("ckptd_blocked_s", 1e3, 0), med("ckptd_decide_s", 1e3, 1), med("dcp_blocked_s", 1e3, 0),
                f"{s['ratio_blocked_s']:.2f}", med("ckptd_persist_s", 1, 2), med("dcp_persist_s", 1, 2),
                f"{s['ratio_persist_s']:.2f}", med("ckptd_total_s", 1, 2), med("dcp_total_s", 1, 2),
                f"{s['ratio_total_s']:.2f}",
            ]  # fmt: skip
            print("| " + " | ".join(cells) + " |")
    print(
        "\nckptd blocked: maybe_snapshot(evaluated=True), verdict wait and broadcast included; DCP blocked: "
        "get_state_dict + async_save until it returns. Persist: from that return until step-S's "
        "MANIFEST.json is in the store (ckptd) / until the future is done, files fsynced "
        "(DCP, sync_files=True). Ratios: ckptd / DCP."
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--rank-job" in argv:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        rank_main(argv)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mb", default="64,256", help="MiB of parameters, comma-separated (64,256)")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds per size (3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (1)")
    parser.add_argument("--dir", help="where the run dir goes (default: a temp dir on the repo's filesystem)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for each torchrun job (900)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    try:
        sizes = [int(v) for v in args.mb.split(",") if v.strip()]
    except ValueError:
        parser.error("--mb takes whole MiB, e.g. 64,256")
    if not sizes or min(sizes) < 4 or args.repeats < 1 or args.warmup < 0:
        parser.error("--mb must be >= 4, --repeats >= 1, --warmup >= 0")

    import benchlib
    import torch
    from benchlib import LoadMeter, filesystem_of, progress

    meter = LoadMeter()
    progress(f"cpus {os.cpu_count()}, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} at start")
    results = []
    for mb in sizes:
        progress(f"== {mb} MiB of parameters")
        size = one_size(mb, args)
        size["summary"] = [summary(rank) for rank in size["ranks"]]
        results.append(size)
    parent = Path(args.dir) if args.dir else benchlib.default_parent()
    result = {
        "benchmark": "sharded_capture",
        **meter.report(),
        "cpu_count": os.cpu_count(),
        "machine": benchlib.machine_info(torch=torch.__version__),
        "disk": filesystem_of(parent if parent.exists() else REPO),
        "config": {"mb": sizes, "repeats": args.repeats, "warmup": args.warmup, "width": WIDTH},
        "sizes": results,
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
