"""Bad and hostile input (issue 13, part 4): every reader of a file ckptd does not fully control,
fed what an attacker, a crash or an editor may leave, answers with well-typed values or its
module's one clear error, never hangs, and nothing ckptd does follows a link out of its roots.

What tests/test_readers.py, test_properties.py, test_faults.py, test_defects_daemon.py,
test_remote.py and test_sharded_store.py cover already is not repeated here: this file takes the
config files and variables, ``uploads.json``, the shard markers, remote manifests and listings,
files that are huge, nested, FIFOs or ``/dev/zero`` in place of each JSON file, symbolic links
planted in a file:// remote, the store and the staging area, and the modes of what a real daemon
and a real capture create under ``umask 000``.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptd.config import RunConfig
from ckptd.errors import ConfigError, ProtocolError, StoreError
from ckptd.protocol import (
    PROTOCOL_VERSION,
    RunPaths,
    atomic_write_json,
    pending_ack_paths,
    read_ack,
    read_control,
    read_pending_uploads,
)
from ckptd.remote import RemoteError, RemoteStore
from ckptd.settings import RUN_KEYS, SERVE_KEYS, ServeSettings, environment_layer, load_file, run_config
from ckptd.store import MANIFEST, SHARD_PREFIX, Store
from tests.conftest import wait_for
from tests.test_readers import JSON_VALUES, VALID_MANIFEST, corrupted

SETTINGS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
RUN_ID = "r"  # the run id every checkpoint made here carries (the store's lineage)


def checkpoint(store: Store, step: int, nbytes: int = 64) -> str:
    """A committed local checkpoint, as the persister makes one."""
    source = store.root.parent / f"src-{step}"
    source.write_bytes(os.urandom(nbytes))
    with store.writing(step) as pending:
        pending.copy_in("tensors.safetensors", source, nbytes)
        record = store.commit(pending, {"tags": [], "metrics": {"loss": step / 1000}, "run_id": RUN_ID})
    return record.name


def tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` (links as their target, never followed), to compare before and after."""
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = f"-> {os.readlink(path)}"
        elif path.is_file():
            out[key] = path.read_bytes()
        else:
            out[key] = "dir"
    return out


def finishes(call: Callable[[], object], seconds: float = 20.0) -> object:
    """``call()``'s result or exception, asserting it returns at all: a FIFO read would hang."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # handed to the test, which says what was allowed
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still reading after {seconds} s: a FIFO or endless file was waited on"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


# -- config files and variables (hypothesis) -----------------------------------------------------


def toml_value(value: object) -> str:
    """``value`` as a TOML literal: JSON's escapes are TOML's, NaN and infinities are TOML words."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (int, str)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return '""'  # null has no TOML form


TOML_VALUES = st.recursive(
    st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.just(10**400)  # TOML integers are unbounded in tomllib: past any float
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10)
    | st.sampled_from(["\x00", "a\x00b", "/abs", "..", "min", "max", "x:min:3", "file:///x", "jsonl", "("]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
KEY_NAMES = st.sampled_from([*RUN_KEYS, *SERVE_KEYS, "dir", "bogus"])


@st.composite
def config_documents(draw: st.DrawFn) -> str:
    """A ckptd.toml: known tables with known and unknown keys of any value, or text cut anywhere."""
    lines = []
    for table in draw(st.lists(st.sampled_from(["run", "serve", "other"]), unique=True, max_size=2)):
        lines.append(f"[{table}]")
        for key, value in draw(st.dictionaries(KEY_NAMES, TOML_VALUES, max_size=5)).items():
            lines.append(f"{key} = {toml_value(value)}")
    text = "\n".join(lines) + "\n"
    if draw(st.integers(0, 9)) == 0:  # one document in ten cut short or spliced with garbage
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=8))
    return text


