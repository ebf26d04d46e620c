"""One run's daemon: follow the log, judge, signal the trainer, persist, rotate.

The shape is gunicorn's arbiter: watchers and signal handlers only put a
wake-up on a queue; one loop does the work; one ``halt`` path cleans up. The
persister thread owns the store. The loop owns everything else (state,
control file, status heartbeat), so there is no shared mutable state to lock.

``run()`` returns 0 after a clean stop, or ``EXIT_UNPERSISTED`` (6) when acknowledged captures
were still not persisted when it stopped (a full disk, a store that cannot be written): they
stay in their slots, listed in the final ``status.json`` (``unpersisted``), and the next daemon
on the run persists them. A trainer's best must not vanish behind an exit status of 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock, Timeout

from ckptd import __version__, sweep
from ckptd.config import RunConfig, live_change
from ckptd.daemon.persister import Job, Outcome, Persister
from ckptd.daemon.state import (
    DaemonState,
    bests_to_json,
    load_state,
    new_run_id,
    save_state,
)
from ckptd.daemon.uploader import Uploader
from ckptd.errors import ConfigError, DaemonAlreadyRunning, ProtocolError
from ckptd.logs import ChangeWatcher, EventSource, open_source
from ckptd.notify import Notifier
from ckptd.policy import best_plus_last, judge
from ckptd.protocol import (
    EXIT_UNPERSISTED,
    PROTOCOL_VERSION,
    Ack,
    Control,
    RunPaths,
    StandingVerdict,
    atomic_write_json,
    flock_holder,
    local_node_id,
    pending_ack_paths,
    read_ack,
    read_client_report,
    read_control,
    read_follower_reports,
    read_status,
    take_requests,
    verdict_to_json,
    write_control,
)
from ckptd.records import Best, LogEvent, Verdict
from ckptd.remote import RemoteError, RemoteStore
from ckptd.staging import allocated_bytes, busy_slots, disk_staging_dir, not_private, staging_dir_for
from ckptd.store import Store

log = logging.getLogger("ckptd.daemon")

_RECENT_EVALS = 4096  # eval metrics remembered for manifests of captures that arrive later
_RETRY_AFTER_S = 5.0  # a failed persist (disk full, ...) is retried this long after
_SLOT_TRIES = 3  # an ack whose slot is gone or overwritten is set aside after this many tries
_SLOT_RETRY_S = 1.0
_YOUNG_S = 3.0  # an unreadable ack younger than this may still be being written: look again
_STORE_COUNT_EVERY_S = 10.0
_MAX_TAGS = 8  # a standing verdict takes no more request tags: a flood of requests is one capture
_UNSEEN_AFTER_EVALS = 5  # evals of other watched metrics before warning that one never appeared
_PERSIST_ERRORS = ("persisting step", "the best at step")  # how _on_persisted's errors begin


@dataclass(frozen=True)
class Wake:
    reason: str
    payload: Any = None


class RunDaemon:
    """Follows one run until ``request_stop`` is called; ``run()`` returns the exit status."""

    def __init__(self, config: RunConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier(None)  # systemd's notify socket, for `ckptd run`
        self.paths: RunPaths = config.paths
        self.store = Store(config.store)
        self._wakeups: queue.Queue[Wake] = queue.Queue()
        self._stopping: str | None = None
        self._stop_requested = threading.Event()
        self._queued: set[str] = set()  # ack file names the persister has and has not reported on
        self._retry_at: dict[str, float] = {}  # ack file name -> monotonic time of the next try
        self._slot_tries: dict[str, int] = {}  # ack file name -> tries that found its slot lost
        # Ack file name -> what status.json says of an acknowledged capture whose persist failed
        # and is retried: not on disk yet. At halt, every ack still pending is in it.
        self._unpersisted: dict[str, dict[str, Any]] = {}
        self._best_steps: frozenset[int] = frozenset()
        self._unseen_warned = False
        self._evals: OrderedDict[int, dict[str, float]] = OrderedDict()
        self._started = time.time()
        self._caught_up_at = time.monotonic()
        self._kept: tuple[float, int, int] | None = None  # (when counted, checkpoints, bytes)
        self._last_verdict: Verdict | None = None
        self._last_error: str | None = None
        self._persisted = 0
        self._last_persist_s: float | None = None
        self._state: DaemonState
        self._durable_state: DaemonState | None = None  # the state last written with fsync
        self._source: EventSource
        self._persister: Persister
        self._uploader: Uploader | None = None
        self._watchers: list[ChangeWatcher] = []
        self._process = psutil.Process()
        self._node = local_node_id()  # the leader's node: ranks elsewhere ack to their own daemon

    # -- the public face -------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Safe from a signal handler: it only enqueues (and raises a flag a long read checks)."""
        self._stop_requested.set()
        self._wakeups.put(Wake("stop", reason))

    def reconfigure(self, config: RunConfig) -> None:
        """Safe from any thread: apply a reloaded policy (see ``live_change``) at the next pass."""
        self._wakeups.put(Wake("reconfigure", config))

    def run(self) -> int:
        if self.paths.meta.is_symlink():
            # Never through a link: lock, state and control would be written wherever it points.
            raise ConfigError(f"{self.paths.meta} is a symbolic link; ckptd will not follow it")
        self.paths.meta.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = FileLock(str(self.paths.lock), timeout=0, mode=0o600)  # not world-writable under umask 000
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
        except BaseException:
            if hasattr(self, "_state"):
                self._remove_idle_slots()  # a failed start must not leave an empty staging dir
            raise
        finally:
            lock.release()
        return EXIT_UNPERSISTED if self._unpersisted else 0

    # -- start, loop, halt ----------------------------------------------------------------

    def _start(self) -> None:
        self.paths.acks.mkdir(mode=0o700, exist_ok=True)
        self._state = self._load_or_create_state()
        squatted = not_private(self.staging)
        if squatted is not None:
            # Not ours: a new run id gives a new staging dir nobody else prepared.
            self._state = self._fresh_run_id(self._state, f"its staging dir is not private: {squatted}")
        self._source = open_source(
            self.config.log,
            self.config.log_format,
            watched=[c.metric for c in self.config.criteria],
            step_key=self.config.step_key,
            regex=self.config.regex,
            cursor=self._state.cursor,
        )
        self.store.ensure()
        lineage = self.store.claim(self._state.run_id, self.config.run_dir)
        # Saved before anything is staged: a daemon killed during a long catch-up keeps its
        # run id, so its next start finds (and can clean) the same staging dir.
        save_state(self.paths.state, self._state)
        for name in self.store.clean_temp():
            log.warning("removed %s left in the store by an interrupted write", name)
        self._make_staging()
        # What killed runs of this user left in shared memory (and idle disk slots of ours).
        for orphan in sweep.sweep_at_start(self.config.run_dir, self.staging):
            log.info("swept %s (%d MiB): %s", orphan.path, orphan.nbytes >> 20, orphan.why)
        self._uploader = self._make_uploader(lineage)
        self._persister = Persister(
            self.store,
            self.staging,
            best_plus_last(dict(self.config.best), self.config.keep_last, self.config.keep_every),
            self._state.run_id,
            lambda outcome: self._wakeups.put(Wake("persisted", outcome)),
            criteria={c.metric: c.mode for c in self.config.criteria},
            lineage=lineage,
            best_steps=lambda: self._best_steps,
            paths=self.paths,
            shard_timeout=self.config.shard_timeout,
            uploader=self._uploader,
        )
        self._note_bests()
        self._publish_first()
        # Catch up: a first start reads the log's history, which establishes the best and is
        # never judged as news (its end was fixed when the source opened, so an eval appended
        # meanwhile is live). A restart resumes at its cursor: what follows was never judged,
        # and is judged now, so a line logged while the daemon was down still gets a verdict.
        resumed = self._state.caught_up
        while not self._source.history_done and not self._stop_requested.is_set():
            self._judge_all(self._source.read_history(), live=resumed)
        self._state = self._state.with_(caught_up=self._source.history_done)
        self._save_state()
        self._write_status()
        self._persister.start()
        if self._uploader is not None:
            self._uploader.start()
        self._submit_acks()
        self._start_watchers()
        self.notifier.ready(self._one_line())
        log.info(
            "following %s (%s), store %s, run id %s",
            self.config.log,
            self._watchers[0].mode,
            self.config.store,
            self._state.run_id,
        )

    def _make_uploader(self, lineage: frozenset[str]) -> Uploader | None:
        """The remote tier's uploader, if a remote is configured; opening it imports the backend."""
        config = self.config
        if config.remote is None:
            return None
        try:
            remote = RemoteStore(config.remote, config.remote_options)
        except RemoteError as exc:
            raise ConfigError(str(exc)) from exc
        policy = best_plus_last(config.remote_best(), config.remote_keep_last, config.remote_keep_every)
        return Uploader(
            remote,
            self.store,
            self.paths,
            policy,
            lineage=lineage,
            best_steps=lambda: self._best_steps,
            released=lambda: self._persister.rotate_soon(),
        )

    def _load_or_create_state(self) -> DaemonState:
        criteria = tuple(f"{c.metric}:{c.mode}" for c in self.config.criteria)
        inode = self.config.run_dir.stat().st_ino
        state = load_state(self.paths.state)
        if state is None:
            state = DaemonState.fresh(self.config.store, criteria)
        elif state.run_dir_inode not in (0, inode):
            state = self._as_copy(state)
        seq = state.seq
        with contextlib.suppress(FileNotFoundError, ProtocolError):
            seq = max(seq, read_control(self.paths.control).seq)
        return state.with_(
            seq=seq,
            store=str(self.config.store),
            criteria=criteria,
            bests=_bests_still_meant(state, criteria),
            run_dir=str(self.config.run_dir),
            run_dir_inode=inode,
        )

    def _as_copy(self, state: DaemonState) -> DaemonState:
        """A run dir copied with its .ckptd/ gets its own run id, so its own staging slots."""
        copied = f"it is a copy of {state.run_dir or 'another run'} (another directory)"
        return self._fresh_run_id(state, copied).with_(caught_up=False)

    def _fresh_run_id(self, state: DaemonState, why: str) -> DaemonState:
        """A new run id, so a new staging dir. Pending acks name slots of the old one, which
        may hold another run's (or another user's) bytes: they are set aside."""
        fresh = state.with_(run_id=new_run_id())
        run_dir, old = self.config.run_dir, state.run_id
        log.warning("%s: %s; it gets a new run id %s (was %s)", run_dir, why, fresh.run_id, old)
        for path in pending_ack_paths(self.paths):
            self._reject(path, f"its slot is from run id {state.run_id}: {why}")
        return fresh

    def _make_staging(self) -> None:
        if self.staging.is_symlink() or (self.staging.exists() and not self.staging.is_dir()):
            raise ConfigError(
                f"the staging path {self.staging} is not a plain directory (a symlink or a file): "
                "ckptd will not stage snapshots or clean up through it; remove it"
            )
        self.staging.mkdir(mode=0o700, parents=True, exist_ok=True)
        sweep.mark(self.staging, self.config.run_dir, self._state.run_id)  # for `ckptd gc`

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
                self._follow()
                self._take_requests()
                self._submit_acks()
            except OSError as exc:  # an unreadable log or acks dir may heal; the heartbeat says what
                self._error(f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # a bug must not stop the persists of acked snapshots
                log.exception("unexpected error; the daemon goes on")
                self._error(f"unexpected {type(exc).__name__}: {exc}")
            self.notifier.watchdog()
            if time.monotonic() >= next_beat:
                self.notifier.status(self._one_line())
                self._write_status()
                self._save_state()
                self._check_shards()
                next_beat = time.monotonic() + self.config.heartbeat_interval

    def _handle(self, wake: Wake) -> None:
        if wake.reason == "stop":
            self._stopping = str(wake.payload)
        elif wake.reason == "persisted":
            self._on_persisted(wake.payload)
        elif wake.reason == "reconfigure":
            self._reconfigure(wake.payload)

    def _reconfigure(self, config: RunConfig) -> None:
        """What a reload may change without a restart: thresholds, how many are kept, the
        schedule. Retention follows at once; the trainer sees a new schedule at its next step."""
        problem = live_change(self.config, config)
        if problem is not None:
            self._error(f"reload ignored: {problem}; restart the daemon to apply it")
            return
        schedule_changed = config.every_steps != self.config.every_steps
        self.config = config
        self._persister.set_policy(best_plus_last(dict(config.best), config.keep_last, config.keep_every))
        if schedule_changed:
            self._publish_settings()
        log.info(
            "reloaded: keep best %s, last %d, every %s; capture every %s steps",
            ", ".join(f"{c.metric}:{k}" for c, k in config.best),
            config.keep_last,
            config.keep_every,
            config.every_steps,
        )

    def _halt(self) -> None:
        """The one clean-up path: stop watching, finish acknowledged persists, say goodbye."""
        log.info("stopping (%s)", self._stopping or "error")
        self.notifier.stopping(f"stopping ({self._stopping or 'error'}): finishing acknowledged persists")
        for watcher in self._watchers:
            watcher.stop()
        self._submit_acks(retry_failed=True)
        self._persister.stop()
        if self._uploader is not None:
            self._uploader.stop()  # after the file being sent; the rest resumes at the next start
        while not self._wakeups.empty():
            self._handle(self._wakeups.get_nowait())
        self._note_unpersisted_at_stop()
        self._save_state()
        self._remove_idle_slots()
        self._write_status(state="stopped")
        self._source.close()  # after the last status: its lag is read from the open source
        # Age the heartbeat at once so clients stop waiting on us now, not in STALE_AFTER_S.
        os.utime(self.paths.status, (0, 0))

    # -- follow and judge --------------------------------------------------------------------

    def _follow(self) -> None:
        """Judge what the log gained, a stretch at a time; a stop request is heard in between."""
        while True:
            if not self._source.history_done:  # a re-detected format reads its history again
                self._judge_all(self._source.read_history(), live=False)
            elif self._judge_all(self._source.read_events(), live=True):
                # After the stretch, not each verdict: the cursor then covers every event
                # judged, so a daemon killed here re-judges a stretch rather than skip one.
                self._save_state(durable=False)
            caught_up = self._source.history_done and not self._source.behind
            if caught_up:
                self._caught_up_at = time.monotonic()
            if caught_up or self._stop_requested.is_set():
                return

    def _judge_all(self, events: list[LogEvent], *, live: bool) -> bool:
        """Judge each event once, in log order; True when a verdict was published."""
        published = False
        for event in events:
            published |= self._on_event(event, live=live)
        return published

    def _on_event(self, event: LogEvent, *, live: bool) -> bool:
        """Every new log line is judged by its position, whatever its step: a lower step is a
        resumed run (or a new run in the same log), and its bests are real."""
        self._remember(event)
        judgement = judge(self.config.criteria, self._state.bests, event)
        if judgement.verdict is None:
            return False
        if event.step < self._state.judged_step:
            log.info(
                "step %d follows step %d: the run resumed from an earlier step (or a new run "
                "writes this log); judging it",
                event.step,
                self._state.judged_step,
            )
        self._state = self._state.with_(bests=dict(judgement.bests), judged_step=event.step)
        self._note_bests()
        if not live:
            return False
        verdict = self._with_standing(judgement.verdict)
        self._publish(verdict)
        log.info("step %d: %s (%s)", event.step, verdict.action, verdict.reason)
        return True

    def _with_standing(self, verdict: Verdict) -> Verdict:
        """A verdict at the step of the standing (uncaptured) snapshot verdict: a second best
        there (HF logs each eval dataset on its own line) joins it, so one capture carries
        every criterion it is best on; the same eval logged again (a trainer resumed from an
        earlier checkpoint re-logs it) asks again, since a new trainer ignores the old ask."""
        standing = self._state.last_snapshot
        if standing is None or standing.verdict.eval_step != verdict.eval_step:
            return verdict
        last = standing.verdict
        if verdict.action == "skip":
            shared = [m for m in last.metrics if m in verdict.metrics]
            same = bool(shared) and all(verdict.metrics[m] == last.metrics[m] for m in shared)
            return last if same else verdict
        return replace(
            verdict,
            tags=tuple(dict.fromkeys((*last.tags, *verdict.tags))),
            reason=f"{last.reason}; {verdict.reason}",
            metrics={**last.metrics, **verdict.metrics},
        )

    def _note_bests(self) -> None:
        # One reference swap: the persister thread reads it without a lock.
        self._best_steps = frozenset(best.step for best in self._state.bests.values())

    def _remember(self, event: LogEvent) -> None:
        self._evals.setdefault(event.step, {}).update(event.metrics)
        self._evals.move_to_end(event.step)
        if len(self._evals) > _RECENT_EVALS:
            # popitem, not del d[next(iter(d))]: a plain dict emptied from the front is
            # scanned past its deleted slots on every call, which a long catch-up felt.
            self._evals.popitem(last=False)

    def _publish(self, verdict: Verdict | None) -> None:
        """Write control.json: the latest verdict (it releases a trainer waiting on that step)
        and the standing snapshot verdict, which stays until an ack answers it."""
        seq = self._state.seq + 1
        written = time.time()
        if verdict is not None and verdict.action == "snapshot":
            self._state = self._state.with_(last_snapshot=StandingVerdict(seq, written, verdict))
        self._state = self._state.with_(seq=seq)
        control = Control(
            seq=seq,
            run_id=self._state.run_id,
            staging=str(self.staging),
            every_steps=self.config.every_steps,
            verdict=verdict,
            written=written,
            standing=self._state.last_snapshot,
            node=self._node,
        )
        write_control(self.paths, control)
        if verdict is not None:
            self._last_verdict = verdict

    def _publish_settings(self) -> None:
        """control.json again with new settings (the schedule). The standing verdict keeps its
        own seq, so no capture is asked twice; a snapshot verdict that no longer stands is not
        repeated as the latest, since a client without a standing one would take it anew."""
        last = self._last_verdict
        self._publish(last if last is not None and last.action == "skip" else None)

    def _take_requests(self) -> None:
        """``ckptd request`` files: each becomes a snapshot verdict the trainer captures at its
        next step. An uncaptured verdict that stands takes the tag instead: one capture serves
        both, and a best is never pushed aside by a manual request."""
        for tag in take_requests(self.paths, self._error):
            standing = self._state.last_snapshot
            if standing is not None and len(standing.verdict.tags) >= _MAX_TAGS:
                log.warning("snapshot request (tag %s) ignored: one is already asked for", tag)
                continue
            # Step 0 before any eval was judged: the trainer's next step is past it either way.
            step = standing.verdict.eval_step if standing else max(self._state.judged_step, 0)
            verdict = Verdict(step, "snapshot", (tag,), f"requested by ckptd request (tag {tag})")
            self._publish(self._with_standing(verdict))
            log.info("snapshot requested (tag %s): captured at the trainer's next step", tag)

    def _publish_first(self) -> None:
        """A fresh control.json at start, with no verdict (an old one would make a new trainer
        capture the wrong step). A snapshot verdict no ack answered still stands, with its first
        write time: the trainer that was running then captures it, a newer one ignores it."""
        standing = self._state.last_snapshot
        if standing is not None and self._answered(str(standing.seq)):
            self._state = self._state.with_(last_snapshot=None)
        elif standing is not None:
            log.warning(
                "step %d: its snapshot verdict had no capture yet; it stands", standing.verdict.eval_step
            )
        self._publish(verdict=None)

    def _answered(self, ack_name: str) -> bool:
        acks = self.paths.acks
        if (acks / f"{ack_name}.json").exists() or (acks / f"{ack_name}.json.rejected").exists():
            return True
        return any(self._stamp_of(record.name) == ack_name for record in self.store.list())

    def _stamp_of(self, name: str) -> object:
        try:
            stamp = self.store.manifest(name).get("ack")
        except (OSError, ValueError):
            return None
        return stamp.get("name") if isinstance(stamp, dict) else None

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
                if _young(path):  # written in place by hand or an old client: maybe not whole yet
                    self._retry_at[path.name] = now + _SLOT_RETRY_S
                    continue
                self._reject(path, str(exc))
                continue
            metrics = self._metrics_at(ack.eval_step) if _ranked_by_its_eval(ack) else {}
            standing = self._state.last_snapshot
            if standing is not None and ack.seq == standing.seq:
                self._state = self._state.with_(last_snapshot=None)  # answered: it stands no more
            self._queued.add(path.name)
            self._persister.submit(Job(path, ack, metrics))

    def _metrics_at(self, step: int) -> dict[str, float]:
        """What the daemon knows of the eval at ``step``, for an ack that carries no metrics (a
        periodic capture at an eval step): recent evals, else the bests the state keeps, so a
        best captured periodically is still ranked after a restart."""
        known = {m: best.value for m, best in self._state.bests.items() if best.step == step}
        return {**known, **self._evals.get(step, {})}

    def _reject(self, path: Path, problem: str) -> None:
        """A bad ack is set aside so it never holds a slot or stops the loop."""
        aside = path.with_name(path.name + ".rejected")
        try:
            path.rename(aside)
        except FileNotFoundError:
            return  # the trainer replaced or removed it meanwhile
        self._slot_tries.pop(path.name, None)
        self._unpersisted.pop(path.name, None)  # set aside: no retry will persist it
        self._error(f"rejected ack {path.name}: {problem} (kept as {aside.name})")

    def _check_shards(self) -> None:
        """Sharded captures wait in the store for the parts other nodes' daemons store: the
        persister looks at them once a beat while any is there (a listing of the store)."""
        try:
            waiting = bool(self.store.shard_captures())
        except OSError as exc:
            self._error(f"cannot list the store for sharded captures: {exc}")
            return
        if waiting:
            self._persister.check_shards()

    def _on_persisted(self, outcome: Outcome) -> None:
        job = outcome.job
        if job is None:
            self._on_shards_checked(outcome)
            return
        name = job.ack_path.name
        self._queued.discard(name)
        if outcome.slot_lost:
            self._on_slot_lost(job, outcome)
            return
        if outcome.error is not None:
            self._on_persist_failed(job, outcome.error)
            return
        self._retry_at.pop(name, None)
        self._unpersisted.pop(name, None)
        if self._last_error and self._last_error.startswith(_PERSIST_ERRORS):
            self._last_error = None  # the persist that failed has gone through now
        if outcome.record is None:
            ack = job.ack
            log.info(
                "stored rank %s's part of step %d; waiting for the other ranks' parts",
                ack.rank,
                ack.captured_step,
            )
            return
        self._on_committed(outcome)

    def _on_persist_failed(self, job: Job, error: str) -> None:
        """Kept and retried; said loudly when the capture is a best, which exists nowhere else
        once the trainer moves on, and listed in status.json until it is on disk."""
        name, ack = job.ack_path.name, job.ack
        self._retry_at[name] = time.monotonic() + _RETRY_AFTER_S
        entry = self._unpersisted.setdefault(name, _unpersisted_entry(name, ack))
        entry["tries"] += 1
        entry["error"] = error
        held = self._uploader.held() if self._uploader is not None else frozenset()
        count = "every" if held is None else str(len(held))
        waiting = (
            f"; {count} checkpoint(s) kept locally until uploaded to {self.config.remote}"
            if held is None or held
            else ""
        )
        bests = [tag.removeprefix("best:") for tag in ack.tags if tag.startswith("best:")]
        what = (
            f"the best at step {ack.captured_step} ({', '.join(bests)}) is not on disk yet: persisting it"
            if bests
            else f"persisting step {ack.captured_step}"
        )
        self._error(
            f"{what} into {self.config.store} failed: {error}; "
            f"the slot is kept and the write retried in {_RETRY_AFTER_S:.0f} s{waiting}"
        )

    def _note_unpersisted_at_stop(self) -> None:
        """At halt, after the last tries: every ack still pending is a capture not persisted
        (its write failed, or it came too late); said once, and the exit status says it too."""
        still: dict[str, dict[str, Any]] = {}
        for path in pending_ack_paths(self.paths):
            entry = self._unpersisted.get(path.name)
            if entry is None:
                try:
                    entry = _unpersisted_entry(path.name, read_ack(path))
                except (OSError, ProtocolError):
                    entry = {"ack": path.name, "step": None, "tags": [], "best": False, "tries": 0}
                entry["error"] = "not persisted before the daemon stopped"
            still[path.name] = entry
        self._unpersisted = still
        if still:
            shown = ", ".join(_described(entry) for entry in still.values())
            self._error(
                f"stopping with {len(still)} acknowledged capture(s) not persisted ({shown}): their "
                f"slots are kept, and the next `ckptd run {self.config.run_dir}` persists them "
                f"(exit status {EXIT_UNPERSISTED})"
            )

    def _on_shards_checked(self, outcome: Outcome) -> None:
        if outcome.error is not None:
            self._error(outcome.error)
        elif outcome.record is not None:
            self._on_committed(outcome)

    def _on_committed(self, outcome: Outcome) -> None:
        assert outcome.record is not None
        self._kept = None  # recount the store at the next heartbeat
        self._persisted += 1
        self._last_persist_s = outcome.seconds
        log.info(
            "committed %s (%s, %.1f MiB in %.2f s)",
            outcome.record.name,
            ", ".join(outcome.record.tags) or "untagged",
            outcome.record.nbytes / 2**20,
            outcome.seconds,
        )

    def _on_slot_lost(self, job: Job, outcome: Outcome) -> None:
        """A slot that is gone or holds another capture will not heal: a few tries (the trainer
        may still be writing it), then the ack is set aside and frees nothing it still holds."""
        name = job.ack_path.name
        tries = self._slot_tries[name] = self._slot_tries.get(name, 0) + 1
        if tries >= _SLOT_TRIES:
            self._reject(job.ack_path, f"{outcome.error} ({tries} tries)")
        else:
            self._retry_at[name] = time.monotonic() + _SLOT_RETRY_S

    def _remove_idle_slots(self) -> None:
        """Slots no pending ack holds would otherwise pin shared memory (or disk) after we are gone."""
        busy = busy_slots(self.paths)
        for staging in (self.staging, disk_staging_dir(self.paths)):
            if staging.is_symlink():
                # Never through a link: it could point anywhere (it deleted a user's folder once).
                self._error(f"{staging} is a symbolic link; left alone, nothing removed through it")
                continue
            try:
                entries = list(staging.iterdir())
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                # Link test first: is_dir() follows it, and raises on one into another user's run.
                if entry.name not in busy and not entry.is_symlink() and entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
            if not busy.intersection(e.name for e in entries):
                shutil.rmtree(staging, ignore_errors=True)

    # -- status and state ----------------------------------------------------------------------

    def _error(self, message: str) -> None:
        self._last_error = message
        log.error("%s", message)

    def _save_state(self, *, durable: bool = True) -> None:
        self._state = self._state.with_(cursor=self._source.cursor())
        if durable and self._state == self._durable_state:
            return  # an idle run's heartbeat: nothing new to write, no fsync to pay
        save_state(self.paths.state, self._state, durable=durable)
        self._durable_state = self._state if durable else None

    def _write_status(self, state: str = "running") -> None:
        verdict = self._last_verdict
        self._warn_unseen_metrics()
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
                "log_offset": (self._source.cursor() or {}).get("offset"),
                "log_lag_bytes": self._source.lag_bytes(),
                "log_lag_seconds": self._lag_seconds(),
                "watcher": self._watchers[0].mode if self._watchers else None,
                "store": str(self.config.store),
                "criteria": [
                    {"metric": c.metric, "mode": c.mode, "keep": keep} for c, keep in self.config.best
                ],
                "bests": bests_to_json(self._state.bests),
                "last_verdict": None if verdict is None else verdict_to_json(verdict),
                "policy": {
                    "keep_last": self.config.keep_last,
                    "keep_every": self.config.keep_every,
                    "every_steps": self.config.every_steps,
                },
                "persisted": self._persisted,
                "persists_in_flight": len(self._queued),
                "staged_bytes": allocated_bytes(self.staging) + allocated_bytes(disk_staging_dir(self.paths)),
                **self._store_counts(),
                "last_persist_seconds": self._last_persist_s,
                "pending_acks": len(pending_ack_paths(self.paths)),
                "malformed_lines": dict(self._source.malformed.counts),
                "log_notes": self._source.notes(),
                "trainer": read_client_report(self.paths),
                "remote": self._uploader.report() if self._uploader is not None else None,
                "node": self._node,
                "followers": read_follower_reports(self.paths),
                "unpersisted": list(self._unpersisted.values()),
                "last_error": self._last_error,
            },
        )

    def _one_line(self) -> str:
        """systemd's STATUS=: the run, its bests, the persists so far."""
        bests = ", ".join(f"{m}={b.value:.6g}@{b.step}" for m, b in self._state.bests.items())
        return f"{self.config.run_dir}: {bests or 'no best yet'}; {self._persisted} persisted"

    def _lag_seconds(self) -> float:
        """How long the daemon has been behind the log: 0 while it keeps up."""
        if not self._source.lag_bytes():
            return 0.0
        return round(time.monotonic() - self._caught_up_at, 3)

    def _store_counts(self) -> dict[str, int]:
        """Checkpoints and bytes the store holds, counted after each persist and every few
        seconds: listing reads every manifest, too much for each heartbeat of a large store."""
        now = time.monotonic()
        if self._kept is None or now - self._kept[0] > _STORE_COUNT_EVERY_S:
            try:
                records = self.store.list()
            except OSError:
                return {}
            self._kept = (now, len(records), sum(r.nbytes for r in records))
        return {"store_checkpoints": self._kept[1], "store_bytes": self._kept[2]}

    def _warn_unseen_metrics(self) -> None:
        """A watched metric that never appears gets one warning naming what the log does hold:
        else the daemon judges nothing in silence while the trainer waits at every eval."""
        if self._unseen_warned:
            return
        seen = self._source.metric_names_seen()
        evals = sorted(m for m in seen if "eval" in m or "val" in m)
        judged = {m for metrics in self._evals.values() for m in metrics}
        missing = [c.metric for c in self.config.criteria if c.metric not in judged]
        if missing and (evals or len(self._evals) >= _UNSEEN_AFTER_EVALS):
            self._unseen_warned = True
            self._error(
                f"no line of {self.config.log} so far holds {', '.join(missing)}; metrics seen: "
                f"{', '.join(sorted(seen)[:20]) or 'none'} (check --metric / --best)"
            )

    def _holder(self) -> str:
        # The lock's holder: status.json is written once the holder has caught up on the log,
        # so until then it is missing or the previous daemon's (another pid).
        pid = flock_holder(self.paths.lock)
        status = read_status(self.paths)
        if status and (pid is None or status.get("pid") == pid):
            return f"pid {status.get('pid')} on {status.get('host')}"
        return f"pid {pid}, starting" if pid is not None else "holder unknown"


