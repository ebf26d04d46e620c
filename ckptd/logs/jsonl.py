"""JSON Lines logs (ms-swift's ``logging.jsonl`` or any one-object-per-line log) to log events.

One line is one JSON object; its step comes from a configured dotted key or, by default,
from ms-swift's ``"global_step/max_steps": "1050/2000"``, ``step`` or ``global_step``.
Every top-level number is a metric. Given the watched metric names, lines that do not
mention any of them are skipped before parsing (a key written with JSON escapes, which
no logger does for ASCII names, would be missed). Lines that cannot be read raise :class:`MalformedLine`
so the caller can count them (:class:`LineCounter`) and go on with the next one.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence

import orjson

from ckptd.errors import ConfigError, MalformedLine
from ckptd.records import LogEvent

logger = logging.getLogger("ckptd.logs")

MS_SWIFT_STEP = "global_step/max_steps"
AUTO_STEP_KEYS = (MS_SWIFT_STEP, "step", "global_step")
# Keys of ms-swift's (and HF's trainer_state.json) end-of-run summary: it repeats the
# whole history and carries a step, but it is not an eval to judge.
_SUMMARY_KEYS = frozenset({"log_history", "best_model_checkpoint", "last_model_checkpoint"})
_INTEGRAL_TEXT = re.compile(r"([0-9]+)(?:\.0*)?")
_PREVIEW_BYTES = 200
_DECODER = json.JSONDecoder()
_NUMBER_TYPES = (int, float)


def as_step(value: object) -> int | None:
    """A non-negative integer step from an int, or a float/str holding an exact integer."""
    # The common cases first, by exact type (bool is not int here): this runs per eval line.
    if type(value) is int:
        return value if value >= 0 else None
    if type(value) is str and value.isdigit() and value.isascii():
        return int(value)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() and value >= 0 else None
    if isinstance(value, str):
        match = _INTEGRAL_TEXT.fullmatch(value.strip())
        return int(match.group(1)) if match else None
    return None


def as_metric(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer beyond float range says nothing we could compare
        return None


class JsonlFormat:
    """Parses one JSONL line into a :class:`LogEvent`, or ``None`` when it carries no step."""

    name = "jsonl"

    def __init__(self, step_key: str | None = None, watched: Sequence[str] = ()) -> None:
        # Only a line that names a watched metric can change a verdict, so the others skip
        # json.loads: a substring test is ~20x cheaper, and most lines are training lines.
        self._needles = tuple(json.dumps(metric).encode() for metric in watched)
        self._watched = tuple(watched)
        self._step_path: tuple[str, ...] | None = None
        if step_key is not None:
            parts = tuple(step_key.split("."))
            if not all(parts):
                raise ConfigError(f"step key {step_key!r} has an empty part")
            self._step_path = parts

    def candidate_lines(self, block: bytes) -> list[bytes]:
        """The lines of ``block`` (lines joined by ``\\n``) that ``parse`` can turn into an event.

        With watched metrics, those naming one, found by ``bytes.find`` over the whole block
        so the other lines never become Python objects; non-ASCII lines too, so that
        garbage is still counted. In file order.
        """
        if not self._needles:
            return block.split(b"\n")
        found: dict[int, bytes] = {}
        for needle in self._needles:
            position = block.find(needle)
            while position >= 0:
                start = block.rfind(b"\n", 0, position) + 1
                end = block.find(b"\n", position)
                end = len(block) if end < 0 else end
                found[start] = block[start:end]
                position = block.find(needle, end)
        if not block.isascii():
            offset = 0
            for line in block.split(b"\n"):
                if not line.isascii():
                    found[offset] = line
                offset += len(line) + 1
        return [found[start] for start in sorted(found)]

    def parse(self, line: bytes) -> LogEvent | None:
        if self._needles and not any(needle in line for needle in self._needles):
            if not line.isascii():  # rare and cheap to check: garbage is still counted
                decode_text(line)
            return None
        return self.parse_candidate(line)

    def parse_candidate(self, line: bytes) -> LogEvent | None:
        """``parse`` for a line ``candidate_lines`` picked: the filter is already applied."""
        obj = _decode_object(line)
        if obj is None or not _SUMMARY_KEYS.isdisjoint(obj):
            return None
        found = self._find_step(obj)
        step = None if found is None else as_step(found[1])
        if found is None or step is None:
            if any(metric in obj for metric in self._watched):
                # A watched metric the daemon cannot place is a dropped eval: count it.
                raise MalformedLine("no-step", f"a line with a watched metric has no step: {found!r}")
            return None
        metrics = _metrics(obj, found[0])
        if self._watched and not any(metric in metrics for metric in self._watched):
            # A watched metric written as something else than a number is a dropped eval too.
            for metric in self._watched:
                value = obj.get(metric)
                if isinstance(value, str):
                    raise MalformedLine("string-metric", f"{metric} is a string, not a number")
                if isinstance(value, bool):
                    raise MalformedLine("bool-metric", f"{metric} is {json.dumps(value)}, not a number")
        return LogEvent(step, metrics)

    def metric_names(self, line: bytes) -> frozenset[str] | None:
        """The names of the numbers on ``line``; None when it is not a JSON object (unusable)."""
        try:
            obj = _decode_object(line)
        except MalformedLine:
            return None
        if obj is None:
            return frozenset()
        return frozenset(k for k, v in obj.items() if type(v) in _NUMBER_TYPES)

    def _find_step(self, obj: dict[str, object]) -> tuple[str, object] | None:
        """The top-level key the step came from and its raw value."""
        if self._step_path is not None:
            value: object = obj
            for part in self._step_path:
                if not isinstance(value, dict) or part not in value:
                    return None
                value = value[part]
            return self._step_path[0], value
        for key in AUTO_STEP_KEYS:
            if key in obj:
                value = obj[key]
                if key == MS_SWIFT_STEP and isinstance(value, str):
                    value = value.partition("/")[0]
                return key, value
        return None


def _metrics(obj: dict[str, object], step_key: str) -> dict[str, float]:
    try:
        # Exact types: json gives int and float, and bool (a subclass of int) is no metric.
        metrics = {k: float(v) for k, v in obj.items() if type(v) in _NUMBER_TYPES}  # type: ignore[arg-type]
    except OverflowError:  # an integer beyond float range: leave that one out
        metrics = {k: m for k, v in obj.items() if (m := as_metric(v)) is not None}
    metrics.pop(step_key, None)
    return metrics


def _decode_object(line: bytes) -> dict[str, object] | None:
    """The JSON object on ``line``; ``None`` for a blank line; :class:`MalformedLine` otherwise."""
    try:
        obj = orjson.loads(line)  # ~6x the stdlib's speed on a typical eval line
    except orjson.JSONDecodeError:
        # orjson is strict RFC 8259; Python loggers write NaN and Infinity, and a line may
        # be blank, carry a BOM or be garbage. The stdlib reads or names all of those.
        obj = _decode_leniently(line)
        if obj is None:
            return None
    if not isinstance(obj, dict):
        raise MalformedLine("not-object", f"expected a JSON object, got {_json_type(obj)}")
    return obj


def _decode_leniently(line: bytes) -> object:
    # NULs before a line: copytruncate with a writer that does not append leaves a hole
    # that reads as zeros up to its next write. The line after the hole is intact.
    text = decode_text(line.lstrip(b"\0")).strip()
    if not text:
        return None
    try:
        # raw_decode skips json.loads' own whitespace scans: ~35% faster per line.
        obj, end = _DECODER.raw_decode(text)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers too long to convert; RecursionError
        # a line nested thousands of levels deep.
        raise MalformedLine("json", f"not valid JSON: {exc}") from exc
    if end != len(text):
        raise MalformedLine("json", f"not valid JSON: extra data at column {end + 1}")
    return obj


def decode_text(line: bytes) -> str:
    try:
        text = line.decode()
    except UnicodeDecodeError as exc:
        raise MalformedLine("utf8", f"invalid UTF-8 at byte {exc.start}: {exc.reason}") from exc
    # A byte order mark at the start of the file is not part of the JSON. (Stripped by
    # hand: the utf-8-sig codec is a Python-level codec, 50x slower than utf-8.)
    return text[1:] if text.startswith("\ufeff") else text


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "a string" if isinstance(value, str) else "an array"


class LineCounter:
    """Counts malformed lines per kind and logs the first of each kind once ("ckptd.logs")."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.first_preview: bytes | None = None  # the start of the first line counted

    def record(self, error: MalformedLine, line_preview: bytes) -> None:
        if self.first_preview is None:
            self.first_preview = line_preview[:_PREVIEW_BYTES]
        seen = self.counts.get(error.kind, 0)
        self.counts[error.kind] = seen + 1
        if seen == 0:
            # One message per kind: a log full of bad lines must not flood the daemon's own log.
            logger.warning(
                "skipping malformed log line (%s): %s; line starts %r; later %r lines are only counted",
                error.kind,
                error.problem,
                line_preview[:_PREVIEW_BYTES],
                error.kind,
            )