@SETTINGS
@given(document=config_documents())
def test_any_config_file_gives_checked_settings_or_a_config_error(
    tmp_path_factory: pytest.TempPathFactory, document: str
) -> None:
    run = tmp_path_factory.mktemp("run")
    path = run / "ckptd.toml"
    path.write_text(document, errors="surrogatepass")
    try:
        loaded = load_file(path)
        serve = loaded.serve_settings() if loaded.serve else None
        config = run_config(run, dict(loaded.run))
    except ConfigError as exc:
        assert str(path) in str(exc) or "--" in str(exc), "the error names the file or the option"
        return
    assert isinstance(config, RunConfig) and config.store.is_absolute() and config.log.is_absolute()
    assert "\x00" not in str(config.store) and "\x00" not in str(config.log)
    assert config.keep_last >= 0 and 0 < config.poll_interval <= 1e7 and config.criteria
    if serve is not None:
        assert isinstance(serve, ServeSettings) and serve.roots
        assert all(isinstance(root, Path) and root.is_absolute() for root in serve.roots)
        assert 0 < serve.scan_interval <= 1e7 and isinstance(serve.max_runs, int)


@SETTINGS
@given(
    environ=st.dictionaries(
        st.sampled_from([f"CKPTD_{key.upper()}" for key in RUN_KEYS]),
        st.text(min_size=1, max_size=12).filter(lambda t: "\x00" not in t)
        | st.sampled_from(["[" * 3000, "{a=" * 3000, "9" * 400, "1e400", "nan", "inf", "{}", "[]"]),
        max_size=4,
    )
)
def test_any_ckptd_variable_gives_a_checked_value_or_a_config_error(
    tmp_path_factory: pytest.TempPathFactory, environ: dict[str, str]
) -> None:
    try:
        layer = environment_layer(environ)
    except ConfigError as exc:
        assert str(exc).startswith("$CKPTD_"), "the error names the variable"
        return
    for name, value in layer.items():
        assert RUN_KEYS[name].check(value), name
    with contextlib.suppress(ConfigError):  # a layer of good values may still not make a run (no metric)
        run_config(tmp_path_factory.mktemp("run"), layer)


# -- uploads.json, shard markers (hypothesis) -----------------------------------------------------


@SETTINGS
@given(
    content=st.one_of(
        JSON_VALUES.map(json.dumps),
        st.lists(
            JSON_VALUES | st.sampled_from(["step-00000001", "../step-1", "step-1/../../x"]), max_size=4
        ).map(lambda names: json.dumps({"pending": names})),
        st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
    )
)
def test_uploads_json_gives_checkpoint_names_or_a_protocol_error(
    tmp_path_factory: pytest.TempPathFactory, content: str
) -> None:
    paths = RunPaths(tmp_path_factory.mktemp("run"))
    paths.meta.mkdir()
    paths.uploads.write_text(content, errors="surrogatepass")
    try:
        names = read_pending_uploads(paths)
    except ProtocolError:
        return
    assert all(isinstance(n, str) and n.startswith("step-") and "/" not in n for n in names)


VALID_MARKER: dict[str, Any] = {
    "capture": "cap",
    "rank": 0,
    "world_size": 1,
    "step": 7,
    "files": {"__0_0.distcp": {"bytes": 4, "xxh3_128": "00"}},
    "manifest": {"format": 1, "step": 7, "run_id": RUN_ID, "tags": [], "metrics": {}, "created": 1.0},
}


@SETTINGS
@given(
    marker=corrupted(VALID_MARKER)
    | st.sampled_from(
        [{**VALID_MARKER, "world_size": 2**62}, {**VALID_MARKER, "world_size": 2**40, "rank": 0}]
    )
)
def test_a_rank_marker_gives_a_commit_nothing_or_a_store_error_at_once(
    tmp_path_factory: pytest.TempPathFactory, marker: dict[str, Any]
) -> None:
    store = Store(tmp_path_factory.mktemp("store"))
    store.ensure()
    shard = store.root / f"{SHARD_PREFIX}cap"
    shard.mkdir()
    (shard / "__0_0.distcp").write_bytes(b"abcd")
    (shard / ".rank-0.json").write_text(json.dumps(marker))
    # A marker another node wrote may claim a world of 2**62 ranks: never a list or set that big.
    missing = finishes(lambda: store.missing_ranks("cap"), 10)
    assert missing is None or (isinstance(missing, list) and len(missing) < 2**20)
    try:
        record = finishes(lambda: store.commit_shards("cap"), 10)
    except StoreError:
        return
    assert record is None or record.step >= 0  # type: ignore[attr-defined]


