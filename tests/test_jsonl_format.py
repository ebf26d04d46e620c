"""JsonlFormat on real ms-swift logs and on hand-made lines; LineCounter's counting and logging."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

from ckptd.errors import ConfigError, MalformedLine
from ckptd.logs import JsonlFormat, LineCounter
from ckptd.records import LogEvent

MS_SWIFT = Path(__file__).parent / "fixtures" / "ms-swift"
EVAL_STEPS = list(range(50, 1201, 50))


def parse_file(name: str) -> list[LogEvent | None]:
    lines = (MS_SWIFT / name).read_bytes().splitlines()
    fmt = JsonlFormat()
    return [fmt.parse(line) for line in lines]


def evals(events: list[LogEvent | None]) -> list[LogEvent]:
    return [e for e in events if e is not None and "eval_loss" in e.metrics]


@pytest.mark.parametrize(
    ("name", "best_step", "best_loss", "last_loss"),
    [
        ("runA_loadbest_logging.jsonl", 1200, 0.19957939, 0.19957939),
        ("runC_oodval_logging.jsonl", 600, 0.8652485, 0.97229719),
    ],
)
def test_ms_swift_fixture_end_to_end(name: str, best_step: int, best_loss: float, last_loss: float) -> None:
    events = parse_file(name)
    assert len(events) == 147
    # Every line but the final summary is an event with the step ms-swift logged.
    assert events[-1] is None
    assert all(e is not None for e in events[:-1])
    eval_events = evals(events)
    assert [e.step for e in eval_events] == EVAL_STEPS
    best = min(eval_events, key=lambda e: e.metrics["eval_loss"])
    assert (best.step, best.metrics["eval_loss"]) == (best_step, best_loss)
    assert eval_events[-1].metrics["eval_loss"] == last_loss


def test_ms_swift_eval_line_metrics() -> None:
    eval_events = evals(parse_file("runA_loadbest_logging.jsonl"))
    at_1050 = next(e for e in eval_events if e.step == 1050)
    assert dict(at_1050.metrics) == {
        "eval_loss": 0.20119336,
        "eval_runtime": 0.0889,
        "eval_samples_per_second": 449.808,
        "eval_steps_per_second": 112.452,
        "eval_token_acc": 0.93188854,
        "epoch": 2.625,
        "train_speed(s/it)": 0.019974,
    }  # strings (elapsed_time, the "1050/1200" step itself) are not metrics


def test_ms_swift_train_lines_have_steps_every_ten() -> None:
    events = parse_file("runC_oodval_logging.jsonl")
    train = [e for e in events if e is not None and "loss" in e.metrics]
    assert [e.step for e in train] == [1, *range(10, 1201, 10)]
    assert train[0].metrics["loss"] == 6.12507153


@pytest.mark.parametrize("step_key", [None, "global_step", "step"])
def test_summary_line_is_not_an_event(step_key: str | None) -> None:
    summary = (MS_SWIFT / "runA_loadbest_logging.jsonl").read_bytes().splitlines()[-1]
    assert b'"global_step": 1200' in summary  # it has a step, yet is no event
    assert JsonlFormat(step_key).parse(summary) is None


@pytest.mark.parametrize("key", ["log_history", "best_model_checkpoint", "last_model_checkpoint"])
def test_any_summary_key_marks_a_summary(key: str) -> None:
    assert JsonlFormat().parse(f'{{"step": 5, "loss": 1, "{key}": null}}'.encode()) is None


@pytest.mark.parametrize(
    ("line", "step_key", "step"),
    [
        (b'{"global_step/max_steps": "1050/2000", "loss": 1}', None, 1050),
        (b'{"step": 7}', None, 7),
        (b'{"global_step": 9}', None, 9),
        (b'{"global_step/max_steps": "5/10", "step": 3, "global_step": 4}', None, 5),
        (b'{"step": 3, "global_step": 9}', None, 3),
        (b'{"step": 0}', None, 0),
        (b'{"step": 12.0}', None, 12),
        (b'{"step": "12"}', None, 12),
        (b'{"step": " 12.0 "}', None, 12),
        (b'{"trainer": {"step": 40}, "step": 1}', "trainer.step", 40),
        (b'{"a": {"b": {"c": 5}}}', "a.b.c", 5),
        (b'{"iteration": 8, "step": 1}', "iteration", 8),
        (b'{"step": 1.5}', None, None),
        (b'{"step": -1}', None, None),
        (b'{"step": true}', None, None),
        (b'{"step": null}', None, None),
        (b'{"step": "abc"}', None, None),
        (b'{"step": "-3"}', None, None),
        (b'{"step": NaN}', None, None),
        (b'{"step": Infinity}', None, None),
        (b'{"step": [1]}', None, None),
        (b'{"global_step/max_steps": "x/10", "step": 3}', None, None),
        (b'{"loss": 1.0}', None, None),
        (b'{"step": 1}', "trainer.step", None),
        (b'{"trainer": 5}', "trainer.step", None),
        (b'{"trainer": {"epoch": 1}}', "trainer.step", None),
    ],
)
def test_step(line: bytes, step_key: str | None, step: int | None) -> None:
    event = JsonlFormat(step_key).parse(line)
    assert (event.step if event else None) == step


@pytest.mark.parametrize(
    ("line", "step_key", "metrics"),
    [
        (b'{"step": 5, "loss": 1.5}', None, {"loss": 1.5}),
        (b'{"step": 5, "global_step": 6}', None, {"global_step": 6.0}),
        (b'{"global_step": 6, "epoch": 2}', None, {"epoch": 2.0}),
        (b'{"iteration": 8, "step": 1}', "iteration", {"step": 1.0}),
        (
            b'{"step": 1, "i": 3, "flag": true, "off": false, "s": "1.0", "n": null, '
            b'"l": [1], "d": {"a": 1}}',
            None,
            {"i": 3.0},
        ),
        (b'{"step": 1, "huge": 1' + b"0" * 400 + b', "x": 2}', None, {"x": 2.0}),
    ],
)
def test_metrics_are_the_top_level_numbers(
    line: bytes, step_key: str | None, metrics: dict[str, float]
) -> None:
    event = JsonlFormat(step_key).parse(line)
    assert event is not None
    assert dict(event.metrics) == metrics
    assert all(type(v) is float for v in event.metrics.values())


def test_nan_and_infinity_are_kept() -> None:
    event = JsonlFormat().parse(b'{"step": 1, "eval_loss": NaN, "up": Infinity, "down": -Infinity}')
    assert event is not None
    assert math.isnan(event.metrics["eval_loss"])
    assert event.metrics["up"] == math.inf
    assert event.metrics["down"] == -math.inf


@pytest.mark.parametrize("line", [b"", b"   ", b"\t\r", b"\xef\xbb\xbf"])
def test_blank_lines_are_none(line: bytes) -> None:
    assert JsonlFormat().parse(line) is None


def test_byte_order_mark_is_ignored() -> None:
    event = JsonlFormat().parse(b'\xef\xbb\xbf{"step": 3, "loss": 2}')
    assert event == LogEvent(3, {"loss": 2.0})


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (b'{"step": 1, "loss": \xff}', "utf8"),
        (b"\xc3\x28", "utf8"),
        (b'{"step": 1', "json"),
        (b"not json", "json"),
        (b'{"step": 1}{"step": 2}', "json"),
        (b"[" * 100_000, "json"),
        (b"[1, 2]", "not-object"),
        (b'"text"', "not-object"),
        (b"42", "not-object"),
        (b"null", "not-object"),
        (b"true", "not-object"),
    ],
)
def test_malformed_lines(line: bytes, kind: str) -> None:
    with pytest.raises(MalformedLine) as info:
        JsonlFormat().parse(line)
    assert info.value.kind == kind
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"{kind}: ")


@pytest.mark.parametrize("step_key", ["", "a..b", ".step", "step."])
def test_step_key_with_an_empty_part_is_a_config_error(step_key: str) -> None:
    with pytest.raises(ConfigError):
        JsonlFormat(step_key)


def test_format_name() -> None:
    assert JsonlFormat.name == "jsonl"


def test_line_counter_counts_every_line_and_logs_each_kind_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counter = LineCounter()
    fmt = JsonlFormat()
    lines = [b"oops", b"\xff", b"also bad", b"[]", b"still bad"]
    with caplog.at_level(logging.WARNING, logger="ckptd.logs"):
        for line in lines:
            with pytest.raises(MalformedLine) as info:
                fmt.parse(line)
            counter.record(info.value, line)
    assert counter.counts == {"json": 3, "utf8": 1, "not-object": 1}
    messages = [r.getMessage() for r in caplog.records if r.name == "ckptd.logs"]
    assert len(messages) == 3
    assert "b'oops'" in messages[0]
    assert not any("also bad" in m for m in messages)


def test_line_counter_preview_is_truncated(caplog: pytest.LogCaptureFixture) -> None:
    counter = LineCounter()
    with caplog.at_level(logging.WARNING, logger="ckptd.logs"):
        counter.record(MalformedLine("json", "bad"), b"x" * 10_000)
    (message,) = [r.getMessage() for r in caplog.records if r.name == "ckptd.logs"]
    assert "x" * 200 in message
    assert "x" * 201 not in message


def test_watched_metrics_skip_lines_that_cannot_change_a_verdict() -> None:
    fmt = JsonlFormat(watched=["eval_loss"])
    train = b'{"loss": 0.5, "global_step/max_steps": "10/100"}'
    assert JsonlFormat().parse(train) is not None  # unfiltered, the same line is an event
    assert fmt.parse(train) is None
    event = fmt.parse(b'{"eval_loss": 0.25, "eval_acc": 0.9, "global_step/max_steps": "50/100"}')
    assert event == LogEvent(50, {"eval_loss": 0.25, "eval_acc": 0.9})


def test_watched_filter_still_counts_invalid_utf8_garbage() -> None:
    with pytest.raises(MalformedLine) as caught:
        JsonlFormat(watched=["eval_loss"]).parse(b"\xff\xfe binary garbage")
    assert caught.value.kind == "utf8"
