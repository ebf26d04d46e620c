"""Event sources: everything the daemon reads log events from, behind one small interface.

Most logs are lines appended to a file (JSONL, CSV, stdout, regex): a
``LineSource`` pairs the ``LogFollower`` with a line format. Some are not:
a ``trainer_state.json`` is rewritten whole, TensorBoard writes binary records
into files that appear in a directory. Each of those is its own source.

The daemon first calls ``read_history`` until ``history_done`` (what the log held when the
source was opened: it establishes bests, nothing is judged as news), then ``read_events`` for
everything after; it saves ``cursor`` and shows ``lag_bytes``, ``notes`` and
``metric_names_seen`` in its status.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from ckptd.errors import MalformedLine
from ckptd.logs.follow import Cursor, HistoryEnd, LogFollower
from ckptd.logs.jsonl import LineCounter
from ckptd.records import LogEvent

logger = logging.getLogger("ckptd.logs")

_PREVIEW_BYTES = 200
MAX_NAMES_SEEN = 64
# Lines at the start of a log looked at whole (never again after): enough to see what a log
# holds, and to tell a log of the wrong format, at a cost that does not grow with the log.
_SAMPLE_LINES = 100
# Unreadable lines, with no event among them, after which the format is said to be wrong.
UNUSABLE_AFTER = 20


class LineFormat(Protocol):
    """Turns one line into an event; ``None`` for lines with nothing to judge."""

    name: str

    def parse(self, line: bytes) -> LogEvent | None:
        """Raise ``MalformedLine`` for a line that cannot be read."""
        ...


class EventSource(Protocol):
    """What the daemon follows.

    History and live: the content the log held when the source was opened is its history.
    Call ``read_history`` until ``history_done``, then ``read_events``: an eval appended while
    a long history is read comes from ``read_events``, so it gets a verdict. ``history_done``
    may turn False again when an auto-detected source re-detects its format (it then reads the
    log again from the start): check it before each pass of ``read_events``.
    """

    name: str
    watch_path: Path  # what the ChangeWatcher watches
    watch_children: bool  # True: watch_path is a directory whose files change

    @property
    def malformed(self) -> LineCounter:
        """Unreadable lines counted by kind (shown in status)."""
        ...

    def read_history(self) -> list[LogEvent]:
        """Events from the next stretch of the history (bounded memory, like ``read_events``);
        ``[]`` once ``history_done``."""
        ...

    @property
    def history_done(self) -> bool:
        """True once everything before the history boundary was read (at once when there was
        no content, or when resuming from a cursor at or after it)."""
        ...

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

    def lag_bytes(self) -> int | None:
        """Bytes written but not read yet (None where that cannot be told)."""
        ...

    def metric_names_seen(self) -> frozenset[str]:
        """A bounded sample (at most 64) of the metric names the log holds: what to name when a
        watched metric never appears."""
        ...

    def notes(self) -> list[str]:
        """Advice about the log as it is now (each also logged once at WARNING): the trainer
        still writing to a rotated file, stdout giving no steps, a format that reads nothing."""
        ...

    def close(self) -> None: ...


class NameSample:
    """At most ``MAX_NAMES_SEEN`` metric names, the first ones met: cheap to feed, never grows."""

    def __init__(self) -> None:
        self._names: set[str] = set()

    def add(self, names: Iterable[str]) -> None:
        if len(self._names) < MAX_NAMES_SEEN:
            for name in names:
                self._names.add(name)
                if len(self._names) >= MAX_NAMES_SEEN:
                    return

    def add_events(self, events: list[LogEvent]) -> None:
        if len(self._names) < MAX_NAMES_SEEN:
            for event in events:
                self.add(event.metrics)

    def frozen(self) -> frozenset[str]:
        return frozenset(self._names)


class LineSource:
    """A growing text file read line by line through ``fmt``."""

    watch_children = False

    def __init__(
        self,
        path: Path,
        fmt: LineFormat,
        cursor: Mapping[str, Any] | None = None,
        max_line_bytes: int = 1 << 20,
        *,
        history: HistoryEnd | bool | None = True,
        rotation_quiet_s: float | None = None,
    ) -> None:
        """``history``: see :class:`LogFollower` (True: the file's size now is the boundary)."""
        self.name = fmt.name
        self.watch_path = path
        self.format = fmt
        self.malformed = LineCounter()
        resume = line_cursor(cursor)
        quiet = {} if rotation_quiet_s is None else {"rotation_quiet_s": rotation_quiet_s}
        self._follower = LogFollower(
            path, cursor=resume, max_line_bytes=max_line_bytes, history=history, **quiet
        )
        self.history_end: HistoryEnd | None = self._follower.history_end
        self._names = NameSample()
        self._events = 0  # events read so far
        self._lines = 0  # lines read so far (counted in C, never split for it)
        self._sampled = 0  # lines of the sample looked at whole
        self._sample_unusable = 0  # of those, lines the format cannot read at all
        self._first_unusable: bytes | None = None
        self._unusable_note: str | None = None

    @property
    def follower(self) -> LogFollower:
        return self._follower

    @property
    def behind(self) -> bool:
        return not self._follower.at_end

    @property
    def history_done(self) -> bool:
        return self._follower.history_done

    @property
    def events_read(self) -> int:
        return self._events

    def read_history(self) -> list[LogEvent]:
        """Events of the next ~1 MiB of the lines the file held when the source was opened."""
        return self._parse_blocks(self._follower.read_history_blocks())

    def read_events(self) -> list[LogEvent]:
        """Events of the next ~1 MiB of lines: a backlog (a late start) is judged as it is
        read, so the daemon's memory stays flat however long the log already is."""
        return self._parse_blocks(self._follower.read_blocks())

    def lag_bytes(self) -> int | None:
        return self._follower.lag_bytes()

    def metric_names_seen(self) -> frozenset[str]:
        return self._names.frozen()

    def notes(self) -> list[str]:
        found = [
            self._follower.special_note,
            self._follower.stalled_note,
            getattr(self.format, "note", None),
            self._unusable_note,
        ]
        return [note for note in found if note]

    @property
    def unusable(self) -> bool:
        """True while nothing read so far gave an event and what was read looks unreadable."""
        if self._events:
            return False
        if self._sampled >= UNUSABLE_AFTER and self._sample_unusable * 10 >= self._sampled * 9:
            return True
        bad = sum(self.malformed.counts.values())
        return bad >= UNUSABLE_AFTER and bad * 10 >= self._lines * 9

    def _parse_blocks(self, blocks: list[bytes]) -> list[LogEvent]:
        events: list[LogEvent] = []
        for block in blocks:
            self._lines += block.count(b"\n") + 1
            if self._sampled < _SAMPLE_LINES:
                self._sample(block)
            self._parse_block(block, events)
        if self._follower.skipped_long_lines:  # counted where every unreadable line is seen
            self.malformed.counts["too-long"] = self._follower.skipped_long_lines
        self._events += len(events)
        self._names.add_events(events)
        if self._unusable_note is None and self.unusable:
            self._warn_unusable()
        return events

    def _sample(self, block: bytes) -> None:
        # The first lines are looked at whole, once: a format that picks its lines out of a
        # block (JSONL) never sees the others, so this is where it learns their names.
        names_of = getattr(self.format, "metric_names", None)
        if names_of is None:
            self._sampled = _SAMPLE_LINES
            return
        for line in block.split(b"\n", _SAMPLE_LINES - self._sampled)[: _SAMPLE_LINES - self._sampled]:
            if not line.strip():
                continue
            self._sampled += 1
            names = names_of(line)
            if names is None:
                self._sample_unusable += 1
                self._first_unusable = self._first_unusable or line[:_PREVIEW_BYTES]
            else:
                self._names.add(names)

    def _warn_unusable(self) -> None:
        bad = sum(self.malformed.counts.values()) or self._sample_unusable
        preview = self._first_unusable or self.malformed.first_preview or b""
        self._unusable_note = (
            f"{self.watch_path}: read as {self.name}, {bad} lines so far gave nothing: none is "
            f"{self.name}; the first looks like {preview[:80]!r}. Is --format right?"
        )
        logger.warning("%s", self._unusable_note)

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


def line_cursor(data: Mapping[str, Any] | None) -> Cursor | None:
    """A saved line cursor, or None when there is none or it belongs to another kind of source."""
    if not data or data.get("kind", "line") != "line":
        return None
    try:
        return Cursor.from_json({k: v for k, v in data.items() if k != "kind"})
    except ValueError:
        return None
