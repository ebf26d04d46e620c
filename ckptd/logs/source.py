"""Event sources: everything the daemon reads log events from, behind one small interface.

Most logs are lines appended to a file (JSONL, CSV, stdout, regex): a
``LineSource`` pairs the ``LogFollower`` with a line format. Some are not:
a ``trainer_state.json`` is rewritten whole, TensorBoard writes binary records
into files that appear in a directory. Each of those is its own source. The
daemon only ever calls ``read_events`` and saves ``cursor``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from ckptd.errors import MalformedLine
from ckptd.logs.follow import Cursor, LogFollower
from ckptd.logs.jsonl import LineCounter
from ckptd.records import LogEvent

_PREVIEW_BYTES = 200


class LineFormat(Protocol):
    """Turns one line into an event; ``None`` for lines with nothing to judge."""

    name: str

    def parse(self, line: bytes) -> LogEvent | None:
        """Raise ``MalformedLine`` for a line that cannot be read."""
        ...


class EventSource(Protocol):
    """What the daemon follows."""

    name: str
    watch_path: Path  # what the ChangeWatcher watches
    watch_children: bool  # True: watch_path is a directory whose files change
    malformed: LineCounter

    def read_events(self) -> list[LogEvent]:
        """Events that appeared since the last call; never raises for bad content."""
        ...

    def cursor(self) -> dict[str, Any] | None:
        """JSON-able state to resume from after a restart."""
        ...

    def close(self) -> None: ...


class LineSource:
    """A growing text file read line by line through ``fmt``."""

    watch_children = False

    def __init__(
        self,
        path: Path,
        fmt: LineFormat,
        cursor: Mapping[str, Any] | None = None,
        max_line_bytes: int = 1 << 20,
    ) -> None:
        self.name = fmt.name
        self.watch_path = path
        self.format = fmt
        self.malformed = LineCounter()
        resume = _cursor_or_none(cursor)
        self._follower = LogFollower(path, cursor=resume, max_line_bytes=max_line_bytes)

    @property
    def follower(self) -> LogFollower:
        return self._follower

    def read_events(self) -> list[LogEvent]:
        events = []
        parse = self.format.parse
        for line in self._follower.read_lines():
            try:
                event = parse(line)
            except MalformedLine as exc:
                self.malformed.record(exc, line[:_PREVIEW_BYTES])
                continue
            if event is not None:
                events.append(event)
        return events

    def cursor(self) -> dict[str, Any] | None:
        cursor = self._follower.cursor
        return None if cursor is None else {"kind": "line", **cursor.to_json()}

    def close(self) -> None:
        self._follower.close()


def _cursor_or_none(data: Mapping[str, Any] | None) -> Cursor | None:
    """A saved line cursor, or None when there is none or it belongs to another kind of source."""
    if not data or data.get("kind", "line") != "line":
        return None
    try:
        return Cursor.from_json({k: v for k, v in data.items() if k != "kind"})
    except ValueError:
        return None
