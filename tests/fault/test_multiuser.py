"""A root ``ckptd serve`` over runs of two unprivileged users: nobody gains rights through it.

Issue 13 (part 4, node mode). The node daemon runs as root; ``ckptd-alice`` and ``ckptd-bob``
(made here with ``useradd`` when missing) each own a run under its root. Alice attacks with
only her own rights (a forked child with her uid, gid and no groups writes her files): acks
whose slot or file names aim at ``/etc/shadow``, at Bob's run or out of the staging dir with
``../``; slots and slot files that are symbolic links to ``/etc`` or to Bob's checkpoint; a
slot file hard-linked to a root-only file; links planted in her store and staging dirs that
rotation and the daemon's cleanup must not delete through; run files that aim the store at
``/etc`` or at Bob's run, the log at ``/etc/shadow``, or are a link to ``/etc/shadow``; a run
dir anyone may write; a run file she drops in a root-owned scratch dir; a status file that
is a link to a root-only file (the metrics textfile, world-readable, would show it).

After each round: neither ``/etc/shadow`` nor the root-only decoy shows up in any file under
the test's tree (a superset of what Alice can read), Bob's run and staging are byte-identical,
nothing appeared or vanished outside Alice's folders, every file ckptd made belongs to its
run's owner and none is world-writable, and the daemon still captures Bob's next eval (and
Alice's). One node daemon serves the whole module.

The users must be able to run the Python that runs ckptd. The venv here points at a pyenv
Python under ``/root`` (0700): then a venv is made, in a world-readable temp dir, from the
system Python of the same version, and reads this venv's site-packages through a ``.pth``
file; the module is skipped when neither works.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import pwd
import secrets
import select
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ckptd.protocol import Ack, RunPaths, daemon_alive, read_control
from ckptd.store import Store
from tests.test_serve import Node, node_config, state_of

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="a root node daemon and two users need root"),
]

ALICE, BOB = "ckptd-alice", "ckptd-bob"
SHADOW = Path("/etc/shadow")
_READ_LIMIT = 64 << 20  # files scanned for a leak are KiBs here; a larger one is read this far

# A user's trainer for the whole module: one torch import, then one eval per stdin line.
AGENT = """
import json, sys
from pathlib import Path
import torch
from ckptd import CheckpointClient
run = Path(sys.argv[1])
with CheckpointClient(run) as ckpt, (run / "logging.jsonl").open("a") as log:
    print("ready", flush=True)
    for line in sys.stdin:
        step = json.loads(line)["step"]
        log.write(line)
        log.flush()
        ckpt.wait_verdict(step, timeout=30)
        took = ckpt.maybe_snapshot(step, lambda: {"w": torch.full((4,), float(step))})
        print(json.dumps(bool(took)), flush=True)
"""


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


def wait_for(
    predicate: Callable[[], bool], timeout: float = 30.0, what: Callable[[], str] | str = "condition"
) -> None:
    """``tests.conftest.wait_for`` at a gentler pace (the CPUs are shared), its message made
    only on failure (the node's log as it is then)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what if isinstance(what, str) else what()}"
            )
        time.sleep(0.05)


def _account(name: str) -> User:
    entry = pwd.getpwnam(name)
    return User(name, entry.pw_uid, entry.pw_gid)


@pytest.fixture(scope="session")
def users() -> tuple[User, User]:
    """Alice and Bob, reused when they exist (another run, another helper made them)."""
    made: list[User] = []
    for name in (ALICE, BOB):
        try:
            made.append(_account(name))
            continue
        except KeyError:
            pass
        try:
            done = subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--user-group",
                    name,
                ],
                capture_output=True,
                text=True,
            )
        except OSError as exc:
            pytest.skip(f"cannot run useradd to make {name}: {exc}")
        try:  # made now, or by someone else meanwhile (useradd then says it exists)
            made.append(_account(name))
        except KeyError:
            pytest.skip(f"useradd refused to make {name}: {done.stderr.strip()}")
    assert all(u.uid != 0 and u.gid != 0 for u in made)
    return made[0], made[1]


def _spawn_as(user: User, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, user=user.uid, group=user.gid, extra_groups=[], capture_output=True, text=True, **kwargs
    )


