"""``ckptd serve``: one process that follows every run on a node that opts in.

Each adopted run gets the same ``RunDaemon`` that ``ckptd run`` uses, with its own policy,
state, store and lock, on a thread of this process. The node loop has gunicorn's shape:
signal handlers only enqueue (SIGHUP reload, SIGTERM/SIGINT drain; a second one exits at
once); the loop rescans the roots, adopts and releases runs, and reports (status file per
run, metrics, systemd notify).

Run as root, the node daemon serves no other user's run in its own process: it starts one
worker per owning user (``ckptd serve --worker-uid UID``, the same code with that user's
uid, gid and groups), which serves that user's runs with that user's rights. So nobody
reaches through ckptd what they could not reach themselves, and every file ckptd creates in
a run (``.ckptd/``, the store, the staging slots) belongs to the run's owner, as the
trainer's client, running as that user, needs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ckptd import metrics, sweep
from ckptd.config import RunConfig, live_change, preflight_store
from ckptd.daemon import RunDaemon
from ckptd.errors import CkptdError, DaemonAlreadyRunning
from ckptd.node.discover import Candidate, find_runs, fingerprint, idle_for, trainer_alive
from ckptd.notify import Notifier, child_environ
from ckptd.protocol import RunPaths, daemon_alive, pending_ack_paths, read_status
from ckptd.settings import (
    FileSettings,
    ServeSettings,
    environment_layer,
    load_file,
    merged,
    run_config,
    run_file_of,
)
from ckptd.sidecar import stop_with

log = logging.getLogger("ckptd.serve")

_TICK_S = 1.0  # the loop's beat: reaping, reporting, the watchdog
_WORKER_RESTART_S = 10.0  # a worker that died is started again after this long
_SWEEP_EVERY_S = 60.0  # staging dirs of runs that are gone are looked for this often


@dataclass
class Served:
    """A run this process follows: its daemon and the thread it runs on."""

    candidate: Candidate
    config: RunConfig
    daemon: RunDaemon
    thread: threading.Thread
    outcome: list[BaseException] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.candidate.run_dir


@dataclass
class Worker:
    """A child ``ckptd serve --worker-uid`` serving one user's runs (root mode only)."""

    uid: int
    process: subprocess.Popen[bytes]


