"""One run's daemon: follow the log, judge, signal the trainer, persist, rotate.

The shape is gunicorn's arbiter: watchers and signal handlers only put a
wake-up on a queue; one loop does the work; one ``halt`` path cleans up. The
persister thread owns the store. The loop owns everything else (state,
control file, status heartbeat), so there is no shared mutable state to lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock, Timeout

from ckptd import __version__
from ckptd.config import RunConfig
from ckptd.daemon.persister import Job, Outcome, Persister
from ckptd.daemon.state import DaemonState, bests_to_json, load_state, save_state
from ckptd.errors import DaemonAlreadyRunning, ProtocolError
from ckptd.logs import ChangeWatcher, EventSource, open_source
from ckptd.policy import best_plus_last, judge
from ckptd.protocol import (
    PROTOCOL_VERSION,
    Control,
    RunPaths,
    atomic_write_json,
    pending_ack_paths,
    read_ack,
    read_control,
    verdict_to_json,
    write_control,
)
from ckptd.records import LogEvent, Verdict
from ckptd.staging import busy_slots, staging_dir_for
from ckptd.store import Store

log = logging.getLogger("ckptd.daemon")

_RECENT_EVALS = 4096  # eval metrics remembered for manifests of captures that arrive later
_RETRY_AFTER_S = 5.0  # a failed persist (disk full, ...) is retried this long after


@dataclass(frozen=True)
class Wake:
    reason: str
    payload: Any = None


class RunDaemon:
    """Follows one run until ``request_stop`` is called; ``run()`` returns the exit status."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.paths: RunPaths = config.paths
        self.store = Store(config.store)
        self._wakeups: queue.Queue[Wake] = queue.Queue()
        self._stopping: str | None = None
        self._stop_requested = threading.Event()
        self._queued: set[str] = set()  # ack file names the persister has and has not reported on
        self._retry_at: dict[str, float] = {}  # ack file name -> monotonic time of the next try
        self._evals: OrderedDict[int, dict[str, float]] = OrderedDict()
        self._started = time.time()
        self._last_verdict: Verdict | None = None
        self._last_error: str | None = None
        self._persisted = 0
        self._last_persist_s: float | None = None
        self._state: DaemonState
        self._source: EventSource
        self._persister: Persister
        self._watchers: list[ChangeWatcher] = []
        self._process = psutil.Process()

    # -- the public face -------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Safe from a signal handler: it only enqueues (and raises a flag a long read checks)."""
        self._stop_requested.set()
        self._wakeups.put(Wake("stop", reason))

    def run(self) -> int:
        self.paths.meta.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = FileLock(str(self.paths.lock), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise DaemonAlreadyRunning(self.config.run_dir, self.paths.lock, self._holder()) from None
        try:
            self._start()
            try:
                self._loop()
            finally:
                self._halt()
        finally:
            lock.release()
        return 0

    # -- start, loop, halt ----------------------------------------------------------------

    def _start(self) -> None:
        self.paths.acks.mkdir(mode=0o700, exist_ok=True)
        self.store.ensure()
        for name in self.store.clean_temp():
            log.warning("removed %s left in the store by an interrupted write", name)
        self._state = self._load_or_create_state()
        self.staging.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._source = open_source(
            self.config.log,
            self.config.log_format,
            watched=[c.metric for c in self.config.criteria],
            step_key=self.config.step_key,
            regex=self.config.regex,
            cursor=self._state.cursor,
        )
        self._persister = Persister(
            self.store,
            self.staging,
            best_plus_last(dict(self.config.best), self.config.keep_last, self.config.keep_every),
            self._state.run_id,
            lambda outcome: self._wakeups.put(Wake("persisted", outcome)),
        )
        # Catch up first: history establishes the best, it is never judged as news.
        self._follow(live=False)
        self._publish(verdict=None)  # a fresh control: no stale verdict for a new trainer
        self._save_state()
        self._write_status()
        self._persister.start()
        self._submit_acks()
        self._start_watchers()
        log.info(
            "following %s (%s), store %s, run id %s",
            self.config.log,
            self._watchers[0].mode,
            self.config.store,
            self._state.run_id,
        )

    def _load_or_create_state(self) -> DaemonState:
        criteria = tuple(f"{c.metric}:{c.mode}" for c in self.config.criteria)
        state = load_state(self.paths.state)
        if state is None:
            state = DaemonState.fresh(self.config.store, criteria)
        seq = state.seq
        with contextlib.suppress(FileNotFoundError, ProtocolError):
            seq = max(seq, read_control(self.paths.control).seq)
        return state.with_(seq=seq, store=str(self.config.store), criteria=criteria)

    @property
    def staging(self) -> Path:
        return staging_dir_for(self._state.run_id)

    def _start_watchers(self) -> None:
        wake = self._wakeups.put
        self._watchers = [
            ChangeWatcher(
                self._source.watch_path,
                lambda: wake(Wake("log")),
                poll=self.config.poll,
                poll_interval=self.config.poll_interval,
                children=self._source.watch_children,
            ),
            ChangeWatcher(
                self.paths.acks,
                lambda: wake(Wake("ack")),
                poll=self.config.poll,
                poll_interval=self.config.poll_interval,
                children=True,
            ),
        ]
        for watcher in self._watchers:
            watcher.start()

    def _loop(self) -> None:
        next_beat = time.monotonic()
        while self._stopping is None:
            timeout = max(0.0, next_beat - time.monotonic())
            try:
                self._handle(self._wakeups.get(timeout=timeout))
                while True:  # coalesce a burst of wake-ups into one pass
                    self._handle(self._wakeups.get_nowait())
            except queue.Empty:
                pass
            try:
                self._follow(live=True)
                self._submit_acks()
            except OSError as exc:  # an unreadable log or acks dir may heal; the heartbeat says what
                self._error(f"{type(exc).__name__}: {exc}")
            if time.monotonic() >= next_beat:
                self._write_status()
                self._save_state()
                next_beat = time.monotonic() + self.config.heartbeat_interval

    def _handle(self, wake: Wake) -> None:
        if wake.reason == "stop":
            self._stopping = str(wake.payload)
        elif wake.reason == "persisted":
            self._on_persisted(wake.payload)

    def _halt(self) -> None:
        """The one clean-up path: stop watching, finish acknowledged persists, say goodbye."""
        log.info("stopping (%s)", self._stopping or "error")
        for watcher in self._watchers:
            watcher.stop()
        self._submit_acks(retry_failed=True)
        self._persister.stop()
        while not self._wakeups.empty():
            self._handle(self._wakeups.get_nowait())
        self._source.close()
        self._save_state()
        self._remove_idle_slots()
        self._write_status(state="stopped")
        # Age the heartbeat at once so clients stop waiting on us now, not in STALE_AFTER_S.
        os.utime(self.paths.status, (0, 0))

    # -- follow and judge --------------------------------------------------------------------

    def _follow(self, *, live: bool) -> None:
        """Judge what the log gained, a stretch at a time; a stop request is heard in between."""
        while True:
            for event in self._source.read_events():
                self._on_event(event, live=live)
            if not self._source.behind or self._stop_requested.is_set():
                return

    def _on_event(self, event: LogEvent, *, live: bool) -> None:
        self._remember(event)
        if event.step <= self._state.judged_step:
            return  # already judged before a restart or a rotation: never re-issue
        judgement = judge(self.config.criteria, self._state.bests, event)
        if judgement.verdict is None:
            return
        self._state = self._state.with_(bests=dict(judgement.bests), judged_step=event.step)
        if live:
            self._publish(judgement.verdict)
            log.info("step %d: %s (%s)", event.step, judgement.verdict.action, judgement.verdict.reason)

    def _remember(self, event: LogEvent) -> None:
        self._evals.setdefault(event.step, {}).update(event.metrics)
        if len(self._evals) > _RECENT_EVALS:
            # popitem, not del d[next(iter(d))]: a plain dict emptied from the front is
            # scanned past its deleted slots on every call, which a long catch-up felt.
            self._evals.popitem(last=False)

    def _publish(self, verdict: Verdict | None) -> None:
        self._state = self._state.with_(seq=self._state.seq + 1)
        write_control(
            self.paths,
            Control(
                seq=self._state.seq,
                run_id=self._state.run_id,
                staging=str(self.staging),
                every_steps=self.config.every_steps,
                verdict=verdict,
            ),
        )
        if verdict is not None:
            self._last_verdict = verdict
            # Right after each verdict, so a killed daemon never re-issues it; without the
            # fsyncs, which cost milliseconds per eval: the heartbeat makes it durable.
            self._save_state(durable=False)

    # -- persist ------------------------------------------------------------------------------

    def _submit_acks(self, *, retry_failed: bool = False) -> None:
        now = time.monotonic()
        for path in pending_ack_paths(self.paths):
            if path.name in self._queued:
                continue
            if not retry_failed and now < self._retry_at.get(path.name, 0.0):
                continue
            try:
                ack = read_ack(path)
            except FileNotFoundError:
                continue
            except ProtocolError as exc:
                self._reject(path, str(exc))
                continue
            metrics = self._evals.get(ack.requested_step or ack.captured_step, {})
            self._queued.add(path.name)
            self._persister.submit(Job(path, ack, metrics))

    def _reject(self, path: Path, problem: str) -> None:
        """A bad ack is set aside so it never holds a slot or stops the loop."""
        aside = path.with_name(path.name + ".rejected")
        path.rename(aside)
        self._error(f"rejected ack {path.name}: {problem} (kept as {aside.name})")

    def _on_persisted(self, outcome: Outcome) -> None:
        name = outcome.job.ack_path.name
        self._queued.discard(name)
        if outcome.error is not None:
            self._retry_at[name] = time.monotonic() + _RETRY_AFTER_S
            self._error(
                f"persisting step {outcome.job.ack.captured_step} into {self.config.store} "
                f"failed: {outcome.error}; "
                f"the slot is kept and the write retried in {_RETRY_AFTER_S:.0f} s"
            )
            return
        self._retry_at.pop(name, None)
        assert outcome.record is not None
        self._persisted += 1
        self._last_persist_s = outcome.seconds
        log.info(
            "committed %s (%s, %.1f MiB in %.2f s)",
            outcome.record.name,
            ", ".join(outcome.record.tags) or "untagged",
            outcome.record.nbytes / 2**20,
            outcome.seconds,
        )

    def _remove_idle_slots(self) -> None:
        """Slots no pending ack holds would otherwise pin shared memory after we are gone."""
        busy = busy_slots(self.paths)
        try:
            entries = list(self.staging.iterdir())
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name not in busy and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
        if not busy:
            shutil.rmtree(self.staging, ignore_errors=True)

    # -- status and state ----------------------------------------------------------------------

    def _error(self, message: str) -> None:
        self._last_error = message
        log.error("%s", message)

    def _save_state(self, *, durable: bool = True) -> None:
        self._state = self._state.with_(cursor=self._source.cursor())
        save_state(self.paths.state, self._state, durable=durable)

    def _write_status(self, state: str = "running") -> None:
        cursor = self._source.cursor() or {}
        try:
            log_size = self.config.log.stat().st_size
        except FileNotFoundError:
            log_size = None
        offset = cursor.get("offset")
        verdict = self._last_verdict
        atomic_write_json(
            self.paths.status,
            {
                "protocol": PROTOCOL_VERSION,
                "version": __version__,
                "state": state,
                "pid": os.getpid(),
                **_memory(self._process),
                "host": socket.gethostname(),
                "started": self._started,
                "heartbeat": time.time(),
                "run_id": self._state.run_id,
                "log": str(self.config.log),
                "log_format": self._source.name,
                "log_offset": offset,
                "log_lag_bytes": None if log_size is None or offset is None else max(0, log_size - offset),
                "watcher": self._watchers[0].mode if self._watchers else None,
                "store": str(self.config.store),
                "bests": bests_to_json(self._state.bests),
                "last_verdict": None if verdict is None else verdict_to_json(verdict),
                "persisted": self._persisted,
                "last_persist_seconds": self._last_persist_s,
                "pending_acks": len(pending_ack_paths(self.paths)),
                "malformed_lines": dict(self._source.malformed.counts),
                "last_error": self._last_error,
            },
        )

    def _holder(self) -> str:
        try:
            status = json.loads(self.paths.status.read_bytes())
            return f"pid {status.get('pid')} on {status.get('host')}"
        except (OSError, ValueError):
            return "holder unknown"


def _memory(process: psutil.Process) -> dict[str, int]:
    """RSS, and its anonymous part: RSS also counts the shared pages of a slot being persisted."""
    memory = process.memory_info()
    return {"rss_bytes": memory.rss, "rss_anon_bytes": memory.rss - getattr(memory, "shared", 0)}
