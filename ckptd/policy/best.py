"""Best-so-far judgement: is this eval a new best, and which verdict follows from it.

Pure functions over records (no I/O, no clock): the daemon passes every log event
through `judge`, writes the verdict to the control file and keeps the returned bests
in its durable state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ckptd.errors import ConfigError
from ckptd.records import Best, Criterion, LogEvent, Verdict


def is_improvement(criterion: Criterion, value: float, best: Best | None) -> bool:
    """Whether ``value`` beats ``best`` by more than ``criterion.min_delta``.

    NaN and infinities are never an improvement: a diverged eval must not replace a real
    best. With no best yet, any finite value is one. Equal is not better, so a plateau
    does not trigger a snapshot per eval.
    """
    if not math.isfinite(value):
        return False
    # A non-finite best cannot come from `judge`; if one arrives from outside (a
    # hand-edited state file) it must not block every later eval, so it counts as none.
    if best is None or not math.isfinite(best.value):
        return True
    if criterion.mode == "min":
        return value < best.value - criterion.min_delta
    return value > best.value + criterion.min_delta


@dataclass(frozen=True)
class Judgement:
    """What `judge` concluded about one log event.

    ``verdict`` is None when the event holds none of the watched metrics (a train-loss
    line, say). ``bests`` is the best so far per metric after this event, a new mapping
    that keeps every entry the event did not beat.
    """

    verdict: Verdict | None
    bests: Mapping[str, Best]


def judge(criteria: Sequence[Criterion], bests: Mapping[str, Best], event: LogEvent) -> Judgement:
    """Judge one event against the best so far of every criterion.

    ``bests`` is keyed by ``criterion.metric``. The verdict is ``snapshot`` when at least
    one criterion improved (its tags in ``criteria`` order), else ``skip``.

    Only values count, never the step: a step lower than the best's is a resumed run
    (or a new run writing the same log), and its better eval is a real best. Not judging
    a line twice is the caller's job (the daemon follows the log by position).

    Raises ConfigError when two criteria watch the same metric, since their bests
    would share one key. The inputs are not modified.
    """
    _check_unique_metrics(criteria)
    watched = [c for c in criteria if c.metric in event.metrics]
    if not watched:
        return Judgement(verdict=None, bests=dict(bests))
    new_bests = dict(bests)
    tags: list[str] = []
    reasons: list[str] = []
    for criterion in watched:
        value = event.metrics[criterion.metric]
        improved, reason = _judge_one(criterion, value, bests.get(criterion.metric))
        reasons.append(reason)
        if improved:
            tags.append(criterion.tag)
            new_bests[criterion.metric] = Best(event.step, value)
    verdict = Verdict(
        eval_step=event.step,
        action="snapshot" if tags else "skip",
        tags=tuple(tags),
        reason="; ".join(reasons),
        metrics={c.metric: event.metrics[c.metric] for c in watched},
    )
    return Judgement(verdict=verdict, bests=new_bests)


def _judge_one(criterion: Criterion, value: float, best: Best | None) -> tuple[bool, str]:
    """One criterion's decision on one value, with the short reason a user reads."""
    name = criterion.metric
    if not math.isfinite(value):
        return False, f"{name} is {value}: never best"
    if best is None:
        return True, f"{name} {value:.6g}: first value"
    if is_improvement(criterion, value, best):
        op = "<" if criterion.mode == "min" else ">"
        return True, f"{name} {value:.6g} {op} best {best.value:.6g} @{best.step}"
    margin = f" by more than {criterion.min_delta:g}" if criterion.min_delta else ""
    return False, f"{name} {value:.6g} not better than {best.value:.6g} @{best.step}{margin}"


def _check_unique_metrics(criteria: Sequence[Criterion]) -> None:
    metrics = [c.metric for c in criteria]
    repeated = sorted({m for m in metrics if metrics.count(m) > 1})
    if repeated:
        raise ConfigError(
            f"each metric may be watched by one criterion only; repeated: {', '.join(repeated)}"
        )
