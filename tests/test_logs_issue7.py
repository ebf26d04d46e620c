"""Regression tests for issue 7 (the log-following layer), on real files and real inotify.

Each test is named after the item it covers (``test_issue7_<item>_...``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest

from ckptd.errors import MalformedLine
from ckptd.logs import ChangeWatcher, LineSource, LogFollower, open_source
from ckptd.logs.csvlog import LightningCsvFormat
from ckptd.logs.detect import detect_format
from ckptd.logs.follow import Cursor
from ckptd.logs.hf import HfStateSource, HfStdoutFormat
from ckptd.logs.jsonl import JsonlFormat
from ckptd.records import LogEvent
from tests.conftest import FIXTURES, wait_for

HF = FIXTURES / "hf-trainer"
LIGHTNING = FIXTURES / "lightning"
STATE = "trainer_state.json"
HF_EVAL_STEPS = list(range(20, 201, 20))
BAR = "\r{pct:3d}%|█         | {n}/200 [00:00<00:01, 107.59it/s]"
CLEAR = "\r" + " " * 49 + "\r"


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as out:
        out.write(data)


def write_in_place(path: Path, data: bytes) -> None:
    """Truncate and write the same file (same inode), as CSVLogger and the HF Trainer do."""
    with path.open("r+b" if path.exists() else "wb") as out:
        out.truncate(0)
        out.write(data)


def eval_line(step: int, loss: float) -> bytes:
    return json.dumps({"step": step, "eval_loss": loss}).encode() + b"\n"


def drain_history(source: object) -> list[LogEvent]:
    events: list[LogEvent] = []
    while not source.history_done:  # type: ignore[attr-defined]
        events += source.read_history()  # type: ignore[attr-defined]
    return events


# -- 13: the log path briefly a directory ------------------------------------------------------


def test_issue7_13_log_path_briefly_a_directory_is_no_file_yet(tmp_path: Path) -> None:
    log = tmp_path / "train.jsonl"
    log.write_bytes(eval_line(10, 1.0))
    source = LineSource(log, JsonlFormat(watched=["eval_loss"]))
    assert [e.step for e in source.read_events()] == [10]
    log.unlink()
    log.mkdir()
    assert source.read_events() == []  # a directory at the path: nothing to read, no error
    assert source.read_events() == []
    assert source.lag_bytes() == 0
    log.rmdir()
    log.write_bytes(eval_line(20, 0.5))
    assert [e.step for e in source.read_events()] == [20]
    source.close()


def test_issue7_13_follower_that_starts_on_a_directory_waits_for_the_file(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.mkdir()
    follower = LogFollower(log)
    assert follower.read_lines() == [] and follower.history_done
    log.rmdir()
    log.write_bytes(b"a\n")
    assert follower.read_lines() == [b"a"]
    follower.close()


# -- 17: HF stdout steps only from the training bar; buffered stdout -----------------------------


def test_issue7_17_step_only_from_the_training_bar_never_another(tmp_path: Path) -> None:
    # What transformers 5.19 wrote around the step-100 save (hf_stdout.log), with the eval dict
    # moved after the shards bar: a `Writing model shards: 1/1` bar must not give step 1.
    lines = [
        BAR.format(pct=50, n=100),
        "\r  0%|          | 0/4 [00:00<?, ?it/s]\x1b[A",
        CLEAR + "\x1b[A{'eval_loss': '1.936', 'epoch': '0.7812'}",
        "\rWriting model shards:   0%|          | 0/1 [00:00<?, ?it/s]\x1b[A"
        "\rWriting model shards: 100%|██████████| 1/1 [00:00<00:00, 677.37it/s]",
        "\r100%|██████████| 4/4 [00:00<00:00, 299.57it/s]",  # an evaluation bar at the margin
        "\rMap (num_proc=1): 100%|██████████| 400/400 [00:00<?, ? examples/s]",
        BAR.format(pct=50, n=101),
    ]
    log = tmp_path / "stdout.log"
    log.write_bytes("\n".join(lines).encode() + b"\n")
    source = LineSource(log, HfStdoutFormat())
    assert source.read_events() == [LogEvent(101, {"eval_loss": 1.936, "epoch": 0.7812})]
    assert source.malformed.counts == {}


def test_issue7_17_the_real_logs_still_give_every_eval_its_step() -> None:
    fmt = HfStdoutFormat()
    events = [e for line in (HF / "hf_stdout.log").read_bytes().split(b"\n") if (e := fmt.parse(line))]
    assert [e.step for e in events if "eval_loss" in e.metrics] == HF_EVAL_STEPS


def _buffered_replay() -> tuple[bytes, bytes]:
    """The HF fixture as a block-buffered stdout writes it with stderr into one file: tqdm's
    clears and redraws (stderr, unbuffered) land at once, the dicts (stdout) later, in a burst."""
    data = (HF / "hf_stdout.log").read_bytes()
    bars, dicts = bytearray(), bytearray()
    for line in data.split(b"\n"):
        segments = line.split(b"\r")
        keep = [seg for seg in segments if b"{'" not in seg]
        dicts += b"".join(seg[seg.index(b"{'") :] + b"\n" for seg in segments if b"{'" in seg)
        bars += b"\r".join(keep) + b"\n"
    return bytes(bars), bytes(dicts)


def test_issue7_17_buffered_stdout_gives_no_guessed_step_and_says_the_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bars, dicts = _buffered_replay()
    log = tmp_path / "stdout.log"
    log.write_bytes(bars[: len(bars) // 2])
    source = LineSource(log, HfStdoutFormat())
    assert source.read_events() == []
    with caplog.at_level(logging.WARNING, logger="ckptd.logs"):
        append(log, b"\n" + dicts + bars[len(bars) // 2 :] + b"\n")  # the burst, then more bars
        events = source.read_events()
        assert source.read_events() == []
    assert events == []  # the bar after a burst is far past its dicts: no step is guessed
    assert source.malformed.counts["no-step"] == dicts.count(b"\n")
    [note] = source.notes()
    assert "-u" in note and "PYTHONUNBUFFERED=1" in note and "runs/" in note
    assert sum("PYTHONUNBUFFERED" in r.getMessage() for r in caplog.records) == 1


# -- 19: Lightning header rewrite with the same first 64 bytes -----------------------------------


def _rewrite_with_same_head() -> tuple[bytes, bytes]:
    """metrics.csv before and after CSVLogger's rewrite for a new column (the fixture's `lr`),
    with a first column name longer than 64 bytes, and the new column's name sized so that the
    old end of file falls at a line start in the rewritten file: nothing but the header tells."""
    long_first = "epoch_of_this_run_as_lightning_counts_it_from_zero_for_every_fit_call"
    before = (LIGHTNING / "metrics_before_rewrite.csv").read_text().splitlines()
    after = (LIGHTNING / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    rows_before = len(before) - 1
    # The old rows gain one cell each: the new name's length that makes the offsets meet.
    name_length = len(before[-1]) + 1 - rows_before
    new_column = ("lr_of_param_group_zero" * 2)[:name_length]
    old = "\n".join([before[0].replace("epoch", long_first, 1), *before[1:]]) + "\n"
    header = after[0].replace("epoch", long_first, 1).replace(",lr,", f",{new_column},", 1)
    new = "\n".join([header, *after[1:]]) + "\n"
    return old.encode(), new.encode()


def test_issue7_19_header_rewrite_same_prefix(tmp_path: Path) -> None:
    old, new = _rewrite_with_same_head()
    assert old[:64] == new[:64] and new[len(old) - 1 : len(old)] == b"\n"  # what the follower checks
    metrics = tmp_path / "metrics.csv"
    metrics.write_bytes(old)
    source = LineSource(metrics, LightningCsvFormat(metrics))
    first = source.read_events()
    assert first[-1].step == 129
    write_in_place(metrics, new)
    later = source.read_events()
    assert source.malformed.counts == {}
    assert source.follower.rewinds == 0  # the follower did not see it: the header did
    # Every row after the rewrite, by the new header; the re-read row of step 129 not twice.
    assert [e.step for e in later][:4] == [139, 149, 149, 159]
    assert later[0].metrics.keys() >= {"train_loss"} and "val_loss" in later[2].metrics
    lr = next(k for k in later[3].metrics if k.startswith("lr"))
    assert later[3].metrics[lr] == pytest.approx(0.025)
    assert sum("val_loss" in e.metrics for e in first + later) == 6


# -- 20: a fixed history boundary ----------------------------------------------------------------


def test_issue7_20_eval_appended_during_catch_up_is_live(tmp_path: Path) -> None:
    log = tmp_path / "logging.jsonl"
    line = b'{"step": %d, "loss": 1.0, "pad": "' + b"x" * 200 + b'"}\n'
    train = b"".join(line % i for i in range(12000))
    log.write_bytes(train + eval_line(12000, 0.5) + b'{"step": 12001, "eval_lo')  # a line crossing
    source = LineSource(log, JsonlFormat(watched=["eval_loss"]))
    assert not source.history_done
    history = source.read_history()  # the first stretch only: the log is ~2.8 MB
    assert not source.history_done
    append(log, b'ss": 0.4}\n' + eval_line(12002, 0.3))  # lands while history is being read
    history += drain_history(source)
    assert [e.step for e in history] == [12000]
    assert source.read_history() == []
    assert [e.step for e in source.read_events()] == [12001, 12002]


@pytest.mark.parametrize("fmt", ["jsonl", "auto"])
def test_issue7_20_history_done_at_once_without_content_or_at_the_cursor(tmp_path: Path, fmt: str) -> None:
    log = tmp_path / "train.log"
    missing = open_source(log, fmt, watched=["eval_loss"])
    assert missing.history_done and missing.read_history() == []
    log.write_bytes(eval_line(5, 1.0))
    assert [e.step for e in missing.read_events()] == [5]
    cursor = missing.cursor()
    missing.close()
    resumed = open_source(log, fmt, watched=["eval_loss"], cursor=cursor)
    assert resumed.history_done
    append(log, eval_line(6, 0.9))
    assert [e.step for e in resumed.read_events()] == [6]
    resumed.close()


def test_issue7_20_auto_detected_source_keeps_the_boundary_of_its_open(tmp_path: Path) -> None:
    log = tmp_path / "stdout.log"
    log.write_bytes(b"loading the model\n")  # there, but nothing tells the format yet
    source = open_source(log, watched=["eval_loss"])
    append(log, b"{'eval_loss': 0.5, 'global_step/max_steps': '10/100'}\n")
    assert drain_history(source) == []  # that line came after the open: live
    assert source.read_events() == [LogEvent(10, {"eval_loss": 0.5})]


def test_issue7_20_hf_state_history_is_the_file_at_open(tmp_path: Path) -> None:
    state = tmp_path / "trainer_state.json"
    state.write_bytes((HF / "checkpoint-100" / "trainer_state.json").read_bytes())
    source = HfStateSource(state)
    write_in_place(state, (HF / "checkpoint-200" / "trainer_state.json").read_bytes())
    history = drain_history(source)
    assert max(e.step for e in history) == 100
    assert [e.step for e in source.read_events()][:2] == [105, 110]


@pytest.mark.parametrize("fmt", ["auto", "hf-state"])
def test_issue7_20_detected_hf_state_reads_its_content_as_history(tmp_path: Path, fmt: str) -> None:
    state = tmp_path / STATE
    state.write_bytes((HF / "checkpoint-100" / STATE).read_bytes())
    source = open_source(state, fmt)
    assert not source.history_done
    assert max(e.step for e in drain_history(source)) == 100
    assert source.read_events() == []


def test_issue7_20_tensorboard_history_is_the_records_present_at_open(tmp_path: Path) -> None:
    from tests.test_format_tensorboard import FIXTURE, scalars

    run = tmp_path / "runs" / "run1"
    run.mkdir(parents=True)
    shutil.copyfile(FIXTURE, run / FIXTURE.name)
    source = open_source(tmp_path / "runs", "tensorboard")
    assert source.lag_bytes() == FIXTURE.stat().st_size
    append(run / FIXTURE.name, scalars(220, {"eval/loss": 1.5}))
    (run / "events.out.tfevents.2.vm.1.0").write_bytes(scalars(240, {"eval/loss": 1.4}))
    history = drain_history(source)
    assert sorted(e.step for e in history if "eval_loss" in e.metrics) == HF_EVAL_STEPS
    assert source.lag_bytes() > 0
    live = source.read_events()
    assert sorted(e.step for e in live) == [220, 240]
    assert source.lag_bytes() == 0


# -- 21: --format tensorboard before runs/ exists ------------------------------------------------


def test_issue7_21_explicit_tensorboard_waits_for_the_directory(tmp_path: Path) -> None:
    from tests.test_format_tensorboard import FIXTURE

    runs = tmp_path / "runs"
    source = open_source(runs, "tensorboard")
    assert source.read_events() == [] and source.read_events() == []
    assert source.notes() == [f"waiting for {runs} to appear"]
    (runs / "Nov27").mkdir(parents=True)
    shutil.copyfile(FIXTURE, runs / "Nov27" / FIXTURE.name)
    events = source.read_events()
    assert sorted(e.step for e in events if "eval_loss" in e.metrics) == HF_EVAL_STEPS
    assert source.name == "tensorboard" and source.watch_children


# -- 22: missing folders, runs/ created later, lightning_logs/ -----------------------------------


def test_issue7_22_runs_created_later_is_seen_by_inotify(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runs = tmp_path / "out" / "runs"
    woken = threading.Event()
    watcher = ChangeWatcher(runs, woken.set, children=True, poll_interval=60)
    with caplog.at_level(logging.INFO, logger="ckptd.logs"):
        watcher.start()
    try:
        assert watcher.mode.startswith("inotify (waiting for")
        (runs / "Nov27_19-58-06_vm").mkdir(parents=True)
        assert woken.wait(2)
        woken.clear()
        assert watcher.mode == "inotify"
        (runs / "Nov27_19-58-06_vm" / "events.out.tfevents.1.vm.1.0").write_bytes(b"x")
        assert woken.wait(2)  # a file deep below: the watch is recursive now
        woken.clear()
        shutil.rmtree(tmp_path / "out")  # gone again: waits on the ancestor
        wait_for(lambda: watcher.mode.startswith("inotify (waiting for"), 2, "the watch to move up")
        woken.clear()
        runs.mkdir(parents=True)
        assert woken.wait(2)
    finally:
        watcher.stop()
    assert "unavailable" not in caplog.text and "polling" not in caplog.text


@pytest.mark.parametrize("fmt", ["auto", "lightning-csv"])
def test_issue7_22_lightning_logs_follows_the_newest_version(tmp_path: Path, fmt: str) -> None:
    logs = tmp_path / "lightning_logs"
    shutil.copytree(LIGHTNING / "lightning_logs", logs)
    source = open_source(logs, fmt, watched=["val_loss"])
    assert (source.name, source.watch_children) == ("lightning-csv", True)
    history = drain_history(source)
    assert [e.step for e in history if "val_loss" in e.metrics] == [49, 99, 149, 199, 249, 299]
    assert source.read_events() == []
    newer = logs / "version_1"
    newer.mkdir()
    (newer / "metrics.csv").write_bytes(b"epoch,step,val_loss\n0,49,0.5\n")
    assert source.read_events() == [LogEvent(49, {"epoch": 0.0, "val_loss": 0.5})]
    assert source.cursor() is not None and source.cursor()["file"] == "version_1/metrics.csv"  # type: ignore[index]
    append(newer / "metrics.csv", b"1,99,0.4\n")
    assert source.read_events() == [LogEvent(99, {"epoch": 1.0, "val_loss": 0.4})]


# -- 23: rename rotation while the writer still writes the old file ------------------------------


def test_issue7_23_rotated_file_is_read_until_quiet_and_a_stall_is_told(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    follower = LogFollower(log, rotation_quiet_s=3600)
    with log.open("ab", buffering=0) as writer:  # the trainer's handle: it does not reopen
        writer.write(b"a\n")
        assert follower.read_lines() == [b"a"]
        os.rename(log, tmp_path / "train.log.1")
        log.write_bytes(b"")  # the rotator creates the new, empty file
        assert follower.read_lines() == []
        writer.write(b"b\n")  # still to the old file
        assert follower.read_lines() == [b"b"]
        writer.write(b"c\n")
        assert follower.read_lines() == [b"c"]
        note = follower.stalled_note
        assert note is not None and "train.log.1" in note and "still grows" in note
        writer.write(b"d")  # unterminated when the trainer finally reopens
    append(log, b"e\n")  # the trainer reopened its log by name
    assert follower.read_lines() == [b"e"]
    assert follower.stalled_note is None
    follower.rotation_quiet_s = 0  # as if an hour had passed
    assert follower.read_lines() == [b"d"]  # the old file went quiet: its last line counts
    assert follower.stalled_note is None
    assert follower.read_lines() == []
    follower.close()


def test_issue7_23_a_writer_thread_on_the_rotated_file_loses_no_line(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_bytes(b"")
    source = LineSource(log, JsonlFormat(watched=["eval_loss"]), rotation_quiet_s=0.5)
    started, rotated = threading.Event(), threading.Event()

    def trainer() -> None:
        with log.open("ab", buffering=0) as out:
            for step in range(400):
                out.write(eval_line(step, 1.0 / (step + 1)))
                if step == 100:
                    started.set()
                    rotated.wait(5)
        with log.open("ab", buffering=0) as out:  # reopened by name
            out.write(eval_line(400, 0.0))

    thread = threading.Thread(target=trainer)
    thread.start()
    started.wait(5)
    seen = [e.step for e in source.read_events()]
    os.rename(log, tmp_path / "train.log.1")
    rotated.set()
    thread.join()
    for _ in range(4):
        seen += [e.step for e in source.read_events()]
    assert sorted(seen) == list(range(401))
    source.close()


# -- 24: detection -------------------------------------------------------------------------------


def test_issue7_24_half_written_first_line_is_not_detected_yet(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_bytes(b'{"step": 10, "eval_lo')
    source = open_source(log, watched=["eval_loss"])
    assert detect_format(log) is None
    assert source.read_events() == []
    append(log, b'ss": 0.5}\n')
    assert source.read_events() == [LogEvent(10, {"eval_loss": 0.5})]
    assert source.name == "jsonl"


def test_issue7_24_a_json_config_line_atop_hf_stdout(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    config = json.dumps({"output_dir": "out", "max_steps": 200, "eval_steps": 20}).encode()
    log.write_bytes(config + b"\n" + (HF / "hf_stdout.log").read_bytes())
    assert detect_format(log) == "hf-stdout"
    source = open_source(log, watched=["eval_loss"])
    events = drain_history(source) + source.read_events()
    assert [e.step for e in events if "eval_loss" in e.metrics] == HF_EVAL_STEPS


def test_issue7_24_redetected_when_everything_read_was_unusable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "out.log"
    marker = json.dumps({"step": 0, "event": "start"}).encode()  # tells "jsonl" on its own
    log.write_bytes(marker + b"\n" + (HF / "hf_stdout.log").read_bytes())
    source = open_source(log, watched=["eval_loss"])
    assert source.name == "jsonl"
    with caplog.at_level(logging.WARNING, logger="ckptd.logs"):
        events = drain_history(source)
        events += source.read_events()
    assert source.name == "hf-stdout"
    assert [e.step for e in events if "eval_loss" in e.metrics] == HF_EVAL_STEPS
    assert "reading it again as hf-stdout" in caplog.text


def test_issue7_24_explicit_format_that_reads_nothing_is_warned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "train.log"
    shutil.copyfile(LIGHTNING / "lightning_logs" / "version_0" / "metrics.csv", log)
    source = open_source(log, "jsonl", watched=["val_loss"])
    with caplog.at_level(logging.WARNING, logger="ckptd.logs"):
        assert drain_history(source) + source.read_events() == []
        append(log, b"2,0.0125,309,0.5,,\n")
        assert source.read_events() == []
    warnings = [r.getMessage() for r in caplog.records if "Is --format right?" in r.getMessage()]
    assert len(warnings) == 1 and "jsonl" in warnings[0] and "epoch,lr,step" in warnings[0]
    assert source.notes() == warnings


# -- 25: docs, hf-state in a directory, quiet shutdown -------------------------------------------


def test_issue7_25_hf_state_given_the_output_dir_follows_the_newest_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "checkpoint-100").mkdir(parents=True)
    shutil.copyfile(HF / "checkpoint-100" / STATE, out / "checkpoint-100" / STATE)
    source = open_source(out, "hf-state")
    assert source.watch_children
    assert max(e.step for e in drain_history(source)) == 100
    (out / "checkpoint-200").mkdir()
    shutil.copyfile(HF / "checkpoint-200" / STATE, out / "checkpoint-200" / STATE)
    live = source.read_events()
    assert [e.step for e in live if "eval_loss" in e.metrics] == [120, 140, 160, 180, 200]


def test_issue7_25_watcher_of_a_vanished_folder_stops_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runs = tmp_path / "runs"
    (runs / "a").mkdir(parents=True)
    watcher = ChangeWatcher(runs, lambda: None, children=True)
    with caplog.at_level(logging.DEBUG):
        watcher.start()
        shutil.rmtree(runs)
        watcher.stop()
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == []


# -- 15/16: lag, rewritten trainer_state.json, dropped evals, names seen -------------------------


def test_issue7_16_lag_bytes_of_every_source(tmp_path: Path) -> None:
    log = tmp_path / "train.jsonl"
    log.write_bytes(eval_line(1, 1.0))
    line = LineSource(log, JsonlFormat())
    assert line.lag_bytes() == log.stat().st_size
    line.read_events()
    assert line.lag_bytes() == 0
    state = tmp_path / "trainer_state.json"
    state.write_bytes((HF / "checkpoint-100" / "trainer_state.json").read_bytes())
    hf = HfStateSource(state)
    assert hf.lag_bytes() == state.stat().st_size
    hf.read_events()
    assert hf.lag_bytes() == 0
    write_in_place(state, (HF / "checkpoint-200" / "trainer_state.json").read_bytes())
    assert hf.lag_bytes() == state.stat().st_size


def test_issue7_16_trainer_state_rewritten_in_place_is_one_problem_not_many(tmp_path: Path) -> None:
    state = tmp_path / "trainer_state.json"
    data = (HF / "checkpoint-200" / "trainer_state.json").read_bytes()
    source = HfStateSource(state)
    for end in range(1000, len(data), 1000):  # read while the Trainer writes it, 19 versions
        write_in_place(state, data[:end])
        assert source.read_events() == []
    assert source.malformed.counts == {"json": 1}
    write_in_place(state, data)
    assert max(e.step for e in source.read_events()) == 200
    write_in_place(state, data[:500])
    source.read_events()
    assert source.malformed.counts == {"json": 2}  # a new unreadable version after a good one


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (b'{"step": 5, "eval_loss": "0.5"}', "string-metric"),
        (b'{"eval_loss": 0.5, "epoch": 1.0}', "no-step"),
        (b'{"step": "five", "eval_loss": 0.5}', "no-step"),
    ],
)
def test_issue7_15_dropped_watched_metrics_are_counted(line: bytes, kind: str) -> None:
    fmt = JsonlFormat(watched=["eval_loss"])
    with pytest.raises(MalformedLine) as caught:
        fmt.parse(line)
    assert caught.value.kind == kind
    JsonlFormat().parse(line)  # nothing watched: nothing dropped, nothing counted


def test_issue7_15_metric_names_seen_sample_lines_without_a_watched_metric(tmp_path: Path) -> None:
    log = tmp_path / "logging.jsonl"
    shutil.copyfile(FIXTURES / "ms-swift" / "runA_loadbest_logging.jsonl", log)
    source = LineSource(log, JsonlFormat(watched=["eval_accuracy"]))
    assert source.read_events() == []
    seen = source.metric_names_seen()
    assert {"loss", "eval_loss", "learning_rate"} <= seen and len(seen) <= 64
    counts = source.malformed.counts
    assert counts == {}, counts
    assert source.notes() == []  # a log of the right format that lacks the metric is not "unusable"


def test_issue7_cursor_of_a_rotated_file_is_the_new_one(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_bytes(b"a\n")
    follower = LogFollower(log)
    follower.read_lines()
    os.rename(log, tmp_path / "old")
    log.write_bytes(b"b\n")
    assert follower.read_lines() == [b"b"]
    assert follower.cursor == Cursor(log.stat().st_ino, 2, b"b\n".hex())
    follower.close()


def test_a_line_after_a_hole_of_nul_bytes_is_read(tmp_path: Path) -> None:
    # copytruncate with a writer that keeps its offset (opened with "w", not "a"): its next
    # write lands past a hole, which reads as NUL bytes glued to the front of the next line.
    log = tmp_path / "logging.jsonl"
    log.write_bytes(b"\0" * 300 + b'{"step": 5, "eval_loss": 0.5}\n')
    source = open_source(log, "jsonl", watched=["eval_loss"])
    assert [e.step for e in drain_history(source)] == [5]
    assert dict(source.malformed.counts) == {}


def test_a_fifo_at_the_log_path_is_refused_without_blocking(tmp_path: Path) -> None:
    log = tmp_path / "logging.jsonl"
    os.mkfifo(log)
    source = open_source(log, "jsonl", watched=["eval_loss"])
    assert drain_history(source) == [] and source.read_events() == []  # returns: no blocking open
    assert any("FIFO" in note for note in source.notes())
    log.unlink()
    log.write_text('{"step": 1, "eval_loss": 0.5}\n')
    assert [e.step for e in source.read_events()] == [1]
    assert not source.notes()


def test_a_folder_named_like_a_log_file_is_no_tensorboard_dir(tmp_path: Path) -> None:
    log = tmp_path / "logging.jsonl"
    log.mkdir()  # briefly a folder at start (rm; mkdir; rmdir)
    source = open_source(log, "auto", watched=["eval_loss"])
    assert drain_history(source) == []
    log.rmdir()
    log.write_text('{"step": 3, "eval_loss": 0.5}\n')
    assert [e.step for e in source.read_events()] == [3]
    assert source.name == "jsonl"


# -- hostile testing, round 2: links pointed elsewhere, writers left on a rotated file, folders
# renamed, formats that read nothing, a metric written as a boolean -------------------------------


class _Watched:
    """A :class:`LineSource` on ``log`` and a real inotify :class:`ChangeWatcher` waking it."""

    def __init__(self, log: Path) -> None:
        self.source = LineSource(log, JsonlFormat(watched=["eval_loss"]), rotation_quiet_s=3600)
        self.woken = threading.Event()
        self.watcher = ChangeWatcher(log, self.woken.set, poll_interval=60)
        self.watcher.start()
        assert self.watcher.mode == "inotify"

    def steps_after_wake(self) -> list[int]:
        """The steps read once inotify said something changed (never the heartbeat)."""
        assert self.woken.wait(2), "no inotify wake-up"
        self.woken.clear()
        return [e.step for e in self.source.read_events()]

    def close(self) -> None:
        self.watcher.stop()
        self.source.close()


def _repoint(link: Path, target: str) -> None:
    """``ln -sfn target link``: a new link renamed over the old one."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.symlink_to(target)
    os.replace(tmp, link)


