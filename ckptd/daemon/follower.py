"""A follower node's daemon: stores the parts its node's ranks staged; the leader commits.

Shared memory is node-local, so a multi-node job runs one daemon per node. The daemon on the
node of rank 0 (the leader, ``RunDaemon``) follows the log, judges, and commits; every other
node runs this one (``ckptd run --role follower``). It has its own files under
``.ckptd/nodes/<node>/`` (lock, heartbeat, the acks of its node's ranks) and writes only
``.shard-<capture>/`` parts into the shared store, each finished by its rank's marker; it never
commits, rotates or deletes a checkpoint. Killed mid-part, it leaves an unmarked part nobody
sees; restarted, it finds the ack again and writes the part anew.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from filelock import FileLock, Timeout

from ckptd import __version__, sweep
from ckptd.daemon.persister import Job, SlotLost, store_part
from ckptd.errors import ConfigError, DaemonAlreadyRunning, ProtocolError
from ckptd.protocol import (
    EXIT_UNPERSISTED,
    PROTOCOL_VERSION,
    NodePaths,
    RunPaths,
    atomic_write_json,
    pending_ack_paths,
    read_ack,
    read_control,
    read_status,
)
from ckptd.staging import not_private, slot_dir, staging_dir_for
from ckptd.store import Store

log = logging.getLogger("ckptd.daemon")

_PASS_S = 0.2  # how often the acks dir is looked at: a part waits at most this long
_RETRY_AFTER_S = 5.0
_SLOT_TRIES = 3


class FollowerDaemon:
    """Stores its node's parts of sharded captures until ``request_stop``; ``run()`` returns 0."""

    def __init__(self, run_dir: Path, store: Path, node_id: str, *, heartbeat_interval: float = 1.0) -> None:
        self.run_paths = RunPaths(run_dir)
        self.paths: NodePaths = self.run_paths.node(node_id)
        self.store = Store(store)
        self.node_id = node_id
        self.heartbeat_interval = heartbeat_interval
        self._stop = threading.Event()
        self._stopping = ""
        self._retry_at: dict[str, float] = {}
        self._tries: dict[str, int] = {}
        self._stored = 0
        self._last_error: str | None = None
        self._started = time.time()
        self._marked = ""  # the run id whose staging dir this daemon made and marked

    def request_stop(self, reason: str) -> None:
        """Safe from a signal handler: sets a flag the loop checks between parts."""
        self._stopping = reason
        self._stop.set()

    def run(self) -> int:
        meta = self.paths.meta
        for folder in (self.run_paths.meta, meta.parent, meta):
            if folder.is_symlink():
                raise ConfigError(f"{folder} is a symbolic link; ckptd will not follow it")
        meta.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.paths.acks.mkdir(mode=0o700, exist_ok=True)
        lock = FileLock(str(self.paths.lock), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise DaemonAlreadyRunning(self.run_paths.run_dir, self.paths.lock, "another follower") from None
        left: list[Path] = []
        try:
            log.info(
                "follower of %s on node %s: storing its parts into %s",
                self.run_paths.run_dir,
                self.node_id,
                self.store.root,
            )
            next_beat = 0.0
            while not self._stop.is_set():
                self._store_pending()
                if time.monotonic() >= next_beat:
                    self._write_status()
                    next_beat = time.monotonic() + self.heartbeat_interval
                self._stop.wait(_PASS_S)
            self._retry_at.clear()  # a last try for each, failed ones included
            self._store_pending()  # acked before the stop: stored, not left for a restart
            left = pending_ack_paths(self.paths)
            if left:  # as the leader does: a part not on disk is no clean stop
                self._error(
                    f"stopping with {len(left)} acknowledged part(s) not stored: their slots are kept, "
                    f"and the next follower on this node stores them (exit status {EXIT_UNPERSISTED})"
                )
            log.info("stopping (%s)", self._stopping)
            self._write_status("stopped")
            os.utime(self.paths.status, (0, 0))  # clients see a dead heartbeat at once
        finally:
            lock.release()
        return EXIT_UNPERSISTED if left else 0

    def _store_pending(self) -> None:
        staging = self._staging()
        if staging is None:
            return
        now = time.monotonic()
        for path in pending_ack_paths(self.paths):
            if now < self._retry_at.get(path.name, 0.0):
                continue
            try:
                ack = read_ack(path)
                if not ack.sharded:
                    raise ProtocolError(path, "not one rank's part of a sharded capture")
                if ack.rank == 0:  # rank 0 is on the leader's node by definition: its daemon stores it
                    raise ProtocolError(path, "rank 0's part is the leader's to store, not a follower's")
            except FileNotFoundError:
                continue
            except ProtocolError as exc:
                self._set_aside(path, str(exc))
                continue
            started = time.monotonic()
            try:
                store_part(self.store, Job(path, ack, {}), slot_dir(staging, self.paths, ack.slot), {})
            except SlotLost as exc:
                tries = self._tries[path.name] = self._tries.get(path.name, 0) + 1
                if tries >= _SLOT_TRIES:
                    self._set_aside(path, f"{exc} ({tries} tries)")
                else:
                    self._retry_at[path.name] = time.monotonic() + 1.0
                continue
            except OSError as exc:
                self._retry_at[path.name] = time.monotonic() + _RETRY_AFTER_S
                self._error(f"storing {path.name} into {self.store.root} failed: {exc}; retried in 5 s")
                continue
            path.unlink(missing_ok=True)  # the part is durable and marked: the slot is free
            self._stored += 1
            self._last_error = None
            log.info(
                "stored rank %s's part of step %d (%.1f MiB in %.2f s)",
                ack.rank,
                ack.captured_step,
                sum(ack.files.values()) / 2**20,
                time.monotonic() - started,
            )

    def _staging(self) -> Path | None:
        """This node's staging dir of the run (the run id is the leader's, in control.json),
        made and marked as the leader makes its own, so ``ckptd gc`` knows whose it is."""
        try:
            control = read_control(self.run_paths.control)
        except FileNotFoundError:
            return None  # the leader has not started yet
        except ProtocolError as exc:
            self._error(f"cannot read the leader's control file: {exc}")
            return None
        problem = self._misconfigured(control.node)
        if problem is not None:
            self._error(problem)
            return None
        run_id = control.run_id
        staging = staging_dir_for(run_id)
        if run_id != self._marked:
            problem = not_private(staging)
            if problem is not None:
                self._error(f"refusing the staging dir: {problem}")
                return None
            staging.mkdir(mode=0o700, parents=True, exist_ok=True)
            sweep.mark(staging, self.run_paths.run_dir, run_id)
            self._marked = run_id
        return staging

    def _misconfigured(self, leader_node: str) -> str | None:
        """Why parts stored here would never be committed, or None: the leader's own node id
        (two daemons for one node's ranks), or another store than the one the leader commits."""
        if leader_node == self.node_id:
            return (
                f"the leader runs on node {self.node_id!r} too: run one daemon per node, each with "
                "its own node id (--node-id / CKPTD_NODE_ID); nothing is stored"
            )
        leaders = read_status(self.run_paths).get("store")
        if isinstance(leaders, str) and Path(leaders).resolve() != self.store.root.resolve():
            return (
                f"the leader commits into {leaders}, this follower would store into "
                f"{self.store.root}: give it --store {leaders}; nothing is stored"
            )
        return None

    def _set_aside(self, path: Path, problem: str) -> None:
        aside = path.with_name(path.name + ".rejected")
        try:
            path.rename(aside)
        except FileNotFoundError:
            return
        self._error(f"rejected ack {path.name}: {problem} (kept as {aside.name})")

    def _error(self, message: str) -> None:
        if message != self._last_error:  # a standing problem is said once, not every pass
            log.error("%s", message)
        self._last_error = message

    def _write_status(self, state: str = "running") -> None:
        atomic_write_json(
            self.paths.status,
            {
                "protocol": PROTOCOL_VERSION,
                "version": __version__,
                "role": "follower",
                "node": self.node_id,
                "state": state,
                "pid": os.getpid(),
                "run_dir": str(self.run_paths.run_dir),
                "store": str(self.store.root),
                "started": self._started,
                "heartbeat": time.time(),
                "parts_stored": self._stored,
                "pending_acks": len(pending_ack_paths(self.paths)),
                "last_error": self._last_error,
            },
        )
