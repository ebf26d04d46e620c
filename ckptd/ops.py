"""Operations on a run from the command line: prune now, ask for a snapshot now.

``prune`` applies a retention policy at once under the store lock the daemon's own
rotation holds, so the two never interleave, and a persist in flight (a temp dir, not yet a
checkpoint) is never a candidate. It deletes only checkpoints of the store's own run ids,
and never one at a step the daemon's state names as a best.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.errors import ConfigError
from ckptd.policy import best_plus_last, plan_deletions
from ckptd.protocol import RunPaths, read_pending_uploads, read_small_json, read_status
from ckptd.records import CheckpointRecord, Criterion
from ckptd.store import Store

_STATE_MAX_BYTES = 16 << 20  # a state.json is KiBs; /dev/zero behind a link stops here


@dataclass(frozen=True)
class Policy:
    """Retention as the daemon applies it: best K per criterion, the last N, every M."""

    best: Mapping[Criterion, int]
    keep_last: int
    keep_every: int | None = None

    def describe(self) -> str:
        bests = ", ".join(f"{c.metric}:{c.mode}:{k}" for c, k in self.best.items())
        every = f", every {self.keep_every}" if self.keep_every else ""
        return f"best {bests}; last {self.keep_last}{every}"


def recorded_policy(run_dir: Path, overrides: Mapping[str, Any]) -> Policy:
    """The policy the daemon last reported in status.json, with ``overrides`` (keep_last,
    keep_best, keep_every given on the command line) on top."""
    status = read_status(RunPaths(run_dir))
    criteria = status["criteria"] if isinstance(status.get("criteria"), list) else []
    policy = status["policy"] if isinstance(status.get("policy"), dict) else {}
    best: dict[Criterion, int] = {}
    for entry in criteria:
        if isinstance(entry, dict) and isinstance(entry.get("metric"), str):
            keep = overrides.get("keep_best") or entry.get("keep")
            mode = entry.get("mode") if entry.get("mode") in ("min", "max") else None
            best[Criterion(entry["metric"], mode or Criterion.default_mode(entry["metric"]))] = (
                keep if isinstance(keep, int) and keep >= 1 else 1
            )
    keep_last = overrides.get("keep_last", policy.get("keep_last"))
    if not best or not isinstance(keep_last, int) or keep_last < 0:
        raise ConfigError(
            f"no policy recorded for {run_dir} (no daemon has reported one); "
            "give --keep-last N (and --metric for the best) explicitly"
        )
    keep_every = overrides.get("keep_every", policy.get("keep_every"))
    return Policy(best, keep_last, keep_every if isinstance(keep_every, int) and keep_every > 0 else None)


def prune(store: Store, run_dir: Path, policy: Policy, *, dry_run: bool) -> list[CheckpointRecord]:
    """Delete (or, ``dry_run``, list) what ``policy`` does not keep; return those records.

    Only the run's own store: the policy and the bests protected come from ``run_dir``'s
    files, so applied to another run's store (``--store``, or a copied run dir whose state
    still names the original's) they could delete that run's best."""
    owner = store.owner_run_dir()
    if owner is not None and Path(owner).resolve() != run_dir.resolve():
        raise ConfigError(
            f"{store.root} is the store of {owner}, not of {run_dir}: prune that run instead "
            "(its policy and its bests are the ones that count)"
        )
    lineage = store.lineage()
    protected_steps = _state_best_steps(run_dir)
    held = set(read_pending_uploads(RunPaths(run_dir)))  # not uploaded yet: kept, as the daemon does
    with store.lock(timeout=60):
        records = [r for r in store.list() if r.run_id in lineage]
        protected = [r.name for r in records if r.step in protected_steps or r.name in held]
        retention = best_plus_last(dict(policy.best), policy.keep_last, policy.keep_every)
        doomed = plan_deletions(records, retention, protected)
        if not dry_run:
            for record in doomed:
                store.delete(record.name)
    return doomed


def _state_best_steps(run_dir: Path) -> frozenset[int]:
    """Steps the daemon's state names as a best: never pruned, whatever a manifest says."""
    try:
        state = read_small_json(RunPaths(run_dir).state, _STATE_MAX_BYTES)
    except (OSError, ValueError, RecursionError):
        return frozenset()
    bests = state.get("bests") if isinstance(state, dict) else None
    if not isinstance(bests, dict):
        return frozenset()
    steps = (b.get("step") for b in bests.values() if isinstance(b, dict))
    return frozenset(s for s in steps if isinstance(s, int) and not isinstance(s, bool))