def test_hostile_1_log_symlink_pointed_at_another_file_is_followed_at_once(tmp_path: Path) -> None:
    (tmp_path / "run-1.jsonl").write_bytes(eval_line(1, 1.0))
    log = tmp_path / "logging.jsonl"
    log.symlink_to("run-1.jsonl")
    watched = _Watched(log)
    try:
        assert [e.step for e in drain_history(watched.source)] == [1]
        append(tmp_path / "run-1.jsonl", eval_line(2, 0.9))  # the file the link names
        assert watched.steps_after_wake() == [2]
        (tmp_path / "run-2.jsonl").write_bytes(b"")
        _repoint(log, "run-2.jsonl")
        assert watched.steps_after_wake() == []
        append(tmp_path / "run-2.jsonl", eval_line(3, 0.8))
        assert watched.steps_after_wake() == [3]
        append(tmp_path / "run-1.jsonl", eval_line(4, 0.7))  # the old file is drained, as rotated
        assert watched.steps_after_wake() == [4]
        assert watched.source.cursor()["inode"] == (tmp_path / "run-2.jsonl").stat().st_ino  # type: ignore[index]
    finally:
        watched.close()


def test_hostile_1_parent_folder_symlink_pointed_elsewhere_is_followed_at_once(tmp_path: Path) -> None:
    for run in ("run-1", "run-2"):
        (tmp_path / run).mkdir()
    (tmp_path / "run-1" / "logging.jsonl").write_bytes(eval_line(1, 1.0))
    latest = tmp_path / "latest"
    latest.symlink_to("run-1")
    watched = _Watched(latest / "logging.jsonl")
    try:
        assert [e.step for e in drain_history(watched.source)] == [1]
        append(tmp_path / "run-1" / "logging.jsonl", eval_line(2, 0.9))
        assert watched.steps_after_wake() == [2]
        (tmp_path / "run-2" / "logging.jsonl").write_bytes(b"")
        _repoint(latest, "run-2")
        assert watched.steps_after_wake() == []
        append(tmp_path / "run-2" / "logging.jsonl", eval_line(3, 0.8))
        assert watched.steps_after_wake() == [3]
        append(tmp_path / "run-1" / "logging.jsonl", eval_line(4, 0.7))  # drained, in its folder
        assert watched.steps_after_wake() == [4]
        (tmp_path / "run-3").mkdir()  # made after the link moved: seen as the log's folder
        _repoint(latest, "run-3")
        assert watched.steps_after_wake() == []
        (tmp_path / "run-3" / "logging.jsonl").write_bytes(eval_line(5, 0.6))
        assert watched.steps_after_wake() == [5]
    finally:
        watched.close()