def _ranked_by_its_eval(ack: Ack) -> bool:
    """Whether the eval at the ack's step may rank its capture: a capture of that very step,
    or a best captured late. A requested snapshot (``ckptd request``) taken steps after the
    last eval holds other weights: given that eval's metrics, it would rank as a best."""
    return ack.captured_step == ack.eval_step or any(tag.startswith("best:") for tag in ack.tags)


def _unpersisted_entry(name: str, ack: Ack) -> dict[str, Any]:
    """status.json's record of an acknowledged capture not on disk yet (``tries`` and
    ``error`` follow each failed try)."""
    return {
        "ack": name,
        "step": ack.captured_step,
        "tags": list(ack.tags),
        "best": any(tag.startswith("best:") for tag in ack.tags),
        "since": time.time(),
        "tries": 0,
        "error": None,
    }


def _described(entry: dict[str, Any]) -> str:
    """One unpersisted capture for a log line: its step, and its tags when it has any."""
    tags = f" ({', '.join(entry['tags'])})" if entry.get("tags") else ""
    return f"step {entry.get('step')}{tags}"


def _young(path: Path) -> bool:
    """Modified within the last few seconds: a file some writer may still be filling."""
    try:
        return time.time() - path.stat().st_mtime < _YOUNG_S
    except FileNotFoundError:
        return False