# -- remote manifests and listings (hypothesis) ---------------------------------------------------


@SETTINGS
@given(
    manifest=corrupted(VALID_MANIFEST)
    | corrupted({**VALID_MANIFEST, "files": {"../../escape": {"bytes": 3, "xxh3_128": "00"}}})
    | JSON_VALUES
)
def test_a_remote_manifest_gives_a_record_or_a_remote_error_and_pull_writes_only_its_dir(
    tmp_path_factory: pytest.TempPathFactory, manifest: Any
) -> None:
    base = tmp_path_factory.mktemp("remote")
    remote_dir = base / "remote" / "step-00000750"
    remote_dir.mkdir(parents=True)
    (remote_dir / "tensors.safetensors").write_bytes(b"0123456789")
    (remote_dir / MANIFEST).write_text(json.dumps(manifest))
    remote = RemoteStore(f"file://{base}/remote")
    for record in remote.list():  # an unreadable manifest is left out, never raised
        assert (
            isinstance(record.step, int) and isinstance(record.run_id, str) and record.name == "step-00000750"
        )
    before = tree(base)
    with contextlib.suppress(RemoteError):
        remote.verify("step-00000750")
    with contextlib.suppress(RemoteError):
        remote.download("step-00000750", base / "pulled")
    after = tree(base)
    assert {k: v for k, v in after.items() if not k.startswith("pulled")} == before, "written outside"


@SETTINGS
@given(
    entries=st.lists(
        st.sampled_from(
            ["../step-00000001", "/step-00000002", "/etc/passwd", "step-00000003/../..", "..", "."]
        )
        | st.text(max_size=30)
        | st.just("step-" + "9" * 5000),
        max_size=6,
    )
)
def test_hostile_listing_names_are_never_checkpoints(entries: list[str]) -> None:
    remote = RemoteStore("memory://hostile-listing")
    remote.fs.ls = lambda *args, **kwargs: [f"{remote.root}/{e}" for e in entries] + entries
    remote.fs.invalidate_cache = lambda *args: None
    # Every name is looked up under the remote's root and has no manifest there: nothing listed,
    # nothing raised, whatever the backend's listing holds.
    assert finishes(remote.list) == []


# -- huge, nested, FIFO, /dev/zero in place of every JSON file -------------------------------------


