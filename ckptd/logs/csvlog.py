"""Lightning ``CSVLogger`` output (``metrics.csv``) to log events.

The file starts with a header naming the columns (sorted, ``step`` among them, e.g.
``epoch,lr,step,train_loss,val_acc,val_loss``); each row after it is one ``log_metrics`` call
and is sparse: a validation row leaves the training columns empty and vice versa. An empty
cell is an absent metric, not 0. The step is the ``step`` column as Lightning writes it (for a
validation run after global step 50 it writes 49).

When a metric name appears that the header lacks, Lightning rewrites the whole file, in place,
with a new header. :class:`~ckptd.logs.follow.LogFollower` usually sees the rewrite (the file
shrank, or its first 64 bytes changed, or the old offset is no line start) and reads the file
again from its start, so this format meets the new header first. When it does not (a header
longer than 64 bytes changed after them, and the offset happens to fall at a line start), a row
whose cell count does not match the header makes this format read line 1 of the file again:
a new header there is taken, and the row is read by it. Rows read again after a rewrite (the
same step and values as one already returned) are not returned twice.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptd.errors import MalformedLine
from ckptd.logs.jsonl import LineCounter, as_step, decode_text
from ckptd.logs.regex import parse_number
from ckptd.logs.source import LineSource
from ckptd.records import LogEvent

logger = logging.getLogger("ckptd.logs")

_STEP_COLUMN = "step"
_HEADER_BYTES = 64 << 10  # a header longer than this is not Lightning's
_REMEMBERED_ROWS = 4096  # rows remembered to drop their repeats after a rewrite


class LightningCsvFormat:
    """Parses one ``metrics.csv`` line: a header is remembered, a row becomes a :class:`LogEvent`."""

    name = "lightning-csv"

    def __init__(self, path: Path | None = None) -> None:
        """``path``: the file, to read its header again when a row does not fit the one known."""
        self._path = path
        self._columns: list[str] | None = None
        self._returned: set[tuple[int, tuple[tuple[str, float], ...]]] = set()
        self._order: deque[tuple[int, tuple[tuple[str, float], ...]]] = deque()

    def parse(self, line: bytes) -> LogEvent | None:
        text = decode_text(line)
        if not text.strip():
            return None
        cells = _cells(text)
        if _is_header(cells):
            self._columns = cells
            return None
        if self._columns is None:
            raise MalformedLine("no-header", "a row came before any header line naming the columns")
        if len(cells) != len(self._columns) and not self._reread_header(len(cells)):
            raise MalformedLine("csv", f"{len(cells)} cells, but the header has {len(self._columns)}")
        event = self._event(dict(zip(self._columns, cells, strict=True)))
        return event if self._first_time(event) else None

    def _reread_header(self, cells: int) -> bool:
        """Take the file's line 1 when it is a header that fits a row of ``cells`` cells: the
        file was rewritten with a new column, unseen by the follower."""
        if self._path is None:
            return False
        try:
            with self._path.open("rb") as file:
                first = file.read(_HEADER_BYTES).partition(b"\n")[0].rstrip(b"\r")
            header = _cells(decode_text(first))
        except (OSError, MalformedLine):
            return False
        if not _is_header(header) or len(header) != cells:
            return False
        self._columns = header
        return True

    def _first_time(self, event: LogEvent) -> bool:
        """False for a row returned before (read again after a rewrite); remembers a bounded few."""
        key = (event.step, tuple(sorted(event.metrics.items())))
        if key in self._returned:
            return False
        self._returned.add(key)
        self._order.append(key)
        if len(self._order) > _REMEMBERED_ROWS:
            self._returned.discard(self._order.popleft())
        return True

    def _event(self, row: dict[str, str]) -> LogEvent:
        step = as_step(row[_STEP_COLUMN])
        if step is None:
            raise MalformedLine("csv", f"the step cell holds {row[_STEP_COLUMN]!r}, not a whole number >= 0")
        metrics: dict[str, float] = {}
        for column, cell in row.items():
            number = None if column == _STEP_COLUMN else parse_number(cell)
            if number is not None:
                metrics[column] = number
        return LogEvent(step, metrics)


def _cells(text: str) -> list[str]:
    try:
        # strict: a quote left open is an error, not a cell that silently runs to the line's end.
        return next(csv.reader([text], strict=True))
    except csv.Error as exc:
        raise MalformedLine("csv", f"not a CSV row: {exc}") from exc


def _is_header(cells: list[str]) -> bool:
    """A header names a ``step`` column and holds no number (every row holds at least its step)."""
    return _STEP_COLUMN in cells and all(parse_number(cell) is None for cell in cells)


_VERSION = "version_"
_METRICS = "metrics.csv"


def is_lightning_dir(path: Path) -> bool:
    """A Lightning ``lightning_logs/`` folder: so named, or holding ``version_N`` folders."""
    return path.name == "lightning_logs" or _newest_version(path) is not None


def _newest_version(folder: Path) -> str | None:
    """The ``version_N`` folder with the highest N, by name; None when there is none."""
    try:
        names = [entry.name for entry in os.scandir(folder) if entry.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return None
    versions = [(int(name[len(_VERSION) :]), name) for name in names if _is_version(name)]
    return max(versions)[1] if versions else None


def _is_version(name: str) -> bool:
    return name.startswith(_VERSION) and name[len(_VERSION) :].isdigit()


class LightningVersionsSource:
    """``metrics.csv`` of the newest ``version_N`` in a ``lightning_logs/`` folder, switching to a
    newer version when one appears (each new ``fit`` writes into the next version folder).

    The history is that file as it was at open; a version that appears later is live whole.
    The cursor is the line cursor of the file followed, with its ``file`` (``version_N/metrics.csv``):
    a saved cursor of another version is not used.
    """

    name = LightningCsvFormat.name
    watch_children = True

    def __init__(self, folder: Path, cursor: Mapping[str, Any] | None = None) -> None:
        self.watch_path = folder
        self._version = _newest_version(folder)
        saved = cursor if cursor and cursor.get("file") == self._file_name(self._version) else None
        self._inner = self._open(self._version, saved, history=True)

    @property
    def malformed(self) -> LineCounter:
        return self._inner.malformed

    @property
    def behind(self) -> bool:
        return self._inner.behind

    @property
    def history_done(self) -> bool:
        return self._inner.history_done

    def read_history(self) -> list[LogEvent]:
        return self._inner.read_history()

    def read_events(self) -> list[LogEvent]:
        newest = _newest_version(self.watch_path)
        if newest == self._version or self._inner.behind:
            return self._inner.read_events()
        # A newer version: finish the old file first, then read the new one from its start.
        events = self._inner.read_events()
        self._inner.close()
        logger.info("%s: following %s", self.watch_path, self._file_name(newest))
        self._version = newest
        self._inner = self._open(newest, None, history=False)
        return events + self._inner.read_events()

    def cursor(self) -> dict[str, Any] | None:
        inner = self._inner.cursor()
        return None if inner is None else {**inner, "file": self._file_name(self._version)}

    def lag_bytes(self) -> int | None:
        return self._inner.lag_bytes()

    def metric_names_seen(self) -> frozenset[str]:
        return self._inner.metric_names_seen()

    def notes(self) -> list[str]:
        waiting = [] if self._version else [f"waiting for {self.watch_path}/version_N/{_METRICS} to appear"]
        return waiting + self._inner.notes()

    def close(self) -> None:
        self._inner.close()

    def _file_name(self, version: str | None) -> str:
        return f"{version or _VERSION + '0'}/{_METRICS}"

    def _open(self, version: str | None, cursor: Mapping[str, Any] | None, *, history: bool) -> LineSource:
        path = self.watch_path / self._file_name(version)
        return LineSource(path, LightningCsvFormat(path), cursor, history=history or None)
