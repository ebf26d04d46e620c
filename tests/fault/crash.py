"""The crash harness (issue 13, part 2): SIGKILL a real daemon at seeded moments, check the store.

A real ``python -m ckptd run`` follows the log of one long-lived real trainer
(``crash_trainer.py``: ``CheckpointClient``, real slots, real acks, frequent new bests and
periodic captures), so persists and rotations happen all the time. Each trial kills the
daemon with SIGKILL at a seeded moment (mostly uniform over a window after a persist starts,
which covers the copy, the fsyncs, the manifest, the rename and the rotation; sometimes at any
moment), names the phase it most likely hit from what is on disk, restarts the daemon, pauses
the trainer (SIGSTOP), waits until the daemon is idle and checks:

1. every visible checkpoint verifies, holds the step it names, and its metric is the eval
   logged at its requested step;
2. the best acknowledged capture (by the values the trainer logged) is in the store, or a
   better one is;
3. no temp dir the kill left survives the restart, and none is left when idle;
4. the state agrees with the log and the store: its best is the log's best, nothing in the
   store beats it, ``ckptd ls --json`` lists the store and ``ckptd best --json`` names its best;
5. no ack is lost: every ack the trainer wrote was committed (seen renamed into the store) or
   set aside as ``.rejected`` with a reason in the daemon's log; none is committed twice.

In each block of 10 trials, at seeded places, one SIGKILLs the trainer right after it writes
an ack instead (its next life is forked at once), one kills the daemon at that moment too (that
capture must be committed either way), and one kills the restarted daemon again while it starts
up (a crash loop: removing temp dirs, catching up, redoing pending acks).

Trials run one after the other on one run, so the state accumulates. As a script:
``python -m tests.fault.crash --trials 300 --seed N`` prints the tally (trials, kills per
phase, invariant failures); ``tests/fault/test_crash.py`` runs 30 in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import math
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from ckptd.cli import main as cli_main
from ckptd.daemon.state import DaemonState
from ckptd.errors import CkptdError
from ckptd.policy import best_plus_last, plan_deletions
from ckptd.protocol import RunPaths, pending_ack_paths, read_ack
from ckptd.records import CheckpointRecord, Criterion
from ckptd.store import LOCK_NAME, MANIFEST, OWNER_NAME, TMP_PREFIX, Store, checkpoint_name
from tests.conftest import Daemon, wait_for

METRIC = "eval_loss"
TRAINER = Path(__file__).with_name("crash_trainer.py")
DELETE_PREFIX = f"{TMP_PREFIX}del-"  # Store.delete renames a doomed checkpoint to this first
Problems = Iterator[tuple[str, str]]  # (invariant, what is wrong)
PERSIST_PHASES = ("copy", "fsync", "manifest-rename", "ack-removal", "rotate", "rotation-due")


@dataclass(frozen=True)
class Settings:
    """What a harness run does; the seed fixes every decision, the machine only the timing."""

    seed: int
    trials: int
    mib: int = 8  # the state's size: a persist must take long enough for kills to land in it
    eval_every: int = 3
    every_steps: int = 4
    step_delay: float = 0.03
    keep_last: int = 2
    anytime_share: float = 0.15  # daemon kills at any moment, not aimed at a persist
    max_seconds: float = math.inf  # the long mode stops early when its time is up


@dataclass
class Tally:
    """What a harness run did: kills per phase, and failures per invariant with messages."""

    seed: int
    trials: int = 0
    phases: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)  # per invariant
    messages: list[str] = field(default_factory=list)  # the first ones, for the report
    acks: int = 0
    rejected: int = 0
    committed: int = 0
    seconds: float = 0.0
    window_s: float = 0.0  # the kill window aimed at persists, at the end

    def fail(self, invariant: str, message: str) -> None:
        self.failures[invariant] += 1
        if len(self.messages) < 40:
            self.messages.append(f"[{invariant}] {message}")

    def summary(self) -> str:
        lines = [
            f"seed {self.seed}: {self.trials} trials in {self.seconds:.1f} s; {self.acks} acks, "
            f"{self.committed} commits, {self.rejected} rejected; kill window {self.window_s * 1000:.0f} ms",
            "kills per phase: " + ", ".join(f"{p} {n}" for p, n in sorted(self.phases.items())),
            "invariant failures: "
            + (", ".join(f"{k} {n}" for k, n in sorted(self.failures.items())) or "none"),
            *self.messages,
        ]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "trials": self.trials,
            "phases": dict(self.phases),
            "failures": dict(self.failures),
            "acks": self.acks,
            "committed": self.committed,
            "rejected": self.rejected,
            "seconds": round(self.seconds, 1),
            "window_ms": round(self.window_s * 1000),
        }


# -- watching the store: what was ever committed, when persists start ---------------------------

_IN_MOVED_TO, _IN_CREATE, _IN_Q_OVERFLOW = 0x80, 0x100, 0x4000
_IN_NONBLOCK, _IN_CLOEXEC = 0o4000, 0o2000000
_EVENT = struct.Struct("iIII")


class StoreWatcher:
    """inotify on the store: the kernel queues every rename into ``step-*``, so a checkpoint
    committed and rotated out between two checks is still known to have been committed."""

    def __init__(self, root: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self._fd < 0 or libc.inotify_add_watch(self._fd, bytes(root), _IN_MOVED_TO | _IN_CREATE) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {root}")
        self.committed: Counter[str] = Counter()  # checkpoint name -> renames into it
        self.overflowed = False  # the kernel dropped events: "committed" may miss some
        self.persist_started = threading.Event()
        self._started_at: float | None = None
        self.durations: list[float] = []  # persist start to commit, seconds
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="store watcher", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            if select.select([self._fd], [], [], 0.1)[0]:
                self.drain()

    def drain(self) -> None:
        """Take every event queued so far. Read and parsed under the lock: once a checker's
        call returns, every rename that happened before it is counted."""
        with self._lock:
            while True:
                try:
                    data = os.read(self._fd, 1 << 16)
                except BlockingIOError:
                    return
                self._parse(data, time.monotonic())

    def _parse(self, data: bytes, now: float) -> None:
        offset = 0
        while offset < len(data):
            _, mask, _, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0").decode()
            offset += _EVENT.size + length
            self._on(mask, name, now)

    def _on(self, mask: int, name: str, now: float) -> None:
        self.overflowed |= bool(mask & _IN_Q_OVERFLOW)
        if mask & _IN_CREATE and name.startswith(TMP_PREFIX) and name[len(TMP_PREFIX) :][:1].isdigit():
            self._started_at = now  # Store.writing's mkdtemp: a persist begins
            self.persist_started.set()
        elif mask & _IN_MOVED_TO and name.startswith("step-"):
            self.committed[name] += 1
            if self._started_at is not None:
                self.durations.append(now - self._started_at)
                self._started_at = None

    def names(self) -> Counter[str]:
        self.drain()
        with self._lock:
            return Counter(self.committed)

    def window(self) -> float:
        """How long after a persist starts a kill still lands in it or in the rotation after:
        half again the median persist seen lately (the rotation takes milliseconds)."""
        with self._lock:
            recent = sorted(self.durations[-21:])
        return max(0.03, 1.5 * recent[len(recent) // 2]) if recent else 0.2

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        os.close(self._fd)


# -- the trainer ------------------------------------------------------------------------------


class Trainer:
    """``crash_trainer.py`` in its own session: SIGSTOP and SIGCONT reach every life of it."""

    def __init__(self, run: Path, control: Path, settings: Settings) -> None:
        self.control = control
        control.mkdir(parents=True, exist_ok=True)
        self.output = control / "trainer.log"
        args = [
            f"--seed={settings.seed}",
            f"--mib={settings.mib}",
            f"--eval-every={settings.eval_every}",
            f"--step-delay={settings.step_delay}",
        ]
        with self.output.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(TRAINER), str(run), str(control), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._journal_at = 0
        self.journal: list[dict[str, Any]] = []

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pause(self) -> None:
        if not self.alive():
            raise AssertionError(f"the trainer exited; output:\n{self.output.read_text()[-4000:]}")
        os.killpg(self.proc.pid, signal.SIGSTOP)
        wait_for(self._stopped, timeout=10, what="the trainer to stop")

    def _stopped(self) -> bool:
        pids = [self.proc.pid]
        with contextlib.suppress(FileNotFoundError, ValueError):
            pids.append(int((self.control / "child.pid").read_text()))
        return all(_process_state(pid) in "TtZX" for pid in pids)

    def resume(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGCONT)

    def order_death(self, order: str) -> None:
        """The next ack is the current life's last (``crash_trainer.py``'s ``die`` file)."""
        staged = self.control / "die.tmp"
        staged.write_text(order)
        staged.rename(self.control / "die")

    def read_journal(self) -> list[dict[str, Any]]:
        """Every ack journaled so far (a line still being written is left for next time)."""
        try:
            with (self.control / "journal.jsonl").open("rb") as handle:
                handle.seek(self._journal_at)
                data = handle.read()
        except FileNotFoundError:  # no life has started yet
            return self.journal
        whole = data[: data.rfind(b"\n") + 1]
        self._journal_at += len(whole)
        self.journal += [json.loads(line) for line in whole.splitlines()]
        return self.journal

    def stop(self) -> int:
        (self.control / "stop").touch()
        self.resume()
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the trainer did not stop; output:\n{self.output.read_text()}") from None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _process_state(pid: int) -> str:
    """The state letter in ``/proc/<pid>/stat`` ("T": stopped); "X" when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return "X"
    return stat[stat.rindex(")") + 2]


