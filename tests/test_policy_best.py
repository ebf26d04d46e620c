"""Table tests for the best-so-far judgement (ckptd.policy.best): no filesystem, no clock."""

from __future__ import annotations

import copy
import math
from types import MappingProxyType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptd.policy import is_improvement, judge
from ckptd.records import Best, Criterion, LogEvent

NAN = math.nan
INF = math.inf

LOSS = Criterion("eval_loss", "min")
ACC = Criterion("eval_acc", "max")


@pytest.mark.parametrize(
    ("criterion", "value", "best", "expected"),
    [
        pytest.param(LOSS, 0.19, Best(100, 0.2), True, id="min-lower"),
        pytest.param(LOSS, 0.21, Best(100, 0.2), False, id="min-higher"),
        pytest.param(LOSS, 0.2, Best(100, 0.2), False, id="min-equal"),
        pytest.param(ACC, 0.81, Best(100, 0.8), True, id="max-higher"),
        pytest.param(ACC, 0.79, Best(100, 0.8), False, id="max-lower"),
        pytest.param(ACC, 0.8, Best(100, 0.8), False, id="max-equal"),
        # Deltas and values are exact binary fractions so "equal" really is equal.
        pytest.param(Criterion("l", "min", 0.25), 0.5, Best(1, 1.0), True, id="min-delta-beyond"),
        pytest.param(Criterion("l", "min", 0.25), 0.75, Best(1, 1.0), False, id="min-delta-equal"),
        pytest.param(Criterion("l", "min", 0.25), 0.875, Best(1, 1.0), False, id="min-delta-within"),
        pytest.param(Criterion("a", "max", 0.25), 1.5, Best(1, 1.0), True, id="max-delta-beyond"),
        pytest.param(Criterion("a", "max", 0.25), 1.25, Best(1, 1.0), False, id="max-delta-equal"),
        pytest.param(Criterion("a", "max", 0.25), 1.125, Best(1, 1.0), False, id="max-delta-within"),
        pytest.param(LOSS, 0.3, None, True, id="min-first-finite"),
        pytest.param(ACC, -5.0, None, True, id="max-first-finite-negative"),
        pytest.param(LOSS, NAN, None, False, id="nan-first"),
        pytest.param(LOSS, INF, None, False, id="inf-first"),
        pytest.param(ACC, -INF, None, False, id="neg-inf-first"),
        pytest.param(LOSS, NAN, Best(1, 0.2), False, id="min-nan"),
        pytest.param(LOSS, -INF, Best(1, 0.2), False, id="min-neg-inf-looks-lower"),
        pytest.param(ACC, INF, Best(1, 0.8), False, id="max-inf-looks-higher"),
        pytest.param(ACC, NAN, Best(1, 0.8), False, id="max-nan"),
        pytest.param(LOSS, 5.0, Best(1, NAN), True, id="nan-best-from-outside-is-no-best"),
    ],
)
def test_is_improvement(criterion: Criterion, value: float, best: Best | None, expected: bool) -> None:
    assert is_improvement(criterion, value, best) is expected


def test_first_finite_value_is_best() -> None:
    j = judge([LOSS], {}, LogEvent(50, {"eval_loss": 0.7}))
    assert j.verdict is not None
    assert j.verdict.action == "snapshot"
    assert j.verdict.tags == ("best:eval_loss",)
    assert j.verdict.eval_step == 50
    assert j.bests == {"eval_loss": Best(50, 0.7)}


@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "neg-inf"])
def test_non_finite_first_value_is_never_best(bad: float) -> None:
    first = judge([LOSS], {}, LogEvent(50, {"eval_loss": bad}))
    assert first.verdict is not None
    assert first.verdict.action == "skip"
    assert first.verdict.tags == ()
    assert "never best" in first.verdict.reason
    assert first.bests == {}
    # The next finite value is then the first best.
    second = judge([LOSS], first.bests, LogEvent(100, {"eval_loss": 0.9}))
    assert second.verdict is not None
    assert second.verdict.action == "snapshot"
    assert second.bests == {"eval_loss": Best(100, 0.9)}


