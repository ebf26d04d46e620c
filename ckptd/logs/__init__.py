"""Reading training logs: following a growing file and turning its lines into log events.

:class:`LogFollower` returns the complete new lines of one file (with a :class:`Cursor`
to resume after a restart), :class:`ChangeWatcher` says when to ask it, and each format
(:class:`JsonlFormat`, ...) parses one line into a :class:`~ckptd.records.LogEvent`.
"""

from __future__ import annotations

from ckptd.logs.detect import FORMATS, open_source
from ckptd.logs.follow import ChangeWatcher, Cursor, LogFollower
from ckptd.logs.jsonl import JsonlFormat, LineCounter
from ckptd.logs.source import EventSource, LineFormat, LineSource

__all__ = [
    "FORMATS",
    "ChangeWatcher",
    "Cursor",
    "EventSource",
    "JsonlFormat",
    "LineCounter",
    "LineFormat",
    "LineSource",
    "LogFollower",
    "open_source",
]
