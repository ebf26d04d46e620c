"""Any text log read through a user's regular expression: the escape hatch for logs no built-in format knows.

The pattern names the step with a group called ``step`` and every metric with a group of that
metric's name, e.g. ``step (?P<step>\\d+) .*eval_loss=(?P<eval_loss>[-+0-9.eE]+|nan)``. It is
searched for anywhere in the line (:func:`re.search`). A line it does not match carries nothing
to judge; a metric group that did not take part in the match, or whose text is no number, is left
out of the event. This module also holds :func:`parse_number`, the one rule by which the text
formats (this one, Lightning CSV, HF stdout) read a number written as text.
"""

from __future__ import annotations

import re

from ckptd.errors import ConfigError, MalformedLine
from ckptd.logs.jsonl import as_step, decode_text
from ckptd.records import LogEvent

_STEP_GROUP = "step"


def parse_number(text: str) -> float | None:
    """The float that ``text`` writes (``"3.9"``, ``"1.4e+04"``, ``"nan"``, ``"-inf"``); None if none."""
    try:
        return float(text)
    except ValueError:
        return None


class RegexFormat:
    """Parses the first match of a user regex in a line into a :class:`LogEvent`."""

    name = "regex"

    def __init__(self, pattern: str) -> None:
        try:
            self._regex = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"log regex {pattern!r} is not a valid regular expression: {exc}") from exc
        if _STEP_GROUP not in self._regex.groupindex:
            raise ConfigError(
                f"log regex {pattern!r} has no named group 'step': write (?P<step>\\d+) where the step is"
            )
        self._metrics = tuple(name for name in self._regex.groupindex if name != _STEP_GROUP)

    def parse(self, line: bytes) -> LogEvent | None:
        match = self._regex.search(decode_text(line))
        if match is None:
            return None
        raw_step = match.group(_STEP_GROUP)
        step = None if raw_step is None else as_step(raw_step)
        if step is None:
            # The line matched, so it is meant to be an eval: say so rather than drop it unseen.
            raise MalformedLine("no-step", f"the regex matched but its step group holds {raw_step!r}")
        metrics: dict[str, float] = {}
        for name in self._metrics:
            text = match.group(name)
            number = None if text is None else parse_number(text)
            if number is not None:
                metrics[name] = number
        return LogEvent(step, metrics)
