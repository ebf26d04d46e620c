"""The control-file protocol: where the daemon and the trainer-side client meet.

The daemon speaks through ``.ckptd/control.json`` (replaced atomically, ``seq``
grows by one on every write) and proves it is alive by refreshing
``.ckptd/status.json``. The trainer answers each capture with an ack file in
``.ckptd/acks/``; the ack stays until the daemon has committed the snapshot, so
a pending ack is also the lock on its shared-memory slot.

Neither side imports the other: this module and ``ckptd.staging`` are the only
things they share. See docs/protocol.md for the field-by-field reference.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptd.errors import ProtocolError
from ckptd.records import Verdict

PROTOCOL_VERSION = 1
HEARTBEAT_INTERVAL_S = 1.0
# A heartbeat older than this means no daemon: several missed beats, not one slow disk.
STALE_AFTER_S = 5.0

_ACK_NAME = re.compile(r"^(?:\d+|step-\d+)\.json$")


@dataclass(frozen=True)
class RunPaths:
    """Every path of the v1 on-disk contract for one run directory."""

    run_dir: Path

    @property
    def meta(self) -> Path:
        return self.run_dir / ".ckptd"

    @property
    def control(self) -> Path:
        return self.meta / "control.json"

    @property
    def acks(self) -> Path:
        return self.meta / "acks"

    @property
    def state(self) -> Path:
        return self.meta / "state.json"

    @property
    def status(self) -> Path:
        return self.meta / "status.json"

    @property
    def lock(self) -> Path:
        return self.meta / "lock"

    @property
    def default_store(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def default_log(self) -> Path:
        return self.run_dir / "logging.jsonl"


def atomic_write_json(path: Path, data: Any, *, durable: bool = False) -> None:
    """Replace ``path`` with ``data`` as JSON so readers see the old file or the new one, never half.

    ``durable`` adds the fsyncs that make the new content survive a power cut,
    for files whose loss would mean re-doing work (the daemon's state).
    """
    payload = json.dumps(data, indent=1, sort_keys=True).encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(Path(tmp))
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename inside it is on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def read_json(path: Path) -> dict[str, Any]:
    """Read a protocol JSON object; anything else is a ProtocolError naming the file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ProtocolError(path, f"cannot read: {exc.strerror}") from exc
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ProtocolError(path, f"expected a JSON object, found {type(data).__name__}")
    version = data.get("protocol")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            path,
            f"protocol version {version!r} is not understood (this ckptd speaks "
            f"{PROTOCOL_VERSION}); upgrade the older of daemon and client",
        )
    return data


def _field(path: Path, data: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(path, f"field {name!r} is missing or not {_kind_name(kind)}")
    return value


def _optional(path: Path, data: Mapping[str, Any], name: str, kind: type) -> Any:
    return None if data.get(name) is None else _field(path, data, name, kind)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


@dataclass(frozen=True)
class Control:
    """What the daemon asks of the trainer: the standing schedule and the latest verdict."""

    seq: int
    run_id: str
    staging: str
    every_steps: int | None = None
    verdict: Verdict | None = None
    written: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "protocol": PROTOCOL_VERSION,
            "seq": self.seq,
            "run_id": self.run_id,
            "staging": self.staging,
            "every_steps": self.every_steps,
            "written": self.written,
        }
        if self.verdict is not None:
            data.update(verdict_to_json(self.verdict))
        return data

    @classmethod
    def from_json(cls, path: Path, data: Mapping[str, Any]) -> Control:
        verdict = None
        if data.get("action") is not None:
            action = _field(path, data, "action", str)
            if action not in ("snapshot", "skip"):
                raise ProtocolError(path, f"unknown action {action!r}")
            verdict = Verdict(
                eval_step=_field(path, data, "eval_step", int),
                action=action,
                tags=tuple(str(t) for t in _field(path, data, "tags", list)),
                reason=str(data.get("reason", "")),
                metrics=metrics_from_json(data.get("metrics")),
            )
        every = _optional(path, data, "every_steps", int)
        if every is not None and every < 1:
            raise ProtocolError(path, f"every_steps must be >= 1, not {every}")
        return cls(
            seq=_field(path, data, "seq", int),
            run_id=_field(path, data, "run_id", str),
            staging=_field(path, data, "staging", str),
            every_steps=every,
            verdict=verdict,
            written=float(_field(path, data, "written", (int, float))),
        )


