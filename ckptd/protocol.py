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
import socket
import stat
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptd.errors import ProtocolError
from ckptd.fields import Fields, is_count, is_token, metric_value
from ckptd.records import Verdict

PROTOCOL_VERSION = 1
HEARTBEAT_INTERVAL_S = 1.0
# A heartbeat older than this means no daemon: several missed beats, not one slow disk.
STALE_AFTER_S = 5.0

_ACK_NAME = re.compile(r"^(?:\d{1,19}|step-\d{1,19})(?:-r\d{1,6})?\.json$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
# DCP's coordinator writes its metadata under this fixed name: the one dot-name a slot may hold.
DCP_METADATA = ".metadata"
# Names a checkpoint's own files take: an ack naming one could forge the manifest or the token.
RESERVED_NAMES = frozenset({"MANIFEST.json", "capture.json"})
_NODE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


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
    def client_lock(self) -> Path:
        """The flock the run's one capturing client holds for its life (the pid inside)."""
        return self.meta / "client.lock"

    @property
    def client_report(self) -> Path:
        return self.meta / "client.json"

    @property
    def uploads(self) -> Path:
        """The remote tier's pending uploads, recorded durably: held locally until uploaded."""
        return self.meta / "uploads.json"

    @property
    def requests(self) -> Path:
        """``ckptd request`` drops a file here; the daemon turns it into a snapshot verdict."""
        return self.meta / "requests"

    def node(self, node_id: str) -> NodePaths:
        """The files of the daemon on another node of a multi-node job (see ``NodePaths``)."""
        return NodePaths(self.run_dir, check_node_id(node_id))

    @property
    def default_store(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def default_log(self) -> Path:
        return self.run_dir / "logging.jsonl"


@dataclass(frozen=True)
class NodePaths(RunPaths):
    """A follower daemon's own files, ``.ckptd/nodes/<node>/``: its lock, heartbeat (status) and
    the acks of the ranks on its node. The leader's (node of rank 0) are ``.ckptd/`` itself;
    control, state and store stay the leader's."""

    node_id: str = ""

    @property
    def meta(self) -> Path:
        return self.run_dir / ".ckptd" / "nodes" / self.node_id


NODE_ENV = "CKPTD_NODE_ID"


def local_node_id() -> str:
    """This machine's node id in a multi-node job: ``$CKPTD_NODE_ID``, else the hostname."""
    return check_node_id(os.environ.get(NODE_ENV) or socket.gethostname())


ROLES = ("auto", "leader", "follower")
# Where launchers put a node's rank: ckptd's own, Slurm's, and the NODE_RANK that Lightning,
# Kubernetes job templates and torchrun's docs use. The first one set decides.
NODE_RANK_VARIABLES = ("CKPTD_NODE_RANK", "SLURM_NODEID", "NODE_RANK")


def resolve_role(role: str | None) -> str:
    """``leader`` or ``follower``: as given, or (auto) follower when the node rank is not 0.
    A node rank that is no integer is a ``ValueError``: guessing would make every node a
    follower (no leader: nothing is ever committed) or two leaders."""
    if role in ("leader", "follower"):
        return role
    for variable in NODE_RANK_VARIABLES:
        value = os.environ.get(variable, "").strip()
        if value:
            if not value.isascii() or not value.isdigit():
                raise ValueError(f"${variable}={value!r} is not a node rank (an integer >= 0); give --role")
            return "leader" if int(value) == 0 else "follower"
    return "leader"


def check_node_id(node_id: str) -> str:
    """A node id (a hostname, or ``CKPTD_NODE_ID``) is a path component: plain or refused."""
    if not _NODE_ID.match(node_id):
        raise ValueError(
            f"node id {node_id!r} must be 1-64 letters, digits, '_', '.' or '-', not starting with '.' or '-'"
        )
    return node_id


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


# `ckptd run` (leader or follower) stopped with acknowledged captures not persisted; `ckptd
# sidecar` passes it on when its command succeeded (README, `--help` of both).
EXIT_UNPERSISTED = 6

_JSON_MAX_BYTES = 16 << 20  # control, acks, client.json: KiBs


def read_json(path: Path) -> dict[str, Any]:
    """Read a protocol JSON object; anything else is a ProtocolError naming the file."""
    try:
        # Bounded, no FIFO waited on: an ack or client.json is the trainer's to write, and a
        # FIFO, /dev/zero or a 100 GB file in its place must not hang or fill the daemon.
        raw = read_small_file(path, _JSON_MAX_BYTES, follow=True)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ProtocolError(path, f"cannot read: {exc.strerror}") from exc
    except ValueError as exc:  # not a regular file, or too large
        raise ProtocolError(path, str(exc).removeprefix(f"{path}: ")) from exc
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
        raise ProtocolError(path, f"not valid JSON ({type(exc).__name__})") from exc
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


@dataclass(frozen=True)
class StandingVerdict:
    """A snapshot verdict no ack has answered yet, with the control seq and time it was first
    written. It stands in control.json until the trainer captures it, whatever later skips
    say: a skip for the next eval must not take a best away before the trainer saw it."""

    seq: int
    written: float
    verdict: Verdict

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "written": self.written, **verdict_to_json(self.verdict)}

    @classmethod
    def from_fields(cls, fields: Fields) -> StandingVerdict:
        return cls(fields.count("seq"), fields.number("written"), verdict_from_fields(fields))


@dataclass(frozen=True)
class Control:
    """What the daemon asks of the trainer: the standing schedule and the latest verdict."""

    seq: int
    run_id: str
    staging: str
    every_steps: int | None = None
    verdict: Verdict | None = None
    written: float = field(default_factory=time.time)
    standing: StandingVerdict | None = None
    # The leader's node (the node of rank 0): ranks elsewhere ack to their own node's daemon.
    node: str = ""

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "protocol": PROTOCOL_VERSION,
            "node": self.node,
            "seq": self.seq,
            "run_id": self.run_id,
            "staging": self.staging,
            "every_steps": self.every_steps,
            "written": self.written,
            "standing": None if self.standing is None else self.standing.to_json(),
        }
        if self.verdict is not None:
            data.update(verdict_to_json(self.verdict))
        return data

    @classmethod
    def from_json(cls, path: Path, data: Mapping[str, Any]) -> Control:
        fields = Fields(path, data)
        verdict = verdict_from_fields(fields) if fields.has("action") else None
        standing = None
        if fields.has("standing"):
            standing = StandingVerdict.from_fields(Fields(path, fields.mapping("standing")))
        every = fields.optional_count("every_steps")
        if every is not None and every < 1:
            raise ProtocolError(path, f"every_steps must be >= 1, not {every}")
        return cls(
            seq=fields.count("seq"),
            run_id=fields.token("run_id"),
            staging=fields.text("staging"),
            every_steps=every,
            verdict=verdict,
            written=fields.number("written"),
            standing=standing,
            node=_node_field(fields),
        )