@pytest.mark.parametrize("rotated_to", ["same-folder", "new-file", "other-folder"])
def test_hostile_2_writer_left_on_the_rotated_file_is_read_at_once_and_told(
    tmp_path: Path, rotated_to: str
) -> None:
    log = tmp_path / "train.log"
    rotated = tmp_path / "old" / "train.log.1" if rotated_to == "other-folder" else tmp_path / "train.log.1"
    rotated.parent.mkdir(exist_ok=True)
    log.write_bytes(b"")
    watched = _Watched(log)
    try:
        with log.open("ab", buffering=0) as writer:  # the trainer's handle: it never reopens
            writer.write(eval_line(1, 1.0))
            assert watched.steps_after_wake() == [1]
            os.rename(log, rotated)
            if rotated_to != "same-folder":
                log.write_bytes(b"")  # the rotator made a new, empty file
            assert watched.steps_after_wake() == []
            for step in (2, 3):
                writer.write(eval_line(step, 1.0 / step))
                assert watched.steps_after_wake() == [step]
            notes = watched.source.notes()
            assert len(notes) == 1 and "still grows" in notes[0] and str(rotated) in notes[0], notes
        append(log, eval_line(4, 0.1))  # the trainer reopened its log by name at last
        assert watched.steps_after_wake() == [4]
        assert watched.source.notes() == []
    finally:
        watched.close()