def verdict_to_json(verdict: Verdict) -> dict[str, Any]:
    """A verdict's fields as control.json carries them (and status.json repeats them)."""
    return {
        "eval_step": verdict.eval_step,
        "action": verdict.action,
        "tags": list(verdict.tags),
        "reason": verdict.reason,
        "metrics": metrics_to_json(verdict.metrics),
    }


def write_control(paths: RunPaths, control: Control) -> None:
    atomic_write_json(paths.control, control.to_json())


def read_control(path: Path) -> Control:
    """Read control.json; FileNotFoundError when there is none, ProtocolError when it is bad."""
    return Control.from_json(path, read_json(path))


@dataclass(frozen=True)
class Ack:
    """The trainer's answer: "the state of step ``captured_step`` is in slot ``slot``"."""

    name: str
    captured_step: int
    slot: str
    files: Mapping[str, int]
    seq: int | None = None
    requested_step: int | None = None
    tags: tuple[str, ...] = ()
    reason: str = ""
    created: float = field(default_factory=time.time)

    @staticmethod
    def name_for(seq: int | None, step: int) -> str:
        """``<seq>`` answers a verdict; ``step-<step>`` is a capture the schedule asked for."""
        return str(seq) if seq is not None else f"step-{step}"

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION,
            "name": self.name,
            "seq": self.seq,
            "requested_step": self.requested_step,
            "captured_step": self.captured_step,
            "slot": self.slot,
            "files": dict(self.files),
            "tags": list(self.tags),
            "reason": self.reason,
            "created": self.created,
        }

    @classmethod
    def from_json(cls, path: Path, data: Mapping[str, Any]) -> Ack:
        files = _field(path, data, "files", dict)
        for fname, size in files.items():
            if not _is_plain_name(fname) or not _is_count(size):
                raise ProtocolError(path, f"bad file entry {fname!r}: {size!r}")
        slot = _field(path, data, "slot", str)
        if not _is_plain_name(slot):
            raise ProtocolError(path, f"slot {slot!r} is not a plain name")
        for name in ("captured_step", "requested_step", "seq"):
            if data.get(name) is not None and not _is_count(data[name]):
                raise ProtocolError(path, f"field {name!r} must be an integer >= 0, not {data[name]!r}")
        return cls(
            name=_field(path, data, "name", str),
            captured_step=_field(path, data, "captured_step", int),
            slot=slot,
            files=files,
            seq=_optional(path, data, "seq", int),
            requested_step=_optional(path, data, "requested_step", int),
            tags=tuple(str(t) for t in data.get("tags") or ()),
            reason=str(data.get("reason", "")),
            created=float(data.get("created") or 0.0),
        )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_plain_name(name: object) -> bool:
    """A single path component: what a hostile ack must not escape with."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


def write_ack(paths: RunPaths, ack: Ack) -> Path:
    path = paths.acks / f"{ack.name}.json"
    atomic_write_json(path, ack.to_json())
    return path


def read_ack(path: Path) -> Ack:
    return Ack.from_json(path, read_json(path))


def pending_ack_paths(paths: RunPaths) -> list[Path]:
    """Ack files not yet committed by the daemon, oldest first (temp files excluded)."""
    try:
        entries = [p for p in paths.acks.iterdir() if _ACK_NAME.match(p.name)]
    except FileNotFoundError:
        return []
    return sorted(entries, key=_mtime_or_zero)


def _mtime_or_zero(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def heartbeat_age(paths: RunPaths, now: float | None = None) -> float | None:
    """Seconds since the daemon last refreshed status.json, or None when it never did.

    Liveness comes from this heartbeat rather than a pid: a sidecar container may
    not share the trainer's PID namespace, but it shares the run directory.
    """
    try:
        mtime = paths.status.stat().st_mtime
    except FileNotFoundError:
        return None
    return max(0.0, (time.time() if now is None else now) - mtime)


def daemon_alive(paths: RunPaths, stale_after: float = STALE_AFTER_S) -> bool:
    age = heartbeat_age(paths)
    return age is not None and age <= stale_after


def metrics_to_json(metrics: Mapping[str, float]) -> dict[str, float | str]:
    """JSON has no NaN: non-finite values travel as their repr ("nan", "inf")."""
    return {k: v if math.isfinite(v) else repr(v) for k, v in metrics.items()}


def metrics_from_json(raw: object) -> dict[str, float]:
    if not isinstance(raw, dict):
        return {}
    out: dict[str, float] = {}
    for key, value in raw.items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            continue
    return out