@pytest.mark.parametrize(
    ("criterion", "best", "value", "action", "reason_parts"),
    [
        pytest.param(
            LOSS,
            Best(1100, 0.2010),
            0.1996,
            "snapshot",
            ("0.1996", "< best", "0.201", "@1100"),
            id="min-improves",
        ),
        pytest.param(
            LOSS,
            Best(1100, 0.1996),
            0.2100,
            "skip",
            ("0.21", "not better", "0.1996", "@1100"),
            id="min-worse",
        ),
        pytest.param(
            ACC,
            Best(1000, 0.80),
            0.81,
            "snapshot",
            ("0.81", "> best", "0.8", "@1000"),
            id="max-improves",
        ),
        pytest.param(
            ACC,
            Best(1000, 0.80),
            0.80,
            "skip",
            ("not better",),
            id="max-equal",
        ),
        pytest.param(
            Criterion("eval_loss", "min", 0.01),
            Best(1000, 0.2),
            0.195,
            "skip",
            ("not better", "by more than 0.01"),
            id="min-within-delta",
        ),
        pytest.param(
            LOSS,
            Best(1000, 0.2),
            NAN,
            "skip",
            ("eval_loss is nan: never best",),
            id="nan-after-best",
        ),
    ],
)
def test_judge_single_criterion(
    criterion: Criterion, best: Best, value: float, action: str, reason_parts: tuple[str, ...]
) -> None:
    j = judge([criterion], {criterion.metric: best}, LogEvent(1150, {criterion.metric: value}))
    assert j.verdict is not None
    assert j.verdict.action == action
    assert j.verdict.tags == ((criterion.tag,) if action == "snapshot" else ())
    for part in reason_parts:
        assert part in j.verdict.reason
    expected_best = Best(1150, value) if action == "snapshot" else best
    assert j.bests == {criterion.metric: expected_best}


@pytest.mark.parametrize(
    "criteria",
    [pytest.param([LOSS, ACC], id="loss-first"), pytest.param([ACC, LOSS], id="acc-first")],
)
def test_two_criteria_both_improve_tags_in_criteria_order(criteria: list[Criterion]) -> None:
    # The event lists acc first: tag order must follow the criteria, not the event.
    event = LogEvent(200, {"eval_acc": 0.9, "loss": 1.5, "eval_loss": 0.1})
    bests = {"eval_loss": Best(100, 0.2), "eval_acc": Best(100, 0.8)}
    j = judge(criteria, bests, event)
    assert j.verdict is not None
    assert j.verdict.action == "snapshot"
    assert j.verdict.tags == tuple(c.tag for c in criteria)
    assert j.verdict.metrics == {"eval_loss": 0.1, "eval_acc": 0.9}
    assert j.bests == {"eval_loss": Best(200, 0.1), "eval_acc": Best(200, 0.9)}


def test_two_criteria_one_improves() -> None:
    event = LogEvent(200, {"eval_loss": 0.3, "eval_acc": 0.9})
    bests = {"eval_loss": Best(100, 0.2), "eval_acc": Best(100, 0.8)}
    j = judge([LOSS, ACC], bests, event)
    assert j.verdict is not None
    assert j.verdict.action == "snapshot"
    assert j.verdict.tags == ("best:eval_acc",)
    assert j.bests == {"eval_loss": Best(100, 0.2), "eval_acc": Best(200, 0.9)}
    # Both criteria explain themselves, so a user sees why loss did not count.
    assert "eval_loss" in j.verdict.reason
    assert "eval_acc" in j.verdict.reason


def test_only_present_watched_metrics_are_judged() -> None:
    bests = {"eval_loss": Best(100, 0.2), "eval_acc": Best(100, 0.8)}
    j = judge([LOSS, ACC], bests, LogEvent(200, {"eval_acc": 0.7, "lr": 1e-4}))
    assert j.verdict is not None
    assert j.verdict.action == "skip"
    assert j.verdict.metrics == {"eval_acc": 0.7}
    assert "eval_loss" not in j.verdict.reason
    assert j.bests == bests