def test_hostile_3_log_folder_renamed_and_made_again_is_watched_at_once(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "logging.jsonl").write_bytes(eval_line(1, 1.0))
    watched = _Watched(logs / "logging.jsonl")
    try:
        assert [e.step for e in drain_history(watched.source)] == [1]
        os.rename(logs, tmp_path / "logs.old")
        logs.mkdir()

        def watching_the_new_folder() -> bool:
            plan = watched.watcher.plan
            st = logs.stat()
            return plan is not None and (str(logs), False, (st.st_dev, st.st_ino)) in plan.watches

        wait_for(watching_the_new_folder, 2, "the watch to move to the new folder")
        watched.woken.clear()
        (logs / "logging.jsonl").write_bytes(eval_line(2, 0.5))
        assert watched.steps_after_wake() == [2]
        append(logs / "logging.jsonl", eval_line(3, 0.4))
        assert watched.steps_after_wake() == [3]
    finally:
        watched.close()


@pytest.mark.parametrize("fmt", ["tensorboard", "hf-state"])
@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("logging.jsonl", eval_line(1, 1.0) + eval_line(2, 0.5)),
        ("metrics.csv", b"epoch,step,val_loss\n0,49,0.5\n1,99,0.4\n"),
        ("trainer_state.json", b'{"global_step": 10, "epoch": 1.0}\n'),
    ],
)
def test_hostile_4_whole_file_format_that_reads_nothing_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fmt: str, name: str, content: bytes
) -> None:
    if fmt == "tensorboard" and name == "trainer_state.json":
        content = content * 2  # 12 bytes at least: shorter is a record still being written
    log = tmp_path / name
    log.write_bytes(content)
    source = open_source(log, fmt, watched=["eval_loss"])
    with caplog.at_level(logging.WARNING, logger="ckptd.logs"):
        assert drain_history(source) + source.read_events() + source.read_events() == []
    warnings = [r.getMessage() for r in caplog.records if "Is --format right?" in r.getMessage()]
    assert len(warnings) == 1 and f"read as {fmt}" in warnings[0] and repr(content[:20])[2:-1] in warnings[0]
    assert source.notes() == warnings


