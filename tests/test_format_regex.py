"""RegexFormat on real ms-swift logs and hand-made lines; its configuration errors; parse_number."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ckptd.errors import ConfigError, MalformedLine
from ckptd.logs.jsonl import JsonlFormat
from ckptd.logs.regex import RegexFormat, parse_number
from ckptd.records import LogEvent

MS_SWIFT = Path(__file__).parent / "fixtures" / "ms-swift"
EVAL_LOSS = r"step (?P<step>\d+) .*eval_loss=(?P<eval_loss>[-+0-9.eE]+|nan)"


def events_of(fmt: RegexFormat, path: Path) -> list[LogEvent]:
    return [e for e in (fmt.parse(line) for line in path.read_bytes().splitlines()) if e is not None]


def test_ms_swift_jsonl_through_a_regex_matches_the_jsonl_format() -> None:
    path = MS_SWIFT / "runA_loadbest_logging.jsonl"
    fmt = RegexFormat(r'"eval_loss": (?P<eval_loss>[-+0-9.eE]+).*"global_step/max_steps": "(?P<step>\d+)/')
    events = events_of(fmt, path)
    jsonl = [e for e in events_of_jsonl(path) if "eval_loss" in e.metrics]
    assert [e.step for e in events] == list(range(50, 1201, 50))
    assert [(e.step, e.metrics) for e in events] == [
        (e.step, {"eval_loss": e.metrics["eval_loss"]}) for e in jsonl
    ]
    assert (events[-1].step, events[-1].metrics) == (1200, {"eval_loss": 0.19957939})


def events_of_jsonl(path: Path) -> list[LogEvent]:
    fmt = JsonlFormat()
    return [e for e in (fmt.parse(line) for line in path.read_bytes().splitlines()) if e is not None]


def test_ms_swift_stdout_through_a_regex() -> None:
    # The printed dicts, amid tqdm bars and carriage returns; the search finds them anywhere.
    fmt = RegexFormat(r"'eval_loss': '(?P<eval_loss>[^']+)'.*'global_step/max_steps': '(?P<step>\d+)/")
    events = events_of(fmt, MS_SWIFT / "runC_stdout.log")
    assert [e.step for e in events] == list(range(50, 1201, 50))
    best = min(events, key=lambda e: e.metrics["eval_loss"])
    assert (best.step, best.metrics["eval_loss"]) == (600, 0.8652)  # README: 0.8652485 at 600


@pytest.mark.parametrize(
    ("pattern", "line", "expected"),
    [
        (EVAL_LOSS, "step 50 loss=1.2 eval_loss=0.75", LogEvent(50, {"eval_loss": 0.75})),
        (EVAL_LOSS, "[rank0] step 50 | eval_loss=1e-3 done", LogEvent(50, {"eval_loss": 0.001})),  # search
        (EVAL_LOSS, "step 50 loss=1.2", None),  # no match: nothing to judge
        (EVAL_LOSS, "", None),
        # A number the group took but that is none: the metric is left out, the event stays.
        (EVAL_LOSS, "step 50 eval_loss=1.2.3", LogEvent(50, {})),
        # A group that took no part in the match is left out.
        (
            r"step=(?P<step>\d+)(?: acc=(?P<acc>\S+))? loss=(?P<loss>\S+)",
            "step=7 loss=0.5",
            LogEvent(7, {"loss": 0.5}),
        ),
        (r"(?P<step>\d+): (?P<a>\S+) (?P<b>\S+)", "12: 0.5 -0.25", LogEvent(12, {"a": 0.5, "b": -0.25})),
        (r"it (?P<step>\S+) (?P<v>\S+)", "it 40.0 3", LogEvent(40, {"v": 3.0})),  # a whole float is a step
        (r"step (?P<step>\d+) (?P<v>\S+)", "step 5 caf\u00e9", LogEvent(5, {})),
    ],
)
def test_lines(pattern: str, line: str, expected: LogEvent | None) -> None:
    assert RegexFormat(pattern).parse(line.encode()) == expected


def test_nan_value() -> None:
    event = RegexFormat(EVAL_LOSS).parse(b"step 5 eval_loss=nan")
    assert event is not None and event.step == 5 and math.isnan(event.metrics["eval_loss"])


@pytest.mark.parametrize(
    ("pattern", "line", "kind"),
    [
        (EVAL_LOSS, b"step 5 eval_loss=\xff", "utf8"),
        (r"it (?P<step>\S+) loss", b"it x loss", "no-step"),
        (r"it (?P<step>-?\d+) loss", b"it -3 loss", "no-step"),
        (r"(?:it (?P<step>\d+))? loss=(?P<loss>\S+)", b" loss=1.0", "no-step"),
    ],
)
def test_malformed_lines(pattern: str, line: bytes, kind: str) -> None:
    with pytest.raises(MalformedLine) as caught:
        RegexFormat(pattern).parse(line)
    assert caught.value.kind == kind


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (r"step (?P<step>\d+", "not a valid regular expression"),
        (r"step (\d+) eval_loss=(?P<eval_loss>\S+)", "no named group 'step'"),
        (r"(?P<Step>\d+)", "no named group 'step'"),
    ],
)
def test_bad_patterns_are_config_errors(pattern: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RegexFormat(pattern)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3.903", 3.903),
        ("1.415e+04", 14150.0),
        ("-inf", -math.inf),
        ("0", 0.0),
        ("0s", None),
        ("", None),
        ("1/2", None),
    ],
)
def test_parse_number(text: str, expected: float | None) -> None:
    assert parse_number(text) == expected
