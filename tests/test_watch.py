"""``ckptd status --watch``: the pure render on synthetic status dicts, then the command under a
pseudo-terminal and through a pipe against a live daemon."""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckptd.watch import CLEAR, HIDE_CURSOR, SHOW_CURSOR, json_key, render, render_screen, summary
from tests.conftest import append_lines

LIVE: dict[str, Any] = {
    "state": "running",
    "pid": 4242,
    "host": "node7",
    "run_dir": "/runs/a",
    "alive": True,
    "heartbeat_age_s": 0.4,
    "heartbeat": 1000.0,
    "rss_bytes": 50_000_000,
    "log_lag_bytes": 0,
    "log_lag_seconds": 0.0,
    "bests": {"eval_loss": {"step": 600, "value": 0.2568}},
    "last_verdict": {"eval_step": 600, "action": "snapshot", "reason": "eval_loss 0.2568 < best 0.2804 @400"},
    "persisted": 3,
    "persists_in_flight": 1,
    "pending_acks": 2,
    "last_persist_seconds": 0.42,
    "last_error": None,
}


# -- pure render ------------------------------------------------------------------------------


def test_render_a_live_daemon_with_a_verdict_and_persists_in_flight() -> None:
    screen = "\n".join(render(LIVE))
    assert "daemon      running, pid 4242 on node7, heartbeat 0.4 s ago" in screen
    assert "log lag     0 B unread" in screen
    assert "best        eval_loss 0.2568 at step 600" in screen
    assert "last        step 600: snapshot (eval_loss 0.2568 < best 0.2804 @400)" in screen
    assert "persists    1 in flight, 2 ack(s) pending, 3 persisted (last took 0.4 s)" in screen
    assert "last error  none" in screen


def test_render_a_dead_daemon_and_its_last_error() -> None:
    dead = {**LIVE, "alive": False, "heartbeat_age_s": 312.0, "last_error": "disk full: /ckpt"}
    screen = "\n".join(render(dead))
    assert "NOT RUNNING (killed or crashed)" in screen and "last heartbeat 5 min ago" in screen
    assert "last error  disk full: /ckpt" in screen
    stopped = "\n".join(render({**dead, "state": "stopped"}))
    assert "NOT RUNNING (stopped)" in stopped
    line = summary(dead)
    assert "NOT RUNNING (killed or crashed)" in line and line.endswith("error: disk full: /ckpt")


def test_render_no_daemon_and_a_damaged_status() -> None:
    assert render({"run_dir": "/runs/b", "alive": False, "heartbeat_age_s": None})[-1].endswith(
        "none has followed this run (no status.json)"
    )
    assert summary({"run_dir": "/runs/b", "alive": False, "heartbeat_age_s": None}) == "/runs/b  no daemon"
    odd = {**LIVE, "bests": [1], "last_verdict": "x", "log_lag_bytes": True, "persisted": {"a": 1}}
    screen = "\n".join(render(odd))  # another version's file: "?" and "none", never a traceback
    assert "best        none yet" in screen and "no verdict yet" in screen and "unknown" in screen


def test_summary_and_json_key_ignore_what_every_heartbeat_moves() -> None:
    later = {**LIVE, "heartbeat_age_s": 0.9, "heartbeat": 1001.0, "rss_bytes": 51_000_000}
    assert summary(later) == summary(LIVE)
    assert json_key(later) == json_key(LIVE)
    moved = {**LIVE, "last_verdict": {**LIVE["last_verdict"], "eval_step": 650, "action": "skip"}}
    assert summary(moved) != summary(LIVE) and json_key(moved) != json_key(LIVE)
    assert "last step 650: skip" in summary(moved)


def test_render_screen_has_one_block_per_run() -> None:
    screen = render_screen([LIVE, {**LIVE, "run_dir": "/runs/b"}], 1.0, time.time())
    assert screen[0].startswith("ckptd status --watch") and "Ctrl-C" in screen[0]
    assert sum(line.startswith("run ") for line in screen) == 2
    assert render_screen([], 2.0, 0.0)[-1] == "no run to show"


# -- the command, against a live daemon ------------------------------------------------------


