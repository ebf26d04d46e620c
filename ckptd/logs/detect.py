"""Choosing the event source for a log: ``--format NAME``, or detected from its name and first bytes.

Detection looks at the name first (``*.jsonl``, ``metrics.csv``, ``trainer_state.json``,
``events.out.tfevents.*`` or a directory of them), then at the first non-blank line of
the file. A log that does not exist yet, or is still empty, is detected when its first
line lands: until then the source reads nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.errors import ConfigError
from ckptd.logs.csvlog import LightningCsvFormat
from ckptd.logs.hf import HfStateSource, HfStdoutFormat
from ckptd.logs.jsonl import JsonlFormat, LineCounter
from ckptd.logs.regex import RegexFormat
from ckptd.logs.source import EventSource, LineSource
from ckptd.records import LogEvent

log = logging.getLogger("ckptd.logs")

FORMATS = ("auto", "jsonl", "hf-stdout", "hf-state", "lightning-csv", "tensorboard", "regex")
_TB_PREFIX = "events.out.tfevents."
_SNIFF_BYTES = 64 << 10


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
        detected = detect_format(path)
        return options.build(path, detected) if detected else _DeferredSource(path, options)
    return options.build(path, log_format)


def detect_format(path: Path) -> str | None:
    """The format of ``path`` judged from its name and first line; None while that cannot be told."""
    by_name = _format_by_name(path)
    if by_name is not None:
        return by_name
    first = _first_line(path)
    if first is None:
        return None
    if first.startswith(b"{"):
        try:
            json.loads(first)
        except ValueError:
            return "hf-stdout"  # Python dict literals ({'loss': ...}) are not JSON
        return "jsonl"
    if b"," in first and b"step" in first.split(b","):
        return "lightning-csv"
    return "hf-stdout"  # warnings and progress bars first: the Trainer's stdout


def _format_by_name(path: Path) -> str | None:
    name = path.name
    if path.is_dir() or name.startswith(_TB_PREFIX):
        return "tensorboard"
    if name == "trainer_state.json":
        return "hf-state"
    if path.suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if path.suffix == ".csv":
        return "lightning-csv"
    return None


def _first_line(path: Path) -> bytes | None:
    try:
        with path.open("rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except (FileNotFoundError, IsADirectoryError):
        return None
    for line in head.splitlines():
        if line.strip():
            return line.strip()
    return None


@dataclass(frozen=True)
class _Options:
    """What every source needs besides its path, kept until the format is known."""

    watched: tuple[str, ...]
    step_key: str | None
    regex: str | None
    cursor: Mapping[str, Any] | None

    def build(self, path: Path, log_format: str) -> EventSource:
        if log_format == "tensorboard":
            from ckptd.logs.tensorboard import TensorBoardSource  # an optional extra, ~20 MiB

            return TensorBoardSource(path, self.cursor)
        if log_format == "hf-state":
            return HfStateSource(path, self.cursor)
        formats = {
            "jsonl": lambda: JsonlFormat(self.step_key, self.watched),
            "hf-stdout": HfStdoutFormat,
            "lightning-csv": LightningCsvFormat,
            "regex": lambda: RegexFormat(self.regex or ""),
        }
        return LineSource(path, formats[log_format](), self.cursor)


class _DeferredSource:
    """Reads nothing until the log has a first line to detect its format from."""

    watch_children = False

    def __init__(self, path: Path, options: _Options) -> None:
        self.watch_path = path
        self.name = "auto"
        self.malformed = LineCounter()
        self._options = options
        self._inner: EventSource | None = None

    def read_events(self) -> list[LogEvent]:
        if self._inner is None:
            detected = detect_format(self.watch_path)
            if detected is None:
                return []
            log.info("%s: detected format %s", self.watch_path, detected)
            self._inner = self._options.build(self.watch_path, detected)
            self.name, self.malformed = self._inner.name, self._inner.malformed
        return self._inner.read_events()

    @property
    def behind(self) -> bool:
        return self._inner is not None and self._inner.behind

    def cursor(self) -> dict[str, Any] | None:
        if self._inner is not None:
            return self._inner.cursor()
        saved = self._options.cursor  # not read yet: keep what a previous daemon saved
        return dict(saved) if saved else None

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
