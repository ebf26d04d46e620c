"""Sharded (FSDP2 / DCP) captures: every rank stages its shards, one commit for all ranks.

Real processes throughout: torchrun starts FSDP2 ranks on gloo (``programs/fsdp_train.py``)
beside real daemons; "nodes" are separate staging roots and node ids on this machine, one
shared store. What ckptd keeps is checked with DCP's own ``load`` (into a freshly sharded model,
on another world size too) and ``dcp_to_torch_save``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.protocol import NodePaths, RunPaths, daemon_alive, pending_ack_paths, read_status
from ckptd.store import SHARD_PREFIX, Store
from tests.conftest import PROGRAMS, wait_for
from tests.test_ddp import free_port

REPO = Path(__file__).parent.parent
SCRIPT = "50:0.9,100:0.7,150:0.5,200:0.6,250:0.55"  # the best at 150, no multiple of 100


def env_for(node: str, shm: Path) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CKPTD_NODE_ID": node,
        "CKPTD_SHM_ROOT": str(shm),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


def torchrun_command(
    program: str, *args: str, nproc: int, nnodes: int = 1, node_rank: int = 0, port: int
) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--nnodes", str(nnodes), "--node-rank", str(node_rank),
        "--master-addr", "127.0.0.1", "--master-port", str(port),
        str(PROGRAMS / program), *args,
    ]  # fmt: skip


def run_job(program: str, *args: str, nproc: int, env: dict[str, str], timeout: float = 240) -> None:
    done = subprocess.run(
        torchrun_command(program, *args, nproc=nproc, port=free_port()),
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


class Process:
    """A daemon (``ckptd run``) with its own environment and output file."""

    def __init__(self, run: Path, env: dict[str, str], *args: str) -> None:
        self.output = run.parent / f"daemon-{time.monotonic_ns()}.log"
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ckptd", "run", str(run), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def log(self) -> str:
        return self.output.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def processes() -> Any:
    started: list[Process] = []

    def start(run: Path, env: dict[str, str], *args: str) -> Process:
        process = Process(run, env, *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def manifests(store: Store) -> list[dict[str, Any]]:
    return [store.manifest(record.name) for record in store.list()]


@pytest.fixture
def node_roots(tmp_path: Path) -> Any:
    roots = []
    for name in ("a", "b"):
        root = Path("/dev/shm") / f"ckptd-test-{os.getpid()}-{time.monotonic_ns()}-{name}"
        root.mkdir()
        roots.append(root)
    yield roots
    for root in roots:
        subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture(scope="module")
def fsdp_job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """One two-rank FSDP2 job beside a daemon (every 100 steps, keep the last 1), run once for
    the tests that read what it left: (the run dir, the environment of its "node")."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    shm = Path("/dev/shm") / f"ckptd-test-{os.getpid()}-{time.monotonic_ns()}-job"
    shm.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    env = env_for("a", shm)
    daemon = Process(run, env, "--every-steps", "100", "--keep-last", "1")
    try:
        wait_for(lambda: daemon_alive(RunPaths(run)), what=f"heartbeat\n{daemon.log()}")
        run_job("fsdp_train.py", "--run-dir", str(run), "--evals", SCRIPT, nproc=2, env=env)
        assert daemon.stop() == 0, daemon.log()
        yield run, env
    finally:
        daemon.kill()
        subprocess.run(["rm", "-rf", str(shm)], check=False)


@pytest.mark.slow
def test_an_fsdp2_job_keeps_the_exact_best_step_as_a_dcp_checkpoint_that_loads_anywhere(
    tmp_path: Path, fsdp_job: tuple[Path, dict[str, str]]
) -> None:
    run, env = fsdp_job
    store = Store(run / "checkpoints")
    kept = {m["step"]: m for m in manifests(store)}
    assert sorted(kept) == [150, 200], kept  # the best, and the last periodic
    best = kept[150]
    assert "best:eval_loss" in best["tags"] and best["ranks"] == 2
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} == set(best["files"])
    assert not store.verify("step-00000150") and not store.verify("step-00000200")
    assert not [p for p in store.root.iterdir() if p.name.startswith(SHARD_PREFIX)]
    assert not pending_ack_paths(RunPaths(run))

    # DCP's own load, into a fresh FSDP2 model on two ranks and on one: the parameters the job
    # had at step 150 (gathered by the job itself at that eval).
    expected = torch.load(run / "full-150.pt")
    for nproc in (2, 1):
        out = tmp_path / f"loaded-{nproc}.pt"
        run_job("fsdp_load.py", str(store.path_of("step-00000150")), str(out), nproc=nproc, env=env)
        loaded = torch.load(out)
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), f"world size {nproc}"
    # The parameters at 150 are not those at 200: the check above could tell them apart.
    later = torch.load(run / "full-200.pt")
    assert not all(torch.equal(later[k], expected[k]) for k in expected)

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    single = tmp_path / "best.pt"
    dcp_to_torch_save(store.path_of("step-00000150"), single)
    model = torch.load(single, weights_only=False)["model"]
    assert all(torch.equal(model[k], expected[k]) for k in expected)

    blocked = [json.loads((run / f"blocked-rank{r}.json").read_text()) for r in (0, 1)]
    assert [b["step"] for b in blocked[0]] == [b["step"] for b in blocked[1]] == [50, 100, 150, 200]


