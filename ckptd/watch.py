"""``ckptd status --watch``: a live view of one run's daemon, or of every run of a node daemon.

The render functions are pure (a status dict in, text out); :func:`watch` is the loop around
them. A status dict here is ``status.json`` as :func:`ckptd.protocol.read_status` gives it plus
``run_dir``, ``alive`` and ``heartbeat_age_s`` (what ``ckptd status --json`` prints); every field
is type-checked where it is read, since the file may come from another version of ckptd.

Three outputs, one per kind of reader:

- a terminal: the screen is redrawn in place every interval (cursor home, clear screen), the
  cursor hidden while watching and shown again on exit, Ctrl-C included;
- a pipe or a file: one compact line per run each time that line changes (``| tee log`` reads
  well); the heartbeat's age and the daemon's memory are left out, so an idle run prints once;
- ``--json``: one JSON object per run per change (JSON lines), compared without the fields that
  move on every heartbeat.

status.json carries no progress figure for a persist in flight, so the view shows the count of
persists in flight and of pending acks.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from ckptd.protocol import STALE_AFTER_S, RunPaths, format_bytes, heartbeat_age, json_safe, read_status
from ckptd.text import printable

Status = dict[str, Any]

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"

# Fields that change on every heartbeat of an idle daemon: not a change worth a JSON line.
VOLATILE = frozenset({"heartbeat", "heartbeat_age_s", "rss_bytes", "rss_anon_bytes", "staged_bytes"})


def sample(run_dir: Path) -> Status:
    """One run's status now, as ``ckptd status --json`` prints it (plus ``run_dir``)."""
    paths = RunPaths(run_dir)
    age = heartbeat_age(paths)
    status = read_status(paths) if age is not None else {}
    # A fresh mtime on a file that says nothing (damaged, replaced) is no daemon's heartbeat,
    # and a clean halt says "stopped" before it ages the file.
    alive = age is not None and age <= STALE_AFTER_S and "pid" in status and status.get("state") != "stopped"
    return {**status, "run_dir": str(run_dir), "alive": alive, "heartbeat_age_s": age}


# -- pure rendering ---------------------------------------------------------------------------


def render(status: Status) -> list[str]:
    """The screen lines of one run: daemon and heartbeat, lag, bests, last verdict, persists,
    the trainer's skipped captures and the last error."""
    lines = [f"run         {_text(status, 'run_dir')}"]
    age = _float(status.get("heartbeat_age_s"))
    who = f"pid {_text(status, 'pid')} on {_text(status, 'host')}"
    if age is None:
        lines.append("daemon      none has followed this run (no status.json)")
        return lines
    if status.get("alive") is True:
        lines.append(f"daemon      running, {who}, heartbeat {age:.1f} s ago")
    else:
        lines.append(
            f"daemon      NOT RUNNING ({_dead_state(status)}), {who}, last heartbeat {_age(age)} ago"
        )
    lines.append(f"log lag     {_lag(status)}")
    bests = status.get("bests")
    shown = False
    for metric, best in bests.items() if isinstance(bests, dict) else ():
        if isinstance(best, dict):
            lines.append(f"best        {metric} {_metric(best.get('value'))} at step {_text(best, 'step')}")
            shown = True
    if not shown:
        lines.append("best        none yet")
    lines.append(f"last        {_verdict(status.get('last_verdict'), long=True)}")
    lines.append(f"persists    {_persists(status)}")
    trainer = status.get("trainer")
    if isinstance(trainer, dict) and trainer.get("skipped_captures"):
        lines.append(
            f"trainer     skipped {_text(trainer, 'skipped_captures')} capture(s), last at step "
            f"{_text(trainer, 'last_skip_step')}: {_text(trainer, 'last_skip_reason')}"
        )
    error = status.get("last_error")
    lines.append(f"last error  {error if isinstance(error, str) and error else 'none'}")
    # Every field came from a file anyone may write: no escape sequence reaches the terminal.
    return [printable(line) for line in lines]


def render_screen(statuses: Iterable[Status], interval: float, now: float) -> list[str]:
    """The whole screen: a header, then one block per run, a blank line between blocks."""
    clock = time.strftime("%H:%M:%S", time.localtime(now))
    lines = [f"ckptd status --watch   {clock}   every {interval:g} s   Ctrl-C to stop", ""]
    blocks = [render(status) for status in statuses]
    for i, block in enumerate(blocks):
        lines += ([""] if i else []) + block
    if not blocks:
        lines.append("no run to show")
    return lines


