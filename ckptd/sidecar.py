"""``ckptd sidecar``: a daemon tied to the life of one training command.

Start ``ckptd run`` as a subprocess and wait for its heartbeat; run the command with
``CKPTD_RUN_DIR``, ``CKPTD_HOOK=1`` and ``ckptd/_hook`` first on ``PYTHONPATH`` (whose
``sitecustomize`` adds ckptd's callback to every Trainer the command's processes build);
forward SIGINT, SIGTERM and SIGHUP to it; when it exits, stop the daemon with SIGTERM (it
persists what was acknowledged first) within a deadline, summarize, and exit with the
command's status (128 + N when signal N killed it). A command that succeeded while captures it
acknowledged were not persisted (the daemon exited 6, ``EXIT_UNPERSISTED``, or was killed with
acks pending) makes the sidecar exit 6: a run whose best is not on disk did not succeed.

The daemon runs in its own session: a Ctrl-C in the terminal reaches the command (and this
process) but not the daemon, which must outlive the command to persist its last capture.

The sidecar is a child subreaper (Linux): a process the command leaves behind (``swift sft``
is a launcher that runs the real trainer with ``subprocess.run`` and passes no signal on)
becomes the sidecar's child when its parent exits. Once the command has exited, such
leftovers get the signal that ended the command (SIGTERM if none did) and are waited for, up
to ``stop_timeout``, then killed: the daemon is stopped only after the last trainer is gone,
and no trainer runs on without one.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

import psutil

from ckptd.errors import ProtocolError
from ckptd.protocol import EXIT_UNPERSISTED, RunPaths, daemon_alive, pending_ack_paths, read_ack

_PR_SET_PDEATHSIG = 1  # <sys/prctl.h>
_PR_SET_CHILD_SUBREAPER = 36
_SAY_WAITING_AFTER_S = 2.0  # a daemon still persisting after this is worth a line
HOOK_DIR = Path(__file__).resolve().with_name("_hook")
METRICS_LOG = "ckptd-metrics.jsonl"  # what the hooked callback writes, in the run dir
READY_TIMEOUT_S = 10.0
EXIT_NOT_FOUND, EXIT_NOT_EXECUTABLE = 127, 126
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def say(message: str) -> None:
    print(f"ckptd sidecar: {message}", file=sys.stderr, flush=True)


def child_env(run_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The command's environment: ours, plus where the run is and the hook first on the path."""
    env = dict(os.environ if base is None else base)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(HOOK_DIR) + (os.pathsep + old if old else "")
    env["CKPTD_RUN_DIR"] = str(run_dir)
    env["CKPTD_HOOK"] = "1"
    return env