@pytest.mark.slow
def test_a_job_resumed_from_the_last_snapshot_on_one_rank_continues_with_the_same_loss(
    tmp_path: Path, fsdp_job: tuple[Path, dict[str, str]]
) -> None:
    run, env = fsdp_job
    last = max(Store(run / "checkpoints").list(), key=lambda r: r.step)
    assert last.step == 200 and "periodic" in last.tags

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    checkpoint = str(Store(run / "checkpoints").path_of(last.name))
    run_job(
        "fsdp_train.py", "--run-dir", str(resumed), "--resume", checkpoint, "--from-step", "200",
        "--no-client", nproc=1, env=env,
    )  # fmt: skip
    before = {
        e["step"]: e["loss"] for e in map(json.loads, (run / "losses-ws2.jsonl").read_text().splitlines())
    }
    after = {
        e["step"]: e["loss"] for e in map(json.loads, (resumed / "losses-ws1.jsonl").read_text().splitlines())
    }
    assert sorted(after) == list(range(201, 251))
    for step in after:
        assert after[step] == pytest.approx(before[step], rel=1e-4, abs=1e-6), step
    # Not a tautology: a model restarted from scratch at 200 has another loss.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    run_job("fsdp_train.py", "--run-dir", str(fresh), "--from-step", "200", "--no-client", nproc=1, env=env)
    scratch = json.loads((fresh / "losses-ws1.jsonl").read_text().splitlines()[0])["loss"]
    assert scratch != pytest.approx(before[201], rel=1e-3)


class Rank:
    """One "node" of a two-node job: its torchrun, its output in a file (a pipe nobody reads
    while the test waits on the store would fill and stop the rank mid-step)."""

    def __init__(self, command: list[str], env: dict[str, str], output: Path) -> None:
        self.output = output
        with output.open("wb") as sink:
            self.proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)

    def finish(self, timeout: float = 240) -> str:
        """Its output once it has exited 0 (else the assertion shows the output's end)."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        out = self.output.read_text(errors="replace")
        assert code == 0, out[-4000:]
        return out


def two_nodes(job: list[str], env_a: dict[str, str], env_b: dict[str, str], out: Path) -> list[Rank]:
    """``fsdp_train.py`` as a two-node job, one rank per "node" (each its own torchrun)."""
    port = free_port()
    return [
        Rank(
            torchrun_command("fsdp_train.py", *job, nproc=1, nnodes=2, node_rank=rank, port=port),
            env,
            out / f"node-{rank}.out",
        )
        for rank, env in ((0, env_a), (1, env_b))
    ]


def follower_paths(run: Path) -> NodePaths:
    return RunPaths(run).node("b")


def part_in_flight(store: Path) -> Path | None:
    """A shard dir where rank 1's data file is being written (no marker for rank 1 yet)."""
    for shard in store.glob(f"{SHARD_PREFIX}*"):
        if (shard / "__1_0.distcp").exists() and not (shard / ".rank-1.json").exists():
            return shard
    return None


