"""The remote tier against a real S3-speaking server (moto, in server mode, on localhost),
through the real s3fs client: uploads, manifest-last visibility, two retention policies, a
server gone mid-upload, a daemon killed mid-upload. The endpoint and credentials reach every
process the way they reach a user's: ``AWS_ENDPOINT_URL`` and ``AWS_*`` in the environment.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from ckptd.protocol import RunPaths, read_status
from ckptd.remote import RemoteStore
from ckptd.store import MANIFEST, Store
from tests.conftest import PROGRAMS, wait_for


class S3Server:
    """``python -m moto.server`` on a free port; stop() and start() again on the same port."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    s3 = S3Server()
    s3.start()
    yield s3
    s3.stop()


@pytest.fixture
def bucket(server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; the environment points every client (and every daemon) at the server."""
    import s3fs

    for name, value in {
        "AWS_ENDPOINT_URL": server.url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    name = f"b{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return name


def checkpoint(store: Store, step: int, nbytes: int = 1000) -> str:
    """A committed local checkpoint of ``nbytes`` random bytes (what the persister makes)."""
    source = store.root.parent / f"src-{step}"
    source.write_bytes(os.urandom(nbytes))
    with store.writing(step) as pending:
        pending.copy_in("tensors.safetensors", source, nbytes)
        record = store.commit(pending, {"tags": ["periodic"], "metrics": {}, "run_id": "r"})
    return record.name


def test_an_upload_is_listed_only_whole_verifies_and_pulls_back(tmp_path: Path, bucket: str) -> None:
    store = Store(tmp_path / "store")
    names = [checkpoint(store, step, 3 << 20) for step in (10, 20)]
    remote = RemoteStore(f"s3://{bucket}/runs/a")
    assert remote.list() == []
    for name in names:
        remote.upload(store, name)
    assert [r.name for r in remote.list()] == names
    assert remote.verify(names[0]) == []
    pulled = tmp_path / "pulled"
    remote.download(names[1], pulled)
    assert (pulled / "tensors.safetensors").read_bytes() == (
        store.path_of(names[1]) / "tensors.safetensors"
    ).read_bytes()
    # An upload cut short (files, no manifest) is invisible; a deletion starts with the manifest.
    remote.fs.pipe_file(f"{bucket}/runs/a/step-00000030/tensors.safetensors", b"partial")
    assert [r.name for r in remote.list()] == names
    remote.delete(names[0])
    assert [r.name for r in remote.list()] == names[1:]


def test_a_reader_listing_during_uploads_never_sees_a_checkpoint_without_all_its_files(
    tmp_path: Path, bucket: str
) -> None:
    store = Store(tmp_path / "store")
    names = [checkpoint(store, step, 8 << 20) for step in range(1, 5)]
    url = f"s3://{bucket}/runs/b"
    done = threading.Event()
    seen: list[list[str]] = []
    problems: list[str] = []

    def read() -> None:
        reader = RemoteStore(url)
        while not done.is_set():
            listed = reader.list()
            seen.append([r.name for r in listed])
            for record in listed:  # listed means whole: every file there and intact
                problems.extend(f"{record.name}: {p}" for p in reader.verify(record.name))

    thread = threading.Thread(target=read)
    thread.start()
    writer = RemoteStore(url)
    for name in names:
        writer.upload(store, name)
    done.set()
    thread.join()
    assert not problems
    assert any(0 < len(s) < len(names) for s in seen), "no listing fell between two uploads"
    assert [r.name for r in writer.list()] == names


def scripted(run: Path, evals: list[dict[str, Any]], mb: int = 0) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(PROGRAMS / "scripted_trainer.py"), str(run), json.dumps(evals)]
    if mb:
        argv += ["--mb", str(mb)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)


def remote_report(run: Path) -> dict[str, Any]:
    report = read_status(RunPaths(run)).get("remote")
    return report if isinstance(report, dict) else {}


@pytest.mark.slow
def test_the_daemon_mirrors_commits_with_its_own_remote_retention(
    tmp_path: Path, bucket: str, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    url = f"s3://{bucket}/runs/c"
    daemon = daemons(
        run, "--best", "loss:min", "--best", "acc:max", "--keep-last", "1",
        "--remote", url, "--remote-keep-last", "3",
    )  # fmt: skip
    # Every eval is a best loss (so each is captured); the best accuracy stays at 200.
    evals = [
        {"step": 100 * (i + 1), "loss": 0.9 - 0.1 * i, "acc": acc}
        for i, acc in enumerate([0.5, 0.9, 0.6, 0.7, 0.8, 0.85])
    ]
    scripted(run, evals)
    wait_for(lambda: remote_report(run).get("uploaded") == 6 and not remote_report(run).get("pending"),
             timeout=60, what=daemon.log())  # fmt: skip
    remote = RemoteStore(url)
    # The remote is rotated after the last upload is counted: wait for it, then check exactly.
    wait_for(lambda: [r.step for r in remote.list()] == [200, 400, 500, 600], what=daemon.log())
    kept = [r.step for r in remote.list()]
    assert kept == [200, 400, 500, 600], daemon.log()  # the bests and the last 3
    local = Store(run / "checkpoints")
    # Held until uploaded, then rotated locally: the bests and the last 1.
    wait_for(lambda: [r.step for r in local.list()] == [200, 600], what=daemon.log())
    assert all(remote.verify(f"step-{s:08d}") == [] for s in kept)
    assert daemon.stop() == 0


@pytest.mark.slow
def test_a_server_gone_mid_upload_is_retried_and_the_local_copy_is_held_until_it_is_up(
    tmp_path: Path, server: S3Server, bucket: str, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    url = f"s3://{bucket}/runs/d"
    daemon = daemons(run, "--metric", "loss", "--keep-last", "0", "--remote", url, "--remote-keep-last", "5")
    # Two bests, 64 MiB each: the first upload takes seconds, and the server dies during it.
    trainer = subprocess.Popen(
        [sys.executable, str(PROGRAMS / "scripted_trainer.py"), str(run),
         json.dumps([{"step": 100, "loss": 0.9}, {"step": 200, "loss": 0.5}]), "--mb", "64"],
    )  # fmt: skip
    try:
        wait_for(lambda: remote_report(run).get("uploading") is not None, timeout=60, what=daemon.log())
        server.stop()
        assert trainer.wait(timeout=120) == 0
        wait_for(lambda: bool(remote_report(run).get("last_error")), timeout=60, what=daemon.log())
        # The remote is down: nothing lost locally, both held (keep-last 0 would delete 100).
        wait_for(lambda: [r.step for r in Store(run / "checkpoints").list()] == [100, 200], what=daemon.log())
        assert sorted(remote_report(run)["pending"]) == ["step-00000100", "step-00000200"]
        assert sorted(json.loads(RunPaths(run).uploads.read_text())["pending"]) == sorted(
            remote_report(run)["pending"]
        )
    finally:
        if trainer.poll() is None:
            trainer.kill()
        server.start()
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)  # moto keeps nothing across a restart
    wait_for(lambda: not remote_report(run).get("pending"), timeout=90, what=daemon.log())
    assert [r.step for r in RemoteStore(url).list()] == [100, 200]
    wait_for(lambda: [r.step for r in Store(run / "checkpoints").list()] == [200], timeout=30)
    assert remote_report(run)["last_error"] is None
    assert daemon.stop() == 0


@pytest.mark.slow
def test_a_daemon_killed_mid_upload_resumes_it_and_never_dropped_the_local_copy(
    tmp_path: Path, bucket: str, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    url = f"s3://{bucket}/runs/e"
    args = ("--metric", "loss", "--keep-last", "0", "--remote", url)
    daemon = daemons(run, *args)
    scripted(run, [{"step": 100, "loss": 0.5}], mb=96)
    wait_for(lambda: remote_report(run).get("uploading") == "step-00000100", timeout=60, what=daemon.log())
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    assert RemoteStore(url).list() == []  # nothing half-visible
    assert (Store(run / "checkpoints").path_of("step-00000100") / MANIFEST).is_file()
    assert json.loads(RunPaths(run).uploads.read_text())["pending"] == ["step-00000100"]
    again = daemons(run, *args)
    wait_for(lambda: not remote_report(run).get("pending") and remote_report(run).get("uploaded") == 1,
             timeout=120, what=again.log())  # fmt: skip
    remote = RemoteStore(url)
    assert [r.name for r in remote.list()] == ["step-00000100"] and remote.verify("step-00000100") == []
    assert again.stop() == 0


def ckptd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptd", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_the_cli_shows_where_each_checkpoint_lives_and_pulls_and_verifies_remote_ones(
    tmp_path: Path, bucket: str, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    url = f"s3://{bucket}/runs/f"
    daemon = daemons(run, "--metric", "loss", "--keep-last", "1", "--remote", url, "--remote-keep-last", "3")
    scripted(run, [{"step": s, "loss": loss} for s, loss in ((100, 0.9), (200, 0.8), (300, 0.7))])
    wait_for(lambda: remote_report(run).get("uploaded") == 3 and not remote_report(run).get("pending"),
             timeout=60, what=daemon.log())  # fmt: skip
    wait_for(lambda: [r.step for r in Store(run / "checkpoints").list()] == [300], what=daemon.log())
    status = ckptd("status", str(run)).stdout
    assert f"remote      {url}: 3 uploaded, 0 pending" in status

    listed = json.loads(ckptd("ls", str(run), "--json").stdout)
    assert {e["name"]: e["where"] for e in listed} == {
        "step-00000100": "remote", "step-00000200": "remote", "step-00000300": "both",
    }  # fmt: skip
    assert "WHERE" in ckptd("ls", str(run)).stdout
    best = ckptd("best", str(run), "--remote")
    assert best.returncode == 0 and best.stdout.strip() == f"{url}/step-00000300"

    pulled = tmp_path / "pulled"
    done = ckptd("pull", str(run), "step-00000200", "--to", str(pulled), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["name"] == "step-00000200"
    assert (pulled / MANIFEST).is_file() and len((pulled / "tensors.safetensors").read_bytes()) > 0
    assert ckptd("verify", str(run), "--remote").returncode == 0

    # One flipped byte on the remote: verify --remote and pull both say so; pull leaves nothing.
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    key = f"{bucket}/runs/f/step-00000300/tensors.safetensors"
    data = bytearray(fs.cat_file(key))
    data[-1] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    bad = ckptd("verify", str(run), "--remote", "--json")
    assert bad.returncode == 5 and not {r["name"]: r["ok"] for r in json.loads(bad.stdout)}["step-00000300"]
    refused = ckptd("pull", str(run), "step-00000300", "--to", str(tmp_path / "bad"))
    assert refused.returncode == 5 and not (tmp_path / "bad").exists(), refused.stderr
    assert not list(tmp_path.glob(".bad.pulling-*"))
    assert ckptd("pull", str(run), "step-00000999", "--to", str(tmp_path / "none")).returncode == 1
    assert daemon.stop() == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs: a real filesystem that fills up. Skipped where mounting is refused."""
    mount = tmp_path / "small"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)]
    done = subprocess.run(command, capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_local_disk_while_the_remote_is_down_is_said_in_status(
    tmp_path: Path,
    bucket: str,
    daemons: Any,
    shm_root: Path,
    small_disk: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: every upload fails
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run, "--metric", "loss", "--keep-last", "0", "--store", str(small_disk / "ckpt"),
                     "--remote", f"s3://{bucket}/g")  # fmt: skip
    evals = [{"step": 100 * (i + 1), "loss": 1.0 - 0.1 * i} for i in range(4)]  # 4 bests, 8 MiB each
    scripted(run, evals, mb=8)
    wait_for(lambda: "kept locally until uploaded" in str(read_status(RunPaths(run)).get("last_error")),
             timeout=60, what=daemon.log())  # fmt: skip
    out = ckptd("status", str(run)).stdout
    assert "No space left on device" in out and "pending (kept locally until uploaded)" in out
    kept = [r.step for r in Store(small_disk / "ckpt").list()]
    assert kept and kept == sorted(kept) and 100 in kept  # held: nothing deleted to make room
    assert daemon.stop(timeout=60) == 6  # it stops with acknowledged captures not persisted


def test_a_daemon_without_a_remote_imports_no_storage_backend() -> None:
    code = (
        "import sys, ckptd.daemon.run, ckptd.daemon.uploader, ckptd.remote, ckptd.cli;"
        "print([m for m in ('fsspec', 's3fs', 'botocore', 'aiobotocore') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


# -- the uploader on its own, against file:// remotes (hostile cases) -----------------------------


def uploader_for(store: Store, url: str, run: Path, lineage: str = "r", keep_last: int = 5) -> Any:
    from ckptd.daemon.uploader import Uploader
    from ckptd.policy import best_plus_last

    paths = RunPaths(run)
    paths.meta.mkdir(parents=True, exist_ok=True)
    return Uploader(
        RemoteStore(url), store, paths, best_plus_last({}, keep_last),
        lineage=frozenset({lineage}), best_steps=frozenset,
    )  # fmt: skip


def settle(uploader: Any, timeout: float = 30) -> None:
    idle = lambda: uploader.held() == frozenset() and uploader.report()["uploading"] is None  # noqa: E731
    wait_for(idle, timeout=timeout)


def test_another_run_s_checkpoint_on_a_shared_remote_is_never_overwritten(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/remote"
    first = Store(tmp_path / "a")
    name = checkpoint(first, 300)
    theirs = uploader_for(first, url, tmp_path / "run-a", lineage="r")
    theirs.start()
    theirs.offer(first.read(name))
    settle(theirs)
    theirs.stop()
    before = RemoteStore(url).manifest(name)

    second = Store(tmp_path / "b")
    checkpoint(second, 300)
    ours = uploader_for(second, url, tmp_path / "run-b", lineage="other-run", keep_last=0)
    ours.start()
    ours.offer(second.read(name))
    wait_for(lambda: "another run's" in str(ours.report()["last_error"]))
    ours.stop()
    assert RemoteStore(url).manifest(name) == before and RemoteStore(url).verify(name) == []


def test_lost_pending_uploads_are_found_again_and_nothing_leaves_the_disk_meanwhile(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    names = [checkpoint(store, step) for step in (100, 200, 300)]
    run = tmp_path / "run"
    (run / ".ckptd").mkdir(parents=True)
    (run / ".ckptd" / "uploads.json").write_text('{"pending": [')  # damaged: nothing can be read
    uploader = uploader_for(store, f"file://{tmp_path}/remote", run)
    assert uploader.held() is None  # before the first listing, everything is held
    uploader.start()
    settle(uploader)
    uploader.stop()
    assert [r.name for r in RemoteStore(f"file://{tmp_path}/remote").list()] == names


def test_a_checkpoint_corrupt_locally_is_dropped_and_does_not_hold_up_the_others(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    names = [checkpoint(store, step) for step in (100, 200)]
    data = store.path_of(names[0]) / "tensors.safetensors"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF
    data.write_bytes(bytes(raw))
    uploader = uploader_for(store, f"file://{tmp_path}/remote", tmp_path / "run")
    uploader.start()
    settle(uploader, timeout=60)
    uploader.stop()
    assert [r.name for r in RemoteStore(f"file://{tmp_path}/remote").list()] == names[1:]
    assert [d["name"] for d in uploader.report()["not_uploaded"]] == names[:1]
    assert "corrupt locally" in uploader.report()["not_uploaded"][0]["why"]


@pytest.mark.parametrize(
    "planted",
    [
        b'{"format": 1, "step": 24, "tags": "notalist", "files": {}}',
        b"[" * 200_000 + b"]" * 200_000,
        b"not json",
    ],
)
def test_a_planted_remote_manifest_is_left_out_and_stops_nothing(tmp_path: Path, planted: bytes) -> None:
    remote_dir = tmp_path / "remote" / "step-00000024"
    remote_dir.mkdir(parents=True)
    (remote_dir / MANIFEST).write_bytes(planted)
    (tmp_path / "remote" / "step-00000025\n").mkdir()  # a name with a newline is no checkpoint
    store = Store(tmp_path / "store")
    name = checkpoint(store, 100)
    uploader = uploader_for(store, f"file://{tmp_path}/remote", tmp_path / "run")
    uploader.start()
    settle(uploader)
    uploader.stop()
    assert [r.name for r in RemoteStore(f"file://{tmp_path}/remote").list()] == [name]
