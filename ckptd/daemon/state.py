"""The daemon's durable memory of one run: ``.ckptd/state.json``.

It holds what a restarted daemon must not forget: the best so far of each
criterion, the last step it judged (so it never re-issues a verdict), the
control ``seq`` (so it only grows), the log cursor, and where the store is
(so ``ckptd ls`` finds it without flags).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ckptd.fields import Fields
from ckptd.protocol import StandingVerdict, atomic_write_json, read_small_file
from ckptd.records import Best

log = logging.getLogger("ckptd.daemon")
STATE_FORMAT = 1


@dataclass(frozen=True)
class DaemonState:
    run_id: str
    store: str
    criteria: tuple[str, ...] = ()
    seq: int = 0
    judged_step: int = -1  # the step of the last eval judged (shown; never a filter)
    bests: dict[str, Best] = field(default_factory=dict)
    cursor: dict[str, Any] | None = None  # the event source's resume state, as it saved it
    # Where this state lives: a run dir copied with ``cp -r`` has another inode, and its
    # daemon must not share the original's run id (and so its staging slots).
    run_dir: str = ""
    run_dir_inode: int = 0
    # The last snapshot verdict (seq, write time, verdict): a daemon restarted before the
    # trainer captured it publishes it again, else that best would never be captured.
    last_snapshot: StandingVerdict | None = None
    # True once a first catch-up read the log's history to its end: after that, every line
    # past the cursor is news, even one logged while the daemon was down.
    caught_up: bool = False

    @classmethod
    def fresh(cls, store: Path, criteria: tuple[str, ...]) -> DaemonState:
        return cls(run_id=new_run_id(), store=str(store), criteria=criteria)

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
            "run_dir": self.run_dir,
            "run_dir_inode": self.run_dir_inode,
            "last_snapshot": None if self.last_snapshot is None else self.last_snapshot.to_json(),
            "caught_up": self.caught_up,
        }

    @classmethod
    def from_json(cls, path: Path, data: object) -> DaemonState:
        """Every field checked; anything wrong is a ProtocolError naming the file and field."""
        fields = Fields(path, data)
        if fields.data.get("format") != STATE_FORMAT:
            raise fields.error("format", str(STATE_FORMAT))
        cursor = fields.mapping("cursor")
        if not _json_safe(cursor):  # the state is written back: it must stay valid JSON
            raise fields.error("cursor", "an object of finite JSON values")
        return cls(
            run_id=fields.token("run_id"),
            store=fields.text("store"),
            criteria=fields.texts("criteria"),
            seq=fields.count("seq", 0),
            judged_step=fields.integer("judged_step", -1),
            bests=_bests(fields),
            cursor=dict(cursor) or None,
            run_dir=fields.text("run_dir", ""),
            run_dir_inode=fields.count("run_dir_inode", 0),
            last_snapshot=_standing(fields),
            caught_up=fields.flag("caught_up"),
        )


def _standing(state: Fields) -> StandingVerdict | None:
    if not state.has("last_snapshot"):
        return None
    return StandingVerdict.from_fields(Fields(state.path, state.mapping("last_snapshot")))


def _json_safe(value: object) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return False
    return True


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _bests(fields: Fields) -> dict[str, Best]:
    bests = {}
    for metric, entry in fields.mapping("bests").items():
        best = Fields(fields.path, entry)
        value = best.number("value")
        bests[str(metric)] = Best(best.count("step"), value)
    return bests


def bests_to_json(bests: Mapping[str, Best]) -> dict[str, dict[str, float]]:
    return {metric: {"step": best.step, "value": best.value} for metric, best in bests.items()}


_STATE_MAX_BYTES = 16 << 20  # a state is KiBs (its cursor names a few files)


def load_state(path: Path) -> DaemonState | None:
    """The saved state, or None. A corrupt file is set aside (never deleted) and reported."""

    try:
        # Bounded, no FIFO waited on: a planted one (or /dev/zero) must not hang or fill the start.
        return DaemonState.from_json(path, json.loads(read_small_file(path, _STATE_MAX_BYTES, follow=True)))
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError) as exc:  # ProtocolError and JSONDecodeError are ValueErrors
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        path.rename(aside)
        log.error("state file %s is unreadable (%s); moved to %s, starting fresh", path, exc, aside)
        return None


def save_state(path: Path, state: DaemonState, *, durable: bool = True) -> None:
    """Replace the state file; ``durable=False`` survives a killed daemon, not a power cut."""
    atomic_write_json(path, state.to_json(), durable=durable)
