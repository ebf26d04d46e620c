"""What ``ckptd status`` (plain and ``--watch``) and ``ckptd ls`` show of files anyone may write:
no escape sequence reaches the terminal, no FIFO or endless file hangs them, no bare NaN goes
out as JSON, and a reader that leaves (``| head``) or a closed stdout is no error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptd import watch
from ckptd.protocol import RunPaths, json_safe

HOSTILE = "loss\x1b]0;PWNED\x07\nfake line\x1b[31m"


def ckptd(*args: str, timeout: float = 20, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptd", *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )  # type: ignore[call-overload]


def write_status(run: Path, status: dict[str, object] | str) -> RunPaths:
    paths = RunPaths(run)
    paths.meta.mkdir(parents=True, exist_ok=True)
    paths.status.write_text(status if isinstance(status, str) else json.dumps(status))
    return paths


def hostile_status() -> dict[str, object]:
    return {
        "pid": 1, "state": "running", "host": HOSTILE, "last_error": HOSTILE,
        "bests": {HOSTILE: {"value": 0.5, "step": HOSTILE}},
        "last_verdict": {"eval_step": 3, "action": HOSTILE, "reason": HOSTILE},
        "log_notes": [HOSTILE],
    }  # fmt: skip


def test_status_and_watch_show_escapes_and_newlines_as_visible_text(tmp_path: Path) -> None:
    write_status(tmp_path, hostile_status())
    shown = ckptd("status", str(tmp_path)).stdout
    status = watch.sample(tmp_path)
    for text in (shown, "\n".join(watch.render(status)), watch.summary(status)):
        assert "\x1b" not in text and "\x07" not in text
        assert "\\x1b]0;PWNED\\x07" in text
    assert "\n" not in watch.summary(status)  # one line per change, whatever a field holds
    assert not any(line.startswith("fake line") for line in shown.splitlines())


@pytest.mark.parametrize("state", ["stopped", None])
def test_a_fresh_status_file_that_is_no_live_daemon_is_not_shown_running(
    tmp_path: Path, state: str | None
) -> None:
    # A clean halt writes state=stopped; a damaged file (no pid) is no daemon's heartbeat.
    write_status(tmp_path, {"pid": 7, "state": state} if state else {"garbage": True})
    assert watch.sample(tmp_path)["alive"] is False
    result = ckptd("status", str(tmp_path))
    assert result.returncode == 1 and "not running" in result.stdout


def test_a_fifo_or_endless_file_in_place_of_status_or_state_does_not_hang(tmp_path: Path) -> None:
    paths = write_status(tmp_path, "{}")
    paths.status.unlink()
    os.mkfifo(paths.status)
    os.symlink("/dev/zero", paths.state)
    started = time.monotonic()
    assert ckptd("status", str(tmp_path)).returncode == 1
    assert ckptd("ls", str(tmp_path)).returncode == 1  # no checkpoint; and no hang on state.json
    assert time.monotonic() - started < 15


def test_status_json_never_emits_a_bare_nan(tmp_path: Path) -> None:
    write_status(tmp_path, '{"pid": 1, "state": "running", "log_lag_seconds": NaN, "x": [Infinity]}')
    out = ckptd("status", str(tmp_path), "--json").stdout
    document = json.loads(out, parse_constant=lambda token: pytest.fail(f"bare {token} in {out}"))
    assert document["log_lag_seconds"] == "nan" and document["x"] == ["inf"]
    assert json.loads(json.dumps(json_safe(watch.sample(tmp_path)), allow_nan=False))


def test_a_reader_that_leaves_early_or_a_closed_stdout_is_not_an_error(tmp_path: Path) -> None:
    write_status(tmp_path, {"pid": 1, "state": "running", "pad": "x" * 200_000})
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptd", "status", str(tmp_path), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first write
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=20) in (0, 1) and "Traceback" not in err and "Broken pipe" not in err
    closed = ckptd("status", str(tmp_path), stdout=None, preexec_fn=lambda: os.close(1))
    assert "Traceback" not in closed.stderr
