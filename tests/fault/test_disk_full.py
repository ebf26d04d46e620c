"""A full disk under the store (issue 13, part 3), on a real small filesystem: a tmpfs mounted
with ``size=`` (bytes) or ``nr_inodes=`` (files), skipped with the reason where mounting is
refused (it needs root).

tests/test_faults.py already shows an empty store too small for a capture: reported, retried,
nothing lost. Here: a write that fails *midway* (a partial temp dir) beside an older checkpoint;
the space check before a write and what it prunes early (``early_deletions``, table-tested);
and a best that cannot be written told loudly: log, status.json, ``ckptd status``, the exit
status of ``ckptd run`` and of ``ckptd sidecar``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd import cli
from ckptd.daemon import run as daemon_run
from ckptd.policy import AnyPreservation, LatestN, best_plus_last, early_deletions, plan_deletions
from ckptd.protocol import Ack, RunPaths, pending_ack_paths, read_control, write_ack
from ckptd.records import CheckpointRecord, Criterion
from ckptd.staging import CAPTURE_FILE, staging_dir_for
from ckptd.store import TMP_PREFIX, Store
from tests.conftest import PROGRAMS, Daemon, wait_for

LOSS = Criterion("eval_loss", "min")
Mount = Callable[..., Path]

# -- which records may go before a write: a pure function, tables of synthetic records ----------


def rec(step: int, loss: float | None = None) -> CheckpointRecord:
    metrics = {} if loss is None else {"eval_loss": loss}
    return CheckpointRecord(name=f"s{step}", step=step, metrics=metrics, created=float(step))


def incoming(step: int, loss: float | None = None) -> CheckpointRecord:
    return CheckpointRecord(
        name="(incoming)", step=step, metrics={} if loss is None else {"eval_loss": loss}, created=1e9
    )


def parse(records: str) -> list[CheckpointRecord]:
    """``"10:.1 20:- 30:.6"``: records by step, with their eval_loss (``-``: none)."""
    pairs = (item.split(":") for item in records.split())
    return [rec(int(step), None if loss == "-" else float(loss)) for step, loss in pairs]


EARLY_CASES = [
    # (why, records, the incoming capture, keep best / last / every, protected, may go early)
    ("the oldest of the last 2 goes", "10:.1 20:.5 30:.6", "40:.7", (1, 2, None), "", "s20"),
    ("a best the incoming displaces stays", "10:.5 20:.6 30:.7", "40:.1", (1, 2, None), "", "s20"),
    ("keep-best 2: both bests stay", "10:.2 20:.3 30:.9 40:.95", "50:.1", (2, 1, None), "", "s30"),
    ("the newest stays (window of 1)", "10:.1 20:.6", "30:.7", (1, 1, None), "", ""),
    ("keep_every keeps its steps", "100:.1 200:.5 250:.6 300:.7", "350:.8", (1, 2, 100), "", "s250"),
    ("protected names stay", "10:.1 20:.5 30:.6 40:.65", "50:.7", (1, 1, None), "s20", "s30"),
    ("what a lowered policy drops goes", "10:.1 20:.5 30:.6 40:.7", "50:.8", (1, 1, None), "", "s20 s30"),
    ("a resumed run's lower step: nothing", "10:.1 20:.5 30:.6", "5:.9", (1, 2, None), "", ""),
    ("captures without metrics", "10:.1 20:- 30:-", "40:-", (1, 2, None), "", "s20"),
    ("an empty store", "", "10:.5", (1, 2, None), "", ""),
]


@pytest.mark.parametrize(
    ("records", "new", "keep", "protected", "expected"),
    [case[1:] for case in EARLY_CASES],
    ids=[case[0] for case in EARLY_CASES],
)
def test_early_deletions_table(
    records: str, new: str, keep: tuple[int, int, int | None], protected: str, expected: str
) -> None:
    best, last, every = keep
    policy = best_plus_last({LOSS: best}, last, every)
    early = early_deletions(
        parse(records), policy, replace(parse(new)[0], name="(incoming)", created=1e9), protected.split()
    )
    assert [r.name for r in early] == expected.split()


class KeepLowestLoss:
    """A policy of a kind ``early_deletions`` does not know: what it keeps now is kept."""

    def preserve(self, records: Sequence[CheckpointRecord]) -> frozenset[str]:
        ranked = sorted(
            (r for r in records if "eval_loss" in r.metrics), key=lambda r: r.metrics[LOSS.metric]
        )
        return frozenset(r.name for r in ranked[:1])


def test_early_deletions_take_an_unknown_policy_at_its_word() -> None:
    policy = AnyPreservation((KeepLowestLoss(), LatestN(1)))
    records = [rec(10, 0.5), rec(20, 0.6), rec(30, 0.7)]
    assert [r.name for r in early_deletions(records, policy, incoming(40, 0.1))] == ["s20"]


def test_early_deletions_refuse_a_str_and_a_name_clash() -> None:
    policy = best_plus_last({LOSS: 1}, 1)
    with pytest.raises(TypeError):
        early_deletions([rec(1)], policy, incoming(2), "s1")
    with pytest.raises(ValueError, match="already"):
        early_deletions([rec(1)], policy, rec(1))


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[CheckpointRecord], CheckpointRecord, object, list[str]]:
    steps = draw(st.lists(st.integers(0, 60), max_size=9, unique=True))
    losses = st.one_of(st.none(), st.floats(0, 1), st.just(float("nan")))
    records = [rec(step, draw(losses)) for step in steps]
    new = incoming(draw(st.integers(0, 70)), draw(losses))
    policy = best_plus_last(
        {LOSS: draw(st.integers(1, 3))},
        draw(st.integers(0, 3)),
        draw(st.one_of(st.none(), st.integers(1, 9))),
    )
    protected = draw(st.lists(st.sampled_from([r.name for r in records]), unique=True)) if records else []
    return records, new, policy, protected


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_pruning_early_keeps_every_safeguard_and_changes_nothing_in_the_end(
    scenario: tuple[list[CheckpointRecord], CheckpointRecord, AnyPreservation, list[str]],
) -> None:
    records, new, policy, protected = scenario
    early = early_deletions(records, policy, new, protected)
    names = {r.name for r in early}
    # Only what retention would delete once the capture is committed, never the capture itself.
    assert names <= {r.name for r in plan_deletions([*records, new], policy, protected)} - {new.name}
    # Should the write still fail: every best and keep_every step, the newest, the protected stay.
    needed = set(protected)
    needed |= frozenset().union(*(p.preserve(records) for p in policy.policies if not isinstance(p, LatestN)))
    if records:
        needed.add(max(records, key=lambda r: (r.step, r.created, r.name)).name)
    assert not names & needed
    # Once it is committed, the rotation keeps exactly what it would have kept without pruning.
    left = [r for r in records if r.name not in names]
    after_early = {r.name for r in [*left, new]} - {
        r.name for r in plan_deletions([*left, new], policy, protected)
    }
    after_plain = {r.name for r in [*records, new]} - {
        r.name for r in plan_deletions([*records, new], policy, protected)
    }
    assert after_early == after_plain


def test_the_exit_code_is_one_number_everywhere() -> None:
    assert daemon_run.EXIT_UNPERSISTED == cli.EXIT_UNPERSISTED == 6


# -- real filesystems, real daemons --------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Mount]:
    """``tmpfs(name, size=..., nr_inodes=...)``: a real small filesystem, unmounted afterwards."""
    mounted: list[Path] = []

    def mount(name: str, size: str, nr_inodes: int | None = None) -> Path:
        point = tmp_path / name
        point.mkdir()
        options = f"size={size}" + (f",nr_inodes={nr_inodes}" if nr_inodes else "")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs was refused (it needs root): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def remount(point: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True)


def status(run: Path) -> dict[str, object]:
    return json.loads(RunPaths(run).status.read_text())


def capture_best(run: Path, step: int, loss: float, mib: int) -> None:
    """A trainer logs an eval, gets its snapshot verdict, stages ``mib`` MiB, acks, dies."""
    done = subprocess.run(
        [sys.executable, str(PROGRAMS / "capture_eval.py"), str(run), str(step), str(loss), str(mib)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def three_bests(run: Path, mib: int) -> None:
    """A trainer logs bests at 10, 20 and 30, captures each (``mib`` MiB) and exits."""
    evals = [{"step": s, "eval_loss": loss} for s, loss in ((10, 0.9), (20, 0.8), (30, 0.7))]
    program = str(PROGRAMS / "scripted_trainer.py")
    trainer = subprocess.run(
        [sys.executable, program, str(run), json.dumps(evals), "--mb", str(mib)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert trainer.returncode == 0 and json.loads(trainer.stdout) == [10, 20, 30], trainer.stderr


def used_inodes(point: Path) -> int:
    info = os.statvfs(point)
    return info.f_files - info.f_ffree


@pytest.mark.slow
def test_a_write_failing_midway_leaves_no_partial_keeps_the_older_checkpoint_and_is_retried(
    tmp_path: Path, daemons, shm_root: Path, tmpfs: Mount
) -> None:
    """ENOSPC halfway through a persist: plenty of bytes, no inode left for its second file, so
    the space check passes and the write itself fails, inside its temp dir."""
    disk = tmpfs("disk", size="64M", nr_inodes=10_000)
    run = tmp_path / "run"
    run.mkdir()
    store = Store(disk / "checkpoints")
    daemon = daemons(run, "--store", str(store.root))
    capture_best(run, 10, 0.5, 1)
    wait_for(lambda: [r.step for r in store.list()] == [10], what="the first best")
    wait_for(lambda: not pending_ack_paths(RunPaths(run)), what="its ack removed")
    remount(disk, f"nr_inodes={used_inodes(disk) + 2}")  # a temp dir and one file; not two

    capture_best(run, 20, 0.4, 1)
    wait_for(lambda: status(run).get("unpersisted"), what=f"the failure reported:\n{daemon.log()}")
    error = str(status(run)["last_error"])
    assert "No space left on device" in error and TMP_PREFIX in error, "failed inside its temp dir"
    assert "the best at step 20 (eval_loss) is not on disk yet" in error
    assert "ERROR the best at step 20 (eval_loss) is not on disk yet" in daemon.log()
    (entry,) = status(run)["unpersisted"]  # type: ignore[misc]
    assert entry["step"] == 20 and entry["best"] is True and entry["tries"] >= 1
    assert not [p.name for p in store.root.iterdir() if p.name.startswith(TMP_PREFIX)], "no partial"
    assert [r.step for r in store.list()] == [10] and store.verify(store.list()[0].name) == []
    assert daemon.proc.poll() is None and len(pending_ack_paths(RunPaths(run))) == 1

    remount(disk, "nr_inodes=10000")  # space returns: the retry (every 5 s) goes through
    wait_for(lambda: [r.step for r in store.list()] == [10, 20], timeout=30, what="the retried persist")
    assert all(store.verify(r.name) == [] for r in store.list())
    wait_for(lambda: status(run).get("unpersisted") == [], what="the report cleared")
    assert status(run)["last_error"] is None
    assert daemon.stop() == 0, daemon.log()


@pytest.mark.slow
def test_short_of_room_it_prunes_what_retention_drops_anyway_then_writes(
    tmp_path: Path, daemons, shm_root: Path, tmpfs: Mount
) -> None:
    """A 10 MiB store, captures of 4 MiB, keep best 1 + last 2: the third does not fit beside
    the first two, and without a commit nothing is ever rotated. The first one, which its
    commit would rotate out (neither a best, nor the newest), goes first; the second stays."""
    disk = tmpfs("disk", size="10M")
    run = tmp_path / "run"
    run.mkdir()
    store = Store(disk / "checkpoints")
    daemon = daemons(run, "--store", str(store.root), "--keep-last", "2")
    three_bests(run, mib=4)
    wait_for(lambda: not pending_ack_paths(RunPaths(run)), timeout=30, what=f"every persist:\n{daemon.log()}")
    assert [r.step for r in store.list()] == [20, 30], daemon.log()
    assert all(store.verify(r.name) == [] for r in store.list())
    assert "pruned step-00000010 early to make room for step 30" in daemon.log()
    assert "No space left" not in daemon.log(), "no write was started that had to fail"
    assert daemon.stop() == 0, daemon.log()


@pytest.mark.slow
def test_a_best_that_cannot_be_written_is_told_loudly_and_the_daemon_exits_6(
    tmp_path: Path, daemons, shm_root: Path, tmpfs: Mount
) -> None:
    """No room even after pruning: no write is started, what is needed and free is said, the
    best is listed as not on disk (status.json, ``ckptd status``), and the stop exits 6. The
    slot survives the stop: the next daemon persists it once there is room."""
    disk = tmpfs("disk", size="1M")
    run = tmp_path / "run"
    run.mkdir()
    store = Store(disk / "checkpoints")
    daemon = daemons(run, "--store", str(store.root))
    capture_best(run, 10, 0.5, 4)
    wait_for(lambda: status(run).get("unpersisted"), what=f"the failure reported:\n{daemon.log()}")
    error = str(status(run)["last_error"])
    assert "it needs 5.0 MiB (its 4.0 MiB and a margin)" in error and "free" in error, error
    assert "no write started" in error and TMP_PREFIX not in error, error
    assert "ERROR the best at step 10 (eval_loss) is not on disk yet" in daemon.log()
    shown = subprocess.run(
        [sys.executable, "-m", "ckptd", "status", str(run)], capture_output=True, text=True, timeout=60
    )
    assert "NOT ON DISK the BEST at step 10 (best:eval_loss)" in shown.stdout, shown.stdout

    assert daemon.stop() == 6, daemon.log()
    assert "stopping with 1 acknowledged capture(s) not persisted (step 10 (best:eval_loss))" in daemon.log()
    final = status(run)
    assert final["state"] == "stopped" and [e["step"] for e in final["unpersisted"]] == [10]  # type: ignore[union-attr]
    assert len(pending_ack_paths(RunPaths(run))) == 1 and store.list() == []

    remount(disk, "size=64M")
    restarted = daemons(run, "--store", str(store.root))
    wait_for(lambda: [r.step for r in store.list()] == [10], timeout=30, what="the next daemon's persist")
    assert restarted.stop() == 0, restarted.log()
    assert status(run)["unpersisted"] == []


def sidecar(run: Path, store: Path, *command: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "ckptd", "sidecar", "--run-dir", str(run), f"--store={store}"]
    argv += [f"--log={run / 'logging.jsonl'}", "--", *command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_the_sidecar_fails_a_successful_command_whose_best_is_not_on_disk(
    tmp_path: Path, shm_root: Path, tmpfs: Mount
) -> None:
    disk = tmpfs("disk", size="1M")
    capture = [sys.executable, str(PROGRAMS / "capture_eval.py")]
    ok_run = tmp_path / "ok"
    done = sidecar(ok_run, disk / "a", *capture, str(ok_run), "10", "0.5", "4")
    assert done.returncode == 6, done.stderr
    said = "exited with status 0, but acknowledged captures were not persisted (step 10 (best:eval_loss))"
    assert said in done.stderr
    assert "exiting with status 6" in done.stderr

    failed_run = tmp_path / "failed"
    script = f"{' '.join(capture)} {failed_run} 10 0.5 4 && exit 3"
    done = sidecar(failed_run, disk / "b", "sh", "-c", script)
    assert done.returncode == 3, done.stderr  # the command's own failure wins
    assert "exiting with status 3 (the command's own)" in done.stderr


@pytest.mark.slow
def test_nothing_is_pruned_early_when_pruning_cannot_make_room(
    tmp_path: Path, daemons, shm_root: Path, tmpfs: Mount
) -> None:
    """A capture bigger than the whole store: deleting what retention would drop once it is
    committed cannot make room, and it is never committed, so the last-N checkpoint must stay."""
    disk = tmpfs("disk", size="10M")
    run = tmp_path / "run"
    run.mkdir()
    store = Store(disk / "checkpoints")
    daemon = daemons(run, "--store", str(store.root), "--keep-last", "2")
    three_bests(run, mib=1)
    wait_for(lambda: [r.step for r in store.list()] == [20, 30], timeout=30, what=f"rotated:\n{daemon.log()}")
    capture_best(run, 40, 0.1, 12)  # needs 13 MiB: more than the 10 MiB disk holds when empty
    wait_for(lambda: status(run).get("unpersisted"), what=f"the failure reported:\n{daemon.log()}")
    assert "no write started" in str(status(run)["last_error"])
    assert [r.step for r in store.list()] == [20, 30], daemon.log()
    assert "WARNING pruned" not in daemon.log()
    assert daemon.stop() == 6, daemon.log()


LATE_ACK = """
import json, os, signal, sys, time
from pathlib import Path
meta = Path(sys.argv[1]) / ".ckptd"
os.kill(json.loads((meta / "status.json").read_text())["pid"], signal.SIGTERM)
while json.loads((meta / "status.json").read_text()).get("state") != "stopped":
    time.sleep(0.05)
