"""Concurrency against real daemons: two daemons started at the same instant, ``ckptd prune``
while a persist is in flight or the daemon rotates, and many ranks acking at the same instant.

Processes meet at a barrier (a FIFO: every one blocks opening it for reading until the test
opens it for writing, which releases them all at once), so "at once" is as close as the
scheduler allows. Slots and acks are laid out here as the client lays them out (no torch):
``tensors.safetensors`` with the token in its header, or a rank's DCP files with the token in
``capture.json``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from filelock import FileLock

from ckptd.ops import Policy, prune
from ckptd.protocol import (
    Ack,
    RunPaths,
    daemon_alive,
    flock_held,
    flock_holder,
    pending_ack_paths,
    read_control,
    read_status,
    write_ack,
)
from ckptd.records import Criterion
from ckptd.staging import TENSORS_FILE, TensorEntry, plan_layout
from ckptd.store import TMP_PREFIX, Store
from tests.conftest import Daemon, append_lines, verdict, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20


# -- a barrier for processes ----------------------------------------------------------------------


class Gate:
    """Processes call ``wait_code`` (Python source) once ready; ``release`` lets them all go."""

    def __init__(self, folder: Path) -> None:
        self.fifo = folder / "gate"
        os.mkfifo(self.fifo)
        self.folder = folder

    def wait_code(self, name: str) -> str:
        ready = self.folder / f"ready-{name}"
        return (
            f"import os, pathlib; pathlib.Path({str(ready)!r}).touch(); "
            f"os.close(os.open({str(self.fifo)!r}, os.O_RDONLY))"
        )

    def release(self, names: list[str], procs: list[subprocess.Popen[bytes]]) -> None:
        """Once every process is ready (and, a moment later, blocked opening the FIFO), open it."""
        ready = [self.folder / f"ready-{n}" for n in names]
        wait_for(
            lambda: all(p.exists() for p in ready) or any(proc.poll() is not None for proc in procs),
            timeout=60,
            what="every process at the gate",
        )
        time.sleep(0.3)
        gone = [(n, p.returncode) for n, p in zip(names, procs, strict=True) if p.poll() is not None]
        assert not gone, f"exited before the gate: {gone}"
        fd = os.open(self.fifo, os.O_WRONLY)  # wakes every reader blocked in open()
        time.sleep(1.0)  # a reader that was slow to reach open() still gets through
        os.close(fd)


def python(code: str, out: Path, *args: str) -> subprocess.Popen[bytes]:
    """``python -c code args...`` with the repo importable, its output in ``out``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with out.open("wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-c", code, *args], stdout=handle, stderr=subprocess.STDOUT, env=env
        )


# -- (a) two daemons started at the same instant ------------------------------------------------