@pytest.mark.slow
def test_two_nodes_commit_each_checkpoint_once_and_survive_a_follower_killed_mid_part(
    tmp_path: Path, processes: Any, node_roots: list[Path]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    store_dir = run / "checkpoints"
    env_a, env_b = env_for("a", node_roots[0]), env_for("b", node_roots[1])
    leader = processes(run, env_a, "--every-steps", "100", "--keep-last", "5", "--role", "leader")
    wait_for(lambda: daemon_alive(RunPaths(run)), what=f"leader heartbeat\n{leader.log()}")
    follower = processes(run, {**env_b, "SLURM_NODEID": "1"})  # the role from the node rank
    wait_for(lambda: daemon_alive(follower_paths(run)), what=f"follower heartbeat\n{follower.log()}")

    gate = tmp_path / "go-on-at-150"
    job = ["--run-dir", str(run), "--evals", SCRIPT, "--extra-mb", "256", "--gate", f"150:{gate}"]
    ranks = two_nodes(job, env_a, env_b, tmp_path)
    # Stop the follower while it writes rank 1's part (its data file there, its marker not),
    # then kill it: the part is half written.
    deadline = time.monotonic() + 120
    caught = None
    while caught is None and time.monotonic() < deadline:
        shard = part_in_flight(store_dir)
        if shard is not None:
            follower.proc.send_signal(signal.SIGSTOP)
            if not (shard / ".rank-1.json").exists() and (shard / "__1_0.distcp").exists():
                caught = shard
            else:
                follower.proc.send_signal(signal.SIGCONT)
        time.sleep(0.001)
    assert caught is not None, follower.log()
    half = (caught / "__1_0.distcp").stat().st_size
    follower.kill()
    capture = caught.name[len(SHARD_PREFIX) :]
    time.sleep(2.5)  # two leader beats: it must not commit what lacks rank 1
    assert not [m for m in manifests(Store(store_dir)) if m["capture"] == capture]
    assert caught.is_dir()
    # Back within the 5 s a heartbeat stays fresh: rank 1 never sees its node without a daemon.
    restarted = processes(run, env_b, "--role", "follower", "--node-id", "b")
    # The ranks wait at 150 until 50 and 100 are committed: both of rank 1's slots are held by
    # the parts the dead follower left, and a capture finding no free slot is skipped (by design;
    # on a loaded machine the restarted follower may not have freed one by the time 150 comes).
    wait_for(
        lambda: {m["step"] for m in manifests(Store(store_dir))} >= {50, 100},
        timeout=120,
        what=lambda: f"50 and 100 committed\n{restarted.log()}\n{leader.log()}\n"
        + "\n".join(r.output.read_text(errors="replace")[-3000:] for r in ranks),
    )
    gate.touch()
    for rank in ranks:
        rank.finish()
    store = Store(store_dir)
    wait_for(
        lambda: not list(store_dir.glob(f"{SHARD_PREFIX}*")) and not pending_ack_paths(follower_paths(run)),
        timeout=60,
        what=f"every part stored and committed\n{restarted.log()}\n{leader.log()}",
    )
    # The leader reports its followers (ckptd status shows them).
    wait_for(lambda: read_status(RunPaths(run)).get("followers", {}).get("b", {}).get("alive") is True)
    follower_report = read_status(RunPaths(run))["followers"]["b"]
    assert follower_report["pending_acks"] == 0 and follower_report["parts_stored"] >= 1
    assert read_status(RunPaths(run))["node"] == "a"
    assert restarted.stop() == 0 and leader.stop() == 0, leader.log()

    kept = manifests(store)
    assert Counter(m["capture"] for m in kept).most_common(1)[0][1] == 1, "a capture committed twice"
    assert [m["step"] for m in kept] == [50, 100, 150, 200]
    killed = next(m for m in kept if m["capture"] == capture)
    assert killed["files"]["__1_0.distcp"]["bytes"] > half, "the half-written part was committed"
    for record in store.list():
        assert not store.verify(record.name), record.name
        assert {".metadata", "__0_0.distcp", "__1_0.distcp"} == set(store.manifest(record.name)["files"])
    status = read_status(follower_paths(run))
    assert status["role"] == "follower" and status["parts_stored"] >= 1


def test_a_capture_missing_a_rank_is_removed_after_the_shard_timeout_and_reported(
    tmp_path: Path, processes: Any, node_roots: list[Path]
) -> None:
    """Rank 0's part arrives, rank 1's never does (its node's daemon is gone): the leader keeps
    nothing visible, removes the part after --shard-timeout, and says so in status.json."""
    from ckptd.protocol import Ack, write_ack
    from ckptd.staging import CAPTURE_FILE

    run = tmp_path / "run"
    run.mkdir()
    env = env_for("a", node_roots[0])
    leader = processes(run, env, "--shard-timeout", "2")
    wait_for(lambda: daemon_alive(RunPaths(run)), what=f"heartbeat\n{leader.log()}")
    control = json.loads(RunPaths(run).control.read_text())
    slot = node_roots[0] / f"ckptd-{control['run_id']}" / "r0-0"
    slot.mkdir(parents=True)
    (slot / "__0_0.distcp").write_bytes(os.urandom(4096))
    (slot / ".metadata").write_bytes(b"metadata")
    (slot / CAPTURE_FILE).write_text('{"token": "t0"}')
    ack = Ack(
        name="step-7-r0", captured_step=7, slot="r0-0", files={"__0_0.distcp": 4096, ".metadata": 8},
        token="t0", token_file=CAPTURE_FILE, rank=0, world_size=2, capture="7-abc",
    )  # fmt: skip
    write_ack(RunPaths(run), ack)
    store = run / "checkpoints"
    wait_for(lambda: (store / f"{SHARD_PREFIX}7-abc" / ".rank-0.json").exists(), what=leader.log())
    wait_for(lambda: not (store / f"{SHARD_PREFIX}7-abc").exists(), timeout=15, what=leader.log())
    assert not Store(store).list()
    wait_for(lambda: "7-abc" in str(read_status(RunPaths(run)).get("last_error")), what=leader.log())
    assert "ranks missing: 1;" in str(read_status(RunPaths(run))["last_error"])
    assert leader.stop() == 0


@pytest.mark.slow
def test_with_no_daemon_on_a_rank_s_node_no_rank_captures_and_training_goes_on(
    tmp_path: Path, processes: Any, node_roots: list[Path]
) -> None:
    """DCP's save is collective: when one rank cannot stage (its node runs no daemon), all skip,
    rather than deadlock or leave a capture that can never be whole; the rank says why."""
    run = tmp_path / "run"
    run.mkdir()
    env_a, env_b = env_for("a", node_roots[0]), env_for("b", node_roots[1])
    leader = processes(run, env_a)
    wait_for(lambda: daemon_alive(RunPaths(run)), what=f"leader heartbeat\n{leader.log()}")
    ranks = two_nodes(["--run-dir", str(run), "--evals", SCRIPT, "--steps", "100"], env_a, env_b, tmp_path)
    outputs = [rank.finish() for rank in ranks]
    assert "no live ckptd daemon for node b" in outputs[1]
    assert json.loads((run / "blocked-rank0.json").read_text()) == []  # nothing staged anywhere
    time.sleep(1.5)
    assert not Store(run / "checkpoints").list() and not list((run / "checkpoints").glob(f"{SHARD_PREFIX}*"))
    assert leader.stop() == 0


class SlowAcks:
    """A ShardedClient on a loaded machine: the writer thread takes its time to acknowledge."""

    @staticmethod
    def client(run: Path) -> Any:
        from ckptd.client.sharded import ShardedClient

        class Slow(ShardedClient):
            def _ack(self, slot: Path, plan: Any) -> Any:
                time.sleep(0.3)
                return super()._ack(slot, plan)

        return Slow(run)


def test_back_to_back_captures_never_reuse_a_slot_before_its_ack_is_written(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    """A Future wakes result() before its done-callbacks run: a next capture that waited only for
    the write took the same slot (no ack named it yet) and emptied it under the first one."""
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run, "--every-steps", "1", "--keep-last", "10")
    client = SlowAcks.client(run)
    try:
        state = {"w": torch.arange(1000.0)}
        staged = [step for step in range(1, 5) if client.maybe_snapshot(step, lambda: state)]
    finally:
        client.close()
    assert len(staged) >= 2  # a scheduled capture finding both slots held is skipped, not queued
    store = Store(run / "checkpoints")
    wait_for(lambda: [r.step for r in store.list()] == staged, what=daemon.log())
    for record in store.list():
        assert store.verify(record.name) == []
        assert set(store.manifest(record.name)["files"]) == {".metadata", "__0_0.distcp"}
    assert not list(RunPaths(run).acks.glob("*.rejected")), daemon.log()


def test_a_state_fn_that_raises_reaches_the_trainer_and_the_next_capture_works(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    from ckptd.client.sharded import ShardedClient

    run = tmp_path / "run"
    run.mkdir()
    daemons(run, "--every-steps", "1", "--keep-last", "10")

    def broken() -> dict[str, Any]:
        raise RuntimeError("user bug")

    with ShardedClient(run) as client:
        with pytest.raises(RuntimeError, match="user bug"):
            client.maybe_snapshot(1, broken)
        assert client.maybe_snapshot(2, lambda: {"w": torch.ones(3)})
        with pytest.raises(TypeError, match="DCP state dict"):
            client.maybe_snapshot(3, lambda: [torch.ones(3)])  # type: ignore[arg-type, return-value]
    with pytest.raises(ValueError, match="closed"):
        client.maybe_snapshot(4, lambda: {"w": torch.ones(3)})
    wait_for(lambda: [r.step for r in Store(run / "checkpoints").list()] == [2])


def test_a_follower_on_the_leader_s_node_id_or_another_store_says_so_and_stores_nothing(
    tmp_path: Path, processes: Any, node_roots: list[Path]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    leader = processes(run, env_for("a", node_roots[0]))
    wait_for(lambda: daemon_alive(RunPaths(run)), what=leader.log())
    same = processes(run, env_for("a", node_roots[1]), "--role", "follower")
    said = lambda node: str(read_status(RunPaths(run).node(node)).get("last_error"))  # noqa: E731
    wait_for(lambda: "leader runs on node 'a' too" in said("a"), what=same.log())
    other = processes(run, env_for("b", node_roots[1]), "--role", "follower", "--store", "elsewhere")
    wait_for(lambda: "give it --store" in said("b"), what=other.log())
    assert other.log().count("give it --store") == 1  # said once, not at every pass
    assert same.stop() == other.stop() == leader.stop() == 0
