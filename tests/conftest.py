"""Shared fixtures: starting and stopping a real ``ckptd run`` daemon as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckptd.protocol import RunPaths, daemon_alive, read_control

PROGRAMS = Path(__file__).parent / "programs"
FIXTURES = Path(__file__).parent / "fixtures"


def append_lines(log: Path, *records: dict[str, object]) -> None:
    """What a trainer does at each log step: JSON lines appended, flushed."""
    with log.open("a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def verdict(paths: RunPaths) -> tuple[int, str] | None:
    """The latest verdict in control.json as (eval step, action), or None."""
    try:
        control = read_control(paths.control)
    except (FileNotFoundError, ValueError):
        return None
    return None if control.verdict is None else (control.verdict.eval_step, control.verdict.action)


def wait_for(
    predicate: Callable[[], bool], timeout: float = 20.0, what: str | Callable[[], str] = "condition"
) -> None:
    """Poll ``predicate``; past ``timeout``, fail saying ``what`` (a callable is asked then, so
    logs it reads are the ones at the timeout, not at the call)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {said}")
        time.sleep(0.005)


class Daemon:
    """A real ``python -m ckptd run`` process, its output kept for the failure message."""

    def __init__(self, run_dir: Path, args: list[str]) -> None:
        self.run_dir = run_dir
        self.output = run_dir.parent / f"daemon-{time.monotonic_ns()}.log"
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ckptd", "run", str(run_dir), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_alive(self) -> Daemon:
        # Its own heartbeat: a daemon SIGKILLed just before left a status.json that looks alive
        # for a few more seconds, and a test going on then races the new one's start-up.
        wait_for(
            lambda: self.proc.poll() is None
            and daemon_alive(RunPaths(self.run_dir))
            and _status_pid(self.run_dir) == self.proc.pid,
            what=f"daemon heartbeat; output:\n{self.log()}",
        )
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # the daemon dumps its threads' stacks
            time.sleep(1.0)
            raise AssertionError(f"the daemon did not stop in {timeout} s; output:\n{self.log()}") from None

    def log(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""


def _status_pid(run_dir: Path) -> object:
    try:
        return json.loads(RunPaths(run_dir).status.read_text()).get("pid")
    except (OSError, ValueError, AttributeError):
        return None


@pytest.fixture
def daemons() -> Iterator[Callable[..., Daemon]]:
    """Start daemons with ``daemons(run_dir, *args)``; all are killed at teardown."""
    started: list[Daemon] = []

    def start(run_dir: Path, *args: str, alive: bool = True) -> Daemon:
        daemon = Daemon(run_dir, list(args))
        started.append(daemon)
        return daemon.wait_alive() if alive else daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait()


@pytest.fixture
def shm_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Staging slots of this test live in their own folder under /dev/shm, removed afterwards."""
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    folder = root / f"ckptd-test-{os.getpid()}-{time.monotonic_ns()}"
    folder.mkdir()
    monkeypatch.setenv("CKPTD_SHM_ROOT", str(folder))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
