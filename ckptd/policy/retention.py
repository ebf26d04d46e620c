"""Retention: which committed checkpoints to keep, as small pure policies.

Borrowed from orbax-checkpoint's preservation policies: each policy names the
checkpoints it wants kept, `AnyPreservation` keeps the union, and `plan_deletions`
lists the rest. Nothing here touches the store; the store module carries out the plan.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ckptd.errors import ConfigError
from ckptd.records import CheckpointRecord, Criterion


class PreservationPolicy(Protocol):
    """Anything that names, among some records, the ones to keep."""

    def preserve(self, records: Sequence[CheckpointRecord]) -> frozenset[str]:
        """The names of the records this policy keeps."""
        ...


@dataclass(frozen=True)
class LatestN:
    """Keep the ``n`` checkpoints with the highest step (ties: later ``created``, then name)."""

    n: int

    def __post_init__(self) -> None:
        _require(self.n >= 0, f"LatestN.n must be >= 0, not {self.n!r}")

    def preserve(self, records: Sequence[CheckpointRecord]) -> frozenset[str]:
        newest = sorted(records, key=lambda r: (r.step, r.created, r.name), reverse=True)
        return frozenset(r.name for r in newest[: self.n])


@dataclass(frozen=True)
class BestN:
    """Keep the ``n`` checkpoints best by ``criterion`` (ties: earlier step, then name).

    A record without the metric, or with a NaN or infinite value, is never ranked, so
    it is never kept by this policy. ``min_delta`` plays no part in ranking: it only
    decides whether an eval is worth a snapshot.
    """

    criterion: Criterion
    n: int

    def __post_init__(self) -> None:
        _require(self.n >= 0, f"BestN.n must be >= 0, not {self.n!r}")

    def preserve(self, records: Sequence[CheckpointRecord]) -> frozenset[str]:
        metric = self.criterion.metric
        ranked = [r for r in records if _is_finite(r.metrics.get(metric))]
        sign = 1.0 if self.criterion.mode == "min" else -1.0
        ranked.sort(key=lambda r: (sign * r.metrics[metric], r.step, r.name))
        return frozenset(r.name for r in ranked[: self.n])


@dataclass(frozen=True)
class EveryNSteps:
    """Keep the checkpoints whose step is a multiple of ``interval`` (step 0 included)."""

    interval: int

    def __post_init__(self) -> None:
        _require(self.interval >= 1, f"EveryNSteps.interval must be >= 1, not {self.interval!r}")

    def preserve(self, records: Sequence[CheckpointRecord]) -> frozenset[str]:
        return frozenset(r.name for r in records if r.step % self.interval == 0)


@dataclass(frozen=True)
class AnyPreservation:
    """Keep what any of ``policies`` keeps; with no policies, keep nothing."""

    policies: tuple[PreservationPolicy, ...]

    def preserve(self, records: Sequence[CheckpointRecord]) -> frozenset[str]:
        return frozenset().union(*(p.preserve(records) for p in self.policies))


def best_plus_last(
    best: Mapping[Criterion, int], keep_last: int, every_steps: int | None = None
) -> AnyPreservation:
    """The product policy: for each criterion its best K (``best`` maps criterion to K),
    the last ``keep_last``, and, when ``every_steps`` is given, every checkpoint at a
    multiple of it."""
    policies: list[PreservationPolicy] = [BestN(c, k) for c, k in best.items()]
    policies.append(LatestN(keep_last))
    if every_steps is not None:
        policies.append(EveryNSteps(every_steps))
    return AnyPreservation(tuple(policies))


def plan_deletions(
    records: Sequence[CheckpointRecord],
    policy: PreservationPolicy,
    protected: Collection[str] = (),
) -> list[CheckpointRecord]:
    """The records ``policy`` does not keep, minus the ``protected`` names, sorted by step.

    ``protected`` holds names the caller must not touch whatever the policy says, such
    as a checkpoint being written.
    """
    # A bare str is a Collection[str] of characters: it would silently protect nothing.
    if isinstance(protected, str):
        raise TypeError(f"protected must be a collection of names, not the str {protected!r}")
    keep = policy.preserve(records) | frozenset(protected)
    return sorted((r for r in records if r.name not in keep), key=lambda r: (r.step, r.name))


def early_deletions(
    records: Sequence[CheckpointRecord],
    policy: PreservationPolicy,
    incoming: CheckpointRecord,
    protected: Collection[str] = (),
) -> list[CheckpointRecord]:
    """The records that may be deleted *before* ``incoming`` is written, to make room for it;
    oldest step first.

    Those ``policy`` drops once ``incoming`` is committed, minus whatever must outlive a write
    that fails (the disk is full, after all): the ``protected`` names, the newest record, and
    every record that a part of the policy other than ``LatestN`` keeps among the records as
    they are now. So a best (or a ``keep_every`` step) that ``incoming`` would displace stays
    until ``incoming`` is on disk; only a record pushed out of the last-N window goes early.
    Deleting them changes nothing in the end: the rotation after the commit keeps the same set.
    """
    if isinstance(protected, str):
        raise TypeError(f"protected must be a collection of names, not the str {protected!r}")
    if not records:
        return []
    if any(r.name == incoming.name for r in records):
        raise ValueError(f"the incoming record's name {incoming.name!r} is already a record's")
    newest = max(records, key=lambda r: (r.step, r.created, r.name))  # LatestN's own order
    needed = _kept_now(policy, records) | frozenset(protected) | {newest.name, incoming.name}
    return [r for r in plan_deletions([*records, incoming], policy, protected) if r.name not in needed]


def _kept_now(policy: PreservationPolicy, records: Sequence[CheckpointRecord]) -> frozenset[str]:
    """What ``policy`` keeps among ``records``, leaving out its ``LatestN`` parts: the window
    of the last N is the one thing a new checkpoint pushes records out of without making them
    worth less. A policy of an unknown kind is taken at its word (kept now: kept)."""
    if isinstance(policy, AnyPreservation):
        return frozenset().union(*(_kept_now(p, records) for p in policy.policies))
    return frozenset() if isinstance(policy, LatestN) else policy.preserve(records)


def _is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