def _node_field(fields: Fields) -> str:
    node = fields.text("node", "")
    if node and not _NODE_ID.match(node):
        raise fields.error("node", "a node id (letters, digits, '_', '.', '-')")
    return node


def verdict_from_fields(fields: Fields) -> Verdict:
    """A verdict as :func:`verdict_to_json` wrote it (in control.json or state.json)."""
    action = fields.text("action")
    if action not in ("snapshot", "skip"):
        raise ProtocolError(fields.path, f"unknown action {action!r}")
    return Verdict(
        eval_step=fields.count("eval_step"),
        action=action,  # type: ignore[arg-type]
        tags=fields.texts("tags"),
        reason=fields.text("reason", ""),
        metrics=fields.metrics("metrics"),
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
    """The trainer's answer: "the state of step ``captured_step`` is in slot ``slot``".

    It carries everything the manifest needs (the verdict's tags, reason and metrics),
    so a daemon restarted after a crash commits the same checkpoint the first one would
    have. ``token`` is written into the slot too: the daemon checks that the slot still
    holds this capture before committing it.
    """

    name: str
    captured_step: int
    slot: str
    files: Mapping[str, int]
    seq: int | None = None
    requested_step: int | None = None
    tags: tuple[str, ...] = ()
    reason: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    token: str = ""
    # The safetensors file whose header carries the token: tensors.safetensors, or the
    # framework's own name (model.safetensors) for a snapshot in a framework's layout.
    token_file: str = "tensors.safetensors"
    created: float = field(default_factory=time.time)
    # Split ``token_file`` into shards of at most this many bytes (plus an index) when it
    # is stored, as save_pretrained(max_shard_size=...) does; None: keep it one file.
    shard_bytes: int | None = None
    # One rank's part of a sharded (DCP) capture: every rank of the job acks its own files, all
    # naming one ``capture`` id; the checkpoint is committed once all ``world_size`` are stored.
    rank: int | None = None
    world_size: int | None = None
    capture: str = ""

    @staticmethod
    def name_for(seq: int | None, step: int, rank: int | None = None) -> str:
        """``<seq>`` answers a verdict; ``step-<step>`` is a capture the schedule asked for;
        ``-r<rank>`` is one rank's part of a sharded capture."""
        base = str(seq) if seq is not None else f"step-{step}"
        return base if rank is None else f"{base}-r{rank}"

    @property
    def sharded(self) -> bool:
        return self.world_size is not None

    @property
    def eval_step(self) -> int:
        """The step whose eval this capture answers (step 0 is a step, not "unknown")."""
        return self.captured_step if self.requested_step is None else self.requested_step

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
            "metrics": metrics_to_json(self.metrics),
            "token": self.token,
            "token_file": self.token_file,
            "created": self.created,
            "shard_bytes": self.shard_bytes,
            "rank": self.rank,
            "world_size": self.world_size,
            "capture": self.capture,
        }

    @classmethod
    def from_json(cls, path: Path, data: Mapping[str, Any]) -> Ack:
        fields = Fields(path, data)
        name = fields.text("name")
        if not _ACK_NAME.match(f"{name}.json"):
            raise fields.error("name", "'<seq>' or 'step-<step>'")
        files = fields.mapping("files")
        for fname, size in files.items():
            if not is_plain_name(fname) or not is_count(size) or fname in RESERVED_NAMES:
                raise ProtocolError(path, f"bad file entry {fname!r}: {size!r}")
        token = fields.text("token", "")
        if token and not is_token(token):
            raise fields.error("token", "a plain identifier")
        token_file = fields.text("token_file", "tensors.safetensors")
        rank, world_size, capture = _rank_fields(fields)
        if world_size is not None and (not files or not token):
            # A part with nothing in it, or none the slot's token can vouch for, is no part.
            raise fields.error(
                "files" if not files else "token", "given (a sharded part has files and a token)"
            )
        # A sharded slot's token is in its capture.json, which is not stored.
        if token and token_file not in files and world_size is None:
            raise fields.error("token_file", "one of the ack's files")
        shard_bytes = fields.optional_count("shard_bytes")  # absent in acks of older clients
        if shard_bytes is not None and (shard_bytes < 1 or token_file not in files):
            raise fields.error("shard_bytes", "an integer >= 1, with a token_file among the files")
        return cls(
            name=name,
            captured_step=fields.count("captured_step"),
            slot=fields.token("slot"),
            files=dict(files),
            seq=fields.optional_count("seq"),
            requested_step=fields.optional_count("requested_step"),
            tags=fields.texts("tags"),
            reason=fields.text("reason", ""),
            metrics=fields.metrics("metrics"),
            token=token,
            token_file=token_file,
            created=fields.number("created"),
            shard_bytes=shard_bytes,
            rank=rank,
            world_size=world_size,
            capture=capture,
        )