def test_hostile_4_hf_state_says_wrong_format_only_while_plainly_no_state(tmp_path: Path) -> None:
    state = tmp_path / STATE
    data = (HF / "checkpoint-100" / STATE).read_bytes()
    state.write_bytes(data[:300])  # caught half-written: read again when it changes, no advice
    source = open_source(state, "hf-state")
    assert drain_history(source) == [] and source.notes() == []
    write_in_place(state, data)
    assert max(e.step for e in source.read_events()) == 100
    assert source.notes() == []
    write_in_place(state, eval_line(1, 1.0) + eval_line(2, 0.5))  # JSON lines in its place
    assert source.read_events() == []
    assert len(source.notes()) == 1 and "Is --format right?" in source.notes()[0]
    write_in_place(state, (HF / "checkpoint-200" / STATE).read_bytes())
    assert max(e.step for e in source.read_events()) == 200
    assert source.notes() == []


@pytest.mark.parametrize("value", [b"true", b"false"])
def test_hostile_5_a_watched_metric_written_as_a_boolean_is_counted(tmp_path: Path, value: bytes) -> None:
    line = b'{"step": 5, "eval_loss": ' + value + b"}"
    with pytest.raises(MalformedLine) as caught:
        JsonlFormat(watched=["eval_loss"]).parse(line)
    assert caught.value.kind == "bool-metric"
    assert JsonlFormat().parse(line) == LogEvent(5, {})  # not watched: nothing dropped
    log = tmp_path / "logging.jsonl"
    log.write_bytes(line + b"\n" + eval_line(6, 0.5))
    source = LineSource(log, JsonlFormat(watched=["eval_loss"]))
    assert [e.step for e in source.read_events()] == [6]
    assert source.malformed.counts == {"bool-metric": 1}
