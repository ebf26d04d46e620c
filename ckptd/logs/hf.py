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
cursor-up code) is passed over, and so is every bar that is not the training bar: the training
bar has no description (``Train`` in ms-swift) and the largest total (max_steps), which stays
the same while training runs; ``Writing model shards: 1/1``, ``Map: 400/400`` or a 4-batch
evaluation bar drawn at the margin say nothing about the step. A dict followed by another dict
before any bar has no step we can know, and neither has the second: with stdout block-buffered
(dicts arrive late, in bursts) the bar after a burst is far past it. Both are counted as
``MalformedLine("no-step")``, never guessed; when dicts keep coming without steps the format
sets :attr:`HfStdoutFormat.note`, logged once, saying how to fix the run.

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
import logging
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
from ckptd.logs.source import NameSample
from ckptd.records import LogEvent

logger = logging.getLogger("ckptd.logs")

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
_CURSOR_UP = "\x1b[A"
# tqdm's default bar: "<desc>: 10%|█▌   | 20/200 [00:00<00:01, 107.59it/s]".
BAR = re.compile(r"\d+%\|[^|]*\| *(\d+)/(\d+) ")
# Descriptions the training bar has: none (HF Trainer), "Train" (ms-swift).
_TRAINING_DESCRIPTIONS = frozenset({"", "train", "training"})
# Dicts without a step, none ever placed by a bar, after which stdout is said to give no steps.
NO_STEP_NOTE_AFTER = 3
NO_STEP_NOTE = (
    "{count} printed metrics dicts had no training progress bar drawn right after them, so "
    "their steps cannot be known: stdout is probably block-buffered (the dicts arrive late, in "
    "bursts) or the bars are off. Run python with -u (or set PYTHONUNBUFFERED=1), or point "
    "--log at the TensorBoard runs/ folder (report_to='tensorboard')"
)
_NAMED_FLOATS = {"nan": math.nan, "inf": math.inf}
_CHECKPOINT = "checkpoint-"
_STATE = "trainer_state.json"
_PREVIEW_BYTES = 200