def _bests_still_meant(state: DaemonState, criteria: tuple[str, ...]) -> dict[str, Best]:
    """Bests of criteria still watched the same way: a metric now judged in the other
    direction (``--mode`` changed) has no best yet; its old one would be the worst."""
    kept = {}
    for metric, best in state.bests.items():
        spec = f"{metric}:{_mode_of(metric, state.criteria)}"
        if spec in criteria:
            kept[metric] = best
        else:
            log.warning("forgetting the best %s of %s: the criterion is now %s", best, spec, criteria)
    return kept


def _mode_of(metric: str, criteria: tuple[str, ...]) -> str:
    return next((c.rpartition(":")[2] for c in criteria if c.rpartition(":")[0] == metric), "")


def _memory(process: psutil.Process) -> dict[str, int]:
    """RSS, and its anonymous part: RSS also counts the shared pages of a slot being persisted.

    The anonymous part is the kernel's own ``RssAnon`` (``/proc/<pid>/status``, Linux 4.5+);
    elsewhere RSS less its shared pages, which also leaves out file pages the process alone
    maps (its libraries): a little less than ``RssAnon``.
    """
    memory = process.memory_info()
    anon = memory.rss - getattr(memory, "shared", 0)
    try:
        with open(f"/proc/{process.pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1]) * 1024  # "RssAnon:    1234 kB"
                    break
    except (OSError, ValueError, IndexError):
        pass  # no procfs (another OS, a sandbox): the estimate stands
    return {"rss_bytes": memory.rss, "rss_anon_bytes": anon}