def exit_status(returncode: int) -> int:
    """A shell's convention: a child killed by signal N exits 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


class Sidecar:
    """One daemon, one command. ``run()`` returns the exit status for ``ckptd sidecar``."""

    def __init__(
        self,
        run_dir: Path,
        daemon_options: Sequence[str],
        command: Sequence[str],
        *,
        stop_timeout: float = 120.0,
        ready_timeout: float = READY_TIMEOUT_S,
        summary: Callable[[], None] | None = None,
        follower_node: str | None = None,
    ) -> None:
        self.run_dir = run_dir
        # The heartbeat to wait for: a follower node's daemon writes its own (docs/distributed.md).
        self.paths = RunPaths(run_dir).node(follower_node) if follower_node else RunPaths(run_dir)
        self.daemon_argv = [sys.executable, "-m", "ckptd", "run", str(run_dir), *daemon_options]
        self.command = list(command)
        self.stop_timeout = stop_timeout
        self.ready_timeout = ready_timeout
        self.summary = summary
        self.daemon: subprocess.Popen[bytes] | None = None
        self.child: subprocess.Popen[bytes] | None = None
        self.received: list[int] = []  # every signal, in order
        self._early: list[int] = []  # signals that came before the command started
        self._leftovers: list[psutil.Process] = []  # the command's processes that outlived it

    def run(self) -> int:
        _become_subreaper()
        previous = {signum: signal.signal(signum, self._on_signal) for signum in _FORWARDED}
        try:
            return self._run()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    # -- the steps ----------------------------------------------------------------------------

    def _run(self) -> int:
        started = self._start_daemon()
        if started is not None:
            return started
        if self.received:
            say(f"{signal.Signals(self.received[0]).name} before the command started; not starting it")
            self._stop_daemon()
            return 128 + self.received[0]
        try:
            child = subprocess.Popen(self.command, env=child_env(self.run_dir))
        except OSError as exc:
            code = EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_NOT_EXECUTABLE
            what = "command not found" if code == EXIT_NOT_FOUND else "cannot run the command"
            say(f"{what}: {self.command[0]} ({exc.strerror or exc}); stopping the daemon")
            self._stop_daemon()
            return code
        self.child = child
        early, self._early = self._early, []
        for signum in early:  # arrived between the check above and Popen
            self._forward(child, signum)
        status = exit_status(child.wait())  # a signal runs its handler and the wait goes on
        how = (
            f"killed by {signal.Signals(-child.returncode).name}"
            if child.returncode < 0 and -child.returncode in signal.valid_signals()
            else f"exited with status {status}"
        )
        self._end_leftovers(child)
        say(f"{self.command[0]} {how}; stopping the daemon (it persists what was acknowledged first)")
        self._stop_daemon()
        if self.summary is not None:
            try:
                self.summary()
            except Exception as exc:  # the summary is a courtesy; the status is the command's
                say(f"could not summarize the store: {exc}")
        return self._final_status(status, how)

    def _final_status(self, status: int, how: str) -> int:
        """The command's status, unless it succeeded and captures it acknowledged are not on
        disk: then ``EXIT_UNPERSISTED``, said in the last line, where the user looks."""
        steps = self._unpersisted(EXIT_UNPERSISTED)
        if steps is None:
            return status
        final = EXIT_UNPERSISTED if status == 0 else status
        mine = "" if status == 0 else " (the command's own)"
        say(
            f"{self.command[0]} {how}, but acknowledged captures were not persisted ({steps}): their "
            f"slots are kept, and the next `ckptd run {self.run_dir}` persists them (see its "
            f"`ckptd status`); exiting with status {final}{mine}"
        )
        return final

    def _unpersisted(self, exit_unpersisted: int) -> str | None:
        """The captures the daemon left unpersisted, described; None when there are none. The
        daemon says so by its exit status; a daemon killed (or crashed) cannot, and any ack
        still pending then speaks for it, as does one written after a clean stop (status 0)."""
        daemon = self.daemon
        if daemon is None or daemon.returncode is None:
            return None
        if daemon.returncode == exit_unpersisted:
            return _listed_in_status(self.paths) or "see the daemon's messages above"
        pending = pending_ack_paths(self.paths)
        return ", ".join(_step_of(path) for path in pending) if pending else None

    def _start_daemon(self) -> int | None:
        """Start ``ckptd run`` and wait for a heartbeat of its own; an exit status if it failed."""
        self.daemon = daemon = subprocess.Popen(
            self.daemon_argv, start_new_session=True, preexec_fn=stop_with(os.getpid())
        )
        deadline = time.monotonic() + self.ready_timeout
        while not self._heartbeat_is(daemon.pid):
            code = daemon.poll()
            if code is not None:
                why = "another daemon already follows it" if code == 3 else "see its messages above"
                say(f"the daemon for {self.run_dir} exited with status {code} ({why}); command not started")
                return code or 1
            if self.received:
                return None  # _run says it and stops the daemon
            if time.monotonic() > deadline:
                say(
                    f"the daemon has shown no heartbeat after {self.ready_timeout:g} s (catching up on a "
                    "long log?); starting the command anyway: captures begin once it is up"
                )
                return None
            time.sleep(0.01)
        return None

    def _wait_for_stop(self, daemon: subprocess.Popen[bytes]) -> str | None:
        """Wait for the daemon to persist and stop; the reason to stop waiting, or None.

        A long persist is said once, and a signal received meanwhile (a second Ctrl-C) ends
        the wait: the user asked twice, and nothing acked is lost by a kill."""
        started = time.monotonic()
        signals_before = len(self.received)
        told = False
        while daemon.poll() is None:
            waited = time.monotonic() - started
            if waited > self.stop_timeout:
                return f"the daemon did not stop within {self.stop_timeout:g} s (--stop-timeout)"
            if len(self.received) > signals_before:
                return "interrupted while the daemon was persisting"
            if not told and waited > _SAY_WAITING_AFTER_S:
                told = True
                say(
                    f"waiting for the daemon to persist what the trainer handed over (up to "
                    f"{self.stop_timeout:g} s, --stop-timeout); interrupt again to stop waiting"
                )
            time.sleep(0.05)
        return None

    def _heartbeat_is(self, pid: int) -> bool:
        """A fresh heartbeat written by ``pid``: another daemon's, or a stale one, is not ours."""
        if not daemon_alive(self.paths):
            return False
        try:
            status = json.loads(self.paths.status.read_bytes())
        except (OSError, ValueError, RecursionError):
            return False
        return isinstance(status, dict) and status.get("pid") == pid

    def _stop_daemon(self) -> None:
        daemon = self.daemon
        if daemon is None:
            return
        if daemon.poll() is not None:
            if daemon.returncode != 0:
                say(f"the daemon had already exited with status {daemon.returncode}; see its messages above")
            return
        daemon.send_signal(signal.SIGTERM)
        why = self._wait_for_stop(daemon)
        if why is not None:
            daemon.kill()
            daemon.wait()
            say(
                f"{why}; killed the daemon (SIGKILL). Acknowledged captures still in shared memory "
                f"are persisted by the next `ckptd run {self.run_dir}`"
            )
            return
        if daemon.returncode != 0:
            say(f"the daemon stopped with status {daemon.returncode}; see its messages above")

    def _end_leftovers(self, child: subprocess.Popen[bytes]) -> None:
        """Processes of the command's tree that outlived it (re-parented to us): give them the
        signal that ended the command, wait for them, kill them past ``stop_timeout``. Looked
        for again until none is left: a leftover's own children become ours when it dies."""
        signum = self.received[-1] if self.received else signal.SIGTERM
        deadline = time.monotonic() + self.stop_timeout
        told: set[int] = set()
        while leftovers := self._living_children():
            self._leftovers = leftovers
            fresh = [p for p in leftovers if p.pid not in told]
            if fresh:
                pids = ", ".join(str(p.pid) for p in fresh)
                say(
                    f"{self.command[0]} left {len(fresh)} process(es) running ({pids}); passing them "
                    f"{signal.Signals(signum).name}, waiting up to {self.stop_timeout:g} s in all"
                )
                _signal_all(fresh, signum)
                told.update(p.pid for p in fresh)
            if time.monotonic() >= deadline:
                say(f"still running after {self.stop_timeout:g} s; killing {len(leftovers)} process(es)")
                _signal_all(leftovers, signal.SIGKILL)
            psutil.wait_procs(leftovers, timeout=max(0.1, min(1.0, deadline - time.monotonic())))
        self._leftovers = []

    def _living_children(self) -> list[psutil.Process]:
        """Our children but the daemon, zombies reaped and left out."""
        daemon_pid = self.daemon.pid if self.daemon is not None else -1
        try:
            children = [p for p in psutil.Process().children() if p.pid != daemon_pid]
        except psutil.Error:
            return []
        living = []
        for process in children:
            try:
                if process.status() == psutil.STATUS_ZOMBIE:
                    process.wait(0)  # reap it: it is ours now
                else:
                    living.append(process)
            except (psutil.Error, psutil.TimeoutExpired):
                continue
        return living

    # -- signals --------------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """Record it and pass it on; nothing else happens in a handler."""
        self.received.append(signum)
        child = self.child
        if child is None:
            self._early.append(signum)
        else:
            self._forward(child, signum)
        for process in self._leftovers:  # while they are waited for, they hear what we hear
            with contextlib.suppress(psutil.Error):
                process.send_signal(signum)

    @staticmethod
    def _forward(child: subprocess.Popen[bytes], signum: int) -> None:
        if child.returncode is not None:
            return
        if signum == signal.SIGINT and _terminal_sent_it_to_the_child():
            return  # a Ctrl-C already reached the whole foreground group: one is enough
        with contextlib.suppress(OSError):  # it exited meanwhile
            child.send_signal(signum)


