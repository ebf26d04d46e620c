"""Hugging Face ``Trainer`` output to log events: its stdout, and its ``trainer_state.json``.

**Stdout** (:class:`HfStdoutFormat`). The Trainer prints every log as a Python dict literal,
through ``tqdm.write``, among its progress bars (lines full of ``\\r`` and ``ESC[A`` codes).
transformers 5.x prints the values as strings of 4 significant digits
(``{'eval_loss': '3.198', 'epoch': '0.1562'}``), 4.x printed floats, NaN and infinity as the
bare names ``nan``/``inf``. A value that is a number, or a string holding one, is a metric.
ms-swift's dicts carry their step (``'global_step/max_steps': '50/1200'``); HF's carry none, and
the step comes from the training progress bar (``N/TOTAL``). ``tqdm.write`` clears the bars,
prints the dict, then redraws the bars at once, so the first bar drawn *after* a dict shows the
exact global step it was logged at. The bar drawn before it does not: tqdm redraws at most every
0.1 s, so on fast steps it lags (in the transformers 5.19 fixture run, 39 of its 51 dicts would
come out 1 to 5 steps early). So a dict without a step waits for the next bar drawn at the left
margin; a nested bar (the evaluation bar, which tqdm draws a line lower and follows with a
cursor-up code) is passed over. A dict followed by another dict before any bar has no step we
can know: it is counted as ``MalformedLine("no-step")``, never guessed.

The wait costs no time for evaluations: the evaluation bar's own line ends the line that redraws
the training bar, in the same write. A training-log dict waits for the next ``\\n`` (its next
log). Limits: output without bars (``disable_tqdm=True``) gives no steps; a daemon restarted
between a dict and the redraw after it loses that dict, as the saved cursor is past it.

**trainer_state.json** (:class:`HfStateSource`). The Trainer rewrites this file whole, and only
when it saves a checkpoint: it is for history and catching up (a daemon started late), not for
catching a best between saves. A best at an eval step that is no save step appears in it only at
the next save, when its weights are gone; for that, follow a log written at every eval (stdout,
TensorBoard events, ms-swift's ``logging.jsonl``).
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import warnings
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptd.errors import MalformedLine
from ckptd.logs.jsonl import AUTO_STEP_KEYS, MS_SWIFT_STEP, LineCounter, as_metric, as_step
from ckptd.logs.regex import parse_number
from ckptd.records import LogEvent

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
_CURSOR_UP = "\x1b[A"
# tqdm's default bar: "<desc>: 10%|█▌   | 20/200 [00:00<00:01, 107.59it/s]".
_BAR = re.compile(r"\d%\|[^|]*\| *(\d+)/\d+ ")
_NAMED_FLOATS = {"nan": math.nan, "inf": math.inf}
_PREVIEW_BYTES = 200


class HfStdoutFormat:
    """Parses the Trainer's (or ms-swift's) console output, one physical line at a time."""

    name = "hf-stdout"

    def __init__(self) -> None:
        self._waiting: dict[str, float] | None = None  # metrics of a dict whose bar is not drawn yet
        # Completed events not returned yet: a line completes at most one in Trainer output,
        # but a hand-made or mixed log may complete two, and the second must not be lost.
        self._ready: deque[LogEvent] = deque()

    def parse(self, line: bytes) -> LogEvent | None:
        # Console output mixes sources; one undecodable byte in a warning must not hide a dict.
        text = line.decode("utf-8", errors="replace")
        problems = [problem for raw in text.split("\r") if (problem := self._segment(raw)) is not None]
        if problems:
            raise problems[0]
        return self._ready.popleft() if self._ready else None

    def _segment(self, raw: str) -> MalformedLine | None:
        """Take in what one carriage return drew; the problem to count, if any."""
        segment = _ANSI.sub("", raw).strip()
        if segment.startswith("{") and segment.endswith("}"):
            return self._on_dict(segment)
        bar = _BAR.search(segment)
        if bar is not None and self._waiting is not None and not raw.rstrip().endswith(_CURSOR_UP):
            self._ready.append(LogEvent(int(bar.group(1)), self._waiting))
            self._waiting = None
        return None

    def _on_dict(self, segment: str) -> MalformedLine | None:
        try:
            obj = _literal_dict(segment)
        except MalformedLine as exc:
            return exc
        own = _own_step(obj)
        metrics = _metrics(obj, skip=own[0] if own else None)
        if not metrics:
            return None
        if own is not None:
            self._ready.append(LogEvent(own[1], metrics))
            return None
        abandoned, self._waiting = self._waiting, metrics
        if abandoned is None:
            return None
        return MalformedLine("no-step", "a metrics dict with no step key was not followed by a progress bar")


class _NamedFloats(ast.NodeTransformer):
    """Turns the bare names ``nan`` and ``inf``, as Python prints those floats, into constants."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id not in _NAMED_FLOATS:
            return node
        return ast.copy_location(ast.Constant(_NAMED_FLOATS[node.id]), node)


