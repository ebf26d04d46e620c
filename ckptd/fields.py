"""Typed, range-checked reading of the JSON files ckptd does not fully control.

Acks are written by the trainer, control and status by a daemon that may be of
another version, state and manifests by a daemon that may have been killed or a
user with an editor. Every reader goes through :class:`Fields`, so a wrong type
or a value out of range is one clear :class:`~ckptd.errors.ProtocolError` naming
the file and the field, never a ``TypeError`` from deep inside the daemon.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptd.errors import ProtocolError

# Identifiers that become part of a path (run ids, slot and ack names) are plain tokens:
# no separator, no dot-dot, nothing a shell or a filesystem would read specially.
TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_MAX_INT = 2**63 - 1  # what every consumer (struct, safetensors, os) can hold


def is_token(value: object) -> bool:
    return isinstance(value, str) and TOKEN.match(value) is not None


def is_count(value: object) -> bool:
    """An int >= 0 that is not a bool (JSON true is no step)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_INT


class Fields:
    """The fields of one JSON object read from ``path``; each accessor checks one field."""

    def __init__(self, path: Path | str, data: object) -> None:
        self.path = Path(path)
        if not isinstance(data, dict):
            raise ProtocolError(self.path, f"expected a JSON object, found {type(data).__name__}")
        self.data: Mapping[str, Any] = data

    def error(self, name: str, expected: str) -> ProtocolError:
        value = repr(self.data.get(name))
        shown = value if len(value) <= 60 else value[:57] + "..."
        return ProtocolError(self.path, f"field {name!r} must be {expected}, not {shown}")

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def flag(self, name: str) -> bool:
        """A boolean (absent: False)."""
        value = self.data.get(name, False)
        if not isinstance(value, bool):
            raise self.error(name, "true or false")
        return value

    def count(self, name: str, default: int | None = None) -> int:
        """An integer >= 0 (a step, a seq, a byte count)."""
        value = self.data.get(name)
        if value is None and default is not None:
            return default
        if not is_count(value):
            raise self.error(name, "an integer >= 0")
        assert isinstance(value, int)  # is_count said so; for the type checker
        return value

    def optional_count(self, name: str) -> int | None:
        return self.count(name) if self.has(name) else None

    def integer(self, name: str, default: int) -> int:
        """Any integer (a step that may be -1 for "none yet")."""
        value = self.data.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or abs(value) > _MAX_INT:
            raise self.error(name, "an integer")
        return value

    def number(self, name: str, default: float | None = None) -> float:
        """A finite number (a time, a value)."""
        value = self.data.get(name)
        if value is None and default is not None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(name, "a finite number")
        return float(value)

    def text(self, name: str, default: str | None = None) -> str:
        value = self.data.get(name)
        if value is None and default is not None:
            return default
        if not isinstance(value, str):
            raise self.error(name, "a string")
        return value

    def token(self, name: str) -> str:
        """A string that is safe as one path component (letters, digits, '_' and '-')."""
        value = self.data.get(name)
        if not is_token(value):
            raise self.error(name, "a plain identifier (letters, digits, '_', '-'; at most 64)")
        return str(value)

    def texts(self, name: str) -> tuple[str, ...]:
        """A list of strings (absent: empty)."""
        value = self.data.get(name)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(name, "a list of strings")
        return tuple(value)

    def mapping(self, name: str) -> Mapping[str, Any]:
        """A JSON object (absent: empty)."""
        value = self.data.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(name, "an object")
        return value

    def metrics(self, name: str) -> dict[str, float]:
        """``{metric: number}``; non-finite values travel as "nan"/"inf"/"-inf"."""
        out: dict[str, float] = {}
        for key, value in self.mapping(name).items():
            number = metric_value(value)
            if number is None:
                raise self.error(name, 'an object of numbers (or "nan", "inf", "-inf")')
            out[str(key)] = number
        return out


def metric_value(value: object) -> float | None:
    """A metric as JSON carries it: a number, or the repr of a non-finite float."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if value in ("nan", "inf", "-inf"):
        return float(str(value))
    return None