class NodeDaemon:
    """Adopts the runs under the configured roots until ``request_stop``; ``run()`` returns
    the exit status. ``worker_uid`` limits it to one user's runs (a worker of a root daemon)."""

    def __init__(self, config_path: Path, *, worker_uid: int | None = None) -> None:
        self.config_path = config_path
        self.worker_uid = worker_uid
        self.file: FileSettings = load_file(config_path)
        self.settings: ServeSettings = self.file.serve_settings()
        self.notifier = Notifier.from_environ()
        self._wakeups: queue.Queue[str] = queue.Queue()
        self._stopping = False
        self._served: dict[Path, Served] = {}
        self._workers: dict[int, Worker] = {}
        self._worker_retry: dict[int, float] = {}
        # run dir -> (its log, the log's fingerprint when released): adopted again once it changes
        self._released: dict[Path, tuple[Path, tuple[int, int]]] = {}
        self._refused: dict[Path, str] = {}  # run dir -> why not adopted (said once)
        self._candidates: list[Candidate] = []
        self._metrics_server: metrics.MetricsServer | None = None

    # -- signals: enqueue only ------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGHUP, lambda *_: self._wakeups.put("reload"))
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop_signal)

    def _on_stop_signal(self, signum: int, _frame: object) -> None:
        if self._stopping:
            # The second one: out now. Temp dirs a persist leaves are removed at the next start.
            os.write(2, f"ckptd serve: second {signal.Signals(signum).name}, exiting now\n".encode())
            os._exit(1)
        self._stopping = True
        self._wakeups.put("stop")

    def request_stop(self) -> None:
        self._stopping = True
        self._wakeups.put("stop")

    def check(self) -> int:
        """``--check``: the file is valid (else ConfigError before this); say what would be
        served, and why a run would not be (its own file is bad, say), on stderr."""
        for candidate in find_runs(self.settings):
            try:
                config = self._config_for(candidate)
            except CkptdError as exc:
                print(f"  {candidate.run_dir}: would not be served: {exc}", file=sys.stderr)
                continue
            print(f"  {candidate.run_dir}: {candidate.how}, log {config.log}", file=sys.stderr)
        print(f"{self.config_path}: OK", file=sys.stderr)
        return 0

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        self._start_metrics()
        self._scan()
        self.notifier.ready(self._summary())
        log.info("serving %s (%d runs)", ", ".join(map(str, self.settings.roots)), len(self._served))
        next_scan = time.monotonic() + self.settings.scan_interval
        next_sweep = time.monotonic()
        while not self._stopping:
            with contextlib.suppress(queue.Empty):
                wake = self._wakeups.get(timeout=_TICK_S)
                if wake == "reload":
                    self._reload()
            if self._stopping:
                break
            self._reap()
            if time.monotonic() >= next_scan:
                self._scan()
                next_scan = time.monotonic() + self.settings.scan_interval
            if time.monotonic() >= next_sweep and self.worker_uid is None:
                self._sweep()
                next_sweep = time.monotonic() + _SWEEP_EVERY_S
            self._report()
        return self._drain()

    def _summary(self) -> str:
        workers = f", {len(self._workers)} user workers" if self._workers else ""
        return f"{len(self._served)} runs served{workers}"

    # -- adopt, release -------------------------------------------------------------------

    def _scan(self) -> None:
        """Adopt every run that opted in and is not served yet; release the finished ones."""
        self._candidates = [c for c in find_runs(self.settings) if self._mine(c)]
        wanted = {c.run_dir for c in self._candidates}
        for run_dir, served in self._served.items():
            if run_dir not in wanted:
                # Its root left the config, or its run file was removed: it opted out.
                log.info("%s: no longer opts in; its daemon stops", run_dir)
                served.daemon.request_stop("no longer opted in")
        for candidate in self._candidates:
            if candidate.run_dir in self._served:
                self._release_if_done(self._served[candidate.run_dir])
            elif self._delegated(candidate):
                continue
            elif not self._still_released(candidate.run_dir) and not self._followed_elsewhere(candidate):
                self._adopt(candidate)
        self._ensure_workers()

    def _still_released(self, run_dir: Path) -> bool:
        released = self._released.get(run_dir)
        if released is None or fingerprint(released[0]) != released[1]:
            self._released.pop(run_dir, None)
            return False
        return True

    def _followed_elsewhere(self, candidate: Candidate) -> bool:
        """A live heartbeat from another process: a `ckptd run`, a sidecar or another node
        daemon follows it. Said once; no thread is started just to meet its lock."""
        paths = RunPaths(candidate.run_dir)
        if not daemon_alive(paths):
            return False
        pid = read_status(paths).get("pid")
        if pid == os.getpid():
            return False
        self._refuse(candidate.run_dir, f"another ckptd (pid {pid}) follows it; left to it")
        return True

    def _mine(self, candidate: Candidate) -> bool:
        """Whether this process serves the run itself (not a worker, not someone else)."""
        if self.worker_uid is not None:
            return candidate.uid == self.worker_uid
        if os.geteuid() == 0 or candidate.uid == os.geteuid():
            return True
        self._refuse(
            candidate.run_dir,
            f"owned by uid {candidate.uid}: a node daemon not running as root serves only "
            f"its own user's runs (uid {os.geteuid()})",
        )
        return False

    def _delegated(self, candidate: Candidate) -> bool:
        """As root, another user's run is left to that user's worker."""
        return os.geteuid() == 0 and self.worker_uid is None and candidate.uid != 0

    def _adopt(self, candidate: Candidate) -> None:
        if len(self._served) >= self.settings.max_runs:
            self._refuse(candidate.run_dir, f"max_runs = {self.settings.max_runs} runs are served already")
            return
        try:
            config = self._config_for(candidate)
            preflight_store(config.store)
        except CkptdError as exc:
            self._refuse(candidate.run_dir, str(exc))
            return
        daemon = RunDaemon(config)
        served = Served(candidate, config, daemon, threading.Thread())
        served.thread = threading.Thread(
            # The thread's name is the run dir: every line this run's daemon logs names its run.
            target=self._follow, args=(served,), name=str(candidate.run_dir), daemon=True
        )
        self._served[candidate.run_dir] = served
        self._refused.pop(candidate.run_dir, None)
        served.thread.start()
        log.info("adopted %s (%s)", candidate.run_dir, candidate.how)

    def _follow(self, served: Served) -> None:
        try:
            served.daemon.run()
        except BaseException as exc:  # reported by the loop when it reaps the thread
            served.outcome.append(exc)

    def _config_for(self, candidate: Candidate) -> RunConfig:
        """The run's options: node [run] < the log a glob found < run file [run] < CKPTD_*."""
        own = run_file_of(candidate.run_dir, self.settings.run_file)
        found = {"log": str(candidate.log)} if candidate.log is not None else {}
        options = merged(self.file.run, found, own.run if own else {}, environment_layer())
        return run_config(candidate.run_dir, options)

    def _release_if_done(self, served: Served) -> None:
        """A run whose log has been idle past ``idle_timeout`` and whose trainer is gone."""
        if idle_for(served.candidate, served.config.log) < self.settings.idle_timeout:
            return
        if trainer_alive(served.run_dir) or pending_ack_paths(RunPaths(served.run_dir)):
            return
        log.info("%s: idle for %.0f s and no trainer: released", served.run_dir, self.settings.idle_timeout)
        self._released[served.run_dir] = (served.config.log, fingerprint(served.config.log))
        served.daemon.request_stop("idle")

    def _reap(self) -> None:
        """Forget runs whose daemon thread ended; say why if it was not a release."""
        for run_dir, served in list(self._served.items()):
            if served.thread.is_alive():
                continue
            del self._served[run_dir]
            for exc in served.outcome:
                if isinstance(exc, DaemonAlreadyRunning):
                    self._refuse(run_dir, "another ckptd (run, sidecar) follows it; left to it")
                else:
                    self._refuse(run_dir, f"its daemon stopped: {type(exc).__name__}: {exc}")
                    self._released[run_dir] = (served.config.log, fingerprint(served.config.log))

    def _refuse(self, run_dir: Path, why: str) -> None:
        if self._refused.get(run_dir) != why:
            self._refused[run_dir] = why
            log.warning("%s: not served: %s", run_dir, why)

    # -- reload, drain --------------------------------------------------------------------

    def _reload(self) -> None:
        """SIGHUP: read the node file again; a policy change applies to the runs at once,
        any other change restarts the run's daemon (at the next scan)."""
        self.notifier.reloading("reloading the configuration")
        try:
            file = load_file(self.config_path)
            settings = file.serve_settings()
        except CkptdError as exc:
            log.error("reload failed, the old configuration stays: %s", exc)
            self.notifier.ready(self._summary())
            return
        self.file, self.settings = file, settings
        self._released.clear()
        self._refused.clear()
        for served in list(self._served.values()):
            self._reconfigure(served)
        for worker in self._workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGHUP)
        self._scan()
        self.notifier.ready(self._summary())
        log.info("configuration reloaded from %s", self.config_path)

    def _reconfigure(self, served: Served) -> None:
        try:
            config = self._config_for(served.candidate)
        except CkptdError as exc:
            log.error("%s: keeps its old settings: %s", served.run_dir, exc)
            return
        if config == served.config:
            return
        if live_change(served.config, config) is None:
            served.config = config
            served.daemon.reconfigure(config)
        else:
            log.info("%s: %s; its daemon restarts", served.run_dir, live_change(served.config, config))
            served.daemon.request_stop("reload")

    def _drain(self) -> int:
        """Stop every run; each finishes the persists its trainer handed over, within
        ``drain_timeout``. Exit 0 when all finished, 1 when the deadline cut one short."""
        self.notifier.stopping("draining: finishing acknowledged persists")
        # Past TimeoutStopSec systemd would SIGKILL a drain still within its own deadline.
        self.notifier.extend_timeout(self.settings.drain_timeout + 10)
        log.info("stopping: draining %d runs", len(self._served))
        for served in self._served.values():
            served.daemon.request_stop("node daemon stopping")
        for worker in self._workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.process.terminate()
        deadline = time.monotonic() + self.settings.drain_timeout
        late = [str(s.run_dir) for s in self._served.values() if not _joined(s.thread, deadline)]
        late += [f"worker uid {w.uid}" for w in self._workers.values() if not _waited(w.process, deadline)]
        if self._metrics_server is not None:
            self._metrics_server.close()
        if late:
            log.error("drain deadline (%.0f s) passed; still busy: %s", self.settings.drain_timeout, late)
            return 1
        return 0

    # -- workers (root only) --------------------------------------------------------------

    def _ensure_workers(self) -> None:
        if os.geteuid() != 0 or self.worker_uid is not None:
            return
        uids = {c.uid: c.gid for c in self._candidates if self._delegated(c)}
        for uid, gid in uids.items():
            worker = self._workers.get(uid)
            if worker is not None and worker.process.poll() is None:
                continue
            if worker is not None:
                log.error("worker for uid %d exited with %s", uid, worker.process.returncode)
                self._worker_retry[uid] = time.monotonic() + _WORKER_RESTART_S
                del self._workers[uid]
            if time.monotonic() >= self._worker_retry.get(uid, 0.0):
                try:
                    self._workers[uid] = Worker(uid, self._spawn_worker(uid, gid))
                except OSError as exc:  # that user cannot run our Python: their runs wait, others go on
                    self._worker_retry[uid] = time.monotonic() + _WORKER_RESTART_S
                    self._refuse(Path(f"uid {uid}"), f"cannot start a worker as uid {uid}: {exc}")

    def _spawn_worker(self, uid: int, gid: int) -> subprocess.Popen[bytes]:
        """The same daemon as the run's owner: its uid, its primary group, its groups."""
        try:
            user = pwd.getpwuid(uid)
            groups, gid, home = os.getgrouplist(user.pw_name, user.pw_gid), user.pw_gid, user.pw_dir
        except KeyError:  # a uid with no account: its run dir's group, no others
            groups, home = [gid], "/"
        argv = [sys.executable, "-m", "ckptd", "serve", "--config", str(self.config_path)]
        argv += ["--worker-uid", str(uid)]
        env = child_environ(os.environ)  # systemd talks to this process, not its workers
        env["HOME"] = home
        log.info("starting a worker for uid %d", uid)
        # PDEATHSIG: a worker whose root daemon died (SIGKILL, OOM) stops too, instead of
        # serving on with stale settings and blocking the next daemon's worker.
        lifeline = stop_with(os.getpid())
        return subprocess.Popen(
            argv, user=uid, group=gid, extra_groups=groups, env=env, cwd="/", preexec_fn=lifeline
        )

    def _sweep(self) -> None:
        """Staging dirs in shared memory whose run is gone: memory given back to the node."""
        try:
            orphans, _unknown = sweep.find_orphans()
        except Exception as exc:  # a planted marker must never stop the node's loop
            log.error("sweeping shared memory failed: %s: %s", type(exc).__name__, exc)
            return
        for orphan in orphans:
            try:
                removed = sweep.remove(orphan)  # judged again: a daemon may have started since
            except OSError as exc:
                self._refuse(orphan.path, f"cannot sweep it ({orphan.why}): {exc}")
            else:
                if removed:
                    log.info("swept %s (%d MiB): %s", orphan.path, orphan.nbytes >> 20, orphan.why)

    # -- reporting --------------------------------------------------------------------------

    def _start_metrics(self) -> None:
        if self.settings.metrics_port and self.worker_uid is None:
            self._metrics_server = metrics.serve_http(
                self.settings.metrics_address, self.settings.metrics_port, self._statuses
            )

    def _statuses(self) -> list[dict[str, object]]:
        return metrics.collect(c.run_dir for c in self._candidates)

    def _report(self) -> None:
        self.notifier.watchdog()
        if self.worker_uid is not None:
            return
        self.notifier.status(self._summary())
        if self.settings.metrics_textfile is not None:
            try:
                metrics.write_textfile(self.settings.metrics_textfile, metrics.render(self._statuses()))
            except OSError as exc:
                self._refuse(self.settings.metrics_textfile, f"cannot write metrics: {exc}")


def _joined(thread: threading.Thread, deadline: float) -> bool:
    thread.join(max(0.0, deadline - time.monotonic()))
    return not thread.is_alive()


def _waited(process: subprocess.Popen[bytes], deadline: float) -> bool:
    try:
        process.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return False
    return True


def serve(config_path: Path, *, worker_uid: int | None = None, check: bool = False) -> int:
    """``ckptd serve``: check the config (``check``), or run the node daemon until stopped."""
    daemon = NodeDaemon(config_path, worker_uid=worker_uid)
    if check:
        return daemon.check()
    if worker_uid is not None and os.geteuid() != worker_uid:
        raise CkptdError(f"--worker-uid {worker_uid}: this process runs as uid {os.geteuid()}")
    daemon.install_signal_handlers()
    return daemon.run()

