"""Table tests for the retention policies (ckptd.policy.retention): synthetic records only."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptd.policy import (
    AnyPreservation,
    BestN,
    EveryNSteps,
    LatestN,
    PreservationPolicy,
    best_plus_last,
    judge,
    plan_deletions,
)
from ckptd.records import Best, CheckpointRecord, Criterion, LogEvent

NAN = math.nan
INF = math.inf

LOSS = Criterion("eval_loss", "min")
ACC = Criterion("eval_acc", "max")


def rec(step: int, created: float = 0.0, name: str | None = None, **metrics: float) -> CheckpointRecord:
    """A committed checkpoint named like the store names them, unless told otherwise."""
    return CheckpointRecord(name=name or f"step-{step:08d}", step=step, metrics=metrics, created=created)


def names(*steps: int) -> frozenset[str]:
    return frozenset(f"step-{s:08d}" for s in steps)


FIVE = [rec(s, eval_loss=loss) for s, loss in [(100, 0.5), (200, 0.3), (300, 0.4), (400, 0.2), (500, 0.6)]]


@pytest.mark.parametrize(
    ("policy", "records", "expected"),
    [
        pytest.param(LatestN(2), FIVE, names(400, 500), id="latest-2"),
        pytest.param(LatestN(0), FIVE, frozenset(), id="latest-0"),
        pytest.param(LatestN(9), FIVE, names(100, 200, 300, 400, 500), id="latest-more-than-records"),
        pytest.param(LatestN(3), [], frozenset(), id="latest-no-records"),
        pytest.param(
            LatestN(1),
            [rec(100, created=2.0, name="b"), rec(100, created=1.0, name="a")],
            frozenset({"b"}),
            id="latest-tie-later-created-wins",
        ),
        pytest.param(
            LatestN(1),
            [rec(100, created=1.0, name="a"), rec(100, created=1.0, name="b")],
            frozenset({"b"}),
            id="latest-tie-then-name",
        ),
        pytest.param(
            LatestN(1),
            [rec(200, created=1.0), rec(100, created=9.0)],
            names(200),
            id="latest-step-beats-created",
        ),
        pytest.param(BestN(LOSS, 2), FIVE, names(200, 400), id="best-min-2"),
        pytest.param(BestN(LOSS, 0), FIVE, frozenset(), id="best-0"),
        pytest.param(BestN(Criterion("eval_loss", "max"), 1), FIVE, names(500), id="best-max-1"),
        pytest.param(BestN(LOSS, 9), FIVE, names(100, 200, 300, 400, 500), id="best-more-than-n"),
        pytest.param(
            BestN(LOSS, 1),
            [rec(300, eval_loss=0.2), rec(100, eval_loss=0.2), rec(200, eval_loss=0.2)],
            names(100),
            id="best-tie-earlier-step-wins",
        ),
        pytest.param(
            BestN(LOSS, 5),
            [rec(100), rec(200, eval_acc=0.9), rec(300, eval_loss=0.4)],
            names(300),
            id="best-missing-metric-never-ranked",
        ),
        pytest.param(
            BestN(LOSS, 5),
            [rec(100, eval_loss=NAN), rec(200, eval_loss=-INF), rec(300, eval_loss=INF)],
            frozenset(),
            id="best-non-finite-never-preserved",
        ),
        pytest.param(
            BestN(ACC, 1),
            [rec(100, eval_acc=INF), rec(200, eval_acc=NAN), rec(300, eval_acc=0.1)],
            names(300),
            id="best-max-inf-does-not-win",
        ),
        pytest.param(EveryNSteps(200), FIVE, names(200, 400), id="every-200"),
        pytest.param(EveryNSteps(1), FIVE, names(100, 200, 300, 400, 500), id="every-1"),
        pytest.param(EveryNSteps(1000), [rec(0), rec(999), rec(1000)], names(0, 1000), id="every-step-0"),
        pytest.param(AnyPreservation(()), FIVE, frozenset(), id="any-empty"),
        pytest.param(
            AnyPreservation((LatestN(1), BestN(LOSS, 1), EveryNSteps(300))),
            FIVE,
            names(300, 400, 500),
            id="any-union",
        ),
        pytest.param(
            AnyPreservation((LatestN(2), EveryNSteps(500))),
            FIVE,
            names(400, 500),
            id="any-overlap",
        ),
    ],
)
def test_preserve(
    policy: PreservationPolicy, records: list[CheckpointRecord], expected: frozenset[str]
) -> None:
    assert policy.preserve(records) == expected


def test_preserve_does_not_depend_on_record_order() -> None:
    policy = best_plus_last({LOSS: 2}, keep_last=1, every_steps=300)
    shuffled = list(FIVE)
    random.Random(0).shuffle(shuffled)
    assert policy.preserve(shuffled) == policy.preserve(FIVE) == names(200, 300, 400, 500)


def test_checkpoint_best_on_two_criteria_is_kept_once() -> None:
    records = [
        rec(100, eval_loss=0.5, eval_acc=0.5),
        rec(200, eval_loss=0.1, eval_acc=0.9),  # best on both
        rec(300, eval_loss=0.2, eval_acc=0.8),  # second on both: one slot each is full
        rec(400, eval_loss=0.4, eval_acc=0.6),
    ]
    policy = best_plus_last({LOSS: 1, ACC: 1}, keep_last=1)
    assert policy.preserve(records) == names(200, 400)
    assert plan_deletions(records, policy) == [records[0], records[2]]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda: LatestN(-1), "LatestN.n must be >= 0, not -1", id="latest-negative"),
        pytest.param(lambda: BestN(LOSS, -2), "BestN.n must be >= 0, not -2", id="best-negative"),
        pytest.param(lambda: EveryNSteps(0), "interval must be >= 1, not 0", id="every-zero"),
        pytest.param(lambda: EveryNSteps(-5), "interval must be >= 1, not -5", id="every-negative"),
        pytest.param(lambda: best_plus_last({LOSS: 1}, keep_last=-1), "LatestN.n", id="keep-last"),
        pytest.param(lambda: best_plus_last({LOSS: 1}, 1, every_steps=0), "interval", id="every-steps"),
    ],
)
def test_constructors_validate(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("every_steps", "expected"),
    [
        pytest.param(None, (BestN(LOSS, 3), BestN(ACC, 3), LatestN(2)), id="without-every"),
        pytest.param(500, (BestN(LOSS, 3), BestN(ACC, 3), LatestN(2), EveryNSteps(500)), id="with-every"),
    ],
)
def test_best_plus_last_builds_the_default_policy(
    every_steps: int | None, expected: tuple[PreservationPolicy, ...]
) -> None:
    assert best_plus_last({LOSS: 3, ACC: 3}, 2, every_steps) == AnyPreservation(expected)


def test_plan_deletions_sorted_by_step() -> None:
    shuffled = [FIVE[3], FIVE[0], FIVE[4], FIVE[2], FIVE[1]]
    planned = plan_deletions(shuffled, LatestN(1))
    assert [r.step for r in planned] == [100, 200, 300, 400]


@pytest.mark.parametrize(
    ("policy", "protected", "expected_deleted"),
    [
        pytest.param(LatestN(0), {"step-00000300"}, (100, 200, 400, 500), id="keep-nothing"),
        pytest.param(LatestN(1), ["step-00000100", "step-00000500"], (200, 300, 400), id="overlap"),
        pytest.param(LatestN(5), {"step-00000300"}, (), id="keep-all"),
        pytest.param(LatestN(4), {"not-a-record"}, (100,), id="unknown-name-harmless"),
    ],
)
def test_protected_names_are_never_planned(
    policy: PreservationPolicy, protected: set[str] | list[str], expected_deleted: tuple[int, ...]
) -> None:
    planned = plan_deletions(FIVE, policy, protected)
    assert tuple(r.step for r in planned) == expected_deleted
    assert not {r.name for r in planned} & set(protected)


def test_protected_as_bare_str_is_refused() -> None:
    # A str would protect its characters, i.e. nothing: refuse rather than delete.
    with pytest.raises(TypeError, match="collection of names"):
        plan_deletions(FIVE, LatestN(0), "step-00000300")


def _seed_loss(step: int) -> float:
    """Eval loss falling to its single minimum at step 1050, then rising."""
    return 0.2 + ((step - 1050) / 1000) ** 2


@pytest.mark.parametrize(
    ("keep_best", "keep_last", "every_steps", "expected_kept"),
    [
        pytest.param(1, 2, None, (1050, 1800, 2000), id="seed-best1-last2"),
        pytest.param(1, 1, None, (1050, 2000), id="best1-last1"),
        pytest.param(2, 2, None, (1000, 1050, 1800, 2000), id="best2-last2"),
        pytest.param(1, 2, 1000, (1000, 1050, 1800, 2000), id="best1-last2-every1000"),
        pytest.param(1, 0, None, (1050,), id="best1-last0"),
    ],
)
def test_seed_scenario(
    keep_best: int, keep_last: int, every_steps: int | None, expected_kept: tuple[int, ...]
) -> None:
    """Evals every 50 steps to 2000, periodic saves every 200, rotation after each commit."""
    policy = best_plus_last({LOSS: keep_best}, keep_last, every_steps)
    bests: dict[str, Best] = {}
    store: list[CheckpointRecord] = []
    for step in range(50, 2001, 50):
        metrics = {"eval_loss": _seed_loss(step)}
        judgement = judge([LOSS], bests, LogEvent(step, metrics))
        bests = dict(judgement.bests)
        assert judgement.verdict is not None
        if judgement.verdict.action == "snapshot" or step % 200 == 0:
            new = CheckpointRecord(f"step-{step:08d}", step, judgement.verdict.tags, metrics, created=step)
            store.append(new)
            doomed = plan_deletions(store, policy)
            store = [r for r in store if r not in doomed]
            # The best so far must survive every rotation, not just the last one.
            assert f"step-{bests['eval_loss'].step:08d}" in {r.name for r in store}
    assert bests == {"eval_loss": Best(1050, _seed_loss(1050))}
    assert tuple(r.step for r in store) == expected_kept


metric_values = st.one_of(
    st.none(),
    st.floats(min_value=-1e6, max_value=1e6),
    st.sampled_from([NAN, INF, -INF]),
)


@st.composite
def record_lists(draw: st.DrawFn) -> list[CheckpointRecord]:
    steps = draw(st.lists(st.integers(0, 5000), min_size=1, max_size=30, unique=True))
    records = []
    for step in steps:
        value = draw(metric_values)
        metrics = {} if value is None else {"m": value}
        records.append(rec(step, created=draw(st.floats(0, 100)), **metrics))
    return records


@given(
    records=record_lists(),
    mode=st.sampled_from(["min", "max"]),
    keep_best=st.integers(1, 5),
    keep_last=st.integers(0, 5),
    every_steps=st.one_of(st.none(), st.integers(1, 1000)),
    data=st.data(),
)
def test_best_finite_record_is_never_deleted(
    records: list[CheckpointRecord],
    mode: str,
    keep_best: int,
    keep_last: int,
    every_steps: int | None,
    data: st.DataObject,
) -> None:
    criterion = Criterion("m", mode)  # type: ignore[arg-type]
    protected = data.draw(st.sets(st.sampled_from([r.name for r in records])))
    policy = best_plus_last({criterion: keep_best}, keep_last, every_steps)
    planned = plan_deletions(records, policy, protected)
    planned_names = {r.name for r in planned}

    finite = [r for r in records if "m" in r.metrics and math.isfinite(r.metrics["m"])]
    if finite:
        sign = 1 if mode == "min" else -1
        best = min(finite, key=lambda r: (sign * r.metrics["m"], r.step))
        assert best.name not in planned_names
    # The plan is exactly the complement of what is kept, in step order.
    kept = policy.preserve(records) | protected
    assert planned_names == {r.name for r in records} - kept
    assert [r.step for r in planned] == sorted(r.step for r in planned)
