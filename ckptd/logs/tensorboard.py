"""TensorBoard event files (HF ``Trainer`` with ``report_to="tensorboard"``, ``SummaryWriter``) to log events.

The trainer appends TFRecord-framed ``Event`` protos to ``events.out.tfevents.*`` files; a new
file appears in the directory for every new writer (a new run, a restart). :class:`TensorBoardSource`
reads the records with tensorboard's own pure-Python record reader and turns the scalar summary
values into log events, one per step.

What it reads:

- ``path`` an existing directory: every ``events.out.tfevents.*`` file in it or in any folder
  below it, in path order, files that appear later from their start. Recursive because HF
  writes into ``<output_dir>/runs/<date>_<host>/``, a folder named only once training starts:
  ``--log runs`` follows every run under it.
- ``path`` anything else: that one event file (it may not exist yet).

Metric names are the tags as written (``eval/loss``); each ``eval/<name>`` tag also yields the
HF-compatible alias ``eval_<name>`` with the same value, so ``--metric eval_loss`` works on HF
TensorBoard output as on its JSON logs. Scalars are the old-style ``simple_value`` (HF, torch)
and new-style ``tensor`` values of the ``scalars`` plugin; every other summary (text, images,
histograms) is ignored. Values are floats as stored (float32 for ``simple_value``); NaN is kept.

A record cut short at the end of a file is being written: it is read, whole, on a later call.
A record that fails its checksum cannot be skipped reliably (its length may be the corrupt part),
so the rest of that file is counted once in :attr:`TensorBoardSource.malformed` and left; the
other files are still read. The reader cannot seek, so the cursor keeps the number of records
consumed per file, and a resumed source reads that many again without delivering them. The reader
checks CRCs in pure Python (about 2 MB/s): fine for scalar logs, slow for files full of images.

History is the records within the bytes each event file held when the source opened (a record is
its payload plus 16 bytes of framing, so the bytes consumed are known); files that appear later
are live.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from ckptd.errors import ConfigError, MalformedLine
from ckptd.logs.jsonl import LineCounter
from ckptd.logs.source import NameSample
from ckptd.records import LogEvent

logger = logging.getLogger("ckptd.logs")

EVENT_FILE_PREFIX = "events.out.tfevents."
_EVAL_PREFIX = "eval/"
_SCALARS_PLUGIN = "scalars"
# The stub reader's DataLossError for a record that ends before its length says; every other
# DataLossError is a failed checksum.
_TRUNCATED = "truncated record"
_PREVIEW_BYTES = 200
_RECORD_FRAMING = 16  # length (8) + its CRC (4) + the payload's CRC (4)

Metrics = dict[int, dict[str, float]]


class _TensorBoard(NamedTuple):
    """The few tensorboard entry points this module uses, imported once by :func:`_import_tensorboard`."""

    open_records: Callable[..., Any]
    errors: ModuleType
    parse_event: Callable[[bytes], Any]
    decode_error: type[Exception]
    make_ndarray: Callable[[Any], Any]


def _import_tensorboard() -> _TensorBoard:
    try:
        # The stub record reader, not event_file_loader.RawEventFileLoader: the loader imports
        # TensorFlow when it is installed (hundreds of MB in a daemon meant to stay small), and it
        # swallows a failed checksum like a truncated record, so corruption could not be counted.
        from google.protobuf.message import DecodeError
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.tensorflow_stub import errors
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New
        from tensorboard.util.tensor_util import make_ndarray
    except ImportError as exc:
        raise ConfigError(
            "reading TensorBoard logs needs the optional extra: pip install 'ckptd[tensorboard]'"
        ) from exc
    return _TensorBoard(PyRecordReader_New, errors, Event.FromString, DecodeError, make_ndarray)


@dataclass
class _EventFile:
    """Reading state of one event file."""

    records: int = 0  # records delivered so far, over restarts: what the cursor saves
    reader: Any = None  # opened on first read; reopened (from the start) after close()
    position: int = 0  # records the current reader has returned
    offset: int = 0  # bytes of the file those records take
    broken: bool = False
    scalar_tags: set[str] = field(default_factory=set)


class TensorBoardSource:
    """Scalars from the TensorBoard event files at ``path`` (a directory, or one file)."""

    name = "tensorboard"
    behind = False  # reads everything new at once: these logs are small

    def __init__(self, path: Path, cursor: Mapping[str, Any] | None = None, *, history: bool = True) -> None:
        """``history``: False when the files appeared after the daemon started (all are live)."""
        self._tb = _import_tensorboard()
        path = Path(path)
        self.watch_path = path
        self.watch_children = path.is_dir()
        self._dir = path if self.watch_children else path.parent
        self.malformed = LineCounter()
        self._files = {name: _EventFile(records=count) for name, count in _resume_counts(cursor).items()}
        self._names = NameSample()
        self._note: str | None = None  # set when the one file given is plainly no event file
        # The history: the bytes each event file held at open.
        files = self._event_files() if history else []
        self._history = {name: size for name in files if (size := self._size(name))}

    @property
    def history_done(self) -> bool:
        return not self._history

    def read_history(self) -> list[LogEvent]:
        """The records the event files held at open (all at once: these logs are small)."""
        merged: Metrics = {}
        history, self._history = self._history, {}
        for name, size in sorted(history.items()):
            state = self._files.setdefault(name, _EventFile())
            if not state.broken:
                self._read_file(name, state, merged, stop=size)
        return self._events(merged)

    def read_events(self) -> list[LogEvent]:
        self._history = {}
        merged: Metrics = {}
        for name in self._event_files():
            state = self._files.setdefault(name, _EventFile())
            if not state.broken:
                self._read_file(name, state, merged)
        return self._events(merged)

    def _events(self, merged: Metrics) -> list[LogEvent]:
        events = [LogEvent(step, metrics) for step, metrics in merged.items()]
        self._names.add_events(events)
        return events

    def lag_bytes(self) -> int | None:
        """Bytes of the event files past the records read (a file not read yet counts whole)."""
        lag = 0
        for name in self._event_files():
            state = self._files.get(name)
            lag += max(0, self._size(name) - (state.offset if state and state.reader else 0))
        return lag

    def metric_names_seen(self) -> frozenset[str]:
        return self._names.frozen()

    def notes(self) -> list[str]:
        return [self._note] if self._note else []

    def _size(self, name: str) -> int:
        try:
            return os.stat(self._dir / name).st_size
        except (FileNotFoundError, NotADirectoryError):
            return 0

    def cursor(self) -> dict[str, Any]:
        return {"kind": "tensorboard", "files": {name: state.records for name, state in self._files.items()}}

    def close(self) -> None:
        # The stub reader opens the file for each read, so a reader holds buffers, not descriptors.
        for state in self._files.values():
            state.reader = None

    def _event_files(self) -> list[str]:
        if not self.watch_children:
            return [self.watch_path.name]
        found = []
        for folder, subfolders, files in os.walk(self._dir):
            subfolders.sort()
            found += [
                os.path.relpath(os.path.join(folder, name), self._dir)
                for name in files
                if name.startswith(EVENT_FILE_PREFIX)
            ]
        return sorted(found)

    def _read_file(self, name: str, state: _EventFile, merged: Metrics, stop: int | None = None) -> None:
        """Read the new records of one file (only those within its first ``stop`` bytes)."""
        errors = self._tb.errors
        try:
            if state.reader is None:
                state.reader = self._tb.open_records(str(self._dir / name), 0, b"", None)
                state.position = state.offset = 0
            while stop is None or state.offset < stop:
                state.reader.GetNext()
                state.position += 1
                record = state.reader.record()
                state.offset += len(record) + _RECORD_FRAMING
                # A reader reopened after a restart passes over what was delivered before,
                # still reading it for the tags' metadata.
                fresh = state.position > state.records
                self._collect(record, state, merged if fresh else {})
                state.records = max(state.records, state.position)
        except (errors.OutOfRangeError, errors.NotFoundError):
            return  # the end of what is written so far, or a file deleted under us
        except errors.DataLossError as exc:
            if _TRUNCATED not in exc.message:
                state.broken = True
                state.reader = None
                problem = f"{name}: {exc.message}; the rest of this file is skipped"
                self.malformed.record(MalformedLine("tfrecord", problem), b"")
                if state.position == 0:
                    self._warn_format(name)

    def _warn_format(self, name: str) -> None:
        """Say once that the one file given is no event file: not named like one, and its very
        first record fails the TFRecord check (a JSONL or a CSV given with --format tensorboard)."""
        if self.watch_children or name.startswith(EVENT_FILE_PREFIX) or self._note is not None:
            return
        try:
            with (self._dir / name).open("rb") as file:
                head = file.read(80)
        except OSError:
            head = b""
        self._note = (
            f"{self.watch_path}: read as {self.name}, it gave nothing: it is no TensorBoard event file "
            f"(not named {EVENT_FILE_PREFIX}*, and its first record fails the TFRecord check); it "
            f"starts {head!r}. Is --format right?"
        )
        logger.warning("%s", self._note)

    def _collect(self, record: bytes, state: _EventFile, sink: Metrics) -> None:
        try:
            event = self._tb.parse_event(record)
        except self._tb.decode_error as exc:
            problem = MalformedLine("tfrecord", f"not an Event proto: {exc}")
            self.malformed.record(problem, record[:_PREVIEW_BYTES])
            return
        for value in event.summary.value:
            try:
                number = self._scalar(value, state.scalar_tags)
            except MalformedLine as exc:
                self.malformed.record(exc, value.tag.encode()[:_PREVIEW_BYTES])
                continue
            if number is not None and event.step >= 0:
                metrics = sink.setdefault(event.step, {})
                metrics[value.tag] = number
                if value.tag.startswith(_EVAL_PREFIX):
                    metrics["eval_" + value.tag.removeprefix(_EVAL_PREFIX)] = number

    def _scalar(self, value: Any, scalar_tags: set[str]) -> float | None:
        """The number a summary value holds, ``None`` for a value that is not a scalar."""
        kind = value.WhichOneof("value")
        if kind == "simple_value":
            return float(value.simple_value)
        if kind != "tensor":
            return None
        # Writers may put the plugin metadata on a tag's first value only: remember the tag.
        if value.metadata.plugin_data.plugin_name == _SCALARS_PLUGIN:
            scalar_tags.add(value.tag)
        elif value.tag not in scalar_tags:
            return None
        try:
            array = self._tb.make_ndarray(value.tensor)
            if array.size != 1:
                raise ValueError(f"shape {array.shape}")
            return float(array.reshape(-1)[0])
        except (TypeError, ValueError) as exc:
            raise MalformedLine("tfrecord", f"scalar {value.tag!r} is not one number: {exc}") from exc


def _resume_counts(cursor: Mapping[str, Any] | None) -> dict[str, int]:
    """Records consumed per file from a saved cursor.

    A bad entry reads that file again from its start: delivering an event twice is harmless (the
    daemon never judges a step twice), skipping one is not.
    """
    if not cursor or cursor.get("kind") != "tensorboard" or not isinstance(cursor.get("files"), Mapping):
        return {}
    return {
        name: count
        for name, count in cursor["files"].items()
        if isinstance(name, str) and isinstance(count, int) and not isinstance(count, bool) and count >= 0
    }
