"""Choosing the event source for a log: ``--format NAME``, or detected from its name and first bytes.

Detection looks at the name first (``*.jsonl``, ``metrics.csv``, ``trainer_state.json``,
``events.out.tfevents.*`` or a directory of them, a Lightning ``lightning_logs/`` directory),
then at the first complete non-blank lines of the file (a line still being written waits for
its newline). A JSON line without a step is what HF stdout may print first (a config): the
next line tells. A log that does not exist yet, or is still empty, is detected when its first
line lands: until then the source reads nothing. When every line read in the detected format
turns out unreadable, the format is detected again from a vote over the first lines.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.errors import ConfigError
from ckptd.logs.csvlog import LightningCsvFormat, LightningVersionsSource, is_lightning_dir
from ckptd.logs.follow import HistoryEnd, history_end_at
from ckptd.logs.hf import BAR, HfStateSource, HfStdoutFormat
from ckptd.logs.jsonl import AUTO_STEP_KEYS, JsonlFormat, LineCounter
from ckptd.logs.regex import RegexFormat
from ckptd.logs.source import EventSource, LineFormat, LineSource, line_cursor
from ckptd.records import LogEvent

log = logging.getLogger("ckptd.logs")

FORMATS = ("auto", "jsonl", "hf-stdout", "hf-state", "lightning-csv", "tensorboard", "regex")
_TB_PREFIX = "events.out.tfevents."
_FILE_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".json", ".log", ".txt")
_SNIFF_BYTES = 64 << 10
_SNIFF_LINES = 20  # complete lines looked at
_WHOLE_FILE_FORMATS = frozenset({"hf-state", "tensorboard"})  # not read by lines: no byte boundary


def open_source(
    path: Path,
    log_format: str = "auto",
    *,
    watched: Sequence[str] = (),
    step_key: str | None = None,
    regex: str | None = None,
    cursor: Mapping[str, Any] | None = None,
) -> EventSource:
    """The source that reads ``path`` in ``log_format`` (``auto``: detected, now or when it appears)."""
    if log_format not in FORMATS:
        raise ConfigError(f"unknown log format {log_format!r}; known: {', '.join(FORMATS)}")
    if regex is not None and log_format not in ("auto", "regex"):
        raise ConfigError(f"--regex reads the log as 'regex', not {log_format!r}")
    if log_format == "regex" and regex is None:
        raise ConfigError("--format regex needs --regex PATTERN with a (?P<step>...) group")
    options = _Options(tuple(watched), step_key, regex, cursor)
    if regex is not None:
        return options.build(path, "regex")
    if log_format == "auto":
        # Deferred even when the format is told at once: it may be told again (re-detection).
        return _DeferredSource(path, options)
    if log_format == "tensorboard" and not path.exists() and not path.name.startswith(_TB_PREFIX):
        # A runs/ folder not created yet: wait for it, rather than read a file of that name.
        return _DeferredSource(path, options, wanted=log_format)
    return options.build(path, log_format)


def detect_format(path: Path, *, settle: bool = False, vote: bool = False) -> str | None:
    """The format of ``path`` judged from its name and first lines; None while that cannot be told.

    ``settle``: decide on what there is, a line still being written included (history must be
    read now). ``vote``: decide by the kind most of the first lines are (re-detection).
    """
    by_name = _format_by_name(path)
    if by_name is not None or path.is_dir():
        return by_name
    lines = _first_lines(path, settle)
    if not lines:
        return None
    kinds = [_kind(line) for line in lines]
    if kinds[0] == "csv-header":
        return "lightning-csv"
    if vote:
        json_lines = sum(kind.startswith("json") for kind in kinds)
        return "jsonl" if json_lines * 2 > len(kinds) else "hf-stdout"
    if kinds[0] == "json-step":
        return "jsonl"
    if kinds[0] == "json":
        # A JSON object without a step: JSONL, or a config HF stdout printed first. The next tells.
        if len(kinds) == 1:
            return "jsonl" if settle else None
        return "jsonl" if kinds[1].startswith("json") else "hf-stdout"
    return "hf-stdout"  # dicts, warnings and progress bars: the Trainer's stdout


def _kind(line: bytes) -> str:
    """What one line looks like: ``json-step``, ``json``, ``csv-header``, ``dict-or-bar``, ``text``."""
    if line.startswith(b"{"):
        try:
            obj = json.loads(line)
        except ValueError:
            return "dict-or-bar"  # Python dict literals ({'loss': ...}) are not JSON
        if isinstance(obj, dict):
            return "json-step" if any(key in obj for key in AUTO_STEP_KEYS) else "json"
        return "text"
    if b"," in line and b"step" in line.split(b","):
        return "csv-header"
    if BAR.search(line.decode("utf-8", errors="replace")):
        return "dict-or-bar"
    return "text"


def _format_by_name(path: Path) -> str | None:
    name = path.name
    if path.is_dir():
        if is_lightning_dir(path):
            return "lightning-csv" if any(path.glob("version_*/metrics.csv")) else None
        if path.suffix in _FILE_SUFFIXES:
            return None  # logging.jsonl/ briefly a folder: a file is coming, not TensorBoard
        return "tensorboard"
    if name.startswith(_TB_PREFIX):
        return "tensorboard"
    if name == "trainer_state.json":
        return "hf-state"
    if path.suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if path.suffix == ".csv":
        return "lightning-csv"
    return None


def _first_lines(path: Path, settle: bool) -> list[bytes]:
    """The first complete non-blank lines, stripped (with ``settle``, an unterminated one too)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return []
    lines = head.split(b"\n")
    if not settle:
        lines = lines[:-1]  # the part after the last newline is being written
    return [line.strip() for line in lines if line.strip()][:_SNIFF_LINES]


