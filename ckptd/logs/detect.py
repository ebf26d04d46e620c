"""Choosing the event source for a log: ``--format NAME``, or detected from the name and first bytes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ckptd.errors import ConfigError
from ckptd.logs.jsonl import JsonlFormat
from ckptd.logs.source import EventSource, LineSource

FORMATS = ("auto", "jsonl")


def open_source(
    path: Path,
    log_format: str = "auto",
    *,
    watched: Sequence[str] = (),
    step_key: str | None = None,
    cursor: Mapping[str, Any] | None = None,
) -> EventSource:
    """The source that reads ``path`` in ``log_format`` (``auto``: detected)."""
    if log_format not in FORMATS:
        raise ConfigError(f"unknown log format {log_format!r}; known: {', '.join(FORMATS)}")
    return LineSource(path, JsonlFormat(step_key, watched), cursor)