def plant(path: Path, kind: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "huge":  # a sparse 100 MB file that starts like JSON: no disk, all of it to read
        path.write_text('{"protocol": 1, "format": 1, "pad": "')
        os.truncate(path, 100 << 20)
    elif kind == "nested":
        path.write_text("[" * 300_000 + "]" * 300_000)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")


def _ack(tmp: Path) -> Callable[[], object]:
    path = tmp / "acks" / "7.json"
    return lambda: read_ack(path)


def _control(tmp: Path) -> Callable[[], object]:
    path = tmp / "control.json"
    return lambda: read_control(path)


def _state(tmp: Path) -> Callable[[], object]:
    from ckptd.daemon.state import load_state

    path = tmp / "state.json"
    return lambda: load_state(path)  # None: set aside (test_issue7_06 checks where it went)


def _manifest(tmp: Path) -> Callable[[], object]:
    store = Store(tmp / "store")
    return lambda: (store.list(), store.read("step-00000001"))


def _owner(tmp: Path) -> Callable[[], object]:
    store = Store(tmp / "store")
    return store.lineage


def _uploads(tmp: Path) -> Callable[[], object]:
    return lambda: read_pending_uploads(RunPaths(tmp))


def _marker(tmp: Path) -> Callable[[], object]:
    store = Store(tmp / "store")
    return lambda: store.commit_shards("cap")


def _remote_manifest(tmp: Path) -> Callable[[], object]:
    remote = RemoteStore(f"file://{tmp}/remote")
    return lambda: (remote.list(), remote.manifest("step-00000001"))


def _config(tmp: Path) -> Callable[[], object]:
    return lambda: load_file(tmp / "ckptd.toml")


READERS: dict[str, tuple[str, Callable[[Path], Callable[[], object]], tuple[type[BaseException], ...]]] = {
    "ack": ("acks/7.json", _ack, (ProtocolError,)),
    "control": ("control.json", _control, (ProtocolError,)),
    "state": ("state.json", _state, ()),
    "manifest": ("store/step-00000001/MANIFEST.json", _manifest, (StoreError,)),
    "store-owner": ("store/.ckptd-store.json", _owner, ()),
    "uploads": (".ckptd/uploads.json", _uploads, (ProtocolError,)),
    "rank-marker": (f"store/{SHARD_PREFIX}cap/.rank-0.json", _marker, (StoreError,)),
    "remote-manifest": ("remote/step-00000001/MANIFEST.json", _remote_manifest, (RemoteError,)),
    "config": ("ckptd.toml", _config, (ConfigError,)),
}


@pytest.mark.parametrize("kind", ["huge", "nested", "fifo", "dev-zero"])
@pytest.mark.parametrize("reader", READERS)
def test_a_huge_nested_fifo_or_endless_file_is_refused_at_once(
    tmp_path: Path, reader: str, kind: str
) -> None:
    where, make, allowed = READERS[reader]
    plant(tmp_path / where, kind)
    read = make(tmp_path)
    try:
        result = finishes(read)
    except allowed:
        return
    # Readers that answer instead of raising (a state set aside, an owner file ignored) answer
    # "nothing": never the planted content.
    assert result in (None, frozenset()), result


# -- hostile file:// remotes against the CLI and the uploader -------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptd", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def hostile_remote(tmp_path: Path) -> Iterator[tuple[Path, Path, Path, Store]]:
    """A run whose store holds step 100, a file:// remote holding our step 100 and every kind of
    hostile entry, and an ``outside`` folder the links point into; yields (run, remote, outside, store)."""
    run = tmp_path / "run"
    run.mkdir()
    store = Store(run / "checkpoints")
    store.ensure()
    store.claim(RUN_ID, run)
    ours = checkpoint(store, 100)
    remote = tmp_path / "remote"
    remote.mkdir()
    RemoteStore(f"file://{remote}").upload(store, ours)

    outside = tmp_path / "outside"
    outside.mkdir()
    # Another of our checkpoints elsewhere (a second remote, the local store): a remote dir
    # linking to it must be neither listed, verified, pulled, nor deleted through.
    elsewhere = Store(outside / "store")
    elsewhere.ensure()
    linked = checkpoint(elsewhere, 5)  # the best loss of all: best --remote must not pick it
    (remote / "step-00000005").symlink_to(elsewhere.path_of(linked), target_is_directory=True)
    # A checkpoint whose manifest names a path out of it, and sizes that lie.
    escape = remote / "step-00000200"
    escape.mkdir()
    files = {"../../outside/victim": {"bytes": 6, "xxh3_128": "00"}}
    (escape / MANIFEST).write_text(
        json.dumps({**VALID_MANIFEST, "step": 200, "run_id": RUN_ID, "files": files})
    )
    lying = remote / "step-00000300"
    lying.mkdir()
    (lying / "tensors.safetensors").write_bytes(b"short")
    entry = {"bytes": 10**12, "xxh3_128": "00"}
    (lying / MANIFEST).write_text(
        json.dumps({**VALID_MANIFEST, "step": 300, "run_id": RUN_ID, "files": {"tensors.safetensors": entry}})
    )
    # Another run's checkpoint with a better loss; a manifest past the size limit; non-dict JSON.
    theirs = remote / "step-00000010"
    theirs.mkdir()
    shutil_copy_manifest(remote / ours, theirs, run_id="someone-else", loss=0.0)
    huge = remote / "step-00000400"
    huge.mkdir()
    (huge / MANIFEST).write_text("{")
    os.truncate(huge / MANIFEST, 100 << 20)
    (remote / "step-00000500").mkdir()
    (remote / "step-00000500" / MANIFEST).write_text("[1, 2]")
    (outside / "victim").write_text("victim")
    yield run, remote, outside, store


def shutil_copy_manifest(source: Path, target: Path, *, run_id: str, loss: float) -> None:
    """A copy of checkpoint ``source`` in ``target`` that names another run and metric."""
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    manifest = json.loads((target / MANIFEST).read_text())
    (target / MANIFEST).write_text(json.dumps({**manifest, "run_id": run_id, "metrics": {"loss": loss}}))


def test_ls_best_pull_and_verify_refuse_hostile_remote_entries_and_write_nothing_outside(
    tmp_path: Path, hostile_remote: tuple[Path, Path, Path, Store]
) -> None:
    run, remote, outside, _ = hostile_remote
    url = f"file://{remote}"
    before = tree(outside)

    listed = cli("ls", str(run), "--remote", url, "--json")
    assert listed.returncode == 0, listed.stderr
    shown = {e["name"] for e in json.loads(listed.stdout)}
    # Only our own whole checkpoints: no link out, no other run's, no unreadable manifest.
    assert "step-00000005" not in shown and "step-00000010" not in shown
    assert not shown & {"step-00000400", "step-00000500"}

    best = cli("best", str(run), "--remote", url, "--metric", "loss:min")
    assert best.returncode == 0 and best.stdout.strip() == f"{url}/step-00000100", best.stdout + best.stderr

    for name, code in (
        ("step-00000200", 4),
        ("step-00000300", 5),
        ("step-00000005", 1),
        ("step-00000400", 1),
    ):
        target = tmp_path / f"pulled-{name}"
        pulled = cli("pull", str(run), name, "--remote", url, "--to", str(target))
        assert pulled.returncode == code, (name, pulled.returncode, pulled.stderr)
        assert "Traceback" not in pulled.stderr and not target.exists()
        assert not list(tmp_path.glob(f".pulled-{name}.pulling-*")), "the partial dir is removed"
    good = cli("pull", str(run), "step-00000100", "--remote", url, "--to", str(tmp_path / "good"))
    assert good.returncode == 0 and (tmp_path / "good" / "tensors.safetensors").is_file(), good.stderr

    verified = cli("verify", str(run), "--remote", url, "--json")
    results = {r["name"]: r["ok"] for r in json.loads(verified.stdout)}
    assert verified.returncode == 5 and results["step-00000100"] is True
    assert results.get("step-00000300") is False and results.get("step-00000200") is False
    assert "step-00000005" not in results, "a checkpoint dir linking out of the remote is not the remote's"
    assert cli("verify", str(run), "--remote", url, "step-00000005").returncode == 2
    assert tree(outside) == before


def test_the_uploader_never_writes_or_deletes_through_links_planted_in_its_remote(
    tmp_path: Path, hostile_remote: tuple[Path, Path, Path, Store]
) -> None:
    from ckptd.daemon.uploader import Uploader
    from ckptd.policy import best_plus_last

    run, remote, outside, store = hostile_remote
    # An upload cut short would leave step 600 without a manifest; a planted one has its file
    # linking to a victim (the upload would write through it) and step 700's dir links out.
    victim_dir = outside / "dir"
    victim_dir.mkdir()
    (remote / "step-00000600").mkdir()
    (remote / "step-00000600" / "tensors.safetensors").symlink_to(outside / "victim")
    (remote / "step-00000700").symlink_to(victim_dir, target_is_directory=True)
    for step in (600, 700, 800, 900):
        checkpoint(store, step)
    before = tree(outside)
    paths = RunPaths(run)
    paths.meta.mkdir(exist_ok=True)
    uploader = Uploader(
        RemoteStore(f"file://{remote}"), store, paths, best_plus_last({}, 1),
        lineage=frozenset({RUN_ID}), best_steps=frozenset,
    )  # fmt: skip
    uploader.start()
    try:
        wait_for(lambda: "step-00000900" not in (uploader.held() or {"step-00000900"}), timeout=30)
        wait_for(lambda: uploader.report()["uploaded"] >= 1, timeout=30, what=str(uploader.report()))
    finally:
        uploader.stop()
    assert tree(outside) == before, "nothing written or deleted outside the remote"
    on_remote = {r.name for r in RemoteStore(f"file://{remote}").list()}
    assert "step-00000900" in on_remote, uploader.report()
    assert (remote / "step-00000005").is_symlink(), "rotation never removes what it did not list"


# -- the daemon attacked: staging, store, acks ------------------------------------------------------


def _fake_slot_file(path: Path, token: str) -> int:
    """A safetensors file with ``token`` in its header, as a trainer's slot holds one."""
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(4, dtype=np.float32)}, str(path), metadata={"token": token})
    return path.stat().st_size