def test_event_without_watched_metric_has_no_verdict() -> None:
    bests = {"eval_loss": Best(100, 0.2), "unwatched": Best(5, 1.0)}
    j = judge([LOSS], bests, LogEvent(150, {"loss": 0.01, "lr": 1e-4}))
    assert j.verdict is None
    assert j.bests == bests


def test_entries_for_other_metrics_are_kept() -> None:
    bests = {"old_metric": Best(5, 1.0)}
    j = judge([LOSS], bests, LogEvent(150, {"eval_loss": 0.3}))
    assert j.bests == {"old_metric": Best(5, 1.0), "eval_loss": Best(150, 0.3)}


@pytest.mark.parametrize(
    ("step", "value", "action"),
    [
        pytest.param(1100, 0.2, "skip", id="same-step-same-value"),
        # A second eval line at the same step (HF's multi-dataset evals log one line each).
        pytest.param(1100, 0.1, "snapshot", id="same-step-better-value"),
        # A run resumed from an earlier checkpoint logs lower steps again: its bests are real.
        pytest.param(850, 0.1, "snapshot", id="earlier-step-better-value"),
        pytest.param(850, 0.3, "skip", id="earlier-step-worse-value"),
    ],
)
def test_issue7_10_judged_by_value_whatever_the_step(step: int, value: float, action: str) -> None:
    bests = {"eval_loss": Best(1100, 0.2)}
    j = judge([LOSS], bests, LogEvent(step, {"eval_loss": value}))
    assert j.verdict is not None
    assert j.verdict.action == action
    assert j.bests == (bests if action == "skip" else {"eval_loss": Best(step, value)})


def test_a_resumed_step_is_judged_per_criterion() -> None:
    bests = {"eval_loss": Best(1100, 0.2), "eval_acc": Best(1000, 0.8)}
    j = judge([LOSS, ACC], bests, LogEvent(1050, {"eval_loss": 0.3, "eval_acc": 0.9}))
    assert j.verdict is not None
    assert j.verdict.tags == ("best:eval_acc",)
    assert j.bests == {"eval_loss": Best(1100, 0.2), "eval_acc": Best(1050, 0.9)}


def test_inputs_are_not_mutated() -> None:
    criteria = [LOSS, ACC]
    bests_dict = {"eval_loss": Best(100, 0.2), "eval_acc": Best(100, 0.8)}
    metrics = {"eval_loss": 0.1, "eval_acc": 0.9}
    before = (copy.deepcopy(criteria), copy.deepcopy(bests_dict), copy.deepcopy(metrics))
    # Read-only views make any write attempt fail loudly, not just show up as a diff.
    bests = MappingProxyType(bests_dict)
    j = judge(criteria, bests, LogEvent(200, MappingProxyType(metrics)))
    assert (criteria, bests_dict, metrics) == before
    assert j.bests is not bests
    assert j.bests["eval_loss"] == Best(200, 0.1)


def test_two_criteria_on_one_metric_are_refused() -> None:
    with pytest.raises(ValueError, match="repeated: eval_loss"):
        judge([LOSS, Criterion("eval_loss", "max")], {}, LogEvent(1, {"eval_loss": 0.1}))


values = st.one_of(st.floats(min_value=-1e6, max_value=1e6), st.sampled_from([NAN, INF, -INF]))


@given(st.lists(values, max_size=40))
def test_running_best_is_the_first_finite_minimum(losses: list[float]) -> None:
    bests: dict[str, Best] = {}
    snapshots: list[int] = []
    for step, loss in enumerate(losses, start=1):
        j = judge([LOSS], bests, LogEvent(step, {"eval_loss": loss}))
        bests = dict(j.bests)
        assert j.verdict is not None
        if j.verdict.action == "snapshot":
            snapshots.append(step)
    finite = [(v, s) for s, v in enumerate(losses, start=1) if math.isfinite(v)]
    if not finite:
        assert bests == {} and snapshots == []
        return
    value, step = min(finite, key=lambda vs: (vs[0], vs[1]))
    assert bests == {"eval_loss": Best(step, value)}
    # One snapshot per strict new minimum, the last of them at the best step.
    record_lows = [s for i, (v, s) in enumerate(finite) if all(v < w for w, _ in finite[:i])]
    assert snapshots == record_lows