def _runs_ckptd(python: str, user: User) -> str | None:
    """Why ``user`` cannot import ckptd and torch with ``python``; None when it can."""
    try:
        probe = _spawn_as(user, [python, "-c", "import ckptd, torch"], cwd="/", timeout=120)
    except OSError as exc:
        return str(exc)
    return probe.stderr[-300:] if probe.returncode else None


@pytest.fixture(scope="session")
def python(users: tuple[User, User]) -> Iterator[str]:
    """A Python with ckptd that both users can run: this one, else a venv of the system Python."""
    alice = users[0]
    problem = _runs_ckptd(sys.executable, alice)
    if problem is None:
        yield sys.executable
        return
    # The venv's interpreter lives where the users cannot reach (pyenv under /root, 0700); the
    # system's one of the same version runs the same wheels. Its venv reads ours through a
    # .pth (addsitedir, so the editable install's own .pth runs too).
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = next(
        (p for p in (f"/usr/bin/{version}", f"/usr/local/bin/{version}") if os.access(p, os.X_OK)), None
    )
    if system is None:
        pytest.skip(
            f"{alice.name} cannot run {sys.executable} ({problem.strip()}) and there is no /usr/bin/{version}"
        )
    base = Path(tempfile.mkdtemp(prefix="ckptd-multiuser-python-"))
    try:
        base.chmod(0o755)
        made = subprocess.run(
            [system, "-m", "venv", "--without-pip", str(base / "venv")], capture_output=True, text=True
        )
        if made.returncode:
            pytest.skip(
                f"{alice.name} cannot run {sys.executable}, and no venv of {system}: {made.stderr[-300:]}"
            )
        purelib = sysconfig.get_paths()["purelib"]
        (base / "venv" / "lib" / version / "site-packages" / "ckptd-test-parent.pth").write_text(
            f"import site; site.addsitedir({purelib!r})\n"
        )
        venv_python = str(base / "venv" / "bin" / "python")
        again = _runs_ckptd(venv_python, alice)
        if again is not None:
            pytest.skip(
                f"{alice.name} can run neither {sys.executable} nor {venv_python} with ckptd: {again}"
            )
        yield venv_python
    finally:
        shutil.rmtree(base, ignore_errors=True)


def as_user(user: User, action: Callable[[], object]) -> object:
    """``action()`` in a forked child that has only ``user``'s uid and gid (no groups, umask
    022): what that user could do alone. Its result, or its exception re-raised here."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
            os.umask(0o022)
            payload = pickle.dumps(("ok", action()))
        except BaseException as exc:  # carried to the parent, raised there
            payload = pickle.dumps(("error", exc))
        with contextlib.suppress(BaseException):
            os.write(write_end, payload)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        raw = reader.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(raw)
    if kind == "error":
        raise value
    return value


class Agent:
    """A user's trainer (``AGENT``), alive for the module: ``eval(step, loss)`` logs an eval and
    says whether the client captured it."""

    def __init__(
        self, python: str, user: User, run: Path, script: Path, env: dict[str, str], log: Path
    ) -> None:
        self.run = run
        self.log = log
        with log.open("wb") as err:
            self.proc = subprocess.Popen(
                [python, str(script), str(run)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                user=user.uid,
                group=user.gid,
                extra_groups=[],
                env=env,
                cwd="/",
                text=True,
            )
        assert self._line(120) == "ready", self.log.read_text()

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the trainer said nothing in {timeout} s: {self.log.read_text()}"
        return self.proc.stdout.readline().strip()

    def eval(self, step: int, loss: float) -> bool:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"step": step, "eval_loss": loss}) + "\n")
        self.proc.stdin.flush()
        return bool(json.loads(self._line(60)))

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


Tree = dict[str, tuple[int, int, int, str]]


def tree(top: Path, skip: Callable[[Path], bool] = lambda _: False) -> Tree:
    """Every entry below ``top`` (itself included), links not followed: type, mode, owner, and
    the content's hash (a file) or target (a link)."""
    found: Tree = {}
    pending = [top]
    while pending:
        path = pending.pop()
        if skip(path):
            continue
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue  # a temp file renamed meanwhile (a heartbeat)
        if stat.S_ISDIR(info.st_mode):
            what = "dir"
            with contextlib.suppress(FileNotFoundError):
                pending.extend(path.iterdir())
        elif stat.S_ISLNK(info.st_mode):
            what = os.readlink(path)
        else:
            try:
                what = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:
                continue
        found[str(path)] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), info.st_uid, what)
    return found


