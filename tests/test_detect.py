"""Format detection from the name and first line, on the real framework logs and by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ckptd.errors import ConfigError
from ckptd.logs import open_source
from ckptd.logs.detect import detect_format
from tests.conftest import FIXTURES


@pytest.mark.parametrize(
    ("fixture", "name", "expected"),
    [
        ("ms-swift/runA_loadbest_logging.jsonl", "logging.jsonl", "jsonl"),
        ("ms-swift/runA_loadbest_logging.jsonl", "train.log", "jsonl"),
        ("ms-swift/runA_stdout.log", "stdout.log", "hf-stdout"),
        ("hf-trainer/hf_stdout.log", "out.log", "hf-stdout"),
        ("hf-trainer/checkpoint-200/trainer_state.json", "trainer_state.json", "hf-state"),
        ("lightning/lightning_logs/version_0/metrics.csv", "metrics.csv", "lightning-csv"),
        ("lightning/lightning_logs/version_0/metrics.csv", "metrics.txt", "lightning-csv"),
    ],
    ids=lambda v: v if isinstance(v, str) and "/" not in v else None,
)
def test_real_logs_are_detected(tmp_path: Path, fixture: str, name: str, expected: str) -> None:
    target = tmp_path / name
    shutil.copy(FIXTURES / fixture, target)
    assert detect_format(target) == expected


def test_a_tensorboard_directory_and_event_file_are_detected(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(FIXTURES / "hf-trainer" / "runs", runs)
    assert detect_format(runs) == "tensorboard"
    event_file = next(runs.rglob("events.out.tfevents.*"))
    assert detect_format(event_file) == "tensorboard"


def test_an_undecidable_log_waits_for_its_first_line(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    source = open_source(log, watched=["eval_loss"])
    assert detect_format(log) is None
    assert source.read_events() == []
    log.write_text("\n")  # blank lines tell nothing either
    assert source.read_events() == []
    with log.open("a") as handle:
        handle.write(json.dumps({"step": 50, "eval_loss": 0.5}) + "\n")
    [event] = source.read_events()
    assert (event.step, event.metrics["eval_loss"], source.name) == (50, 0.5, "jsonl")
    assert source.cursor() is not None


def test_a_deferred_source_keeps_the_saved_cursor_until_it_reads(tmp_path: Path) -> None:
    saved = {"kind": "line", "inode": 1, "offset": 10, "head": ""}
    source = open_source(tmp_path / "train.log", cursor=saved)
    assert source.cursor() == saved


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"log_format": "xml"}, "unknown log format"),
        ({"log_format": "regex"}, "needs --regex"),
        ({"log_format": "jsonl", "regex": r"(?P<step>\d+)"}, "--regex reads the log as 'regex'"),
    ],
    ids=["unknown", "regex-without-pattern", "regex-with-jsonl"],
)
def test_format_options_that_cannot_work(tmp_path: Path, kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_source(tmp_path / "log", **kwargs)  # type: ignore[arg-type]


def test_regex_overrides_detection(tmp_path: Path) -> None:
    log = tmp_path / "train.jsonl"
    log.write_text("step 50 eval_loss=0.25\n")
    source = open_source(log, regex=r"step (?P<step>\d+) eval_loss=(?P<eval_loss>\S+)")
    [event] = source.read_events()
    assert (source.name, event.step, event.metrics) == ("regex", 50, {"eval_loss": 0.25})