def _watch_cmd(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ckptd", "status", str(run), "--watch", "--interval", "0.2", *extra]


def _with_sigint() -> None:
    """In the child: SIGINT as a terminal sends it, even when the tests run as a background job
    (a non-interactive shell starts those with SIGINT ignored, which Python then honours)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _read_until(fd: int, buffer: bytearray, done: Callable[[str], bool], timeout: float, what: str) -> str:
    """Read ``fd`` into ``buffer`` until ``done(text so far)``; the text."""
    deadline = time.monotonic() + timeout
    while not done(text := buffer.decode(errors="replace")):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; output:\n{text[-3000:]}")
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the pty's other side closed
                chunk = b""
            if not chunk:
                time.sleep(0.05)
            buffer += chunk
    return text


def _drain(fd: int, buffer: bytearray, seconds: float) -> None:
    """Read what ``fd`` gives for ``seconds``."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the pty's other side closed
                return
            if not chunk:
                return
            buffer += chunk


def test_watch_on_a_terminal_redraws_in_place_and_restores_the_cursor(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemons(run, "--every-steps", "1000")
    master, slave = os.openpty()
    proc = subprocess.Popen(_watch_cmd(run), stdin=slave, stdout=slave, stderr=slave, preexec_fn=_with_sigint)
    os.close(slave)
    try:
        out = bytearray()
        _read_until(master, out, lambda t: t.count(CLEAR) >= 2, 20, "two redraws")
        text = out.decode(errors="replace")
        assert HIDE_CURSOR in text and "daemon      running" in text and "no verdict yet" in text
        append_lines(run / "logging.jsonl", {"step": 5, "eval_loss": 0.5})
        _read_until(
            master,
            out,
            lambda t: (
                "last        step 5: snapshot" in t.rpartition(CLEAR)[2]
                and "best        eval_loss 0.5 at step 5" in t.rpartition(CLEAR)[2]
            ),
            20,
            "the verdict on the screen",
        )
        proc.send_signal(signal.SIGINT)
        # Keep reading while it exits: a full pty buffer would block its last writes.
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            _drain(master, out, 0.1)
        assert proc.wait(timeout=1) == 0
        text = _read_until(master, out, lambda t: SHOW_CURSOR in t, 5, "the cursor shown again")
        assert "Traceback" not in text
        assert text.rindex(SHOW_CURSOR) > text.rindex(CLEAR)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_watch_through_a_pipe_prints_one_line_per_change(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemons(run, "--every-steps", "1000")
    proc = subprocess.Popen(
        _watch_cmd(run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_with_sigint
    )
    assert proc.stdout is not None
    try:
        out = bytearray()
        fd = proc.stdout.fileno()
        _read_until(fd, out, lambda t: "running" in t, 20, "the first line")
        _drain(fd, out, 1.0)  # ~5 refreshes of a run that stands still: no new line
        assert out.decode().count("\n") == 1, out.decode()
        append_lines(run / "logging.jsonl", {"step": 5, "eval_loss": 0.5})
        _read_until(fd, out, lambda t: "eval_loss=0.5@5" in t and "step 5: snapshot" in t, 20, "the best")
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    lines = (out + rest).decode().splitlines()
    assert len(lines) >= 2 and not any("\x1b" in line for line in lines)
    shown = [line[9:] for line in lines]  # without the "HH:MM:SS " stamp
    assert all(a != b for a, b in itertools.pairwise(shown)), lines
    assert shown[0].startswith(f"{run}  running  lag ")
    assert b"Traceback" not in err


def test_watch_json_lines_for_the_runs_of_a_node_config(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        (root / name / "ckptd.toml").write_text("")
    config = tmp_path / "node.toml"
    config.write_text(f'[serve]\nroots = ["{root}"]\n')
    cmd = [sys.executable, "-m", "ckptd", "status", "--config", str(config), "--watch", "--json"]
    proc = subprocess.Popen(
        [*cmd, "--interval", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_with_sigint
    )
    assert proc.stdout is not None
    try:
        out = bytearray()
        _read_until(proc.stdout.fileno(), out, lambda t: t.count("\n") >= 2, 20, "two JSON lines")
        time.sleep(0.5)  # nothing changes: nothing more
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    rows = [json.loads(line) for line in (out + rest).decode().splitlines()]
    assert sorted(Path(r["run_dir"]).name for r in rows) == ["a", "b"]
    assert all(r["alive"] is False and r["heartbeat_age_s"] is None for r in rows)


def test_watch_rejects_a_bad_interval(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ckptd", "status", str(tmp_path), "--watch", "--interval", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "--interval" in done.stderr