def _heartbeat(path: Path) -> bool:
    """status.json and state.json are rewritten at every beat by the run's own daemon (their
    temp files come and go): no change anyone else made. On a loaded machine a beat can land
    between the baseline and the check, with a state whose content moved on (its cursor)."""
    return path.parent.name == ".ckptd" and any(
        path.name == name or path.name.startswith(f".{name}.") for name in ("status.json", "state.json")
    )


@dataclass
class World:
    """The node: its root of runs, shared memory folder, daemon, users and their trainers."""

    base: Path
    runs: Path
    shm: Path
    alice: User
    bob: User
    alice_run: Path
    bob_run: Path
    secret: bytes  # in a root-only file (``decoy``): must never reach a file Alice can read
    decoy: Path
    etc_targets: list[Path]  # paths under /etc that run files aim a store at
    node: Node | None = None
    agents: dict[str, Agent] = field(default_factory=dict)
    step: int = 0
    planted: set[Path] = field(default_factory=set)  # made by the test (as root or Alice), not by ckptd
    bob_before: Tree = field(default_factory=dict)
    outside_before: dict[str, str] = field(default_factory=dict)

    @property
    def alice_area(self) -> Path:
        return self.runs / "alice"

    def log(self) -> str:
        return self.node.log() if self.node is not None else ""

    def says(self, text: str) -> Callable[[], bool]:
        """Whether the node's log (its workers' too) holds ``text``: for ``wait_for``."""
        return lambda: text in self.log()

    def staging_of(self, run: Path) -> Path:
        return Path(read_control(RunPaths(run).control).staging)

    def owned_shm(self, user: User) -> list[Path]:
        return [p for p in self.shm.iterdir() if p.lstat().st_uid == user.uid]

    def bob_tree(self) -> Tree:
        found = tree(self.bob_run, _heartbeat)
        for staging in self.owned_shm(self.bob):
            found.update(tree(staging))
        return found

    def outside(self) -> dict[str, str]:
        """Names (not contents) of everything under the test's tree outside Alice's folders,
        and of the /etc paths run files aimed at: what she must not create or delete."""
        alice_shm = set(self.owned_shm(self.alice))

        def skip(path: Path) -> bool:
            return (
                path == self.alice_area
                or path in alice_shm
                or _heartbeat(path)
                or path.parent == self.base / "metrics"  # rewritten every second
                or path.name.startswith("serve-")
            )

        names = {p: str(v[0]) for p, v in tree(self.base, skip).items()}
        names.update({str(p): "exists" for p in self.etc_targets if os.path.lexists(p)})
        return names

    def baseline(self) -> None:
        # Bob's daemon saves its state a moment after a commit: wait until his tree is quiet.
        self.bob_before = self.bob_tree()
        for _ in range(20):
            time.sleep(0.5)
            now, self.bob_before = self.bob_before, self.bob_tree()
            if now == self.bob_before:
                break
        self.outside_before = self.outside()

    def eval(self, who: str, loss: float | None = None) -> None:
        """The next eval of ``who``'s run: captured, and in that run's store."""
        self.step += 10
        run = self.alice_run if who == "alice" else self.bob_run
        captured = self.agents[who].eval(self.step, 1000.0 - self.step if loss is None else loss)
        assert captured, f"{who}'s eval at {self.step} was not captured:\n{self.log()}"
        wait_for(
            lambda: self.step in steps(run),
            timeout=30,
            what=lambda: f"{who}'s step {self.step}: {self.log()}",
        )

    def check(self) -> None:
        """The invariants every round ends with (see the module docstring)."""
        self.no_leak()
        assert self.bob_tree() == self.bob_before, "Bob's run or staging changed"
        assert self.outside() == self.outside_before, "something appeared or vanished outside Alice's folders"
        self.owners_and_modes()
        assert self.node is not None and self.node.proc.poll() is None, self.log()
        self.eval("bob")  # both runs still served
        self.eval("alice")
        self.baseline()

    def no_leak(self) -> None:
        shadow = _shadow_lines()
        decoy = self.decoy.lstat().st_ino
        for name, (kind, _mode, _uid, _what) in tree(self.base).items():
            path = Path(name)
            if kind != stat.S_IFREG:
                continue
            # Opened without following a link (those are not files of their own); a temp file
            # may be renamed away meanwhile.
            with (
                contextlib.suppress(FileNotFoundError),
                open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as handle,
            ):
                if os.fstat(handle.fileno()).st_ino == decoy:
                    continue  # the decoy itself, and the hard link root made to it
                data = handle.read(_READ_LIMIT)
                assert self.secret not in data, f"the root-only decoy leaked into {path}"
                assert not any(line in data for line in shadow), f"/etc/shadow leaked into {path}"

    def owners_and_modes(self) -> None:
        """Under Alice's folder, Bob's run and shared memory: every entry belongs to the run's
        owner (Alice's, Bob's), and nothing is world-writable unless the test made it so."""
        checked = [(self.alice_area, self.alice), (self.bob_run, self.bob)]
        for entry in self.shm.iterdir():
            owner = self.bob if entry.lstat().st_uid == self.bob.uid else self.alice
            checked.append((entry, owner))
        for top, owner in checked:
            for name, (kind, mode, uid, _what) in tree(top).items():
                if Path(name) in self.planted:
                    continue
                assert uid == owner.uid, f"{name} belongs to uid {uid}, not to {owner.name}"
                assert kind == stat.S_IFLNK or not mode & stat.S_IWOTH, f"{name} is world-writable ({mode:o})"