_MAX_WORLD = 1 << 20


def _rank_fields(fields: Fields) -> tuple[int | None, int | None, str]:
    """``rank``, ``world_size`` and ``capture`` of a sharded ack: all three or none."""
    world_size = fields.optional_count("world_size")
    if world_size is None:
        if fields.has("rank"):
            raise fields.error("world_size", "given with rank")
        return None, None, ""
    if not 1 <= world_size <= _MAX_WORLD:
        raise fields.error("world_size", f"an integer from 1 to {_MAX_WORLD}")
    rank = fields.count("rank")
    if rank >= world_size:
        raise fields.error("rank", f"below world_size {world_size}")
    return rank, world_size, fields.token("capture")


def is_plain_name(name: object) -> bool:
    """A file name inside a slot or checkpoint: one component, nothing a path could escape with."""
    return isinstance(name, str) and (_FILE_NAME.match(name) is not None or name == DCP_METADATA)


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


def read_client_report(paths: RunPaths) -> dict[str, Any] | None:
    """What the trainer-side client last reported (captures it had to skip), for status;
    None when there is none or it is unreadable (the trainer owns that file, not us)."""
    try:
        fields = Fields(paths.client_report, read_json(paths.client_report))
        return {
            "pid": fields.count("pid"),
            "skipped_captures": fields.count("skipped_captures", 0),
            "last_skip_reason": fields.text("last_skip_reason", ""),
            "last_skip_step": fields.optional_count("last_skip_step"),
            "skipped_by_cause": _counts_by_cause(fields.mapping("skipped_by_cause")),
            "staging": "disk" if fields.text("staging", "shm") == "disk" else "shm",
            "updated": fields.number("updated", 0.0),
        }
    except (OSError, ProtocolError):
        return None