# -- the harness ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    """What one trial did and what the kill left on disk."""

    trial: int
    kind: str  # "daemon", "trainer", "both"
    phase: str
    leftovers: tuple[str, ...]  # temp dirs in the store at the kill


class Harness:
    """One run, one trainer, one daemon at a time; ``trial`` kills, restarts and checks."""

    def __init__(self, workdir: Path, settings: Settings) -> None:
        self.settings = settings
        self.run = workdir / "run"
        self.paths = RunPaths(self.run)
        self.store = Store(self.run / "checkpoints")
        self.store.root.mkdir(parents=True)
        self.tally = Tally(settings.seed)
        self.daemons: list[Daemon] = []
        self.watcher = StoreWatcher(self.store.root)
        self.trainer = Trainer(self.run, workdir / "control", settings)
        self.criterion = Criterion(METRIC, "min")
        self._reported: set[tuple[str, str]] = set()

    @property
    def daemon(self) -> Daemon:
        return self.daemons[-1]

    # -- processes ----------------------------------------------------------------------------

    def start_daemon(self, *, wait: bool = True) -> None:
        s = self.settings
        args = [f"--metric={METRIC}", f"--every-steps={s.every_steps}", f"--keep-last={s.keep_last}"]
        daemon = Daemon(self.run, args)
        self.daemons.append(daemon)
        if wait:
            self._wait(self._daemon_up, 60, "the daemon's heartbeat")

    def _daemon_up(self) -> bool:
        """The new daemon's own heartbeat: the killed one's status.json stays fresh for 5 s."""
        if self.daemon.proc.poll() is not None:
            raise AssertionError(f"the daemon exited {self.daemon.proc.returncode}:\n{self.daemon.log()}")
        try:
            status = json.loads(self.paths.status.read_text())
        except (FileNotFoundError, ValueError):
            return False
        return bool(status.get("pid") == self.daemon.proc.pid and status.get("state") == "running")

    def kill_daemon(self) -> None:
        if self.daemon.proc.poll() is None:
            self.daemon.proc.send_signal(signal.SIGKILL)
        self.daemon.proc.wait()

    def close(self) -> None:
        """Stop everything, whatever state a failure left it in."""
        if self.trainer.alive():
            self.trainer.kill()
        for daemon in self.daemons:
            if daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGKILL)
                daemon.proc.wait()
        self.watcher.close()

    # -- the run ------------------------------------------------------------------------------

    def run_trials(self) -> Tally:
        started = time.monotonic()
        self.start_daemon()
        self._wait(lambda: bool(self.watcher.names()), 120, "the first commit")
        for trial in range(self.settings.trials):
            if time.monotonic() - started > self.settings.max_seconds:
                break
            self.trial(trial)
        self.finish()
        self.tally.seconds = time.monotonic() - started
        self.tally.window_s = self.watcher.window()
        return self.tally

    def trial(self, number: int) -> None:
        rng = random.Random(f"{self.settings.seed}:{number}")  # each trial's own: no drift
        fraction, anytime, later = rng.random(), rng.random() < self.settings.anytime_share, rng.random()
        # In each block of 10 trials, at seeded places: one kills the trainer right after an
        # ack, one kills it and the daemon at that moment, one kills the restarted daemon again
        # while it starts up. So 30 trials always hold each three times.
        block = random.Random(f"{self.settings.seed}:block:{number // 10}").sample(range(10), 3)
        position = number % 10
        if position in block[:2]:
            kill = self._kill_trainer(number, both=position == block[1])
        else:
            kill = self._kill_daemon(number, fraction, anytime)
        again = later if position == block[2] else None
        self.tally.trials += 1
        self.tally.phases[kill.phase] += 1
        leftovers = set(kill.leftovers)
        if self.daemon.proc.poll() is not None and again is not None:
            leftovers |= self._kill_during_start_up(again)
        if self.daemon.proc.poll() is not None:
            self.start_daemon()
        survivors = sorted(leftovers & {p.name for p in self.store.root.iterdir()})
        if survivors:
            self._fail(kill, "3-temp", f"temp dirs left by the kill survive the restart: {survivors}")
        self.check_idle(kill)

    def _kill_during_start_up(self, fraction: float) -> set[str]:
        """A crash loop: the restarted daemon is killed again once it has claimed the store,
        amid removing temp dirs, catching up on the log and redoing pending acks."""
        owner = self.store.root / OWNER_NAME
        claimed = owner.stat().st_mtime_ns
        self.start_daemon(wait=False)
        self._wait(
            lambda: owner.stat().st_mtime_ns != claimed or self.daemon.proc.poll() is not None,
            60,
            "the restarted daemon to claim the store",
        )
        time.sleep(fraction * 0.2)  # the seeded kill delay, into the start-up
        self.kill_daemon()
        self.tally.phases["start-up"] += 1
        return set(self.classify()[1])

    def _kill_daemon(self, number: int, fraction: float, anytime: bool) -> Kill:
        if anytime:
            time.sleep(fraction * 0.5)  # the seeded kill delay: any moment, idle or not
        else:
            self.watcher.persist_started.clear()
            window = self.watcher.window()
            if self.watcher.persist_started.wait(10.0):
                time.sleep(fraction * window)  # the seeded kill delay, inside the persist's window
        self.kill_daemon()
        phase, leftovers = self.classify()
        return Kill(number, "daemon", phase, leftovers)

    def _kill_trainer(self, number: int, *, both: bool) -> Kill:
        dying = sum(1 for entry in self.trainer.read_journal() if entry["die"])
        self.trainer.order_death(f"both:{self.daemon.proc.pid}" if both else "trainer")
        self._wait(
            lambda: sum(1 for entry in self.trainer.read_journal() if entry["die"]) > dying,
            60,
            "the trainer's last ack",
        )
        if both:
            self.daemon.proc.wait(timeout=30)  # the dying trainer SIGKILLed it
            _, leftovers = self.classify()
            return Kill(number, "both", "both-after-ack", leftovers)
        return Kill(number, "trainer", "trainer-after-ack", ())

    def classify(self) -> tuple[str, tuple[str, ...]]:
        """Which part of a persist the kill most likely hit, from what it left on disk."""
        temps = sorted(p for p in self.store.root.iterdir() if p.name.startswith(TMP_PREFIX))
        leftovers = tuple(p.name for p in temps)
        acks = _pending_acks(self.paths)
        if any(p.name.startswith(DELETE_PREFIX) for p in temps):
            return "rotate", leftovers
        if temps:
            return _persist_phase(temps[0], acks), leftovers
        committed = {r.step for r in self.store.list()}
        if any(ack["captured_step"] in committed for ack in acks):
            return "ack-removal", leftovers
        if acks:
            return "queued", leftovers
        return ("rotation-due" if self._rotation_due() else "idle"), leftovers

    def _rotation_due(self) -> bool:
        state = _read_state(self.paths)
        best_steps = {b.step for b in state.bests.values()} if state else set()
        records = [r for r in self.store.list() if r.run_id in self.store.lineage()]
        policy = best_plus_last({self.criterion: 1}, self.settings.keep_last)
        protected = [r.name for r in records if r.step in best_steps]
        return bool(plan_deletions(records, policy, protected))

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """``wait_for``, its failure naming the seed and showing the daemon's latest output."""
        try:
            wait_for(predicate, timeout=timeout, what=what)
        except AssertionError as exc:
            tail = self.daemon.log()[-4000:]
            raise AssertionError(f"seed {self.settings.seed}: {exc}; daemon output:\n{tail}") from None

    def _fail(self, kill: Kill | None, invariant: str, message: str) -> None:
        """Count a failure once, at the first trial that sees it (a lost ack stays lost)."""
        if (invariant, message) in self._reported:
            return
        self._reported.add((invariant, message))
        where = f"trial {kill.trial} ({kill.kind}, {kill.phase})" if kill else "final"
        self.tally.fail(invariant, f"seed {self.settings.seed} {where}: {message}")

    # -- idle, then the invariants ------------------------------------------------------------

    def check_idle(self, kill: Kill | None) -> None:
        """Pause the trainer, wait until the daemon has nothing left to do, check, resume."""
        self.trainer.pause()
        try:
            try:
                wait_for(self._idle, timeout=60, what="the daemon to be idle")
            except AssertionError:
                self._fail(kill, "5-ack-lost", f"not idle after 60 s: {self._busy()}")
                return
            self._check_locked(kill)
        finally:
            self.trainer.resume()

    def _check_locked(self, kill: Kill | None) -> None:
        """The checks, under the store lock: a rotation still due waits until they are done."""
        with FileLock(str(self.store.root / LOCK_NAME), timeout=60):
            for invariant, message in self.check():
                self._fail(kill, invariant, message)

    def _idle(self) -> bool:
        return not self._busy()

    def _busy(self) -> str:
        """What the daemon still has to do ("" when nothing): acks, temp dirs, log lines."""
        acks = [p.name for p in pending_ack_paths(self.paths)]
        temps = [p.name for p in self.store.root.iterdir() if p.name.startswith(TMP_PREFIX)]
        state = _read_state(self.paths)
        offset = (state.cursor or {}).get("offset") if state else None
        log_size = (self.run / "logging.jsonl").stat().st_size
        lag = "" if offset == log_size else f"log judged to {offset} of {log_size}"
        return "; ".join(x for x in (f"acks {acks}" * bool(acks), f"temp {temps}" * bool(temps), lag) if x)

    def check(self) -> list[tuple[str, str]]:
        """Every invariant, at a moment the daemon is idle: (invariant, problem) pairs."""
        records = self.store.list()
        logged = self._logged()
        journal = self.trainer.read_journal()
        self.tally.acks = len(journal)
        return [
            *self._check_checkpoints(records, logged),
            *self._check_acks(journal),
            *self._check_best(records, journal, logged),
            *self._check_state(records, logged),
        ]

    def _logged(self) -> dict[int, float]:
        evals: dict[int, float] = {}
        for line in (self.run / "logging.jsonl").read_text().splitlines():
            record = json.loads(line)
            evals.setdefault(record["step"], record[METRIC])
        return evals

    def _check_checkpoints(self, records: list[CheckpointRecord], logged: dict[int, float]) -> Problems:
        listed = {r.name for r in records}
        for name in self.store.checkpoint_dirs():
            if name not in listed:
                yield "1-verify", f"{name} is a checkpoint dir whose manifest does not read"
                continue
            try:
                problems = self.store.verify(name)
            except (OSError, CkptdError) as exc:
                problems = [str(exc)]
            if problems:
                yield "1-verify", f"{name}: {problems}"
        for record in records:
            yield from _check_content(self.store, record, logged)
        temps = [p.name for p in self.store.root.iterdir() if p.name.startswith(TMP_PREFIX)]
        if temps:
            yield "3-temp", f"temp dirs in the store of an idle daemon: {temps}"

    def _check_acks(self, journal: list[dict[str, Any]]) -> Problems:
        committed = self.watcher.names()
        self.tally.committed = sum(committed.values())
        if self.watcher.overflowed:
            yield "harness", "the inotify queue overflowed: commits may have gone unseen"
        twice = sorted(n for n, count in committed.items() if count > 1 or n.count("-") > 1)
        if twice:
            yield "5-ack-lost", f"committed more than once: {twice}"
        logs = "".join(d.log() for d in self.daemons)
        rejected = 0
        for ack in journal:
            if checkpoint_name(ack["captured_step"]) in committed:
                continue
            aside = self.paths.acks / f"{ack['name']}.json.rejected"
            if aside.exists() and not ack["die"] and f"rejected ack {ack['name']}.json" in logs:
                rejected += 1
                continue
            yield "5-ack-lost", f"{ack['name']} (step {ack['captured_step']}) neither committed nor set aside"
        self.tally.rejected = rejected

    def _check_best(
        self, records: list[CheckpointRecord], journal: list[dict[str, Any]], logged: dict[int, float]
    ) -> Problems:
        committed = self.watcher.names()
        values = [
            v
            for ack in journal
            if checkpoint_name(ack["captured_step"]) in committed
            and (v := _ranking_value(ack, logged)) is not None
        ]
        if not values:
            return
        expected = min(values)
        kept = _best_value(records)
        if kept is None or kept > expected:
            yield "2-best", f"best acked capture {METRIC}={expected!r} is gone; the store's best is {kept!r}"

    def _check_state(self, records: list[CheckpointRecord], logged: dict[int, float]) -> Problems:
        state = _read_state(self.paths)
        if state is None:
            yield "4-state", "state.json is missing or unreadable"
            return
        if Path(state.store) != self.store.root:
            yield "4-state", f"state names store {state.store}, not {self.store.root}"
        best = state.bests.get(METRIC)
        first_best = min(logged.items(), key=lambda item: (item[1], item[0])) if logged else None
        if first_best is not None and (best is None or (best.step, best.value) != first_best):
            yield "4-state", f"state best {best} is not the log's best (step, value) {first_best}"
        kept = _best_value(records)
        if best is not None and kept is not None and kept < best.value:
            yield "4-state", f"the store holds {METRIC}={kept!r}, better than the state's best {best}"
        yield from self._check_cli(records)

    def _check_cli(self, records: list[CheckpointRecord]) -> Problems:
        code, listed = _cli("ls", str(self.run), "--json")
        names = [r["name"] for r in listed] if code == 0 else []
        held = [r.name for r in records]
        if names != held:
            yield "4-state", f"ckptd ls --json (exit {code}) lists {names}, the store holds {held}"
        code, shown = _cli("best", str(self.run), "--json")
        kept = _best_value(records)
        name = shown.get("name") if isinstance(shown, dict) else None
        value = None if name is None else self.store.read(name).metrics.get(METRIC)
        if value != kept:
            yield "4-state", f"ckptd best --json (exit {code}) shows {name} ({value!r}), the best is {kept!r}"

    # -- the end --------------------------------------------------------------------------------

    def finish(self) -> None:
        """The trainer stops, the daemon persists what is left and stops cleanly; all checked
        once more, ``ckptd verify`` included."""
        if self.daemon.proc.poll() is not None:
            self.start_daemon()
        if self.trainer.stop() != 0:
            self._fail(None, "trainer", f"the trainer failed:\n{self.trainer.output.read_text()[-4000:]}")
        self._wait(self._idle, 60, "the last persists")
        self._check_locked(None)
        code = self.daemon.stop()
        if code != 0:
            self._fail(None, "daemon", f"SIGTERM made the daemon exit {code}")
        done = subprocess.run(
            [sys.executable, "-m", "ckptd", "verify", str(self.run), "--json"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        verdicts = json.loads(done.stdout or "[]")
        if done.returncode != 0 or not verdicts or not all(v.get("ok") for v in verdicts):
            self._fail(None, "1-verify", f"ckptd verify --json exit {done.returncode}: {done.stdout[-2000:]}")


# -- helpers ----------------------------------------------------------------------------------


def _pending_acks(paths: RunPaths) -> list[dict[str, Any]]:
    acks = []
    for path in pending_ack_paths(paths):
        with contextlib.suppress(OSError, ValueError):
            acks.append(read_ack(path).to_json())
    return acks


def _persist_phase(temp: Path, acks: list[dict[str, Any]]) -> str:
    """A persist's temp dir: its manifest written (rename next), every file at full size
    (fsync or manifest next), or still copying."""
    if (temp / MANIFEST).exists():
        return "manifest-rename"
    step = int(temp.name[len(TMP_PREFIX) :].split("-", 1)[0])
    ack = next((a for a in acks if a["captured_step"] == step), None)
    if ack is None:
        return "copy"
    sizes = {p.name: p.stat().st_size for p in temp.iterdir()}
    whole = all(sizes.get(name) == nbytes for name, nbytes in ack["files"].items())
    return "fsync" if whole else "copy"


def _read_state(paths: RunPaths) -> DaemonState | None:
    """The daemon's state, read without ``load_state``'s side effect (it sets a bad file aside)."""
    try:
        return DaemonState.from_json(paths.state, json.loads(paths.state.read_bytes()))
    except (OSError, ValueError):
        return None


def _ranking_value(ack: dict[str, Any], logged: dict[int, float]) -> float | None:
    """The eval that ranks an acked capture: the verdict's, carried in the ack, or for a
    periodic capture at an eval step, that eval (the daemon ranks it so too)."""
    value = ack["metrics"].get(METRIC)
    if isinstance(value, float):
        return value
    return logged.get(ack["captured_step"]) if ack["requested_step"] == ack["captured_step"] else None


def _best_value(records: list[CheckpointRecord]) -> float | None:
    values = [v for r in records if (v := r.metrics.get(METRIC)) is not None and math.isfinite(v)]
    return min(values, default=None)


def _check_content(store: Store, record: CheckpointRecord, logged: dict[int, float]) -> Problems:
    """The checkpoint holds the state of its step (every tensor is filled with it), and its
    metric is the eval logged at its requested step."""
    path = store.path_of(record.name) / "tensors.safetensors"
    try:
        held = {_tensor_ends(path, "w")[0], *_tensor_ends(path, "pad")}
    except (OSError, ValueError, KeyError, struct.error) as exc:
        yield "1-verify", f"{record.name}: tensors unreadable: {exc}"
        return
    if held != {float(record.step)}:
        yield "1-verify", f"{record.name} holds the state of steps {sorted(held)}, not {record.step}"
    value, asked = record.metrics.get(METRIC), record.requested_step
    if value is not None and (asked is None or value != logged.get(asked)):
        yield "1-verify", f"{record.name}: {METRIC}={value!r} is not the eval logged at step {asked}"


def _tensor_ends(path: Path, name: str) -> tuple[float, float]:
    """The first and last float32 of tensor ``name`` in a safetensors file."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        entry = json.loads(handle.read(length))[name]
        if entry["dtype"] != "F32":
            raise ValueError(f"{name} is {entry['dtype']}, not F32")
        start, end = entry["data_offsets"]
        handle.seek(8 + length + start)
        (first,) = struct.unpack("<f", handle.read(4))
        handle.seek(8 + length + end - 4)
        (last,) = struct.unpack("<f", handle.read(4))
    return first, last


def _cli(*argv: str) -> tuple[int, Any]:
    """A ``ckptd`` command run in this process (a subprocess per trial costs a second here)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = cli_main(list(argv))
    try:
        return code, json.loads(out.getvalue())
    except ValueError:
        return code, None


def run_harness(workdir: Path, settings: Settings) -> Tally:
    """Run the trials in ``workdir`` (slots under ``$CKPTD_SHM_ROOT``); always cleans up."""
    harness = Harness(workdir, settings)
    try:
        return harness.run_trials()
    finally:
        harness.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fault.crash", description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--seed", type=int, default=random.SystemRandom().randrange(1 << 30))
    parser.add_argument("--mib", type=int, default=Settings.mib, help="size of the trainer's state")
    parser.add_argument("--max-seconds", type=float, default=math.inf, help="stop starting trials after this")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (printed) afterwards")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="ckptd-crash-"))
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else workdir
    os.environ["CKPTD_SHM_ROOT"] = str(Path(tempfile.mkdtemp(prefix="ckptd-crash-", dir=shm)))
    settings = Settings(seed=args.seed, trials=args.trials, mib=args.mib, max_seconds=args.max_seconds)
    try:
        tally = run_harness(workdir, settings)
    finally:
        shutil.rmtree(os.environ["CKPTD_SHM_ROOT"], ignore_errors=True)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(tally.summary())
    print(json.dumps(tally.to_json()))
    if args.keep:
        print(f"work dir: {workdir}")
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
