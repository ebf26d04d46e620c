"""TensorBoardSource on the real HF Trainer event file and on event files written while it reads."""

from __future__ import annotations

import io
import json
import math
import random
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.scalar.summary_v2 import scalar_pb
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util.tensor_util import make_tensor_proto

from ckptd.logs.tensorboard import TensorBoardSource
from ckptd.records import LogEvent

HF = Path(__file__).parent / "fixtures" / "hf-trainer"
FIXTURE_RUN = "Nov27_19-58-06_vm"
FIXTURE_NAME = "events.out.tfevents.1795809486.vm.11325.0"
FIXTURE = HF / "runs" / FIXTURE_RUN / FIXTURE_NAME
# README.txt: (step, eval_loss), printed to 4 decimals.
README_EVAL_LOSS = {
    20: 3.1976,
    40: 2.5518,
    60: 2.2408,
    80: 2.0483,
    100: 1.9363,
    120: 1.8693,
    140: 1.8281,
    160: 1.8051,
    180: 1.7779,
    200: 1.7705,
}
# TensorBoard stores simple_value as float32, about 7 significant digits: a value logged as a
# double (trainer_state.json) compares equal only to float32 precision, hence rel=1e-6.
FLOAT32 = 1e-6


def copy_fixture(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / FIXTURE_RUN
    run.mkdir(parents=True)
    shutil.copyfile(FIXTURE, run / FIXTURE_NAME)
    return run


def framed(payload: bytes) -> bytes:
    """One TFRecord, framed (length, checksums) as tensorboard's writer frames it."""
    buffer = io.BytesIO()
    RecordWriter(buffer).write(payload)
    return buffer.getvalue()


def record(event: Event) -> bytes:
    return framed(event.SerializeToString())


def scalars(step: int, values: dict[str, float]) -> bytes:
    summary = Summary(value=[Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])
    return record(Event(step=step, summary=summary))


def by_step(events: Iterable[LogEvent]) -> dict[int, dict[str, float]]:
    merged: dict[int, dict[str, float]] = {}
    for event in events:
        merged.setdefault(event.step, {}).update(event.metrics)
    return merged


def deliveries(events: Iterable[LogEvent]) -> Counter[tuple[int, str]]:
    return Counter((event.step, tag) for event in events for tag in event.metrics)


def assert_each_record_delivered_once(seen: list[LogEvent]) -> None:
    """Nothing lost, nothing delivered twice, against tensorboard's own loader as the oracle.

    HF writes some (step, tag) pairs more than once (``train/epoch`` with the train and the eval
    logs of a step); records read in one call merge, so such a pair arrives 1 to n times.
    """
    written: Counter[tuple[int, str]] = Counter()
    for raw in RawEventFileLoader(str(FIXTURE)).Load():
        event = Event.FromString(raw)
        written.update((event.step, value.tag) for value in event.summary.value)
    scalar_written = {pair: n for pair, n in written.items() if not pair[1].endswith("text_summary")}
    delivered = {pair: n for pair, n in deliveries(seen).items() if not pair[1].startswith("eval_")}
    assert delivered.keys() == scalar_written.keys()
    assert all(1 <= delivered[pair] <= n for pair, n in scalar_written.items())


def fixture_metrics() -> dict[int, dict[str, float]]:
    source = TensorBoardSource(FIXTURE)
    try:
        return by_step(source.read_events())
    finally:
        source.close()


def test_hf_fixture_eval_loss_matches_readme_and_trainer_state(tmp_path: Path) -> None:
    source = TensorBoardSource(copy_fixture(tmp_path))
    events = source.read_events()

    steps = [event.step for event in events]
    assert steps == sorted(set(steps)), "one merged event per step"
    assert all(event.metrics for event in events)
    metrics = by_step(events)
    eval_loss = {step: m["eval/loss"] for step, m in metrics.items() if "eval/loss" in m}
    assert eval_loss == pytest.approx(README_EVAL_LOSS, abs=5e-5)
    state = json.loads((HF / "checkpoint-200" / "trainer_state.json").read_text())
    logged = {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
    assert eval_loss == pytest.approx(logged, rel=FLOAT32)
    assert eval_loss[200] == pytest.approx(1.7705039978027344, rel=FLOAT32)
    # The HF-compatible alias carries the same value.
    assert {step: m["eval_loss"] for step, m in metrics.items() if "eval_loss" in m} == eval_loss
    assert {step for step, m in metrics.items() if "train/loss" in m} == set(range(5, 201, 5))
    assert metrics[200]["train/train_loss"] == pytest.approx(2.253, abs=5e-4)
    assert not any("text_summary" in tag for m in metrics.values() for tag in m)
    assert source.malformed.counts == {}
    assert source.read_events() == []
    assert source.cursor() == {"kind": "tensorboard", "files": {FIXTURE_NAME: 219}}


def test_a_file_path_reads_only_that_file(tmp_path: Path) -> None:
    run = copy_fixture(tmp_path)
    (run / "events.out.tfevents.2.other").write_bytes(scalars(7, {"eval/loss": 9.0}))
    source = TensorBoardSource(run / FIXTURE_NAME)
    assert (source.watch_path, source.watch_children) == (run / FIXTURE_NAME, False)
    assert by_step(source.read_events()) == fixture_metrics()
    directory = TensorBoardSource(run)
    assert (directory.watch_path, directory.watch_children) == (run, True)
    assert by_step(directory.read_events())[7] == {"eval/loss": 9.0, "eval_loss": 9.0}


def test_records_cut_anywhere_are_read_once_when_complete(tmp_path: Path) -> None:
    data = FIXTURE.read_bytes()
    live = tmp_path / FIXTURE_NAME
    live.touch()
    source = TensorBoardSource(tmp_path)
    seen: list[LogEvent] = []
    sizes = [1, 3, 7, 12, 13, 50, 333]
    offset = 0
    for i in range(len(data)):  # bounded; ends when the data is written
        if offset >= len(data):
            break
        chunk = data[offset : offset + sizes[i % len(sizes)]]
        with live.open("ab") as out:
            out.write(chunk)
        offset += len(chunk)
        seen += source.read_events()  # mostly with a partial record at the end of the file
    assert all(event.metrics for event in seen)
    assert_each_record_delivered_once(seen)
    assert by_step(seen) == fixture_metrics()
    assert source.malformed.counts == {}


def test_live_summary_writer_every_step_once(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter  # the writer HF uses

    steps = range(1, 301)
    done = threading.Event()

    def train() -> None:
        writer = SummaryWriter(log_dir=str(tmp_path))
        try:
            for step in steps:
                writer.add_scalar("eval/loss", 1.0 / step, step)
                writer.add_scalar("train/loss", 2.0 / step, step)
                if step % 7 == 0:
                    writer.flush()
        finally:
            writer.close()
            done.set()

    source = TensorBoardSource(tmp_path)
    thread = threading.Thread(target=train)
    thread.start()
    batches: list[list[LogEvent]] = []
    while not done.is_set():
        batches.append(source.read_events())
    thread.join()
    batches.append(source.read_events())
    seen = [event for batch in batches for event in batch]

    assert sum(1 for batch in batches if batch) > 1, "read while the writer wrote"
    assert set(deliveries(seen).values()) == {1}
    metrics = by_step(seen)
    assert sorted(metrics) == list(steps)
    for step in steps:
        assert metrics[step]["eval_loss"] == pytest.approx(1.0 / step, rel=FLOAT32)
        assert metrics[step]["train/loss"] == pytest.approx(2.0 / step, rel=FLOAT32)
    assert source.malformed.counts == {}


def test_a_file_that_appears_later_is_read_from_its_start(tmp_path: Path) -> None:
    run = copy_fixture(tmp_path)
    source = TensorBoardSource(run)
    assert len(source.read_events()) == 40
    # A restart: a new writer, a new file; also one whose name sorts first.
    (run / "events.out.tfevents.1795900000.vm.2.0").write_bytes(
        scalars(200, {"eval/loss": 1.5}) + scalars(220, {"eval/loss": 1.4})
    )
    (run / "events.out.tfevents.1000000000.vm.3.0").write_bytes(scalars(1, {"eval/loss": 5.0}))
    assert by_step(source.read_events()) == {
        1: {"eval/loss": 5.0, "eval_loss": 5.0},
        200: {"eval/loss": 1.5, "eval_loss": 1.5},
        220: {"eval/loss": pytest.approx(1.4, rel=FLOAT32), "eval_loss": pytest.approx(1.4, rel=FLOAT32)},
    }


def test_resume_from_cursor_delivers_only_new_records(tmp_path: Path) -> None:
    data = FIXTURE.read_bytes()
    live = tmp_path / FIXTURE_NAME
    live.write_bytes(data[: len(data) // 2])  # ends inside a record
    first = TensorBoardSource(tmp_path)
    before = first.read_events()
    first.close()
    saved = json.loads(json.dumps(first.cursor()))  # what state.json keeps

    resumed = TensorBoardSource(tmp_path, cursor=saved)
    assert resumed.read_events() == []
    with live.open("ab") as out:
        out.write(data[len(data) // 2 :])
    after = resumed.read_events()

    assert before and after
    assert_each_record_delivered_once(before + after)
    assert by_step(before + after) == fixture_metrics()
    assert resumed.cursor() == {"kind": "tensorboard", "files": {FIXTURE_NAME: 219}}


@pytest.mark.parametrize(
    "cursor",
    [None, {"kind": "line", "offset": 5}, {"kind": "tensorboard", "files": {FIXTURE_NAME: "x"}}],
)
def test_a_cursor_without_a_count_for_the_file_reads_it_all(tmp_path: Path, cursor: dict | None) -> None:
    source = TensorBoardSource(copy_fixture(tmp_path), cursor=cursor)
    assert by_step(source.read_events()) == fixture_metrics()


def test_garbage_and_corrupt_files_are_counted_not_raised(tmp_path: Path) -> None:
    run = copy_fixture(tmp_path)
    rng = random.Random(0)
    (run / "events.out.tfevents.garbage").write_bytes(rng.randbytes(4096))
    corrupt = bytearray(FIXTURE.read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF
    (run / "events.out.tfevents.corrupt").write_bytes(corrupt)

    source = TensorBoardSource(run)
    metrics = by_step(source.read_events())
    assert metrics == fixture_metrics()  # the good file is read in full
    assert source.malformed.counts == {"tfrecord": 2}
    assert source.read_events() == []
    assert source.malformed.counts == {"tfrecord": 2}, "a broken file is counted once"

    alone = TensorBoardSource(run / "events.out.tfevents.corrupt")
    eval_steps = {step for step, m in by_step(alone.read_events()).items() if "eval/loss" in m}
    assert 20 in eval_steps and 200 not in eval_steps  # the records before the bad one count


def test_a_truncated_file_is_a_file_being_written(tmp_path: Path) -> None:
    # A cut-off last record looks exactly like one the writer has not finished: not malformed.
    data = FIXTURE.read_bytes()
    (tmp_path / FIXTURE_NAME).write_bytes(data[: len(data) * 3 // 4])
    source = TensorBoardSource(tmp_path)
    metrics = by_step(source.read_events())
    assert metrics and set(metrics) < set(fixture_metrics())
    assert source.malformed.counts == {}


def test_new_style_tensors_nan_and_bad_records(tmp_path: Path) -> None:
    tensor = scalar_pb("eval/acc", 0.5)
    # Writers may send the plugin metadata with a tag's first value only.
    bare = Summary()
    bare.value.add(tag="eval/acc", tensor=make_tensor_proto(np.float32(0.75)))
    text = Summary()
    text.value.add(tag="notes", tensor=make_tensor_proto(np.array(["hello"], dtype=object)))
    vector = scalar_pb("eval/vec", 1.0)
    vector.value[0].tensor.CopyFrom(make_tensor_proto(np.array([1.0, 2.0], dtype=np.float32)))
    data = b"".join(
        [
            record(Event(step=1, summary=tensor)),
            record(Event(step=2, summary=bare)),
            record(Event(step=3, summary=text)),
            record(Event(step=4, summary=vector)),
            record(Event(step=-1, summary=tensor)),
            record(Event(step=5, file_version="brain.Event:2")),
            framed(b"\xff" * 10),  # checksums right, not an Event
            scalars(6, {"eval/loss": math.nan}),
        ]
    )
    (tmp_path / "events.out.tfevents.1.x").write_bytes(data)
    source = TensorBoardSource(tmp_path)
    events = source.read_events()
    assert [event.step for event in events] == [1, 2, 6]
    assert events[0].metrics == {"eval/acc": 0.5, "eval_acc": 0.5}
    assert events[1].metrics == {"eval/acc": 0.75, "eval_acc": 0.75}
    assert math.isnan(events[2].metrics["eval_loss"])
    assert source.malformed.counts == {"tfrecord": 2}  # the vector and the non-proto record


def test_missing_tensorboard_is_a_config_error() -> None:
    code = (
        "import sys; sys.modules['tensorboard'] = None\n"
        "from pathlib import Path\n"
        "from ckptd.errors import ConfigError\n"
        "from ckptd.logs.tensorboard import TensorBoardSource\n"
        "try:\n"
        "    TensorBoardSource(Path('.'))\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == (
        "reading TensorBoard logs needs the optional extra: pip install 'ckptd[tensorboard]'"
    )


def test_report_rss_of_the_reader(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Measured, not asserted: the daemon's RSS target is 40 MB, and this is what the reader adds.
    code = (
        "import sys, psutil\n"
        "from pathlib import Path\n"
        "import ckptd.daemon.run\n"
        "from ckptd.logs.tensorboard import TensorBoardSource\n"
        "rss = psutil.Process().memory_info\n"
        "before = rss().rss\n"
        "source = TensorBoardSource(Path(sys.argv[1]))\n"
        "source.read_events()\n"
        "print(before, rss().rss)\n"
    )
    run = copy_fixture(tmp_path)
    out = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, check=True)
    before, after = (int(n) / 2**20 for n in out.stdout.split())
    with capsys.disabled():
        print(f"\nRSS: daemon imports {before:.1f} MiB; + TensorBoard reader {after - before:.1f} MiB")


def test_a_runs_directory_is_followed_into_the_run_folders_hf_creates(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(HF / "runs", runs)  # runs/<date>_<host>/events.out.tfevents.*
    source = TensorBoardSource(runs)
    first = {e.step: e.metrics for e in source.read_events()}
    assert first[200]["eval_loss"] == pytest.approx(1.7705039978027344, rel=1e-6)
    later = runs / "Nov28_09-00-00_vm"
    later.mkdir()
    shutil.copy(FIXTURE, later / "events.out.tfevents.2.vm")
    again = {e.step for e in source.read_events()}
    assert again == set(first), "a second run's file, in its own folder, is read from its start"
    assert any("Nov28" in name for name in source.cursor()["files"])