def _counts_by_cause(counts: Mapping[str, Any]) -> dict[str, int]:
    """Skip counts by cause from the trainer's report: causes are identifiers, counts
    integers; anything else (the file is the trainer's) is left out, at most 16 kept."""
    return dict(sorted((k, v) for k, v in counts.items() if is_token(k) and is_count(v))[:16])


def flock_held(path: Path) -> bool | None:
    """Whether some process holds an flock on ``path``, read from ``/proc/locks`` without taking
    the lock (taking it, even for a moment, could make a starting daemon or client think another
    one serves the run). False when there is no such file; None when it cannot be told (no
    ``/proc/locks``, the file not ours to stat)."""
    holders = _flock_holders(path)
    return None if holders is None else bool(holders)


def flock_holder(path: Path) -> int | None:
    """The pid holding an flock on ``path``, from ``/proc/locks``; None when none does or it
    cannot be told (no ``/proc/locks``, a holder outside this PID namespace shows as 0)."""
    return next((int(pid) for pid in _flock_holders(path) or () if pid.isdigit() and int(pid)), None)


def _flock_holders(path: Path) -> list[str] | None:
    """The pid fields of ``/proc/locks``' FLOCK lines on ``path`` (a waiter's line has "->");
    [] when there is no such file, None when it cannot be told."""
    try:
        info = os.stat(path)
        with open("/proc/locks", encoding="ascii", errors="replace") as handle:
            table = handle.read()
    except FileNotFoundError as exc:
        return [] if exc.filename == str(path) else None
    except OSError:
        return None
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    holders = []
    for line in table.splitlines():
        fields = line.split()  # "1: FLOCK ADVISORY WRITE <pid> <dev:ino> 0 EOF"
        if fields[1:2] == ["FLOCK"] and fields[5:6] == [device]:
            holders.append(fields[4])
    return holders


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


STATUS_MAX_BYTES = 1 << 20  # a status.json is a few KiB; /dev/zero behind a link stops here


def read_status(paths: RunPaths) -> dict[str, Any]:
    """``status.json`` as a dict; empty when missing, unreadable, too large or not an object.
    Readers check each field's type where they use it: the file may be another version's."""
    try:
        document = read_small_json(paths.status, STATUS_MAX_BYTES)
    except (OSError, ValueError, RecursionError):
        return {}
    return document if isinstance(document, dict) else {}


_UPLOADS_MAX_BYTES = 1 << 20


def read_pending_uploads(paths: RunPaths) -> list[str]:
    """Checkpoint names ``uploads.json`` records as not uploaded yet (none when missing).
    Raises ``ProtocolError`` for a file that is not what the daemon writes."""
    try:
        data = read_small_json(paths.uploads, _UPLOADS_MAX_BYTES)
    except FileNotFoundError:
        return []
    except (OSError, ValueError, RecursionError) as exc:
        raise ProtocolError(paths.uploads, f"unreadable: {type(exc).__name__}: {exc}") from exc
    names = Fields(paths.uploads, data).texts("pending")
    return [n for n in dict.fromkeys(names) if n.startswith("step-") and "/" not in n]


_MAX_NODES = 4096  # a listing of .ckptd/nodes/ stops here: a flood of folders is not a cluster


def read_follower_reports(paths: RunPaths) -> dict[str, dict[str, Any]]:
    """What each follower node's daemon last said (``.ckptd/nodes/<node>/status.json``): its
    parts stored and pending, its last error, and ``age_s``, how old its heartbeat is."""
    try:
        folders = sorted(p for p in (paths.meta / "nodes").iterdir() if _NODE_ID.match(p.name))
    except OSError:
        return {}
    reports = {}
    for folder in folders[:_MAX_NODES]:
        node = paths.node(folder.name)
        status = read_status(node)
        age = heartbeat_age(node)
        reports[folder.name] = {
            "age_s": None if age is None else round(age, 1),
            "alive": age is not None and age <= STALE_AFTER_S,
            **{k: status.get(k) for k in ("parts_stored", "pending_acks", "last_error", "state")},
        }
    return reports