def _listed_in_status(paths: RunPaths) -> str:
    """The ``unpersisted`` captures the daemon's final status.json names, as "step N (tags)"."""
    try:
        status = json.loads(paths.status.read_bytes())
    except (OSError, ValueError, RecursionError):
        return ""
    listed = status.get("unpersisted") if isinstance(status, dict) else None
    entries = [e for e in listed if isinstance(e, dict)] if isinstance(listed, list) else []
    return ", ".join(_described(e.get("step"), e.get("tags")) for e in entries)


def _step_of(ack_path: Path) -> str:
    try:
        ack = read_ack(ack_path)
    except (OSError, ProtocolError):
        return ack_path.name
    return _described(ack.captured_step, list(ack.tags))


def _described(step: object, tags: object) -> str:
    shown = ", ".join(map(str, tags)) if isinstance(tags, list) and tags else ""
    return f"step {step}" + (f" ({shown})" if shown else "")


def _terminal_sent_it_to_the_child() -> bool:
    """Whether our process group (the command's too) is its terminal's foreground group."""
    for fd in (0, 1, 2):
        try:
            return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue  # not a terminal
    return False


def _signal_all(processes: list[psutil.Process], signum: int) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signum)


def _become_subreaper() -> None:
    """Orphans of the command's tree become our children, not init's (Linux; elsewhere a
    no-op): they can then be told to stop, and waited for."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1)


def stop_with(parent: int) -> Callable[[], None]:
    """For a child process, before exec: SIGTERM it when ``parent`` dies, however it dies
    (a SIGKILL, the OOM killer). Else an orphaned daemon would follow the run for good and
    refuse every later sidecar on it. Linux only; elsewhere the daemon outlives a killed
    sidecar as before."""

    def arm() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return arm
