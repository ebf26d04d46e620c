"""Plain records shared by every floor: log events, criteria, verdicts, checkpoints.

Frozen dataclasses, no I/O. Policies take and return these, which is what
lets them be table-tested without a filesystem or a clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["min", "max"]
Action = Literal["snapshot", "skip"]


@dataclass(frozen=True)
class LogEvent:
    """One log line turned into numbers: the step it speaks of and its numeric metrics."""

    step: int
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class Criterion:
    """What "best" means for one metric."""

    metric: str
    mode: Mode
    min_delta: float = 0.0

    @property
    def tag(self) -> str:
        return f"best:{self.metric}"

    @staticmethod
    def default_mode(metric: str) -> Mode:
        """``min`` for anything called a loss, ``max`` for everything else (accuracy, f1, ...)."""
        return "min" if "loss" in metric.lower() else "max"

    @classmethod
    def parse(cls, spec: str, min_delta: float = 0.0) -> Criterion:
        """``eval_loss``, ``eval_loss:min`` or ``eval_acc:max``."""
        metric, _, mode = spec.partition(":")
        metric = metric.strip()
        if not metric:
            raise ValueError(f"empty metric name in criterion {spec!r}")
        mode = mode.strip() or cls.default_mode(metric)
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {mode!r} (in {spec!r})")
        if not math.isfinite(min_delta) or min_delta < 0:
            raise ValueError(f"min_delta must be a finite number >= 0, not {min_delta!r}")
        return cls(metric, mode, min_delta)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Best:
    """The best value seen so far for one criterion, and the step it was seen at."""

    step: int
    value: float


@dataclass(frozen=True)
class Verdict:
    """The daemon's answer to one eval: capture this step, or not."""

    eval_step: int
    action: Action
    tags: tuple[str, ...] = ()
    reason: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointRecord:
    """One committed checkpoint as its manifest describes it."""

    name: str
    step: int
    tags: tuple[str, ...] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)
    requested_step: int | None = None
    nbytes: int = 0
    created: float = 0.0
    run_id: str = ""  # the run that wrote it: retention only touches its own run's