class HfStdoutFormat:
    """Parses the Trainer's (or ms-swift's) console output, one physical line at a time."""

    name = "hf-stdout"

    def __init__(self) -> None:
        self._waiting: dict[str, float] | None = None  # metrics of a dict whose bar is not drawn yet
        self._waiting_late = False  # it came right after another dict: its bar tells nothing
        self._training_total: int | None = None  # the training bar's total, once one was drawn
        self._placed = 0  # dicts whose step came from the training bar
        self._no_step = 0
        self.note: str | None = None
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
        bar = BAR.search(segment)
        if bar is None or raw.rstrip().endswith(_CURSOR_UP) or not self._training_bar(segment, bar):
            return None
        metrics, self._waiting = self._waiting, None
        if metrics is None:
            return None
        if self._waiting_late:
            return self._count_no_step("a metrics dict came right after another: the bar after it is later")
        self._placed += 1
        self._ready.append(LogEvent(int(bar.group(1)), metrics))
        return None

    def _training_bar(self, segment: str, bar: re.Match[str]) -> bool:
        """Whether ``bar`` (drawn at the left margin) is the training bar: no description, or
        ms-swift's ``Train``, and a total no smaller than the largest such seen (max_steps)."""
        description = segment[: bar.start()].strip().rstrip(":").strip().lower()
        total = int(bar.group(2))
        if description not in _TRAINING_DESCRIPTIONS or total < (self._training_total or 0):
            return False
        self._training_total = total
        return True

    def _count_no_step(self, problem: str) -> MalformedLine:
        self._no_step += 1
        if self.note is None and self._placed == 0 and self._no_step >= NO_STEP_NOTE_AFTER:
            self.note = NO_STEP_NOTE.format(count=self._no_step)
            logger.warning("%s", self.note)
        return MalformedLine("no-step", problem)

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
        self._waiting_late = abandoned is not None
        if abandoned is None:
            return None
        return self._count_no_step("a metrics dict with no step key was not followed by a progress bar")


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
    """The ``log_history`` entries of one ``trainer_state.json`` that are newer than the last returned.

    ``path`` may be the Trainer's ``output_dir``: then the newest ``checkpoint-N/trainer_state.json``
    in it is read (transformers 5.x writes the file only there), switching as checkpoints appear.
    History is the file as it was when the source opened.
    """

    name = "hf-state"
    behind = False  # reads everything new at once: these logs are small

    def __init__(self, path: Path, cursor: Mapping[str, Any] | None = None, *, history: bool = True) -> None:
        """``history``: False when the file appeared after the daemon started (all of it is live)."""
        self.watch_path = Path(path)
        self.watch_children = self.watch_path.is_dir()
        self.malformed = LineCounter()
        self._last_step = _resume_step(cursor)  # the highest step returned; None before any
        self._seen: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) last read
        self._unreadable = False  # the last version read was no JSON: counted once until one is
        self._format_note: str | None = None  # set while the file read is plainly no trainer state
        self._format_warned = False
        self._names = NameSample()
        # The history: what the file held when the source opened (small: read now).
        self._history: bytes | None = _read_file(self._state_file()) if history else None

    @property
    def history_done(self) -> bool:
        return self._history is None

    def read_history(self) -> list[LogEvent]:
        """The entries of the file as it was at open, once (a version caught half-written
        is read again from the file as it is now: it was being written at open)."""
        data, self._history = self._history, None
        if data is None:
            return []
        try:
            return self._newer(_log_history(data))
        except MalformedLine:
            return self.read_events()

    def read_events(self) -> list[LogEvent]:
        self._history = None  # what is read now is past the history, whatever it held
        data = self._read_if_changed()
        if not data:  # unchanged, missing, or truncated an instant before being written again
            return []
        try:
            history = _log_history(data)
        except MalformedLine as exc:
            # Most likely caught half-written (the end of the write changes the file, and we read
            # again): one count per unreadable stretch, not one per version seen while it grows.
            if not self._unreadable:
                self.malformed.record(exc, data[:_PREVIEW_BYTES])
            self._unreadable = True
            if _no_state(data):
                self._warn_format(data)
            return []
        self._unreadable = False
        self._format_note = None
        return self._newer(history)

    def _newer(self, history: list[LogEvent]) -> list[LogEvent]:
        last = self._last_step
        events = [event for event in history if last is None or event.step > last]
        if events:
            self._last_step = max(event.step for event in events)
        self._names.add_events(events)
        return events

    def cursor(self) -> dict[str, Any] | None:
        return None if self._last_step is None else {"kind": self.name, "step": self._last_step}

    def lag_bytes(self) -> int | None:
        """0 when the file is unchanged since it was read, else its size (it is read whole)."""
        try:
            st = os.stat(self._state_file())
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return 0
        return 0 if (st.st_ino, st.st_size, st.st_mtime_ns) == self._seen else st.st_size

    def metric_names_seen(self) -> frozenset[str]:
        return self._names.frozen()

    def notes(self) -> list[str]:
        return [self._format_note] if self._format_note else []

    def close(self) -> None:
        """Nothing to release: the file is opened only while it is read."""

    def _warn_format(self, data: bytes) -> None:
        """Say (once in the log, in the notes while it lasts) that the file is no trainer state."""
        self._format_note = (
            f"{self.watch_path}: read as {self.name}, it gave nothing: {self._state_file().name} is no "
            f"trainer_state.json (a JSON object with a log_history list); it starts {data[:80]!r}. "
            "Is --format right?"
        )
        if not self._format_warned:
            self._format_warned = True
            logger.warning("%s", self._format_note)

    def _state_file(self) -> Path:
        """The file to read: ``path``, or in a directory its newest checkpoint's state."""
        if not self.watch_path.is_dir():
            return self.watch_path
        newest = max(
            (
                (int(folder.name.removeprefix(_CHECKPOINT)), folder)
                for folder in self.watch_path.glob(_CHECKPOINT + "*")
                if folder.name.removeprefix(_CHECKPOINT).isdigit() and (folder / _STATE).is_file()
            ),
            default=None,
        )
        return newest[1] / _STATE if newest else self.watch_path / _STATE

    def _read_if_changed(self) -> bytes | None:
        try:
            with self._state_file().open("rb") as file:
                st = os.fstat(file.fileno())
                signature = (st.st_ino, st.st_size, st.st_mtime_ns)
                if signature == self._seen:
                    return None
                # Recorded before reading: a write that lands during the read changes the file
                # again, so the next call reads the finished version.
                self._seen = signature
                return file.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None


def _read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes() or None
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def _resume_step(cursor: Mapping[str, Any] | None) -> int | None:
    if not cursor or cursor.get("kind") != HfStateSource.name:
        return None
    return as_step(cursor.get("step"))


def _no_state(data: bytes) -> bool:
    """True when ``data`` cannot be a ``trainer_state.json`` caught half-written (which is read
    again when it changes): it does not start as a JSON object, or it holds one JSON value and
    more after it (JSON lines), or it is whole JSON without a ``log_history`` list."""
    if not data.lstrip().startswith(b"{"):
        return True
    try:
        json.loads(data)
    except json.JSONDecodeError as exc:
        return exc.msg == "Extra data"
    except (ValueError, RecursionError):
        return False
    return True  # whole JSON, yet refused by _log_history


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
