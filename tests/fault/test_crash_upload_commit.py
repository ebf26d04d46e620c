"""Crash harness for the remote upload and the multi-node commit (issue 13).

Real daemons (``python -m ckptd run``) are SIGKILLed at seeded random moments, restarted, and the
promises of docs/remote.md and docs/distributed.md are checked after every kill:

- **upload**: one daemon with a ``file://`` remote and a remote policy commits checkpoints and
  uploads them. Every checkpoint the remote lists verifies (none half-uploaded is ever listed),
  nothing held for upload leaves the local store before it is on the remote, the restarted
  uploader finishes what was pending, the best stays local, and no temp dir a kill left survives
  the restart.
- **commit**: a leader daemon and a follower daemon (two processes, two node ids, two
  shared-memory roots, one store) gather the rank parts of sharded captures. Every visible
  ``step-*`` verifies and holds every rank's files, each capture is committed exactly once or
  (a rank's slot deliberately lost) reported abandoned after ``--shard-timeout``, and every ack
  ends committed or rejected with a reason.

The trainer is fabricated without torch, as tests/test_sharded_store.py does: slots written by
hand with their token, acks through ``write_ack``.

The kill windows are real, not mocked. A checkpoint is 16 MiB in 8 files, so a persist (every
file fsynced) takes tenths of a second and an upload (each file copied, read back and hashed)
tens of milliseconds. A kill aimed at an upload waits for the checkpoint's remote directory to
appear (the upload's first act), then a seeded fraction of the upload time measured from the
daemon's own log; a kill aimed at a commit waits for a rank's file, marker or the last markers in
the shard directory. What each kill actually interrupted is read afterwards from what it left on
disk, and tallied per phase.

``python -m tests.fault.test_crash_upload_commit --trials 300 --seed N`` runs the long mode and
prints the tally; pytest runs a short one with a fixed seed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
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

import pytest

from ckptd.errors import StoreError
from ckptd.protocol import (
    Ack,
    RunPaths,
    pending_ack_paths,
    read_control,
    read_pending_uploads,
    write_ack,
)
from ckptd.remote import RemoteStore
from ckptd.staging import CAPTURE_FILE, TENSORS_FILE, TensorEntry, plan_layout, staging_dir_for
from ckptd.store import MANIFEST, SHARD_PREFIX, TMP_PREFIX, Store
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

FILES = 8  # files per uploaded checkpoint: the upload has a check between each two
FILE_BYTES = 3 << 19  # 1.5 MiB: 12 MiB a checkpoint
PART_BYTES = 2 << 20  # one rank's DCP file
RANKS = 4  # ranks 0 and 1 on the leader's node, 2 and 3 on the follower's
LEADER, FOLLOWER = "node-a", "node-b"
SHARD_TIMEOUT_S = 3.0
LOSS_RATE = 0.2  # captures one rank's slot of which is lost (a node rebooted): abandoned, reported
CHAIN = 25  # trials in one run dir before a fresh one: bounds its logs and its store
SETTLE_S = 60.0
_NOISE = 64 << 10


@dataclass
class Tally:
    """What a harness did: trials, kills per interrupted phase, outcomes, invariant failures."""

    trials: int = 0
    kills: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def fail(self, where: str, problem: str) -> None:
        self.failures.append(f"{where}: {problem}")

    def render(self) -> str:
        lines = [f"trials: {self.trials}", f"kills: {sum(self.kills.values())}"]
        lines += [f"  {phase}: {count}" for phase, count in sorted(self.kills.items())]
        lines += ["outcomes:"] + [f"  {what}: {count}" for what, count in sorted(self.outcomes.items())]
        lines += [f"invariant failures: {len(self.failures)}"] + [f"  {f}" for f in self.failures[:50]]
        return "\n".join(lines)


# A spare interpreter: ckptd (and fsspec's local backend) imported, then it waits for its argv on
# stdin and runs ``ckptd.cli.main`` as ``python -m ckptd`` does. A restart hands the argv to the
# spare started after the previous one, so it costs the daemon's own start rather than Python's
# imports (1.5 s and more on a loaded 2-core box: most of a trial otherwise). EOF: unused, exit.
_SPARE = """
import json, sys
import ckptd.cli, ckptd.daemon.run, ckptd.daemon.follower, ckptd.remote
import fsspec.implementations.local
line = sys.stdin.readline()
sys.exit(ckptd.cli.main(json.loads(line)) if line else 0)
"""


class Proc:
    """One daemon process of a node, its output in its own file: spawned as a spare that waits
    for ``launch`` (see ``_SPARE``), then a real ``ckptd run``."""

    def __init__(self, env: dict[str, str], out: Path, status: Path) -> None:
        self.out = out
        self.status = status
        with out.open("wb") as handle:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _SPARE],
                stdin=subprocess.PIPE, stdout=handle, stderr=subprocess.STDOUT, env=env, text=True,
            )  # fmt: skip

    def launch(self, argv: list[str]) -> Proc:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(["run", *argv]) + "\n")
        self.proc.stdin.close()
        return self

    def wait_alive(self, timeout: float = 60.0) -> Proc:
        """Until the status file is this process's own: a killed daemon's heartbeat stays fresh
        for seconds, so a fresh mtime alone would not say the new one is up."""

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited {self.proc.returncode}:\n{self.log()[-4000:]}")
            return _read_json(self.status).get("pid") == self.proc.pid

        wait_for(up, timeout, what=f"the daemon's heartbeat ({self.out.name})")
        return self

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            return -1

    def log(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""


class Spares:
    """One spare process per node, replaced as soon as it is launched."""

    def __init__(self, base: Path, procs: list[Proc]) -> None:
        self.base = base
        self.procs = procs  # every process made, for the logs and the final kill
        self.waiting: dict[str, Proc] = {}

    def launch(self, node: str, env: dict[str, str], status: Path, argv: list[str]) -> Proc:
        proc = self.waiting.pop(node, None) or self._spawn(node, env, status)
        proc.launch(argv)
        self.waiting[node] = self._spawn(node, env, status)
        return proc

    def _spawn(self, node: str, env: dict[str, str], status: Path) -> Proc:
        proc = Proc(env, self.base / f"{node}-{len(self.procs)}.log", status)
        self.procs.append(proc)
        return proc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _noise(rng: random.Random, nbytes: int) -> bytes:
    """``nbytes`` of seeded bytes, cheaply: a random block repeated (a file's bytes differ from
    every other file's, which is what a checksum mix-up would need to go unseen)."""
    return rng.randbytes(_NOISE) * (nbytes // _NOISE) + rng.randbytes(nbytes % _NOISE)


def _names(folder: Path, prefix: str) -> set[str]:
    try:
        return {entry for entry in os.listdir(folder) if entry.startswith(prefix)}
    except FileNotFoundError:
        return set()


def _logs(procs: list[Proc]) -> str:
    return "\n".join(p.log() for p in procs)


def _manifest_state(directory: Path) -> str:
    """``none`` (no MANIFEST.json), ``whole`` (a JSON object) or ``torn`` (anything else)."""
    try:
        return "whole" if isinstance(json.loads((directory / MANIFEST).read_bytes()), dict) else "torn"
    except FileNotFoundError:
        return "none"
    except ValueError:
        return "torn"


def _local_problems(store: Store, name: str) -> list[str] | None:
    """What ``store.verify`` finds wrong with ``name``; None when it was rotated out meanwhile
    by a live daemon (a deletion renames it out of sight first, so a checkpoint still there
    with a problem is a real one)."""
    try:
        problems = store.verify(name)
    except OSError as exc:
        problems = [str(exc)]
    return None if problems and not (store.path_of(name) / MANIFEST).is_file() else problems


def _remote_problems(remote: RemoteStore, name: str) -> list[str] | None:
    """What ``remote.verify`` finds wrong with ``name``; None when remote retention deleted it
    meanwhile (its manifest goes first)."""
    try:
        problems = remote.verify(name)
    except OSError as exc:  # RemoteError: the manifest is gone, or unreadable
        problems = [str(exc)]
    return None if problems and not remote.fs.exists(remote.path(name, MANIFEST)) else problems


def _error_lines(text: str) -> list[str]:
    """Lines no crash of ours can explain: a traceback, an unexpected error, a checkpoint that
    left the local store before its upload, one found corrupt locally."""
    bad = ("Traceback", "unexpected", "before its upload", "corrupt locally", "CORRUPT")
    return [line for line in text.splitlines() if any(b in line for b in bad)]


# -- the remote upload ------------------------------------------------------------------------


class _Chain:
    """What both kinds of trial share: one run dir (an empty log, the store in it) whose
    daemons are started by spare processes, killed and restarted trial after trial."""

    def __init__(self, base: Path, rng: random.Random, tally: Tally) -> None:
        self.base = base
        self.rng = rng
        self.tally = tally
        self.run = base / "run"
        self.run.mkdir(parents=True)
        (self.run / "logging.jsonl").touch()
        self.paths = RunPaths(self.run)
        self.store = Store(self.run / "checkpoints")
        self.procs: list[Proc] = []
        self.spares = Spares(base, self.procs)
        self.step = 0


class UploadChain(_Chain):
    """One run dir whose daemon is killed and restarted trial after trial; its trainer is the
    harness, acking fabricated checkpoints with losses drawn from the seed."""

    ARGS = ("--metric", "loss", "--keep-last", "1", "--remote-keep-last", "2")

    def __init__(self, base: Path, shm: Path, rng: random.Random, tally: Tally) -> None:
        super().__init__(base, rng, tally)
        self.remote_dir = base / "remote"
        self.url = f"file://{self.remote_dir}"
        self.env = {**os.environ, "CKPTD_SHM_ROOT": str(shm)}
        self.losses: dict[str, float] = {}  # every checkpoint acked: name -> its loss
        self.slots: dict[str, Path] = {}  # ack file name -> its slot
        self.remote_seen: set[str] = set()  # every name the remote was seen listing
        self.upload_s = 0.05
        self.daemon = self._start()
        self.staging = staging_dir_for(read_control(self.paths.control).run_id, shm)

    def _start(self) -> Proc:
        argv = [str(self.run), *self.ARGS, "--remote", self.url]
        return self.spares.launch("daemon", self.env, self.paths.status, argv).wait_alive()

    def _ack_checkpoint(self) -> str:
        """A checkpoint staged as a trainer would (every file, the token in the tensors file's
        header) and acked; returns the name it will be committed under."""
        self.step += 10
        name = f"step-{self.step:08d}"
        loss = self.rng.uniform(0.0, 10.0)
        self.losses[name] = loss
        token = f"{self.rng.getrandbits(64):016x}"
        slot = self.staging / f"h{self.step}"
        slot.mkdir(mode=0o700)
        layout = plan_layout([TensorEntry("w", "U8", (FILE_BYTES,), FILE_BYTES)], {"token": token})
        (slot / TENSORS_FILE).write_bytes(layout.header + _noise(self.rng, FILE_BYTES))
        files = {TENSORS_FILE: layout.total}
        for index in range(1, FILES):
            (slot / f"part-{index}.bin").write_bytes(_noise(self.rng, FILE_BYTES))
            files[f"part-{index}.bin"] = FILE_BYTES
        ack = Ack(
            name=f"step-{self.step}", captured_step=self.step, slot=slot.name, files=files,
            tags=("periodic",), reason="crash harness", metrics={"loss": loss}, token=token,
        )  # fmt: skip
        self.slots[write_ack(self.paths, ack).name] = slot
        return name

    def trial(self) -> None:
        where = f"upload trial {self.tally.trials}"
        new = [self._ack_checkpoint() for _ in range(self.rng.randint(1, 3))]
        if self.rng.random() < 0.7:
            # Aimed at an upload: its directory appears first, then files, each read back.
            target = self.remote_dir / self.rng.choice(new)
            wait_for(target.exists, timeout=SETTLE_S, what=f"the upload of {target.name}")
            time.sleep(self.rng.uniform(0.0, 1.5 * self.upload_s))
        else:  # anywhere: persists, commits, the hand-over, rotation
            time.sleep(self.rng.uniform(0.0, 0.4 * len(new)))
        self.daemon.kill()
        leftovers = self._post_mortem(where)
        self.daemon = self._start()
        survived = sorted(n for n in leftovers if (self.store.root / n).exists())
        if survived:
            self.tally.fail(where, f"temp dirs of the killed daemon survive its restart: {survived}")
        if self._settle(where):
            self._check(where)
        self.tally.trials += 1

    def _post_mortem(self, where: str) -> set[str]:
        """What the kill left: checked (the remote lists only whole checkpoints, the local store
        only intact ones), and classified by the phase it interrupted. Returns the temp dirs."""
        leftovers = _names(self.store.root, TMP_PREFIX)
        try:
            pending = set(read_pending_uploads(self.paths))
        except ValueError as exc:  # written atomically: never half
            self.tally.fail(where, f"uploads.json unreadable after the kill: {exc}")
            pending = set()
        dirs = {name: _manifest_state(self.remote_dir / name) for name in _names(self.remote_dir, "step-")}
        remote = RemoteStore(self.url)
        listed = [r.name for r in remote.list()]
        whole = sorted(name for name, state in dirs.items() if state == "whole")
        if listed != whole:
            self.tally.fail(
                where, f"the remote lists {listed}, the directories with a whole manifest: {whole}"
            )
        # file:// writes the manifest in place: a kill inside that write leaves it torn. Unlisted,
        # so harmless, as long as the upload is still pending and will be redone.
        torn = {name for name, state in dirs.items() if state == "torn"}
        if torn - pending:
            self.tally.fail(
                where, f"torn remote manifests of uploads no longer pending: {sorted(torn - pending)}"
            )
        for name in listed:
            if problems := _remote_problems(remote, name):
                self.tally.fail(where, f"{name} is listed on the remote but does not verify: {problems}")
        self.remote_seen.update(listed)
        for record in self.store.list():
            if problems := _local_problems(self.store, record.name):
                self.tally.fail(where, f"local {record.name} does not verify after the kill: {problems}")
        acks = {p.name for p in pending_ack_paths(self.paths)}
        partial = {name for name, state in dirs.items() if state == "none"}
        local = _names(self.store.root, "step-")
        if torn:
            phase = "mid-manifest-write"
        elif partial & pending:
            phase = "mid-upload"
        elif pending & set(whole):
            phase = "uploaded-not-yet-recorded"
        elif partial:
            phase = "mid-remote-delete"
        elif any(n.startswith(f"{TMP_PREFIX}del-") for n in leftovers):
            phase = "mid-local-delete"
        elif leftovers:
            phase = "mid-persist"
        elif any(f"step-{int(a[5:-5]):08d}" in local for a in acks):
            phase = "committed-ack-not-removed"
        elif acks:
            phase = "acks-queued"
        elif pending:
            phase = "upload-queued"
        else:
            phase = "idle"
        self.tally.kills[f"upload:{phase}"] += 1
        return leftovers

    def _expected_local(self) -> set[str]:
        """The best loss of every checkpoint ever committed, and the latest: all local retention
        keeps once nothing is held for upload any more."""
        return {min(self.losses, key=self.losses.__getitem__), max(self.losses)}

    def _settled(self) -> bool:
        if pending_ack_paths(self.paths) or read_pending_uploads(self.paths):
            return False
        expected = self._expected_local()
        local = _names(self.store.root, "step-") | _names(self.store.root, TMP_PREFIX)
        return local == expected and all(_manifest_state(self.remote_dir / n) == "whole" for n in expected)

    def _settle(self, where: str) -> bool:
        try:
            wait_for(self._settled, timeout=SETTLE_S, what="the restarted daemon to finish")
        except AssertionError:
            state = {
                "acks": [p.name for p in pending_ack_paths(self.paths)],
                "uploads": read_pending_uploads(self.paths),
                "local": sorted(_names(self.store.root, "step-") | _names(self.store.root, TMP_PREFIX)),
                "expected": sorted(self._expected_local()),
                "remote": sorted(_names(self.remote_dir, "step-")),
            }
            self.tally.fail(where, f"never settled in {SETTLE_S:.0f} s: {state}\n{self.daemon.log()[-3000:]}")
            return False
        return True

    def _check(self, where: str) -> None:
        logs = _logs(self.procs)
        if bad := _error_lines(logs):
            self.tally.fail(where, f"the daemon reported: {bad[:3]}")
        rejected = sorted(_names(self.paths.acks, "step-") - {p.name for p in pending_ack_paths(self.paths)})
        if rejected:
            self.tally.fail(where, f"acks of whole slots set aside: {rejected}")
        local = {r.name: r for r in self.store.list()}
        best = min(self.losses, key=self.losses.__getitem__)
        if best not in local:
            self.tally.fail(where, f"the best {best} is not in the local store: {sorted(local)}")
        for name in local:
            if problems := _local_problems(self.store, name):
                self.tally.fail(where, f"local {name} does not verify: {problems}")
            stamp = self.store.manifest(name).get("ack", {})
            if stamp.get("name") != f"step-{local[name].step}":
                self.tally.fail(where, f"local {name} was committed from another ack: {stamp}")
        remote = RemoteStore(self.url)
        listed = [r.name for r in remote.list()]
        self.remote_seen.update(listed)
        if unlisted := sorted(self._expected_local() - set(listed)):
            self.tally.fail(where, f"{unlisted} kept locally, uploaded, yet not listed by the remote")
        for name in listed:
            if name not in self.losses:
                self.tally.fail(where, f"the remote lists {name}, which no ack made (a second commit?)")
            elif problems := _remote_problems(remote, name):
                self.tally.fail(where, f"remote {name} does not verify: {problems}")
        uploaded = set(re.findall(r"uploaded (step-\d+) to ", logs))
        unwanted = set(re.findall(r"(step-\d+) is not kept by the remote policy", logs))
        for name in self.losses:
            if name not in local and name not in self.remote_seen | uploaded | unwanted:
                self.tally.fail(where, f"{name} left the local store without ever being on the remote")
        seconds = [
            float(s) for s in re.findall(r"uploaded step-\d+ to \S+ \([\d.]+ MiB in ([\d.]+) s\)", logs)
        ]
        if seconds:
            self.upload_s = statistics.median(seconds[-20:])
        for ack, slot in list(self.slots.items()):  # committed: the trainer may reuse the memory
            if not (self.paths.acks / ack).exists():
                shutil.rmtree(slot, ignore_errors=True)
                del self.slots[ack]
        self.tally.outcomes["upload:settled"] += 1

    def close(self) -> None:
        where = f"upload chain {self.base.name}"
        code = self.daemon.stop()
        if code != 0:
            self.tally.fail(where, f"a clean stop exited {code}:\n{self.daemon.log()[-3000:]}")
        done = subprocess.run(
            [sys.executable, "-m", "ckptd", "verify", str(self.run), "--remote", "--json"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        try:
            results = json.loads(done.stdout)
        except ValueError:
            results = None
        if done.returncode != 0 or not results or not all(r["ok"] for r in results):
            self.tally.fail(
                where, f"ckptd verify --remote exited {done.returncode}: {done.stdout} {done.stderr}"
            )


# -- the multi-node commit --------------------------------------------------------------------


@dataclass
class Capture:
    """One sharded capture the harness acked: each rank's ack, and the rank whose slot it lost."""

    capture: str
    step: int
    lost: int | None
    acks: dict[int, Path] = field(default_factory=dict)
    slots: list[Path] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)  # names it was seen committed under


def _node_of(rank: int) -> str:
    return LEADER if rank < RANKS // 2 else FOLLOWER


def _rank_files(rank: int) -> dict[str, int]:
    """What DCP writes for ``rank`` with one file per rank; the coordinator adds ``.metadata``."""
    return {f"__{rank}_0.distcp": PART_BYTES, **({".metadata": 4096} if rank == 0 else {})}


_EXPECTED_FILES = {name for rank in range(RANKS) for name in _rank_files(rank)}


class CommitChain(_Chain):
    """One run dir with a leader daemon and a follower daemon on two pretend nodes (their own
    node ids and shared-memory roots, one store); each is killed and restarted as drawn."""

    def __init__(self, base: Path, shm: Path, rng: random.Random, tally: Tally) -> None:
        super().__init__(base, rng, tally)
        self.node_paths = {LEADER: self.paths, FOLLOWER: self.paths.node(FOLLOWER)}
        self.shm = {node: shm / node for node in (LEADER, FOLLOWER)}
        for folder in self.shm.values():
            folder.mkdir(mode=0o700)
        self.captures: list[Capture] = []
        self.daemons = {LEADER: self._start(LEADER).wait_alive()}
        self.run_id = read_control(self.paths.control).run_id
        self.daemons[FOLLOWER] = self._start(FOLLOWER).wait_alive()

    def _start(self, node: str) -> Proc:
        argv = [str(self.run), "--role", "leader" if node == LEADER else "follower", "--node-id", node]
        if node == LEADER:
            argv += ["--shard-timeout", str(SHARD_TIMEOUT_S), "--keep-last", "3"]
        env = {**os.environ, "CKPTD_SHM_ROOT": str(self.shm[node])}
        return self.spares.launch(node, env, self.node_paths[node].status, argv)

    def _ack_capture(self) -> Capture:
        """Every rank's part staged in its node's shared memory and acked to its node's daemon,
        in a seeded order; the lost rank's ack names a slot that is not there."""
        self.step += 10
        loss = self.rng.uniform(0.0, 10.0)
        lost = self.rng.randrange(RANKS) if self.rng.random() < LOSS_RATE else None
        capture = Capture(f"{self.step}-{self.rng.getrandbits(32):08x}", self.step, lost)
        ranks = list(range(RANKS))
        self.rng.shuffle(ranks)
        for rank in ranks:
            node = _node_of(rank)
            staging = staging_dir_for(self.run_id, self.shm[node])
            staging.mkdir(mode=0o700, exist_ok=True)
            slot = staging / f"r{rank}-{self.step}"
            token = f"{self.rng.getrandbits(64):016x}"
            files = _rank_files(rank)
            if rank != lost:
                slot.mkdir(mode=0o700)
                for name, nbytes in files.items():
                    (slot / name).write_bytes(_noise(self.rng, nbytes))
                (slot / CAPTURE_FILE).write_text(json.dumps({"token": token}))  # last, as DCP's client
                capture.slots.append(slot)
            ack = Ack(
                name=Ack.name_for(None, self.step, rank), captured_step=self.step, slot=slot.name,
                files=files, tags=("periodic",), reason="crash harness", metrics={"eval_loss": loss},
                token=token, token_file=CAPTURE_FILE, rank=rank, world_size=RANKS, capture=capture.capture,
            )  # fmt: skip
            capture.acks[rank] = write_ack(self.node_paths[node], ack)
        self.captures.append(capture)
        return capture

    def trial(self) -> None:
        where = f"commit trial {self.tally.trials}"
        new = [self._ack_capture() for _ in range(self.rng.randint(1, 2))]
        acked = time.monotonic()
        aimed = new[0]
        victims = self.rng.choice(((LEADER,), (FOLLOWER,), (LEADER, FOLLOWER)))
        aim = self.rng.choice(("anywhere", "part", "marker", "commit"))
        shard = self.store.shard_dir(aimed.capture)
        if aim == "part":  # a rank's file is being copied in
            self._wait_until(aimed, lambda: bool(_names(shard, "__")), what="a part's first file")
            time.sleep(self.rng.uniform(0.0, 0.03))
        elif aim == "marker":  # a rank's marker is being written, or has just been
            self._wait_until(aimed, lambda: bool(_names(shard, ".rank-") | _names(shard, "..rank-")),
                             what="a rank's marker")  # fmt: skip
            time.sleep(self.rng.uniform(0.0, 0.01))
        elif aim == "commit":  # all markers but one: the last, then the manifest and the rename
            self._wait_until(aimed, lambda: len(_names(shard, ".rank-")) >= RANKS - 1, what="the last parts")
            time.sleep(self.rng.uniform(0.0, 1.2))
        else:
            time.sleep(self.rng.uniform(0.0, 1.2))
        for node in victims:
            self.daemons[node].kill()
        leftovers = self._post_mortem(where, aimed, "+".join(victims))
        for node in victims:  # both at once when both died: the nodes restart independently
            self.daemons[node] = self._start(node)
        for node in victims:
            self.daemons[node].wait_alive()
        # How long a part may have waited for a daemon that was down: from the acks to both up.
        waited = time.monotonic() - acked
        if LEADER in victims:  # the leader's start removes the temp dirs in the store
            survived = sorted(n for n in leftovers if (self.store.root / n).exists())
            if survived:
                self.tally.fail(where, f"temp dirs of the killed leader survive its restart: {survived}")
        if self._settle(where, new):
            # An outcome is logged by the leader's main loop after its worker is done with the
            # store: give the log a moment to catch up (what never comes, _check reports).
            with contextlib.suppress(AssertionError):
                wait_for(lambda: self._accounted(new), timeout=5.0, what="the leader's reports")
            self._check(where, new, waited)
        self.tally.trials += 1

    def _wait_until(self, capture: Capture, predicate: Callable[[], bool], what: str) -> None:
        """Until ``predicate`` holds or the capture is past it (committed, or all its acks gone)."""
        done = lambda: predicate() or not any(p.exists() for p in capture.acks.values())  # noqa: E731
        wait_for(done, timeout=SETTLE_S, what=f"{what} of capture {capture.capture}")

    def _committed(self) -> dict[str, str]:
        """Visible checkpoints by the capture their manifest names."""
        found = {}
        for record in self.store.list():
            with contextlib.suppress(OSError, ValueError):
                found[str(self.store.manifest(record.name).get("capture"))] = record.name
        return found

    def _check_visible(self, where: str) -> None:
        """Every visible checkpoint verifies and holds every rank's files, once."""
        known = {c.capture: c for c in self.captures}
        for record in self.store.list():
            try:
                manifest = self.store.manifest(record.name)
            except FileNotFoundError:
                continue  # rotated out meanwhile by the live leader
            capture = known.get(str(manifest.get("capture")))
            if capture is None:
                self.tally.fail(where, f"{record.name} names no capture of ours: {manifest.get('capture')}")
                continue
            capture.seen.add(record.name)
            if problems := _local_problems(self.store, record.name):
                self.tally.fail(where, f"visible {record.name} does not verify: {problems}")
            if manifest.get("ranks") != RANKS or set(manifest.get("files", {})) != _EXPECTED_FILES:
                self.tally.fail(
                    where, f"visible {record.name} is not whole: ranks {manifest.get('ranks')}, "
                    f"files {sorted(manifest.get('files', {}))}",
                )  # fmt: skip
            if record.name != f"step-{capture.step:08d}" or capture.lost is not None:
                self.tally.fail(where, f"capture {capture.capture} (lost rank {capture.lost}) "
                                       f"visible as {record.name}")  # fmt: skip

    def _post_mortem(self, where: str, aimed: Capture, victims: str) -> set[str]:
        leftovers = _names(self.store.root, TMP_PREFIX)
        self._check_visible(where)
        shard = self.store.shard_dir(aimed.capture)
        pending = [p for p in aimed.acks.values() if p.exists()]
        if shard.is_dir():
            names = set(os.listdir(shard))
            markers = {n for n in names if re.fullmatch(r"\.rank-\d+\.json", n)}
            unmarked = {
                n for n in names if n.startswith("__") and f".rank-{n[2:].split('_')[0]}.json" not in markers
            }
            if MANIFEST in names:
                phase = "manifest-before-rename"
            elif any(n.startswith("..rank-") for n in names):
                phase = "mid-marker-write"
            elif len(markers) == RANKS:
                phase = "all-marked-before-commit"
            elif unmarked:
                phase = "mid-part-copy"
            elif markers:
                phase = "between-parts"
            else:
                phase = "shard-dir-empty"
        elif aimed.capture in self._committed():
            phase = "committed-ack-not-removed" if pending else "after-commit"
        elif pending:
            phase = "before-any-part"
        else:
            phase = "after-abandon"
        self.tally.kills[f"commit:{victims}:{phase}"] += 1
        return leftovers

    def _accounted(self, new: list[Capture]) -> bool:
        """Every capture visible, or its commit or its removal in the leader's log."""
        logs = _logs([p for p in self.procs if p.out.name.startswith(LEADER)])
        return all(
            (self.store.root / f"step-{c.step:08d}").is_dir()
            or f"committed step-{c.step:08d} " in logs
            or f"sharded capture {c.capture} not whole" in logs
            for c in new
        )

    def _settled(self) -> bool:
        return not (
            pending_ack_paths(self.paths)
            or pending_ack_paths(self.node_paths[FOLLOWER])
            or _names(self.store.root, SHARD_PREFIX)
            or _names(self.store.root, TMP_PREFIX)
        )

    def _settle(self, where: str, new: list[Capture]) -> bool:
        try:
            wait_for(self._settled, timeout=SETTLE_S + SHARD_TIMEOUT_S, what="both daemons to finish")
        except AssertionError:
            state = {
                "acks": [p.name for p in pending_ack_paths(self.paths)],
                "follower acks": [p.name for p in pending_ack_paths(self.node_paths[FOLLOWER])],
                "store": sorted(os.listdir(self.store.root)),
            }
            self.tally.fail(where, f"never settled: {state}\n{self.daemons[LEADER].log()[-3000:]}")
            return False
        return True

    def _check(self, where: str, new: list[Capture], waited: float) -> None:
        self._check_visible(where)
        logs = _logs(self.procs)
        if bad := _error_lines(logs):
            self.tally.fail(where, f"a daemon reported: {bad[:3]}")
        for capture in new:
            committed = capture.seen | set(re.findall(rf"committed (step-0*{capture.step}(?:-\d+)?) ", logs))
            abandoned = [
                line for line in logs.splitlines() if f"sharded capture {capture.capture} not whole" in line
            ]
            early = [
                line for line in abandoned if int(re.findall(r"not whole (\d+) s", line)[0]) < SHARD_TIMEOUT_S
            ]
            if early:
                self.tally.fail(where, f"capture {capture.capture} removed before --shard-timeout: {early}")
            if capture.lost is None and committed == {f"step-{capture.step:08d}"} and not abandoned:
                self.tally.outcomes["commit:committed once"] += 1
            elif (
                capture.lost is None
                and not committed
                and waited > SHARD_TIMEOUT_S - 0.5
                and all("ranks missing" in line for line in abandoned)
            ):
                # A daemon down longer than the timeout: the documented removal, not a loss.
                self.tally.outcomes["commit:abandoned after a long restart"] += 1
            elif (
                capture.lost is not None
                and not committed
                and abandoned
                and all(f"ranks missing: {capture.lost};" in line for line in abandoned)
            ):
                self.tally.outcomes["commit:abandoned, rank lost"] += 1
            else:
                self.tally.fail(
                    where, f"capture {capture.capture} (lost rank {capture.lost}, waited {waited:.1f} s): "
                    f"committed as {sorted(committed)}, abandoned: {abandoned}",
                )  # fmt: skip
            for rank, ack in capture.acks.items():
                aside = ack.with_name(ack.name + ".rejected")
                if ack.exists():
                    self.tally.fail(where, f"ack {ack.name} still pending")
                elif aside.exists() != (rank == capture.lost):
                    self.tally.fail(
                        where, f"ack {ack.name} (lost rank {capture.lost}) set aside: {aside.exists()}"
                    )
                elif aside.exists() and f"rejected ack {ack.name}:" not in logs:
                    self.tally.fail(where, f"ack {ack.name} set aside without a reason in the log")
            for slot in capture.slots:
                shutil.rmtree(slot, ignore_errors=True)

    def close(self) -> None:
        where = f"commit chain {self.base.name}"
        for node in (FOLLOWER, LEADER):
            code = self.daemons[node].stop()
            if code != 0:
                self.tally.fail(
                    where, f"{node}'s clean stop exited {code}:\n{self.daemons[node].log()[-3000:]}"
                )


# -- running them -----------------------------------------------------------------------------

Chain = UploadChain | CommitChain


@contextlib.contextmanager
def _shm_folder() -> Iterator[Path]:
    """Shared memory of this harness: its own folder under /dev/shm, removed afterwards."""
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    folder = root / f"ckptd-crash-{os.getpid()}-{time.monotonic_ns()}"
    folder.mkdir(mode=0o700)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_harness(
    kind: str, trials: int, seed: int, base: Path, tally: Tally, deadline: float = math.inf
) -> None:
    """``trials`` seeded trials of ``kind`` (``upload`` or ``commit``), none started after
    ``deadline`` (monotonic), a fresh run dir every ``CHAIN`` trials or after a failure; every
    daemon is gone when it returns."""
    rng = random.Random(f"{kind}-{seed}")
    make: type[UploadChain] | type[CommitChain] = UploadChain if kind == "upload" else CommitChain
    done = 0
    with _shm_folder() as shm:
        while done < trials and time.monotonic() < deadline:
            name = f"{kind}-{done}"
            (shm / name).mkdir(mode=0o700)
            chain: Chain = make(base / name, shm / name, rng, tally)
            clean = len(tally.failures)
            try:
                for _ in range(min(CHAIN, trials - done)):
                    if time.monotonic() >= deadline:
                        break
                    failures = len(tally.failures)
                    try:
                        chain.trial()
                    except AssertionError as exc:  # a wait that timed out: the daemons stalled
                        tally.fail(f"{kind} trial {tally.trials}", str(exc))
                    done += 1
                    if len(tally.failures) > failures:
                        break  # a run dir in a state no invariant promises: start afresh
                chain.close()
            finally:
                for proc in chain.procs:
                    proc.kill()
            if len(tally.failures) == clean:  # kept only for a post-mortem: hundreds of MiB each
                shutil.rmtree(base / name, ignore_errors=True)


def run_kinds(shares: dict[str, int], seed: int, base: Path, deadline: float = math.inf) -> dict[str, Tally]:
    """Each kind's harness on its own thread, at once: a trial mostly waits (a process start, an
    fsync, a heartbeat), so two overlap for about the wall time of one."""
    tallies = {kind: Tally() for kind in shares}

    def run(kind: str) -> None:
        try:
            run_harness(kind, shares[kind], seed, base, tallies[kind], deadline)
        except Exception as exc:  # a harness bug must show up as a failure, not a silent thread
            tallies[kind].fail(kind, f"the harness stopped: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(kind,), name=f"crash-{kind}") for kind in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tallies


SEED = 1313


# -- what the harness found, pinned without processes -----------------------------------------


def _stored_part(store: Store, capture: str, rank: int, world: int) -> None:
    """One rank's part as a daemon stores it (``writing_rank``, ``copy_in``, ``mark_rank``)."""
    source = store.root.parent / f"slot-{capture}-{rank}"
    source.write_bytes(bytes([rank]) * 100)
    with store.writing_rank(capture, 7, [f"__{rank}_0.distcp"]) as pending:
        pending.copy_in(f"__{rank}_0.distcp", source, 100)
        store.mark_rank(pending, capture, rank, world, {"run_id": "r"} if rank == 0 else {})


def test_a_marker_write_cut_short_by_a_kill_does_not_keep_a_whole_capture_from_its_commit(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "store")
    _stored_part(store, "7-a", 0, 2)
    # A follower killed inside atomic_write_json of its marker leaves the temp file; its restart
    # stores the part anew under a new temp name, and the marker lands.
    (store.shard_dir("7-a") / "..rank-1.json.k1ll3d.tmp").write_text('{"capture": "7-')
    _stored_part(store, "7-a", 1, 2)
    record = store.commit_shards("7-a")
    assert record is not None and store.verify(record.name) == []
    assert sorted(os.listdir(store.path_of(record.name))) == [MANIFEST, "__0_0.distcp", "__1_0.distcp"]


def test_a_whole_capture_that_fails_its_check_ages_toward_its_timeout(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    _stored_part(store, "7-b", 0, 1)
    shard = store.shard_dir("7-b")
    (shard / "stray.bin").write_bytes(b"no part names me")
    os.utime(shard / "stray.bin", (1.0, 1.0))
    for entry in (*shard.iterdir(), shard):
        os.utime(entry, (1.0, 1.0))
    for _ in range(2):  # the leader looks again at every beat
        with pytest.raises(StoreError, match="no rank's part names"):
            store.commit_shards("7-b")
    # Nothing written: its newest file is as old as its last part, so --shard-timeout removes it.
    assert store.shard_captures() == [("7-b", 1.0)] and not (shard / MANIFEST).exists()


CI_TRIALS = {"upload": 15, "commit": 15}


def test_daemons_killed_mid_upload_and_mid_commit_keep_every_promise(tmp_path: Path) -> None:
    tallies = run_kinds(CI_TRIALS, SEED, tmp_path)
    report = "\n".join(f"{kind}:\n{tally.render()}" for kind, tally in tallies.items())
    print(report)
    for kind, tally in tallies.items():
        assert not tally.failures, report
        assert tally.trials == CI_TRIALS[kind] and sum(tally.kills.values()) == CI_TRIALS[kind], report
    # The aimed kills land where they are aimed, often enough to matter.
    assert tallies["upload"].kills["upload:mid-upload"] >= 3, report
    assert tallies["commit"].outcomes["commit:abandoned, rank lost"] >= 1, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trials", type=int, default=300, help="trials in all, split between the kinds")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--kind", choices=("upload", "commit", "both"), default="both")
    parser.add_argument("--minutes", type=float, default=math.inf, help="start no trial after this long")
    parser.add_argument("--keep", action="store_true", help="keep the run dirs (printed) for a post-mortem")
    args = parser.parse_args(argv)
    kinds = ("upload", "commit") if args.kind == "both" else (args.kind,)
    shares = {
        k: args.trials // len(kinds) + (1 if i < args.trials % len(kinds) else 0) for i, k in enumerate(kinds)
    }
    base = Path(tempfile.mkdtemp(prefix="ckptd-crash-"))
    started = time.monotonic()
    tallies = run_kinds(shares, args.seed, base, started + args.minutes * 60)
    for kind, tally in tallies.items():
        print(f"== {kind}\n{tally.render()}")
    failures = sum(len(t.failures) for t in tallies.values())
    trials = sum(t.trials for t in tallies.values())
    took = time.monotonic() - started
    print(f"== {trials} trials, {failures} invariant failures, seed {args.seed}, {took:.0f} s")
    if args.keep or failures:
        print(f"run dirs kept in {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