@dataclass(frozen=True)
class _Options:
    """What every source needs besides its path, kept until the format is known."""

    watched: tuple[str, ...]
    step_key: str | None
    regex: str | None
    cursor: Mapping[str, Any] | None

    def build(
        self, path: Path, log_format: str, history: HistoryEnd | bool | None = True, fresh: bool = False
    ) -> EventSource:
        """``history``: True when the content there now is history; for a source built later, what
        was there when the first one opened. ``fresh``: read from the start (no cursor)."""
        cursor = None if fresh else self.cursor
        if log_format == "tensorboard":
            from ckptd.logs.tensorboard import TensorBoardSource  # an optional extra, ~20 MiB

            return TensorBoardSource(path, cursor, history=history is True)
        if log_format == "hf-state":
            return HfStateSource(path, cursor, history=history is True)
        if log_format == "lightning-csv" and path.is_dir():
            return LightningVersionsSource(path, cursor)
        formats: dict[str, Callable[[], LineFormat]] = {
            "jsonl": lambda: JsonlFormat(self.step_key, self.watched),
            "hf-stdout": HfStdoutFormat,
            "lightning-csv": lambda: LightningCsvFormat(path),
            "regex": lambda: RegexFormat(self.regex or ""),
        }
        return LineSource(path, formats[log_format](), cursor, history=history)


class _DeferredSource:
    """Reads nothing until the log can tell its format (``wanted``: until the path exists).

    Its history is what the log held when it opened: a source built later reads only that as
    history, so lines that land while detection waits are live.
    """

    def __init__(self, path: Path, options: _Options, wanted: str | None = None) -> None:
        self.watch_path = path
        self.watch_children = path.is_dir()
        self.name = wanted or "auto"
        self.malformed = LineCounter()
        self._options = options
        self._wanted = wanted
        self._inner: EventSource | None = None
        self._redetected = False
        self._history = history_end_at(path, line_cursor(options.cursor))
        self._had_content = self._history is not None or path.is_dir()
        self._opening = True
        self._open_inner(settle=False)  # told at once when the name or first lines tell
        self._opening = False

    @property
    def history_done(self) -> bool:
        if self._inner is not None:
            return self._inner.history_done
        return not self._had_content

    def read_history(self) -> list[LogEvent]:
        inner = self._open_inner(settle=True)
        if inner is None:
            self._had_content = False  # nothing to tell a format by: there is no history to read
            return []
        events = inner.read_history()
        self._maybe_redetect()
        return events

    def read_events(self) -> list[LogEvent]:
        inner = self._open_inner(settle=False)
        if inner is None:
            return []
        events = inner.read_events()
        self._maybe_redetect()
        return events

    @property
    def behind(self) -> bool:
        return self._inner is not None and self._inner.behind

    def cursor(self) -> dict[str, Any] | None:
        if self._inner is not None:
            return self._inner.cursor()
        saved = self._options.cursor  # not read yet: keep what a previous daemon saved
        return dict(saved) if saved else None

    def lag_bytes(self) -> int | None:
        if self._inner is not None:
            return self._inner.lag_bytes()
        return self._history.size if self._history else 0

    def metric_names_seen(self) -> frozenset[str]:
        return self._inner.metric_names_seen() if self._inner is not None else frozenset()

    def notes(self) -> list[str]:
        if self._inner is not None:
            return self._inner.notes()
        return [f"waiting for {self.watch_path} to appear"] if not self.watch_path.exists() else []

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()

    def _open_inner(self, *, settle: bool) -> EventSource | None:
        if self._inner is None:
            detected = self._detect(settle)
            if detected is None:
                return None
            log.info("%s: detected format %s", self.watch_path, detected)
            self._build(detected, fresh=False)
        return self._inner

    def _detect(self, settle: bool) -> str | None:
        if self._wanted is not None:
            return self._wanted if self.watch_path.exists() else None
        return detect_format(self.watch_path, settle=settle)

    def _build(self, log_format: str, *, fresh: bool) -> None:
        # Told at open: what is there now is history. Told later: only what was there at open
        # (a line log's size then; a folder or a trainer_state.json that appeared since: none).
        history: HistoryEnd | bool | None = True if self._opening else self._history
        if not self._opening and (self.watch_path.is_dir() or log_format in _WHOLE_FILE_FORMATS):
            history = False
        self._inner = self._options.build(self.watch_path, log_format, history, fresh=fresh)
        self.name, self.malformed = self._inner.name, self._inner.malformed
        self.watch_children = self._inner.watch_children

    def _maybe_redetect(self) -> None:
        """Once: when all the detected format read was unreadable, detect again by a vote over
        the first lines and, if that says otherwise, read the log again in that format."""
        inner = self._inner
        if self._redetected or self._wanted or not isinstance(inner, LineSource) or not inner.unusable:
            return
        self._redetected = True
        again = detect_format(self.watch_path, settle=True, vote=True)
        if again is None or again == inner.name:
            return
        log.warning(
            "%s: nothing read as %s was readable; reading it again as %s", self.watch_path, inner.name, again
        )
        inner.close()
        self._build(again, fresh=True)
