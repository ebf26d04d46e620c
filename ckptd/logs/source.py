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
        """Events from the next stretch of what appeared since the last call; never raises for
        bad content. A source may stop early to bound memory: then ``behind`` is True."""
        ...

    @property
    def behind(self) -> bool:
        """True when the last ``read_events`` left written content unread: call it again."""
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

    @property
    def behind(self) -> bool:
        return not self._follower.at_end

    def read_events(self) -> list[LogEvent]:
        """Events of the next ~1 MiB of lines: a backlog (a late start) is judged as it is
        read, so the daemon's memory stays flat however long the log already is."""
        events: list[LogEvent] = []
        for block in self._follower.read_blocks():
            self._parse_block(block, events)
        if self._follower.skipped_long_lines:  # counted where every unreadable line is seen
            self.malformed.counts["too-long"] = self._follower.skipped_long_lines
        return events

    def _parse_block(self, block: bytes, events: list[LogEvent]) -> None:
        # A line a format picked out of a block skips its filter a second time.
        parse = getattr(self.format, "parse_candidate", self.format.parse)
        for raw in self._candidates(block):
            line = self._follower.accept(raw)
            if line is None:
                continue
            try:
                event = parse(line)
            except MalformedLine as exc:
                self.malformed.record(exc, line[:_PREVIEW_BYTES])
                continue
            if event is not None:
                events.append(event)

    def _candidates(self, block: bytes) -> list[bytes]:
        # A format that can pick its lines out of a block (JSONL with watched metrics) is
        # asked to: most lines of a training log are never looked at one by one.
        pick = getattr(self.format, "candidate_lines", None)
        return pick(block) if pick is not None else block.split(b"\n")

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