def _literal_dict(text: str) -> dict[Any, Any]:
    """The dict that ``text`` prints, read as a literal (never evaluated as code)."""
    try:
        with warnings.catch_warnings():
            # A stray backslash in a printed string ("\e") is the trainer's text, not our code.
            warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
            value = ast.literal_eval(_NamedFloats().visit(ast.parse(text, mode="eval")))
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as exc:
        raise MalformedLine("dict", f"looks like a printed dict but is no Python literal: {exc}") from exc
    if not isinstance(value, dict):
        raise MalformedLine("dict", f"expected a dict literal, got a {type(value).__name__}")
    return value


def _own_step(obj: dict[Any, Any]) -> tuple[str, int] | None:
    """The key and value of a step the dict carries itself (ms-swift's ``global_step/max_steps``)."""
    for key in AUTO_STEP_KEYS:
        value = obj.get(key)
        if key == MS_SWIFT_STEP and isinstance(value, str):
            value = value.partition("/")[0]
        step = as_step(value)
        if step is not None:
            return key, step
    return None


def _metrics(obj: dict[Any, Any], skip: str | None) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for key, value in obj.items():
        number = parse_number(value) if isinstance(value, str) else as_metric(value)
        if isinstance(key, str) and key != skip and number is not None:
            metrics[key] = number
    return metrics


class HfStateSource:
    """The ``log_history`` entries of one ``trainer_state.json`` that are newer than the last returned."""

    name = "hf-state"
    behind = False  # reads everything new at once: these logs are small
    watch_children = False

    def __init__(self, path: Path, cursor: Mapping[str, Any] | None = None) -> None:
        self.watch_path = Path(path)
        self.malformed = LineCounter()
        self._last_step = _resume_step(cursor)  # the highest step returned; None before any
        self._seen: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) last read

    def read_events(self) -> list[LogEvent]:
        data = self._read_if_changed()
        if not data:  # unchanged, missing, or truncated an instant before being written again
            return []
        try:
            history = _log_history(data)
        except MalformedLine as exc:
            # Most likely caught half-written: the end of the write changes the file, and we read again.
            self.malformed.record(exc, data[:_PREVIEW_BYTES])
            return []
        last = self._last_step
        events = [event for event in history if last is None or event.step > last]
        if events:
            self._last_step = max(event.step for event in events)
        return events

    def cursor(self) -> dict[str, Any] | None:
        return None if self._last_step is None else {"kind": self.name, "step": self._last_step}

    def close(self) -> None:
        """Nothing to release: the file is opened only while it is read."""

    def _read_if_changed(self) -> bytes | None:
        try:
            with self.watch_path.open("rb") as file:
                st = os.fstat(file.fileno())
                signature = (st.st_ino, st.st_size, st.st_mtime_ns)
                if signature == self._seen:
                    return None
                # Recorded before reading: a write that lands during the read changes the file
                # again, so the next call reads the finished version.
                self._seen = signature
                return file.read()
        except FileNotFoundError:
            return None


def _resume_step(cursor: Mapping[str, Any] | None) -> int | None:
    if not cursor or cursor.get("kind") != HfStateSource.name:
        return None
    return as_step(cursor.get("step"))


def _log_history(data: bytes) -> list[LogEvent]:
    try:
        state = json.loads(data)
    except (ValueError, RecursionError) as exc:  # ValueError covers JSONDecodeError and bad UTF-8
        raise MalformedLine("json", f"not valid JSON: {exc}") from exc
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise MalformedLine("json", "no log_history list: not a trainer_state.json")
    return [event for entry in history if (event := _entry_event(entry)) is not None]


def _entry_event(entry: object) -> LogEvent | None:
    if not isinstance(entry, dict):
        return None
    step = as_step(entry.get("step"))
    if step is None:
        return None
    metrics = {key: as_metric(value) for key, value in entry.items() if key != "step"}
    return LogEvent(step, {key: number for key, number in metrics.items() if number is not None})