@pytest.mark.slow
def test_the_daemon_refuses_linked_slots_planted_store_links_and_bad_acks_and_lives(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    nbytes = _fake_slot_file(outside / "tensors.safetensors", "tok")
    # Our own checkpoint, linked into the store from outside: rotation with keep-last 1 must
    # never delete through the link, and list must not count it.
    elsewhere = Store(outside / "store")
    elsewhere.ensure()
    linked = checkpoint(elsewhere, 1)
    daemon = daemons(run, "--every-steps", "1", "--keep-last", "1")
    run_id = json.loads(RunPaths(run).state.read_text())["run_id"]
    store = Store(run / "checkpoints")
    (store.root / "step-00000001").symlink_to(elsewhere.path_of(linked), target_is_directory=True)
    before = tree(outside)
    paths = RunPaths(run)

    # A slot directory that links out of the staging area, holding a file whose token matches.
    staging = shm_root / f"ckptd-{run_id}"
    (staging / "slot-5").symlink_to(outside, target_is_directory=True)
    ack = {"protocol": PROTOCOL_VERSION, "captured_step": 5, "slot": "slot-5", "created": 1.0, "token": "tok"}
    atomic_write_json(
        paths.acks / "step-5.json", {**ack, "name": "step-5", "files": {"tensors.safetensors": nbytes}}
    )
    # Another protocol version; a 100 MB ack; a nested one; a FIFO; /dev/zero behind a link.
    atomic_write_json(paths.acks / "step-6.json", {**ack, "protocol": 2, "name": "step-6", "slot": "slot-0"})
    for name, kind in (("step-7", "huge"), ("step-8", "nested"), ("step-9", "fifo"), ("step-10", "dev-zero")):
        plant(paths.acks / f"{name}.json", kind)
    for step in (5, 6, 7, 8):
        wait_for(
            lambda s=step: (paths.acks / f"step-{s}.json.rejected").exists(), timeout=30, what=daemon.log()
        )
    wait_for(lambda: not pending_ack_paths(paths), timeout=30, what=f"every ack handled\n{daemon.log()}")
    assert daemon.proc.poll() is None
    assert json.loads(paths.status.read_text())["heartbeat"], "the heartbeat goes on"
    said = daemon.log()
    assert "slot-5 is not a plain directory" in said, "refused for the link, not for a token"
    assert "protocol version 2 is not understood" in said and "larger than" in said
    assert store.list() == [], "nothing copied from outside the staging area"
    assert daemon.stop() == 0, daemon.log()
    assert tree(outside) == before
    assert (store.root / "step-00000001").is_symlink()


@pytest.mark.slow
def test_nothing_a_daemon_and_a_capture_create_under_umask_000_is_world_writable(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    torch = pytest.importorskip("torch")
    from ckptd import CheckpointClient

    run = tmp_path / "run"
    run.mkdir()
    (run / "logging.jsonl").write_text("")
    old = os.umask(0)  # the daemon inherits it; the client in this process runs under it too
    try:
        daemon = daemons(run, "--every-steps", "1")
        with CheckpointClient(run) as client:
            assert client.maybe_snapshot(1, lambda: {"w": torch.ones(4), "step": 1})
            wait_for(lambda: not pending_ack_paths(RunPaths(run)), what="the persist")
        assert len(Store(run / "checkpoints").list()) == 1
        run_id = json.loads(RunPaths(run).state.read_text())["run_id"]
        staging = shm_root / f"ckptd-{run_id}"
        assert staging.is_dir()
        open_to_all = [
            f"{path} {stat.filemode(path.lstat().st_mode)}"
            for root in (run / ".ckptd", run / "checkpoints", staging)
            for path in [root, *root.rglob("*")]
            if not path.is_symlink() and path.lstat().st_mode & stat.S_IWOTH
        ]
        assert daemon.stop() == 0, daemon.log()
    finally:
        os.umask(old)
    assert open_to_all == [], "\n".join(open_to_all)