def read_small_json(path: Path, limit: int) -> object:
    """A JSON file someone else may have planted (see ``read_small_file``). Raises OSError or
    ValueError."""
    return json.loads(read_small_file(path, limit))


def read_small_file(path: Path, limit: int, *, follow: bool = False) -> bytes:
    """The bytes of a file someone else may have planted: no FIFO waited on, a regular file
    only, at most ``limit`` bytes, and (unless ``follow``) no link followed: the daemon
    replaces its own files by rename, so a link there was put there. Raises OSError or
    ValueError."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    with os.fdopen(os.open(path, flags), "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ValueError(f"{path}: not a regular file")
        raw = handle.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"{path}: larger than {limit} bytes")
    return raw


def daemon_alive(paths: RunPaths, stale_after: float = STALE_AFTER_S) -> bool:
    age = heartbeat_age(paths)
    return age is not None and age <= stale_after


def metrics_to_json(metrics: Mapping[str, float]) -> dict[str, float | str]:
    """JSON has no NaN: non-finite values travel as their repr ("nan", "inf")."""
    return {k: v if math.isfinite(v) else repr(v) for k, v in metrics.items()}


def json_safe(value: object) -> object:
    """``value`` with every non-finite float as "nan", "inf" or "-inf" (as in metrics_to_json):
    a bare NaN is no JSON, and a status.json anyone may write can hold one."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def metrics_from_json(raw: object) -> dict[str, float]:
    """Lenient: the metrics of a mapping that may hold anything; what is no metric is left out."""
    if not isinstance(raw, dict):
        return {}
    return {str(k): v for k, v in ((k, metric_value(v)) for k, v in raw.items()) if v is not None}


# -- manual snapshot requests (`ckptd request`) ---------------------------------------------------

_MAX_REQUESTS = 16  # per pass: a flood of request files cannot stall the daemon's loop
_REQUEST_BYTES = 4096


def write_request(paths: RunPaths, tag: str) -> Path:
    """Ask the run's daemon for a snapshot at the trainer's next step, tagged ``tag``."""
    if not is_token(tag):
        raise ProtocolError(paths.requests, f"tag {tag!r}: up to 64 letters, digits, _ or -")
    paths.requests.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = paths.requests / f"{time.time_ns()}-{os.getpid()}.json"
    atomic_write_json(path, {"tag": tag, "requested": time.time()})
    return path


def take_requests(paths: RunPaths, on_error: Any) -> list[str]:
    """The tags of the request files waiting (oldest first), each file removed as it is read;
    a bad one is removed too and reported through ``on_error(message)``."""
    if paths.requests.is_symlink():
        on_error(f"ignored {paths.requests}: a symbolic link (requests are never read through one)")
        return []
    try:
        with os.scandir(paths.requests) as entries:
            # Plain files only: a link or a folder named *.json is no request (and a link is
            # never followed); left where it is, it costs one scandir entry per pass.
            names = sorted(
                e.name for e in entries if e.name.endswith(".json") and e.is_file(follow_symlinks=False)
            )
    except (FileNotFoundError, NotADirectoryError):
        return []
    tags: list[str] = []
    for name in names[:_MAX_REQUESTS]:
        path = paths.requests / name
        try:
            tag = _request_tag(path)
        except FileNotFoundError:
            continue
        except (ProtocolError, OSError) as exc:
            on_error(f"ignored snapshot request: {exc}")
            tag = None
        _unlink_quietly(path)
        if tag is not None:
            tags.append(tag)
    return tags


def _request_tag(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        raw = handle.read(_REQUEST_BYTES + 1)
    if len(raw) > _REQUEST_BYTES:
        raise ProtocolError(path, f"larger than {_REQUEST_BYTES} bytes")
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(path, f"not JSON: {exc}") from None
    tag = document.get("tag") if isinstance(document, dict) else None
    if not is_token(tag):
        raise ProtocolError(path, f"tag {tag!r} is not a plain token")
    return str(tag)


def format_bytes(n: int) -> str:
    """``n`` bytes for people: B, then KiB, MiB, GiB, TiB with one decimal."""
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} TiB"
