"""The daemon's durable memory of one run: ``.ckptd/state.json``.

It holds what a restarted daemon must not forget: the best so far of each
criterion, the last step it judged (so it never re-issues a verdict), the
control ``seq`` (so it only grows), the log cursor, and where the store is
(so ``ckptd ls`` finds it without flags).
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ckptd.protocol import atomic_write_json
from ckptd.records import Best

log = logging.getLogger("ckptd.daemon")
STATE_FORMAT = 1


@dataclass(frozen=True)
class DaemonState:
    run_id: str
    store: str
    criteria: tuple[str, ...] = ()
    seq: int = 0
    judged_step: int = -1
    bests: dict[str, Best] = field(default_factory=dict)
    cursor: dict[str, Any] | None = None  # the event source's resume state, as it saved it

    @classmethod
    def fresh(cls, store: Path, criteria: tuple[str, ...]) -> DaemonState:
        return cls(run_id=uuid.uuid4().hex[:12], store=str(store), criteria=criteria)

    def with_(self, **changes: Any) -> DaemonState:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "run_id": self.run_id,
            "store": self.store,
            "criteria": list(self.criteria),
            "seq": self.seq,
            "judged_step": self.judged_step,
            "bests": bests_to_json(self.bests),
            "cursor": self.cursor,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DaemonState:
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown state format {data.get('format')!r}")
        bests = {
            str(m): Best(int(b["step"]), float(b["value"]))
            for m, b in dict(data.get("bests") or {}).items()
            if math.isfinite(float(b["value"]))
        }
        cursor = data.get("cursor")
        return cls(
            run_id=str(data["run_id"]),
            store=str(data["store"]),
            criteria=tuple(str(c) for c in data.get("criteria") or ()),
            seq=int(data.get("seq", 0)),
            judged_step=int(data.get("judged_step", -1)),
            bests=bests,
            cursor=cursor if isinstance(cursor, dict) else None,
        )


def bests_to_json(bests: Mapping[str, Best]) -> dict[str, dict[str, float]]:
    return {metric: {"step": best.step, "value": best.value} for metric, best in bests.items()}


def load_state(path: Path) -> DaemonState | None:
    """The saved state, or None. A corrupt file is set aside (never deleted) and reported."""

    try:
        return DaemonState.from_json(json.loads(path.read_bytes()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        path.rename(aside)
        log.error("state file %s is unreadable (%s); moved to %s, starting fresh", path, exc, aside)
        return None


def save_state(path: Path, state: DaemonState, *, durable: bool = True) -> None:
    """Replace the state file; ``durable=False`` survives a killed daemon, not a power cut."""
    atomic_write_json(path, state.to_json(), durable=durable)
