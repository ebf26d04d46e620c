"""``ckptd serve``: a real node daemon over a root of real runs, written by real trainers.

The promises under test: every adopted run keeps its own best + last N; SIGHUP with a smaller
keep-last prunes at once without a restart; SIGTERM during a persist completes that persist;
as root, a run owned by another user is served with that user's rights (the files ckptd
creates belong to that user); systemd hears READY=1, WATCHDOG=1, STOPPING=1 in order.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ckptd import CheckpointClient
from ckptd.protocol import RunPaths, daemon_alive, pending_ack_paths
from ckptd.store import Store
from tests.conftest import PROGRAMS, append_lines, wait_for
from tests.notify_socket import NotifySocket

pytestmark = pytest.mark.slow


class Node:
    """A real ``python -m ckptd serve`` process over a config written in ``folder``."""

    def __init__(self, folder: Path, text: str, env: dict[str, str] | None = None) -> None:
        self.config = folder / "node.toml"
        self.config.write_text(text)
        self.output = folder / f"serve-{time.monotonic_ns()}.log"
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ckptd", "serve", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def log(self) -> str:
        return self.output.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"ckptd serve did not stop:\n{self.log()}") from None


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    started: list[Node] = []
    yield started
    for node in started:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()


def node_config(root: Path, *, keep_last: int = 3, every: int = 10, extra: str = "") -> str:
    return (
        f'[serve]\nroots = ["{root}"]\nscan_interval = 0.2\nidle_timeout = 600\n{extra}\n'
        f'[run]\nmetric = "eval_loss"\nkeep_last = {keep_last}\nevery_steps = {every}\n'
    )


def make_run(root: Path, name: str, run_toml: str = "") -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "ckptd.toml").write_text(run_toml)
    return run


def trainer(run: Path, evals: list[dict[str, float]], user: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(PROGRAMS / "scripted_trainer.py"), str(run), json.dumps(evals)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        user=user,
        cwd=str(run),
    )


def finish(proc: subprocess.Popen[str]) -> list[int]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    captured: list[int] = json.loads(out.strip().splitlines()[-1])
    return captured


def kept_steps(run: Path) -> dict[int, tuple[str, ...]]:
    return {r.step: r.tags for r in Store(run / "checkpoints").list()}


def evals(*losses: float) -> list[dict[str, float]]:
    """One eval every 10 steps from step 10, with these losses."""
    return [{"step": 10 * (i + 1), "eval_loss": loss} for i, loss in enumerate(losses)]


EVALS_A = evals(5, 4, 2, 3, 3.5, 3.2, 3.1, 3.3)  # best at 30
EVALS_B = evals(9, 8, 7, 6, 5.5, 1, 4, 4.5)  # best at 60


def test_two_live_runs_keep_their_own_best_and_last_and_a_reload_prunes_without_restart(
    tmp_path: Path, nodes: list[Node], shm_root: Path
) -> None:
    root = tmp_path / "runs"
    run_a = make_run(root, "team/a")
    run_b = make_run(root, "b", "[run]\nkeep_last = 1\n")  # its own file wins over the node's
    node = Node(tmp_path, node_config(root))
    nodes.append(node)
    wait_for(lambda: daemon_alive(RunPaths(run_a)) and daemon_alive(RunPaths(run_b)), what=node.log())
    pid_a = json.loads(RunPaths(run_a).status.read_text())["pid"]
    a, b = trainer(run_a, EVALS_A), trainer(run_b, EVALS_B)
    # A periodic capture is skipped while both slots wait for their persist: what was captured
    # is what the policy ranks. Each best is captured (a best waits for a slot).
    captured_a, captured_b = finish(a), finish(b)
    assert 30 in captured_a and 60 in captured_b and len(captured_a) >= 4
    wait_for(lambda: not pending_ack_paths(RunPaths(run_a)) and not pending_ack_paths(RunPaths(run_b)))
    want_a, want_b = sorted({30, *captured_a[-3:]}), sorted({60, *captured_b[-1:]})
    wait_for(lambda: sorted(kept_steps(run_a)) == want_a, what=f"{kept_steps(run_a)}\n{node.log()}")
    wait_for(lambda: sorted(kept_steps(run_b)) == want_b, what=f"{kept_steps(run_b)}\n{node.log()}")
    assert "best:eval_loss" in kept_steps(run_a)[30] and "best:eval_loss" in kept_steps(run_b)[60]

    node.config.write_text(node_config(root, keep_last=1))
    node.proc.send_signal(signal.SIGHUP)
    want_a = sorted({30, captured_a[-1]})
    wait_for(lambda: sorted(kept_steps(run_a)) == want_a, what=f"{kept_steps(run_a)}\n{node.log()}")
    assert sorted(kept_steps(run_b)) == want_b
    wait_for(lambda: json.loads(RunPaths(run_a).status.read_text())["policy"]["keep_last"] == 1)
    assert json.loads(RunPaths(run_a).status.read_text())["pid"] == pid_a, "applied live, same daemon"
    assert node.stop() == 0, node.log()
    for run in (run_a, run_b):
        store = Store(run / "checkpoints")
        assert all(store.verify(r.name) == [] for r in store.list())
    assert not list(shm_root.iterdir()), node.log()


def test_sigterm_during_a_persist_completes_it(tmp_path: Path, nodes: list[Node], shm_root: Path) -> None:
    root = tmp_path / "runs"
    run = make_run(root, "big")
    node = Node(tmp_path, node_config(root, every=1000))
    nodes.append(node)
    wait_for(lambda: daemon_alive(RunPaths(run)), what=node.log())
    state = {"w": torch.randn(96 * 2**20 // 4)}  # 96 MiB: a persist that takes a while here
    with CheckpointClient(run) as client:
        append_lines(run / "logging.jsonl", {"step": 7, "eval_loss": 1.0})
        assert client.wait_verdict(7) is not None
        assert client.maybe_snapshot(7, lambda: state)
        node.proc.send_signal(signal.SIGTERM)  # the ack is on disk: the persist is in flight
        # Waited for, not stop()ped: a second SIGTERM while the drain runs means "exit now".
        assert node.proc.wait(timeout=120) == 0, node.log()
    (record,) = Store(run / "checkpoints").list()
    assert record.step == 7 and Store(run / "checkpoints").verify(record.name) == []
    assert not pending_ack_paths(RunPaths(run))


def test_systemd_hears_ready_watchdog_and_stopping_in_order_from_serve_and_run(
    tmp_path: Path, shm_root: Path
) -> None:
    root = tmp_path / "runs"
    make_run(root, "r")
    (tmp_path / "node.toml").write_text(node_config(root))
    (tmp_path / "solo").mkdir()
    commands = {
        "serve": ["serve", "--config", str(tmp_path / "node.toml")],
        "run": ["run", str(tmp_path / "solo")],
    }
    for name, argv in commands.items():
        with NotifySocket(tmp_path, abstract=name == "run") as notify:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ckptd", *argv],
                env=notify.environ(watchdog_usec=400_000),
                stderr=subprocess.PIPE,
            )
            try:
                assert notify.wait_for("READY=1").pid == proc.pid, name
                notify.wait_for("WATCHDOG=1")
                notify.wait_for("WATCHDOG=1")  # again: it keeps the watchdog fed
                proc.send_signal(signal.SIGTERM)
                notify.wait_for("STOPPING=1")
                assert proc.wait(30) == 0, name
            finally:
                proc.kill()
                proc.communicate()


def test_serve_check_accepts_the_example_and_names_an_unknown_key(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "service" / "ckptd.toml"
    ok = subprocess.run(
        [sys.executable, "-m", "ckptd", "serve", "--check", "--config", str(example)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(example.read_text().replace("scan_interval = 5", "scan_intervall = 5"))
    refused = subprocess.run(
        [sys.executable, "-m", "ckptd", "serve", "--check", "--config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2
    assert "scan_intervall" in refused.stderr and str(bad) in refused.stderr


def test_a_run_already_followed_by_ckptd_run_is_left_to_it(
    tmp_path: Path, nodes: list[Node], daemons: object, shm_root: Path
) -> None:
    root = tmp_path / "runs"
    run = make_run(root, "mine")
    solo = daemons(run)  # type: ignore[operator]
    node = Node(tmp_path, node_config(root))
    nodes.append(node)
    wait_for(lambda: "left to it" in node.log(), what=node.log())
    assert json.loads(RunPaths(run).status.read_text())["pid"] == solo.proc.pid
    assert node.stop() == 0


def _unprivileged() -> pwd.struct_passwd | None:
    for name in ("nobody", "daemon"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        if user.pw_uid != 0:
            return user
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="serving another user's run needs a root node daemon")
def test_as_root_another_users_run_is_served_with_that_users_rights(nodes: list[Node]) -> None:
    user = _unprivileged()
    if user is None:
        pytest.skip("no unprivileged account (nobody, daemon) on this machine")
    as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    try:
        probe = subprocess.run([sys.executable, "-c", "import ckptd"], capture_output=True, **as_user)
        problem = probe.stderr.decode()[-200:] if probe.returncode else None
    except OSError as exc:
        problem = str(exc)
    if problem:
        # Python installed under /root (pyenv) is out of reach of any other user: no worker of
        # theirs can start, whatever ckptd does. So on the development VM: run by hand there.
        pytest.skip(f"{user.pw_name} cannot run {sys.executable} with ckptd: {problem}")
    # Outside pytest's tmp_path (0700, root's): the user must reach the run and its Python.
    base = Path(tempfile.mkdtemp(prefix="ckptd-serve-root-"))
    try:
        base.chmod(0o755)
        root = base / "runs"
        root.mkdir()
        root.chmod(0o755)
        run = make_run(root, "theirs")
        os.chown(run, user.pw_uid, user.pw_gid)
        os.chown(run / "ckptd.toml", user.pw_uid, user.pw_gid)
        shm = base / "shm"
        shm.mkdir(mode=0o1777)
        shm.chmod(0o1777)
        env = {**os.environ, "CKPTD_SHM_ROOT": str(shm)}
        node = Node(base, node_config(root), env=env)
        nodes.append(node)
        wait_for(lambda: daemon_alive(RunPaths(run)), what=node.log())
        with subprocess.Popen(
            [sys.executable, str(PROGRAMS / "scripted_trainer.py"), str(run), json.dumps(EVALS_A[:3])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
            env=env,
            cwd="/",
        ) as proc:
            out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert json.loads(out.splitlines()[-1]) == [10, 20, 30]
        wait_for(lambda: sorted(kept_steps(run)) == [10, 20, 30], what=node.log())
        status = json.loads(RunPaths(run).status.read_text())
        assert status["pid"] != node.proc.pid, "served by the user's worker, not the root daemon"
        created = [p for p in run.rglob("*") if p.name != "ckptd.toml"]
        assert created and all(p.lstat().st_uid == user.pw_uid for p in created), [
            (p, p.lstat().st_uid) for p in created if p.lstat().st_uid != user.pw_uid
        ]
        assert node.stop() == 0, node.log()
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


def state_of(run: Path) -> str:
    try:
        return str(json.loads(RunPaths(run).status.read_text()).get("state"))
    except (OSError, ValueError):
        return "none"


def test_an_idle_run_is_released_once_its_trainer_is_gone_and_adopted_again_when_it_logs(
    tmp_path: Path, nodes: list[Node], shm_root: Path
) -> None:
    root = tmp_path / "runs"
    run = make_run(root, "r")
    text = node_config(root, every=1000).replace("idle_timeout = 600", "idle_timeout = 1.5")
    node = Node(tmp_path, text)
    nodes.append(node)
    wait_for(lambda: daemon_alive(RunPaths(run)), what=node.log())
    with CheckpointClient(run) as client:
        append_lines(run / "logging.jsonl", {"step": 5, "eval_loss": 1.0})
        assert client.wait_verdict(5) is not None and client.maybe_snapshot(5, lambda: {"w": torch.ones(2)})
        time.sleep(3.0)  # the log is idle past the timeout, but the trainer's client is alive
        assert state_of(run) == "running" and daemon_alive(RunPaths(run)), node.log()
    wait_for(lambda: state_of(run) == "stopped", what=node.log())
    assert "released" in node.log()
    append_lines(run / "logging.jsonl", {"step": 6, "eval_loss": 0.5})  # the run goes on
    wait_for(lambda: state_of(run) == "running" and daemon_alive(RunPaths(run)), what=node.log())
    assert node.stop() == 0, node.log()
    assert [r.step for r in Store(run / "checkpoints").list()] == [5]