time.sleep(0.5)
(meta / "acks" / "step-10.json").write_text("{}")  # an in-flight capture acked after the stop
"""


@pytest.mark.slow
def test_the_sidecar_fails_a_successful_command_that_acked_after_the_daemon_stopped(
    tmp_path: Path, shm_root: Path
) -> None:
    """The daemon stopped cleanly (status 0) while the command ran; an ack written after that
    is a capture no daemon persisted: a success would be a lie."""
    run = tmp_path / "run"
    done = sidecar(run, tmp_path / "store", sys.executable, "-c", LATE_ACK, str(run))
    assert pending_ack_paths(RunPaths(run)), done.stderr
    assert done.returncode == 6, done.stderr


def test_a_follower_stopped_with_a_part_it_could_not_store_exits_6(
    tmp_path: Path, tmpfs: Mount, shm_root: Path, daemons: Callable[..., Daemon]
) -> None:
    """The exit-6 promise holds on every node: a follower whose rank part does not fit the store
    keeps it, says so, and stops with 6 (a follower with nothing left stops with 0)."""
    store = tmpfs("store", "1M") / "checkpoints"
    run = tmp_path / "run"
    run.mkdir()
    leader = daemons(run, "--store", str(store), "--role", "leader", "--node-id", "a")
    follower_shm = tmp_path / "shm-b"
    follower_shm.mkdir(mode=0o700)
    node_b = RunPaths(run).node("b")
    out = tmp_path / "follower.log"
    with out.open("wb") as sink:
        follower = subprocess.Popen(
            [sys.executable, "-m", "ckptd", "run", str(run), "--store", str(store), "--role", "follower",
             "--node-id", "b"],
            stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "CKPTD_SHM_ROOT": str(follower_shm)},
        )  # fmt: skip
    try:
        wait_for(lambda: node_b.status.exists(), what=out.read_text())
        staging = staging_dir_for(read_control(RunPaths(run).control).run_id, follower_shm)
        staging.mkdir(mode=0o700, exist_ok=True)
        slot = staging / "r1-0"
        slot.mkdir(mode=0o700)
        (slot / "__1_0.distcp").write_bytes(os.urandom(4 << 20))  # 4 MiB part, 1 MiB disk
        (slot / CAPTURE_FILE).write_text(json.dumps({"token": "t0"}))
        ack = Ack(
            name=Ack.name_for(None, 10, 1), captured_step=10, slot=slot.name, files={"__1_0.distcp": 4 << 20},
            tags=("periodic",), reason="test", metrics={}, token="t0", token_file=CAPTURE_FILE,
            rank=1, world_size=2, capture="10-abc",
        )  # fmt: skip
        write_ack(node_b, ack)
        wait_for(lambda: "No space left on device" in out.read_text(), what=out.read_text())
        follower.send_signal(signal.SIGTERM)
        assert follower.wait(timeout=60) == daemon_run.EXIT_UNPERSISTED, out.read_text()
        assert "not stored" in out.read_text() and pending_ack_paths(node_b) and slot.is_dir()
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert leader.stop() == 0, leader.log()
