"""LightningCsvFormat on Lightning's real CSVLogger files (and their rewrites) and on hand-made rows."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ckptd.errors import MalformedLine
from ckptd.logs.csvlog import LightningCsvFormat
from ckptd.logs.source import LineSource
from ckptd.records import LogEvent

LIGHTNING = Path(__file__).parent / "fixtures" / "lightning"
FINAL = LIGHTNING / "lightning_logs" / "version_0" / "metrics.csv"
# Validation rows as lightning/README.txt lists them: step, epoch, val_loss, val_acc.
README_VALIDATIONS = [
    (49, 0, 1.1636923551559448, 0.60546875),
    (99, 0, 0.9257780313491821, 0.712890625),
    (149, 1, 0.8121192455291748, 0.76953125),
    (199, 1, 0.7097402811050415, 0.818359375),
    (249, 2, 0.6646843552589417, 0.828125),
    (299, 2, 0.6223934292793274, 0.84765625),
]


def parse_file(path: Path) -> list[LogEvent]:
    fmt = LightningCsvFormat()
    events = [fmt.parse(line) for line in path.read_bytes().splitlines()]
    assert events[0] is None  # the header
    return [e for e in events[1:] if e is not None]


def validations(events: list[LogEvent]) -> list[tuple[int, float, float, float]]:
    return [
        (e.step, e.metrics["epoch"], e.metrics["val_loss"], e.metrics["val_acc"])
        for e in events
        if "val_loss" in e.metrics
    ]


def test_final_metrics_csv_validations_match_readme() -> None:
    events = parse_file(FINAL)
    assert len(events) == 36  # 30 train rows + 6 validation rows, every row an event
    assert validations(events) == README_VALIDATIONS
    # Sparse rows: a validation row has no train_loss or lr, not a 0.
    assert events[5] == LogEvent(49, {"epoch": 0.0, "val_acc": 0.60546875, "val_loss": 1.1636923551559448})


def test_final_metrics_csv_train_rows_and_late_lr_column() -> None:
    train = [e for e in parse_file(FINAL) if "train_loss" in e.metrics]
    assert [e.step for e in train] == list(range(9, 300, 10))
    assert train[0] == LogEvent(9, {"epoch": 0.0, "train_loss": 1.382326364517212})
    with_lr = {e.step: e.metrics["lr"] for e in train if "lr" in e.metrics}
    assert sorted(with_lr) == list(range(159, 300, 10))
    assert {with_lr[s] for s in range(159, 200, 10)} == {0.02500000037252903}
    assert {with_lr[s] for s in range(209, 300, 10)} == {0.012500000186264515}


@pytest.mark.parametrize(
    ("name", "rows", "last_step", "expected_validations"),
    [
        ("metrics_before_first_val.csv", 4, 39, []),
        ("metrics_before_rewrite.csv", 15, 129, README_VALIDATIONS[:2]),
    ],
)
def test_earlier_versions_of_the_file(
    name: str, rows: int, last_step: int, expected_validations: list[tuple[int, int, float, float]]
) -> None:
    events = parse_file(LIGHTNING / name)
    assert len(events) == rows
    assert events[-1].step == last_step
    assert validations(events) == expected_validations


def test_following_the_real_rewrites_yields_each_validation_once_per_step(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.csv"
    source = LineSource(metrics, LightningCsvFormat())
    events: list[LogEvent] = []
    versions = [LIGHTNING / "metrics_before_first_val.csv", LIGHTNING / "metrics_before_rewrite.csv", FINAL]
    inodes = set()
    for version in versions:
        # As CSVLogger does: the same file truncated and written again from its header.
        with metrics.open("r+b" if metrics.exists() else "wb") as out:
            out.truncate(0)
            out.write(version.read_bytes())
        inodes.add(metrics.stat().st_ino)
        events += source.read_events()
    assert len(inodes) == 1
    assert source.follower.rewinds == 2
    assert source.malformed.counts == {}
    by_step: dict[int, set[tuple[float, float, float]]] = {}
    for step, epoch, loss, acc in validations(events):
        by_step.setdefault(step, set()).add((epoch, loss, acc))
    # Rows re-read after a rewrite come again, always with the same values.
    assert {step: values.pop() for step, values in by_step.items() if len(values) == 1} == {
        step: (epoch, loss, acc) for step, epoch, loss, acc in README_VALIDATIONS
    }
    # Nothing was lost or mis-mapped by the two header changes: the last rows read are the final file.
    assert events[-36:] == parse_file(FINAL)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        # Sparse: empty cells are absent metrics.
        (
            ["epoch,step,train_loss,val_loss", "0,9,1.5,", "0,9,,1.25"],
            [(9, {"epoch": 0.0, "train_loss": 1.5}), (9, {"epoch": 0.0, "val_loss": 1.25})],
        ),
        # NaN and infinities as Python's csv writes them.
        (["step,val_loss,x", "5,nan,-inf"], [(5, {"val_loss": math.nan, "x": -math.inf})]),
        # A header rewritten part-way: rows after it use the new columns.
        (
            ["epoch,step,train_loss", "0,9,1.5", "epoch,lr,step,train_loss", "0,0.1,19,1.4"],
            [(9, {"epoch": 0.0, "train_loss": 1.5}), (19, {"epoch": 0.0, "lr": 0.1, "train_loss": 1.4})],
        ),
        # Quoted names, a step written as 19.0, a cell that is no number, a blank line.
        (['"a,b",step,note', "1.5,19.0,oops", ""], [(19, {"a,b": 1.5})]),
        # A byte order mark before the header.
        (["\ufeffstep,val_loss", "3,0.5"], [(3, {"val_loss": 0.5})]),
    ],
)
def test_hand_made_files(lines: list[str], expected: list[tuple[int, dict[str, float]]]) -> None:
    fmt = LightningCsvFormat()
    events = [e for e in (fmt.parse(line.encode()) for line in lines) if e is not None]
    assert [e.step for e in events] == [step for step, _ in expected]
    for event, (_, metrics) in zip(events, expected, strict=True):
        assert event.metrics.keys() == metrics.keys()
        for key, value in metrics.items():
            assert event.metrics[key] == value or (math.isnan(value) and math.isnan(event.metrics[key]))


@pytest.mark.parametrize(
    ("header", "row", "kind"),
    [
        (None, "0,9,1.5", "no-header"),
        (None, "epoch,train_loss", "no-header"),  # no step column: not a header
        ("epoch,step,train_loss", "0,9", "csv"),
        ("epoch,step,train_loss", "0,9,1.5,7", "csv"),
        ("epoch,step,train_loss", '0,9,"1.5', "csv"),  # an unclosed quote
        ("epoch,step,train_loss", "0,,1.5", "csv"),  # no step
        ("epoch,step,train_loss", "0,9.5,1.5", "csv"),
        ("epoch,step,train_loss", "0,-1,1.5", "csv"),
        ("step,x", b"9,\xff", "utf8"),
    ],
)
def test_malformed_rows(header: str | None, row: str | bytes, kind: str) -> None:
    fmt = LightningCsvFormat()
    if header is not None:
        assert fmt.parse(header.encode()) is None
    with pytest.raises(MalformedLine) as caught:
        fmt.parse(row if isinstance(row, bytes) else row.encode())
    assert caught.value.kind == kind


def test_a_malformed_row_does_not_lose_the_header() -> None:
    fmt = LightningCsvFormat()
    fmt.parse(b"epoch,step,val_loss")
    with pytest.raises(MalformedLine):
        fmt.parse(b"0,9")
    assert fmt.parse(b"0,49,1.25") == LogEvent(49, {"epoch": 0.0, "val_loss": 1.25})
