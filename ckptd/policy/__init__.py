"""Pure policies: when an eval is a new best, and which checkpoints to keep.

No I/O, no clock, no logging: everything here is a function of records, so it is
table-tested without a filesystem.
"""

from __future__ import annotations

from ckptd.policy.best import Judgement, is_improvement, judge
from ckptd.policy.retention import (
    AnyPreservation,
    BestN,
    EveryNSteps,
    LatestN,
    PreservationPolicy,
    best_plus_last,
    early_deletions,
    plan_deletions,
)

__all__ = [
    "AnyPreservation",
    "BestN",
    "EveryNSteps",
    "Judgement",
    "LatestN",
    "PreservationPolicy",
    "best_plus_last",
    "early_deletions",
    "is_improvement",
    "judge",
    "plan_deletions",
]