def _shadow_lines() -> list[bytes]:
    """Lines of /etc/shadow long enough to be telling (an account and its fields)."""
    return [line for line in SHADOW.read_bytes().splitlines() if len(line) >= 12]


def steps(run: Path) -> list[int]:
    return [r.step for r in Store(run / "checkpoints").list()]


def _mkdir(path: Path, mode: int = 0o755) -> None:
    path.mkdir()
    path.chmod(mode)  # whatever the umask


def _old(path: Path) -> None:
    """Untouched for an hour: the sweep's grace (10 min) is past, an ack is no longer young."""
    then = time.time() - 3600
    os.utime(path, (then, then), follow_symlinks=False)


@pytest.fixture(scope="module")
def world(users: tuple[User, User], python: str) -> Iterator[World]:
    alice, bob = users
    base = Path(tempfile.mkdtemp(prefix="ckptd-multiuser-"))
    tag = secrets.token_hex(6)
    etc_targets = [Path(f"/etc/ckptd-multiuser-{tag}"), Path(f"/etc/ckptd-multiuser-{tag}-scratch")]
    secret = f"CKPTD-ROOT-ONLY-{secrets.token_hex(16)}".encode()
    w = World(
        base=base,
        runs=base / "runs",
        shm=base / "shm",
        alice=alice,
        bob=bob,
        alice_run=base / "runs" / "alice" / "main",
        bob_run=base / "runs" / "bob",
        secret=secret,
        decoy=base / "decoy.json",
        etc_targets=etc_targets,
    )
    try:
        base.chmod(0o755)
        _mkdir(w.runs)
        _mkdir(w.shm, 0o1777)  # as /dev/shm
        _mkdir(base / "metrics")
        (base / "agent.py").write_text(AGENT)
        (base / "agent.py").chmod(0o644)
        # Root-only, and JSON a status reader would take: {"run_id": secret} in the metrics
        # textfile (0644) would hand it to anyone.
        w.decoy.write_bytes(
            json.dumps({"protocol": 1, "run_id": secret.decode(), "state": "running"}).encode()
        )
        w.decoy.chmod(0o600)

        _mkdir(w.bob_run, 0o700)  # Bob's run is his alone: Alice cannot even read it
        (w.bob_run / "ckptd.toml").write_text("")
        for path in (w.bob_run, w.bob_run / "ckptd.toml"):
            os.chown(path, bob.uid, bob.gid)
        _mkdir(w.runs / "scratch", 0o1777)  # a root-owned scratch folder anyone may write
        _mkdir(w.alice_area)
        os.chown(w.alice_area, alice.uid, alice.gid)
        as_user(alice, lambda: _alice_before_start(w))
        w.planted.update({w.alice_area / "open", w.runs / "scratch" / "ckptd.toml", w.shm / "ckptd-planted"})

        env = {**os.environ, "CKPTD_SHM_ROOT": str(w.shm), "HOME": "/"}
        text = node_config(
            w.runs, keep_last=1, every=10, extra=f'metrics_textfile = "{base}/metrics/ckptd.prom"'
        )
        (base / "node.toml").write_text(text)
        (base / "node.toml").chmod(0o644)  # the workers read it as their user
        w.node = _node(base, python, env)
        wait_for(
            lambda: daemon_alive(RunPaths(w.alice_run)) and daemon_alive(RunPaths(w.bob_run)),
            timeout=120,
            what=w.log,
        )
        script = base / "agent.py"
        w.agents["alice"] = Agent(python, alice, w.alice_run, script, env, base / "agent-alice.log")
        w.agents["bob"] = Agent(python, bob, w.bob_run, script, env, base / "agent-bob.log")
        w.baseline()
        yield w
        for agent in w.agents.values():
            agent.close()
        assert w.node.stop(90) == 0, w.log()
    finally:
        for agent in w.agents.values():
            with contextlib.suppress(Exception):
                agent.proc.kill()
        if w.node is not None and w.node.proc.poll() is None:
            w.node.proc.kill()
            w.node.proc.wait()
        for target in etc_targets:  # only there if ckptd was made to write /etc: clean up anyway
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
        subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=False)