def race(run: Path, folder: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    """Two ``ckptd run`` on ``run`` released by one gate: (the winner, still running, the
    loser's exit status and output). Fails unless exactly one exited."""
    folder.mkdir()
    gate = Gate(folder)
    names = ["a", "b"]
    procs = [
        python(
            "import sys; from ckptd.cli import main; "
            + gate.wait_code(name)
            + f"; sys.exit(main(['run', {str(run)!r}, '-q']))",
            folder / f"{name}.out",
        )
        for name in names
    ]
    try:
        gate.release(names, procs)
        wait_for(lambda: any(p.poll() is not None for p in procs), timeout=60, what="the loser to exit")
        time.sleep(0.5)  # had both exited, both would show by now
        outputs = [(folder / f"{n}.out").read_text() for n in names]
        losers = [i for i, p in enumerate(procs) if p.poll() is not None]
        assert len(losers) == 1, outputs
        (loser,) = losers
        winner = procs[1 - loser]
        wait_for(
            lambda: daemon_alive(RunPaths(run)) and read_status(RunPaths(run)).get("pid") == winner.pid,
            what=f"the winner's heartbeat\n{outputs}",
        )
        return winner, procs[loser].returncode, outputs[loser]
    except BaseException:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        raise


def test_two_daemons_started_at_the_same_instant_one_wins_and_the_loser_names_its_pid(
    tmp_path: Path, shm_root: Path
) -> None:
    """Sequential starts are covered (test_integration's second daemon); here both pass the
    barrier together, three times on one run dir, so from the second round on a stopped
    daemon's status.json (another pid) is there too: exactly one wins, the other exits 3
    naming the winner's pid, never the stale one, and the winner runs on undisturbed."""
    run = tmp_path / "run"
    run.mkdir()
    previous: int | None = None
    for round_ in range(3):
        winner, code, said = race(run, tmp_path / f"round-{round_}")
        try:
            assert code == 3, said
            assert "another ckptd daemon already follows" in said, said
            assert re.search(rf"pid {winner.pid}\b", said), (
                f"round {round_}: the winner is {winner.pid}: {said}"
            )
            if previous is not None:
                assert not re.search(rf"pid {previous}\b", said), "the stopped daemon's pid, not the holder's"
            assert winner.poll() is None, "the refused start must not disturb the winner"
            winner.send_signal(signal.SIGTERM)
            assert winner.wait(timeout=30) == 0
            previous = winner.pid
        finally:
            if winner.poll() is None:
                winner.kill()
                winner.wait()


def test_flock_holder_names_the_process_holding_the_lock(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    assert flock_holder(lock) is None  # no file
    lock.touch()
    assert flock_holder(lock) is None  # nobody holds it
    with FileLock(str(lock), timeout=0):
        assert flock_holder(lock) == os.getpid()
    assert flock_holder(lock) is None


def test_a_daemon_refused_while_the_holder_catches_up_names_the_holder_not_the_last_daemon(
    tmp_path: Path, shm_root: Path
) -> None:
    """Between taking the lock and its first status.json, a daemon catches up on the log, which
    takes seconds on a long one; status.json meanwhile is the previous, stopped daemon's. A
    daemon started then is refused naming the lock's holder (from /proc/locks), not that pid."""
    run = tmp_path / "run"
    run.mkdir()
    paths = RunPaths(run)
    first = start(run)
    assert first.stop() == 0
    stale = read_status(paths)["pid"]
    # A long log the next start reads as history (~1 s on an idle machine): its state is gone,
    # as when a run dir comes back from a backup without .ckptd/state.json.
    paths.state.unlink()
    with (run / "logging.jsonl").open("a") as log:
        log.writelines(f'{{"step": {s}, "eval_loss": {1 + (s % 7) / 10}}}\n' for s in range(1, 60_001))
    holder = Daemon(run, [])
    try:
        wait_for(lambda: flock_held(paths.lock) is True, what=f"the lock taken\n{holder.log()}")
        refused = subprocess.run(
            [sys.executable, "-m", "ckptd", "run", str(run)], capture_output=True, text=True, timeout=60
        )
        caught = read_status(paths).get("pid") == stale  # still catching up when refused
        assert refused.returncode == 3, refused.stderr
        assert re.search(rf"pid {holder.proc.pid}\b", refused.stderr), refused.stderr
        assert not re.search(rf"pid {stale}\b", refused.stderr), refused.stderr
        if not caught:
            pytest.fail("the holder finished catching up before the refusal: make the log longer")
        holder.wait_alive()
        assert holder.stop() == 0, holder.log()
    finally:
        if holder.proc.poll() is None:
            holder.proc.kill()
            holder.proc.wait()


# -- slots and acks as the client lays them out ----------------------------------------------------


def staging_of(run: Path) -> Path:
    staging = Path(read_control(RunPaths(run).control).staging)
    staging.mkdir(mode=0o700, parents=True, exist_ok=True)
    return staging


def plain_slot(staging: Path, slot: str, nbytes: int, token: str, fill: int) -> int:
    """``slot``'s tensors.safetensors: one uint8 tensor of ``nbytes`` bytes equal to ``fill``,
    the token in the header. Returns the file's valid bytes."""
    layout = plan_layout([TensorEntry("w", "U8", (nbytes,), nbytes)], {"token": token})
    folder = staging / slot
    folder.mkdir(mode=0o700, exist_ok=True)
    chunk = bytes([fill]) * min(nbytes, 8 * MIB)
    with (folder / TENSORS_FILE).open("wb") as handle:
        handle.write(layout.header)
        left = nbytes
        while left:
            left -= handle.write(chunk[: min(left, len(chunk))])
    return layout.total


def plain_ack(run: Path, step: int, slot: str, nbytes: int, fill: int) -> Ack:
    token = f"t{step}"
    total = plain_slot(staging_of(run), slot, nbytes, token, fill)
    ack = Ack(name=f"step-{step}", captured_step=step, slot=slot, files={TENSORS_FILE: total}, token=token)
    write_ack(RunPaths(run), ack)
    return ack


def steps_in(store: Store) -> list[int]:
    return sorted(r.step for r in store.list())


def all_verify(store: Store) -> dict[str, list[str]]:
    return {r.name: list(problems) for r in store.list() if (problems := store.verify(r.name))}


def start(run: Path, *args: str) -> Daemon:
    return Daemon(run, list(args)).wait_alive()


# -- (b) prune during a persist -------------------------------------------------------------------


def test_prune_during_a_persist_leaves_the_checkpoint_in_flight_and_the_best(
    tmp_path: Path, shm_root: Path
) -> None:
    """The daemon is frozen (SIGSTOP) in the middle of copying a 128 MiB slot, its temp dir in
    the store; ``ckptd prune --keep-last 1`` then deletes the committed checkpoints the policy
    lets go and nothing else: not the best (step 10), not the temp dir, the ack or the slot of
    the persist in flight, which commits whole once the daemon runs again."""
    run = tmp_path / "run"
    run.mkdir()
    daemon = start(run, "--keep-last", "10")
    paths, store = RunPaths(run), Store(run / "checkpoints")
    try:
        append_lines(run / "logging.jsonl", *({"step": s, "eval_loss": s / 10} for s in (10, 20, 30, 40, 50)))
        wait_for(lambda: verdict(paths) == (50, "skip"), what=f"the verdicts\n{daemon.log()}")
        for step in (10, 20, 30, 40):
            plain_ack(run, step, f"slot-{step}", 64 << 10, step)
            wait_for(lambda step=step: step in steps_in(store), what=f"step {step}\n{daemon.log()}")
        plain_ack(run, 50, "slot-big", 128 * MIB, 50)

        def in_flight() -> list[Path]:
            return [p for p in store.root.iterdir() if p.name.startswith(TMP_PREFIX)]

        wait_for(lambda: bool(in_flight()) or 50 in steps_in(store), timeout=30, what="the persist")
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            temp = in_flight()
            assert temp and 50 not in steps_in(store), "the 128 MiB persist ended before it could be caught"
            done = subprocess.run(
                [sys.executable, "-m", "ckptd", "prune", str(run), "--keep-last", "1"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            assert steps_in(store) == [10, 40], done.stdout  # the best and the last committed
            assert in_flight() == temp, "prune touched the temp dir of the persist in flight"
            assert [p.name for p in pending_ack_paths(paths)] == ["step-50.json"]
            assert (staging_of(run) / "slot-big" / TENSORS_FILE).stat().st_size > 128 * MIB
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: 50 in steps_in(store), timeout=60, what=f"step 50 committed\n{daemon.log()}")
        wait_for(lambda: not pending_ack_paths(paths), what="the ack released")
        assert steps_in(store) == [10, 40, 50]
        assert all_verify(store) == {}
        assert not in_flight()
        assert read_status(paths).get("last_error") is None, read_status(paths)
        assert daemon.stop() == 0, daemon.log()
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGCONT)
            daemon.proc.kill()
            daemon.proc.wait()


def test_prune_over_and_over_while_the_daemon_persists_and_rotates_loses_nothing(
    tmp_path: Path, shm_root: Path
) -> None:
    """Twelve acks persisted back to back (4 MiB each) with the daemon rotating to the last 3
    after each, while this process prunes to the last 2 as fast as it can: both take the store
    lock, so every persist commits, nothing is reported, prune never fails or deletes the best,
    and what is left verifies."""
    run = tmp_path / "run"
    run.mkdir()
    daemon = start(run, "--keep-last", "3")
    paths, store = RunPaths(run), Store(run / "checkpoints")
    try:
        steps = list(range(10, 130, 10))
        # Step 10 is the best; every later eval is worse.
        append_lines(run / "logging.jsonl", *({"step": s, "eval_loss": s / 10} for s in steps))
        wait_for(lambda: verdict(paths) == (steps[-1], "skip"), what=f"the verdicts\n{daemon.log()}")
        policy = Policy({Criterion("eval_loss", "min"): 1}, keep_last=2)
        stop, errors, deleted = threading.Event(), [], []

        def pruning() -> None:
            while not stop.is_set():
                try:
                    deleted.extend(r.step for r in prune(store, run, policy, dry_run=False))
                except Exception as exc:  # reported by the test
                    errors.append(repr(exc))
                time.sleep(0.01)

        pruner = threading.Thread(target=pruning)
        pruner.start()
        try:
            for step in steps:
                plain_ack(run, step, f"slot-{step}", 4 * MIB, step % 251)
            wait_for(
                lambda: not pending_ack_paths(paths) and read_status(paths).get("persisted") == len(steps),
                timeout=60,
                what=f"every persist\n{daemon.log()}",
            )
        finally:
            stop.set()
            pruner.join()
        assert errors == []
        assert 10 not in deleted, "prune deleted the best"
        assert not list(paths.acks.glob("*.rejected"))
        status = read_status(paths)
        assert status.get("last_error") is None, status
        assert 10 in steps_in(store) and steps[-1] in steps_in(store)
        assert len(store.list()) <= 3
        assert all_verify(store) == {}
        assert not [p for p in store.root.iterdir() if p.name.startswith(TMP_PREFIX)]
        assert daemon.stop() == 0, daemon.log()
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


# -- (c) many ranks acking at the same instant ----------------------------------------------------

RANK_CODE = """
import json, os, sys
from pathlib import Path
from ckptd.protocol import Ack, RunPaths, write_ack
from ckptd.staging import CAPTURE_FILE, TENSORS_FILE, TensorEntry, plan_layout

run, staging, rank, world, step = Path(sys.argv[1]), Path(sys.argv[2]), *map(int, sys.argv[3:6])
paths = RunPaths(run)
# This rank's part of one sharded capture, as ShardedClient stages it: DCP's files, then
# capture.json (the token) last.
part = staging / f"r{rank}-0"
part.mkdir(mode=0o700)
files = {f"__{rank}_0.distcp": 256 * 1024 + rank}
if rank == 0:
    files[".metadata"] = 100
for name, size in files.items():
    (part / name).write_bytes(bytes([rank]) * size)
(part / CAPTURE_FILE).write_text(json.dumps({"token": f"c{rank}"}))
sharded = Ack(
    name=Ack.name_for(None, step, rank=rank), captured_step=step, slot=part.name, files=files,
    token=f"c{rank}", token_file=CAPTURE_FILE, rank=rank, world_size=world, capture=f"{step}-cap",
)
# And a capture of its own at another step, in a plain slot.
nbytes = 512 * 1024
layout = plan_layout([TensorEntry("w", "U8", (nbytes,), nbytes)], {"token": f"p{rank}"})
slot = staging / f"slot-{rank}"
slot.mkdir(mode=0o700)
(slot / TENSORS_FILE).write_bytes(layout.header + bytes([rank + 1]) * nbytes)
plain = Ack(
    name=f"step-{rank + 1}", captured_step=rank + 1, slot=slot.name,
    files={TENSORS_FILE: layout.total}, token=f"p{rank}",
)
"""


def test_eight_ranks_acking_at_the_same_instant_are_all_committed(tmp_path: Path, shm_root: Path) -> None:
    """Eight processes each write, at the same instant, their rank's ack of one 8-rank sharded
    capture and an ack of a plain capture of their own: 16 acks at once. The daemon commits the
    sharded checkpoint once, whole (8 ranks, every file), and the 8 plain ones; it rejects none,
    reports nothing, and every byte stored is the one staged."""
    run = tmp_path / "run"
    run.mkdir()
    daemon = start(run, "--keep-last", "20")
    paths, store = RunPaths(run), Store(run / "checkpoints")
    world, step = 8, 1000
    try:
        staging = staging_of(run)
        gate = Gate(tmp_path)
        names = [str(rank) for rank in range(world)]
        procs = [
            python(
                RANK_CODE + gate.wait_code(name) + "\nwrite_ack(paths, sharded)\nwrite_ack(paths, plain)\n",
                tmp_path / f"rank-{name}.out",
                str(run),
                str(staging),
                name,
                str(world),
                str(step),
            )
            for name in names
        ]
        try:
            gate.release(names, procs)
            for rank, proc in enumerate(procs):
                assert proc.wait(timeout=60) == 0, (tmp_path / f"rank-{rank}.out").read_text()
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        wanted = [*range(1, world + 1), step]
        wait_for(
            lambda: steps_in(store) == wanted and not pending_ack_paths(paths),
            timeout=60,
            what=f"every capture committed\n{daemon.log()}",
        )
        assert not list(paths.acks.glob("*.rejected"))
        status = read_status(paths)
        assert status.get("last_error") is None, status
        assert all_verify(store) == {}
        (sharded,) = [r for r in store.list() if r.step == step]
        manifest = store.manifest(sharded.name)
        assert manifest["ranks"] == world and manifest["capture"] == f"{step}-cap"
        assert set(manifest["files"]) == {".metadata", *(f"__{r}_0.distcp" for r in range(world))}
        for rank in range(world):
            part = (store.path_of(sharded.name) / f"__{rank}_0.distcp").read_bytes()
            assert part == bytes([rank]) * (256 * 1024 + rank)
        for record in store.list():
            if record.step != step:
                data = (store.path_of(record.name) / TENSORS_FILE).read_bytes()
                assert data.endswith(bytes([record.step]) * (512 * 1024)), record.name
        assert not [p for p in store.root.iterdir() if p.name.startswith((TMP_PREFIX, ".shard-"))]
        assert daemon.stop() == 0, daemon.log()
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