def summary(status: Status) -> str:
    """One compact line for a log: nothing in it moves while the run stands still."""
    if _float(status.get("heartbeat_age_s")) is None:
        state = "no daemon"
    elif status.get("alive") is True:
        state = "running"
    else:
        state = f"NOT RUNNING ({_dead_state(status)})"
    parts = [_text(status, "run_dir"), state]
    if state != "no daemon":
        bests = status.get("bests")
        shown = [
            f"{metric}={_metric(best.get('value'))}@{_text(best, 'step')}"
            for metric, best in (bests.items() if isinstance(bests, dict) else ())
            if isinstance(best, dict)
        ]
        lag = _int(status.get("log_lag_bytes"))
        parts += [
            "lag " + ("?" if lag is None else format_bytes(lag)),
            "best " + (", ".join(shown) or "none"),
            "last " + _verdict(status.get("last_verdict"), long=False),
            "persists " + _persists(status),
        ]
        error = status.get("last_error")
        if isinstance(error, str) and error:
            parts.append(f"error: {error}")
    return printable("  ".join(parts))  # one line, whatever newlines a field held


def json_key(status: Status) -> str:
    """What a JSON line is compared on: the status without the fields every heartbeat moves."""
    return json.dumps({k: v for k, v in status.items() if k not in VOLATILE}, sort_keys=True, default=str)


def _dead_state(status: Status) -> str:
    state = status.get("state")
    if state == "running":
        return "killed or crashed"  # a clean halt writes state=stopped
    return state if isinstance(state, str) else "?"


def _lag(status: Status) -> str:
    lag = _int(status.get("log_lag_bytes"))
    behind = _float(status.get("log_lag_seconds"))
    text = "unknown" if lag is None else f"{format_bytes(lag)} unread"
    return text + (f", {behind:.1f} s behind" if behind and math.isfinite(behind) else "")


def _verdict(verdict: object, *, long: bool) -> str:
    if not isinstance(verdict, dict):
        return "no verdict yet"
    text = f"step {_text(verdict, 'eval_step')}: {_text(verdict, 'action')}"
    return f"{text} ({_text(verdict, 'reason')})" if long else text


def _persists(status: Status) -> str:
    text = (
        f"{_text(status, 'persists_in_flight')} in flight, {_text(status, 'pending_acks')} ack(s) pending, "
        f"{_text(status, 'persisted')} persisted"
    )
    took = _float(status.get("last_persist_seconds"))
    if took is None or not math.isfinite(took):
        return text
    return text + (f" (last took {took:.1f} s)" if abs(took) < 1e6 else f" (last took {took:.3g} s)")


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    return "?" if isinstance(value, (dict, list)) or value is None else str(value)


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _metric(value: object) -> str:
    number = _float(value)
    return "?" if number is None else f"{number:.6g}"


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


# -- the loop ---------------------------------------------------------------------------------


def watch(
    statuses: Callable[[], list[Status]],
    *,
    interval: float = 1.0,
    as_json: bool = False,
    out: TextIO | None = None,
    tty: bool | None = None,
) -> int:
    """Show ``statuses()`` every ``interval`` seconds until Ctrl-C (or SIGTERM); returns 0.

    ``tty``: redraw in place (default: whether ``out`` is a terminal). Otherwise, and with
    ``as_json``, each run gets a line only when its line changed since the last one printed.
    """
    out = sys.stdout if out is None else out
    redraw = (out.isatty() if tty is None else tty) and not as_json
    previous: dict[str, str] = {}
    main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        if redraw:
            out.write(HIDE_CURSOR)
        while True:
            started = time.monotonic()
            shown = statuses()
            if redraw:
                screen = render_screen(shown, interval, time.time())
                out.write(CLEAR + "\n".join(screen) + "\n")
            else:
                for status in shown:
                    key = json_key(status) if as_json else summary(status)
                    if previous.get(str(status.get("run_dir"))) == key:
                        continue
                    previous[str(status.get("run_dir"))] = key
                    if as_json:
                        out.write(json.dumps(json_safe(status)) + "\n")
                    else:
                        out.write(time.strftime("%H:%M:%S ") + key + "\n")
            out.flush()
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # `ckptd status --watch | head`: the reader left; nothing more to say, and Python's
        # flush at exit must not complain either.
        _quiet_stdout(out)
        return 0
    finally:
        if main:
            signal.signal(signal.SIGTERM, old_term)
        if redraw:
            try:
                out.write(SHOW_CURSOR)
                out.flush()
            except OSError:
                pass


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _quiet_stdout(out: TextIO) -> None:
    if out is sys.stdout:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