def _node(base: Path, python: str, env: dict[str, str]) -> Node:
    """``tests.test_serve.Node``, started with ``python`` (its own uses ``sys.executable``)."""
    node = Node.__new__(Node)
    node.config = base / "node.toml"
    node.output = base / f"serve-{time.monotonic_ns()}.log"
    with node.output.open("wb") as out:
        node.proc = subprocess.Popen(
            [python, "-m", "ckptd", "serve", "--config", str(node.config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd="/",
        )
    return node


def _alice_before_start(w: World) -> None:
    """Alice's runs and what she plants before the node daemon starts (as Alice)."""
    area = w.alice_area
    runs = {
        "main": "",
        "linked": "",
        "store-etc": f'[run]\nstore = "{w.etc_targets[0]}"\n',
        "store-bob": '[run]\nstore = "../../bob/checkpoints"\n',  # ../ out of her folder
        "store-bob-new": f'[run]\nstore = "{w.bob_run / "from-alice"}"\n',
        "log-shadow": f'[run]\nlog = "{SHADOW}"\n',
        "open": "",
        "runfile-link": None,
    }
    for name, text in runs.items():
        (area / name).mkdir()
        if text is None:
            (area / name / "ckptd.toml").symlink_to(SHADOW)
        else:
            (area / name / "ckptd.toml").write_text(text)
    (area / "open").chmod(0o777)  # anyone could have written its run file
    (w.runs / "scratch" / "ckptd.toml").write_text(f'[run]\nstore = "{w.etc_targets[1]}"\n')
    # A store temp dir ckptd's start cleans up, that is a link to Bob's store.
    store = area / "main" / "checkpoints"
    store.mkdir()
    (store / ".tmp-00000001-evil").symlink_to(w.bob_run / "checkpoints")
    # An orphan staging dir the root daemon's sweep removes: links inside, to Bob's run and /etc.
    planted = w.shm / "ckptd-planted"
    planted.mkdir(mode=0o700)
    (planted / "run.json").write_text(json.dumps({"run_dir": str(area / "gone"), "run_id": "planted"}))
    (planted / "slot-0").symlink_to(w.bob_run)
    (planted / "slot-1").symlink_to("/etc")
    for path in (*planted.iterdir(), planted):
        _old(path)


# -- the rounds ---------------------------------------------------------------------------------


def test_alices_legitimate_captures_are_stored_as_alice(world: World) -> None:
    """The positive control: the same daemon serves both users' captures, as each user."""
    world.check()  # one eval of each, captured
    for run, owner in ((world.alice_run, world.alice), (world.bob_run, world.bob)):
        status = json.loads(RunPaths(run).status.read_text())
        assert world.node is not None and status["pid"] != world.node.proc.pid, "served by a worker"
        made = tree(run)
        for staging in world.owned_shm(owner):
            made.update(tree(staging))
        assert {uid for _kind, _mode, uid, _what in made.values()} == {owner.uid}, made
        assert any("/.ckptd/" in name for name in made) and any("/checkpoints/step-" in name for name in made)
    assert world.step - 10 in steps(world.bob_run) and world.step in steps(world.alice_run)
    # What Alice planted before the start: the root sweep removed her orphan staging dir (so it
    # ran, as root) without following its links; the store's start kept the linked temp dir.
    assert not (world.shm / "ckptd-planted").exists(), world.log()
    assert (world.alice_run / "checkpoints" / ".tmp-00000001-evil").is_symlink()
    world.planted.discard(world.shm / "ckptd-planted")


def _ack(name: str, slot: str, files: dict[str, int]) -> dict[str, Any]:
    step = int(name.removeprefix("step-"))
    return Ack(name=name, captured_step=step, slot=slot, files=files, token="").to_json()


def test_acks_and_slots_aimed_at_shadow_or_bob_are_refused(world: World) -> None:
    paths = RunPaths(world.alice_run)
    staging = world.staging_of(world.alice_run)
    bob_checkpoint = next((world.bob_run / "checkpoints").glob("step-*")) / "tensors.safetensors"
    size = len(world.decoy.read_bytes())
    attacks = {
        # name: (slot, files)
        "step-9001": ("/etc/shadow", {"shadow": 10}),
        "step-9002": ("../../../bob/checkpoints", {"tensors.safetensors": 10}),
        "step-9003": ("slot-3", {"../../../../etc/shadow": 10}),
        "step-9004": ("slot-4", {"tensors.safetensors": 10}),  # the file: a link to /etc/shadow
        "step-9005": ("slot-5", {"shadow": 10}),  # the slot: a link to /etc
        "step-9006": ("slot-6", {"tensors.safetensors": 10}),  # the file: a link to Bob's checkpoint
        "step-9008": ("slot-8", {"tensors.safetensors": 10}),  # the slot: a link to Bob's store
    }
    hard = "step-9007"  # disk-7's file: a hard link to a root-only file

    def plant() -> str:
        (staging / "slot-3").mkdir()
        (staging / "slot-4").mkdir()
        (staging / "slot-4" / "tensors.safetensors").symlink_to(SHADOW)
        (staging / "slot-5").symlink_to("/etc")
        (staging / "slot-6").mkdir()
        (staging / "slot-6" / "tensors.safetensors").symlink_to(bob_checkpoint)
        (staging / "slot-8").symlink_to(bob_checkpoint.parent)
        disk = paths.meta / "staging" / "disk-7"
        disk.mkdir(parents=True)
        try:  # the kernel's protected_hardlinks should refuse this
            os.link(SHADOW, disk / "tensors.safetensors")
            linked = "linked"
        except OSError as exc:
            linked = errno.errorcode.get(exc.errno or 0, str(exc))
        (paths.acks / "step-9009.json").symlink_to(SHADOW)  # the ack itself: a link
        return linked

    linked = as_user(world.alice, plant)
    protected = Path("/proc/sys/fs/protected_hardlinks").read_text().strip()
    assert linked == "EPERM" or protected == "0", (linked, protected)
    # Where the kernel refuses, the attack needs a file system that allows it (or an old
    # kernel): root makes the link Alice could have made there, to a root-only file.
    target = paths.meta / "staging" / "disk-7" / "tensors.safetensors"
    if linked != "linked":
        os.link(world.decoy, target)
    world.planted.add(target)

    def write_acks() -> None:
        for name, (slot, files) in {**attacks, hard: ("disk-7", {"tensors.safetensors": size})}.items():
            path = paths.acks / f"{name}.json"
            path.write_text(json.dumps(_ack(name, slot, files)))
            _old(path)  # not young: judged at once

    as_user(world.alice, write_acks)
    rejected = [*attacks, "step-9009"]
    wait_for(
        lambda: all((paths.acks / f"{n}.json.rejected").exists() for n in rejected),
        timeout=40,
        what=lambda: f"{sorted(p.name for p in paths.acks.iterdir())}\n{world.log()}",
    )
    wait_for(world.says("persisting step 9007"), what=world.log)
    assert "Permission denied" in world.log().split("persisting step 9007", 1)[1].splitlines()[0]
    assert not {9001, 9002, 9003, 9004, 9005, 9006, 9007, 9008, 9009} & set(steps(world.alice_run))
    assert (paths.acks / "step-9009.json.rejected").is_symlink()  # set aside, never written through
    # Alice takes the ack back: a persist retried forever would hold the drain at the end.
    as_user(world.alice, lambda: (paths.acks / f"{hard}.json").unlink())
    world.check()


def test_links_in_alices_store_and_staging_are_never_deleted_through(world: World) -> None:
    bob_checkpoint = next((world.bob_run / "checkpoints").glob("step-*"))
    store = world.alice_run / "checkpoints"
    linked = world.alice_area / "linked"
    links = {
        store / "step-00000001": bob_checkpoint,  # named like a checkpoint rotation would delete
        store / "step-00000002": Path("/etc"),
        store / "bobs": world.bob_run / "checkpoints",
    }

    def plant() -> None:
        for link, target in links.items():
            link.symlink_to(target)

    as_user(world.alice, plant)
    before = steps(world.alice_run)
    world.eval("alice", loss=0.0)  # a new best and last: the older ones are rotated out
    wait_for(
        lambda: steps(world.alice_run) == [world.step], timeout=30, what=lambda: f"{steps(world.alice_run)}"
    )
    assert before and world.step not in before
    assert all(link.is_symlink() and os.readlink(link) == str(t) for link, t in links.items())

    # A run whose staging dirs Alice swapped for links to Bob's: when it stops (she opts out),
    # its daemon removes its idle slots, and must not remove through them.
    wait_for(lambda: daemon_alive(RunPaths(linked)), timeout=30, what=world.log)
    shm_staging = world.staging_of(linked)
    bob_staging = world.staging_of(world.bob_run)
    disk_staging = RunPaths(linked).meta / "staging"

    def swap() -> None:
        shutil.rmtree(shm_staging)
        shm_staging.symlink_to(bob_staging)
        disk_staging.symlink_to(world.bob_run / "checkpoints")
        (linked / "ckptd.toml").unlink()  # opts out: its daemon stops

    as_user(world.alice, swap)
    wait_for(lambda: state_of(linked) == "stopped", timeout=30, what=world.log)
    assert world.log().count("is a symbolic link; left alone") >= 2, world.log()
    assert shm_staging.is_symlink() and disk_staging.is_symlink()
    world.check()


def test_run_files_aimed_at_etc_or_bob_are_not_obeyed(world: World) -> None:
    area = world.alice_area
    refused = ["store-etc", "store-bob", "store-bob-new"]
    # Each refused by Alice's worker (it cannot write there), said in the node's log.
    for name in refused:
        wait_for(world.says(f"{area / name}: not served"), what=world.log)
        assert not RunPaths(area / name).state.exists()
    assert not any(os.path.lexists(p) for p in world.etc_targets), "a store was made in /etc"
    assert not (world.bob_run / "from-alice").exists()
    assert not (area / "runfile-link" / ".ckptd").exists()  # its run file is /etc/shadow
    # A run dir others may write, and a run file Alice dropped in root's scratch dir: no daemon
    # touches them (a root one would have written the store that file names in /etc).
    assert not (area / "open" / ".ckptd").exists() and not (world.runs / "scratch" / ".ckptd").exists()
    # The log is /etc/shadow: Alice's worker cannot read it, and says so nowhere she can read.
    wait_for(world.says(str(SHADOW)), what=world.log)

    # A status file that links to a root-only JSON file, in a run the root daemon lists for
    # metrics (a candidate nobody serves): the world-readable textfile must not show it.
    def plant() -> None:
        meta = RunPaths(area / "store-etc").meta
        meta.mkdir(mode=0o700)
        (meta / "status.json").symlink_to(world.decoy)

    as_user(world.alice, plant)
    prom = world.base / "metrics" / "ckptd.prom"
    written = prom.stat().st_mtime_ns if prom.exists() else 0
    wait_for(lambda: prom.exists() and prom.stat().st_mtime_ns != written, timeout=10)
    wait_for(lambda: str(world.bob_run) in prom.read_text(), timeout=10, what=prom.read_text)
    world.check()
