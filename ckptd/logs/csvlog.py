"""Lightning ``CSVLogger`` output (``metrics.csv``) to log events.

The file starts with a header naming the columns (sorted, ``step`` among them, e.g.
``epoch,lr,step,train_loss,val_acc,val_loss``); each row after it is one ``log_metrics`` call
and is sparse: a validation row leaves the training columns empty and vice versa. An empty
cell is an absent metric, not 0. The step is the ``step`` column as Lightning writes it (for a
validation run after global step 50 it writes 49).

When a metric name appears that the header lacks, Lightning rewrites the whole file, in place,
with a new header. :class:`~ckptd.logs.follow.LogFollower` sees the rewrite and reads the file
again from its start, so this format meets the new header first and maps the rows after it by
the new columns. The old rows come again as events; the daemon never judges a step twice, so
they change nothing.
"""

from __future__ import annotations

import csv

from ckptd.errors import MalformedLine
from ckptd.logs.jsonl import as_step, decode_text
from ckptd.logs.regex import parse_number
from ckptd.records import LogEvent

_STEP_COLUMN = "step"


class LightningCsvFormat:
    """Parses one ``metrics.csv`` line: a header is remembered, a row becomes a :class:`LogEvent`."""

    name = "lightning-csv"

    def __init__(self) -> None:
        self._columns: list[str] | None = None

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
        if len(cells) != len(self._columns):
            raise MalformedLine("csv", f"{len(cells)} cells, but the header has {len(self._columns)}")
        row = dict(zip(self._columns, cells, strict=True))
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
