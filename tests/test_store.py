"""The checkpoint store on real directories: write-then-commit, crash leftovers, refusals to delete
anything but a committed checkpoint inside the store, verification (xxh3_128, and sha256 of older
manifests), files written at once (shards) and a full disk meanwhile, listing, and the
cross-process lock."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import filelock
import pytest
import xxhash

import ckptd.daemon.persister as persister_module
import ckptd.store as store_module
from ckptd.daemon.persister import Persister
from ckptd.errors import StoreError
from ckptd.protocol import Ack
from ckptd.staging import TensorEntry, plan_layout
from ckptd.store import MANIFEST, PendingCheckpoint, Store

TENSORS = "tensors.safetensors"
STRUCTURE = "structure.json"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "checkpoints")


@pytest.fixture
def slot(tmp_path: Path) -> Path:
    """A slot-like folder: a tensors file with capacity beyond its valid bytes, and a structure."""
    folder = tmp_path / "slot-0"
    folder.mkdir()
    (folder / TENSORS).write_bytes(os.urandom(300_000) + b"\0" * 50_000)
    (folder / STRUCTURE).write_bytes(b'{"format": 1, "step": 1050, "tree": {"$tensor": "w"}}')
    return folder


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def xxh3(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


def names_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def fill(pending: PendingCheckpoint, slot: Path) -> None:
    pending.copy_in(TENSORS, slot / TENSORS, 300_000)
    pending.copy_in(STRUCTURE, slot / STRUCTURE, (slot / STRUCTURE).stat().st_size)


def commit_one(store: Store, slot: Path, step: int, **manifest: Any) -> str:
    with store.writing(step) as pending:
        fill(pending, slot)
        return store.commit(pending, manifest).name


# -- the full cycle --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "requested", "expected_name"),
    [
        pytest.param(1050, 1050, "step-00001050", id="exact"),
        pytest.param(1051, 1050, "step-00001051", id="late-capture-keeps-requested"),
        pytest.param(0, None, "step-00000000", id="step-zero-no-request"),
        pytest.param(123_456_789, None, "step-123456789", id="more-than-8-digits"),
    ],
)
def test_write_copy_commit_full_cycle(
    store: Store, slot: Path, step: int, requested: int | None, expected_name: str
) -> None:
    tensors = (slot / TENSORS).read_bytes()[:300_000]
    structure = (slot / STRUCTURE).read_bytes()
    with store.writing(step) as pending:
        assert pending.directory.parent == store.root
        assert pending.directory.name.startswith(".tmp-")
        assert store.list() == []  # in flight: invisible to readers
        fill(pending, slot)
        record = store.commit(
            pending,
            {
                "tags": ["best:eval_loss", "periodic"],
                "metrics": {"eval_loss": 0.25, "grad_norm": math.nan},
                "requested_step": requested,
                "reason": "eval_loss improved",
            },
        )

    assert record.name == expected_name
    assert names_in(store.root) == [expected_name]  # no temp dir left behind
    committed = store.root / expected_name
    assert names_in(committed) == [MANIFEST, STRUCTURE, TENSORS]
    assert (committed / TENSORS).read_bytes() == tensors
    assert (committed / STRUCTURE).read_bytes() == structure

    manifest = json.loads((committed / MANIFEST).read_bytes())
    assert manifest["step"] == step
    assert manifest["requested_step"] == requested
    assert manifest["files"] == {
        TENSORS: {"bytes": 300_000, "xxh3_128": xxh3(tensors)},
        STRUCTURE: {"bytes": len(structure), "xxh3_128": xxh3(structure)},
    }
    assert manifest["bytes"] == 300_000 + len(structure)
    assert manifest["metrics"] == {"eval_loss": 0.25, "grad_norm": "nan"}
    assert manifest["reason"] == "eval_loss improved"

    (listed,) = store.list()
    assert (listed.name, listed.step, listed.requested_step, listed.tags, listed.nbytes) == (
        expected_name,
        step,
        requested,
        ("best:eval_loss", "periodic"),
        300_000 + len(structure),
    )
    assert listed.metrics["eval_loss"] == 0.25 and math.isnan(listed.metrics["grad_norm"])
    assert listed.created == pytest.approx(time.time(), abs=60)
    assert store.verify(expected_name) == []


def _raise_immediately(pending: PendingCheckpoint, slot: Path) -> None:
    raise RuntimeError("trainer crashed")


def _raise_after_copy(pending: PendingCheckpoint, slot: Path) -> None:
    fill(pending, slot)
    raise RuntimeError("trainer crashed")


def _short_source(pending: PendingCheckpoint, slot: Path) -> None:
    pending.copy_in(STRUCTURE, slot / STRUCTURE, 10_000_000)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        pytest.param(_raise_immediately, RuntimeError, id="raises-before-copy"),
        pytest.param(_raise_after_copy, RuntimeError, id="raises-after-copy"),
        pytest.param(_short_source, StoreError, id="source-too-short"),
    ],
)
def test_writing_block_that_raises_leaves_nothing(
    store: Store, slot: Path, body: Callable[[PendingCheckpoint, Path], None], error: type[Exception]
) -> None:
    with pytest.raises(error), store.writing(300) as pending:
        body(pending, slot)
    assert names_in(store.root) == []
    assert store.list() == []


def test_crash_leftovers_are_unlisted_and_cleaned_without_touching_anything_else(
    store: Store, slot: Path, tmp_path: Path
) -> None:
    committed = commit_one(store, slot, 100)
    crashed = store.root / ".tmp-00000300-k2j4"
    (crashed / "deep").mkdir(parents=True)
    (crashed / TENSORS).write_bytes(b"half")
    (crashed / "deep" / "x").write_bytes(b"x")
    deleting = store.root / ".tmp-del-step-00000050-4242"  # a crash in the middle of delete()
    deleting.mkdir()
    (deleting / MANIFEST).write_text("{}")
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data").write_bytes(b"keep")
    (store.root / ".tmp-link").symlink_to(outside, target_is_directory=True)
    (store.root / "notes.txt").write_text("mine")
    (store.root / "other-dir").mkdir()
    (store.root / "other-dir" / "f").write_text("mine too")

    assert [r.name for r in store.list()] == [committed]
    assert sorted(store.clean_temp()) == [".tmp-00000300-k2j4", ".tmp-del-step-00000050-4242"]

    assert names_in(store.root) == sorted([".tmp-link", committed, "notes.txt", "other-dir"])
    assert store.verify(committed) == []
    assert (outside / "data").read_bytes() == b"keep"
    assert (store.root / "notes.txt").read_text() == "mine"
    assert (store.root / "other-dir" / "f").read_text() == "mine too"
    assert store.clean_temp() == []


def test_clean_temp_on_missing_store_is_a_no_op(tmp_path: Path) -> None:
    assert Store(tmp_path / "absent").clean_temp() == []
    assert not (tmp_path / "absent").exists()


# -- copy_in ---------------------------------------------------------------------------------------

_CHUNK = 16 << 20


@pytest.mark.parametrize(
    ("source_size", "nbytes"),
    [
        pytest.param(1000, 300, id="prefix"),
        pytest.param(1000, 1000, id="whole"),
        pytest.param(1000, 0, id="nothing"),
        pytest.param(_CHUNK + 4096, _CHUNK + 3, id="prefix-across-chunks"),
    ],
)
def test_copy_in_copies_only_the_first_nbytes(
    store: Store, tmp_path: Path, source_size: int, nbytes: int
) -> None:
    source = tmp_path / "source"
    data = os.urandom(source_size)
    source.write_bytes(data)
    with store.writing(7) as pending:
        digest = pending.copy_in("blob", source, nbytes)
        copied = (pending.directory / "blob").read_bytes()
        assert copied == data[:nbytes]
        assert (digest.nbytes, digest.algorithm, digest.digest) == (nbytes, "xxh3_128", xxh3(data[:nbytes]))
        assert pending.files == {"blob": digest}


@pytest.mark.parametrize("short_by", [1, 999], ids=["one-byte-short", "mostly-missing"])
def test_copy_in_from_a_short_source_raises_store_error(store: Store, tmp_path: Path, short_by: int) -> None:
    source = tmp_path / "source"
    source.write_bytes(os.urandom(1000))
    with store.writing(7) as pending:
        with pytest.raises(StoreError) as info:
            pending.copy_in("blob", source, 1000 + short_by)
        assert info.value.path == source
        assert f"1000 of {1000 + short_by}" in str(info.value)
        assert "blob" not in pending.files


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ""], ids=["climbs", "nested", "dotdot", "empty"])
def test_copy_in_refuses_a_name_that_is_not_plain(store: Store, slot: Path, name: str) -> None:
    with store.writing(7) as pending, pytest.raises(StoreError):
        pending.copy_in(name, slot / STRUCTURE, 4)
    assert names_in(store.root) == []
    assert not (store.root.parent / "escape").exists()


def test_same_step_committed_again_gets_a_suffix(store: Store, slot: Path) -> None:
    names = [commit_one(store, slot, 200, reason=f"try {i}") for i in range(3)]
    assert names == ["step-00000200", "step-00000200-2", "step-00000200-3"]
    assert [r.name for r in store.list()] == names
    assert [store.manifest(n)["reason"] for n in names] == ["try 0", "try 1", "try 2"]
    assert all(store.verify(n) == [] for n in names)


# -- delete ----------------------------------------------------------------------------------------


def test_delete_removes_a_committed_checkpoint(store: Store, slot: Path) -> None:
    keep = commit_one(store, slot, 100)
    doomed = commit_one(store, slot, 200)
    with store.lock(timeout=5):
        store.delete(doomed)
    assert [r.name for r in store.list()] == [keep]
    assert names_in(store.root) == [".ckptd-store.lock", keep]  # no .tmp-del-* left behind
    assert store.verify(keep) == []


def _outside_checkpoint(tmp_path: Path, name: str) -> Path:
    """A directory outside the store that looks exactly like a committed checkpoint."""
    target = tmp_path / "elsewhere" / name
    target.mkdir(parents=True)
    (target / MANIFEST).write_text(json.dumps({"format": 1, "step": 1, "files": {}}))
    (target / "weights").write_bytes(b"precious")
    return target


def _bad_name(store: Store, tmp_path: Path) -> tuple[str, Path]:
    target = store.root / "best-model"
    shutil.copytree(_outside_checkpoint(tmp_path, "best-model"), target)
    return "best-model", target


def _dotdot(store: Store, tmp_path: Path) -> tuple[str, Path]:
    return "..", store.root


def _absolute(store: Store, tmp_path: Path) -> tuple[str, Path]:
    target = _outside_checkpoint(tmp_path, "step-00000001")
    return str(target), target


def _relative_escape(store: Store, tmp_path: Path) -> tuple[str, Path]:
    target = _outside_checkpoint(tmp_path, "step-00000001")
    return "../elsewhere/step-00000001", target


def _symlink_out(store: Store, tmp_path: Path) -> tuple[str, Path]:
    target = _outside_checkpoint(tmp_path, "step-00000007")
    (store.root / "step-00000007").symlink_to(target, target_is_directory=True)
    return "step-00000007", target


def _no_manifest(store: Store, tmp_path: Path) -> tuple[str, Path]:
    target = store.root / "step-00000009"
    target.mkdir()
    (target / "weights").write_bytes(b"not committed yet")
    return "step-00000009", target


def _missing(store: Store, tmp_path: Path) -> tuple[str, Path]:
    return "step-00000404", store.root


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param(_bad_name, id="name-not-a-checkpoint"),
        pytest.param(_dotdot, id="dotdot"),
        pytest.param(_absolute, id="absolute-path"),
        pytest.param(_relative_escape, id="relative-escape"),
        pytest.param(_symlink_out, id="symlink-to-outside"),
        pytest.param(_no_manifest, id="dir-without-manifest"),
        pytest.param(_missing, id="does-not-exist"),
    ],
)
def test_delete_refuses_anything_but_a_committed_checkpoint(
    store: Store,
    slot: Path,
    tmp_path: Path,
    setup: Callable[[Store, Path], tuple[str, Path]],
) -> None:
    committed = commit_one(store, slot, 100)
    name, survivor = setup(store, tmp_path)
    before = sorted(str(p.relative_to(survivor)) for p in survivor.rglob("*"))
    with pytest.raises(StoreError):
        store.delete(name)
    assert survivor.is_dir()
    assert sorted(str(p.relative_to(survivor)) for p in survivor.rglob("*")) == before
    assert store.verify(committed) == []
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp-")]


# -- verify ----------------------------------------------------------------------------------------


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 1)


def _append(path: Path) -> None:
    with path.open("ab") as handle:
        handle.write(b"\0")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        pytest.param(None, None, id="intact"),
        pytest.param(_flip_a_byte, "xxh3_128 mismatch", id="flipped-byte"),
        pytest.param(_truncate, "299999 bytes", id="truncated"),
        pytest.param(_append, "300001 bytes", id="grown"),
        pytest.param(Path.unlink, "missing", id="deleted"),
    ],
)
def test_verify_reports_damage(
    store: Store, slot: Path, damage: Callable[[Path], None] | None, expected: str | None
) -> None:
    name = commit_one(store, slot, 100)
    if damage is None:
        assert store.verify(name) == []
        return
    damage(store.path_of(name) / TENSORS)
    problems = store.verify(name)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{TENSORS}:")
    assert expected in problems[0]


def _hand_written(store: Store, entries: Callable[[bytes], dict[str, object]]) -> str:
    """A checkpoint written by hand, as an older ckptd (or another tool) left it: each file's
    manifest entry is ``entries(content)``."""
    name = "step-00000100"
    folder = store.root / name
    folder.mkdir(parents=True)
    contents = {TENSORS: os.urandom(70_000), STRUCTURE: b'{"format": 1, "step": 100, "tree": null}'}
    for fname, data in contents.items():
        (folder / fname).write_bytes(data)
    manifest = {
        "format": 1,
        "step": 100,
        "requested_step": 100,
        "tags": ["best:eval_loss"],
        "metrics": {"eval_loss": 0.5},
        "files": {fname: entries(data) for fname, data in contents.items()},
        "bytes": sum(len(data) for data in contents.values()),
        "created": 1.0,
        "run_id": "older",
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return name


def test_verify_checks_an_older_sha256_manifest(store: Store) -> None:
    name = _hand_written(store, lambda data: {"bytes": len(data), "sha256": sha256(data)})
    assert [r.name for r in store.list()] == [name]
    assert store.verify(name) == []
    _flip_a_byte(store.path_of(name) / TENSORS)
    assert store.verify(name) == [f"{TENSORS}: sha256 mismatch"]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        pytest.param(
            lambda data: {"bytes": len(data), "xxh3_128": xxh3(data), "sha256": "0" * 64},
            [],
            id="xxh3_128-preferred-over-a-wrong-sha256",
        ),
        pytest.param(
            lambda data: {"bytes": len(data), "xxh3_128": "0" * 32, "sha256": sha256(data)},
            [f"{STRUCTURE}: xxh3_128 mismatch", f"{TENSORS}: xxh3_128 mismatch"],
            id="a-right-sha256-does-not-excuse-a-wrong-xxh3_128",
        ),
        pytest.param(
            lambda data: {"bytes": len(data), "md5": hashlib.md5(data).hexdigest()},
            [f"{n}: no known checksum (expected one of xxh3_128, sha256)" for n in (STRUCTURE, TENSORS)],
            id="unknown-algorithm",
        ),
        pytest.param(
            lambda data: {"bytes": len(data)},
            [f"{n}: no known checksum (expected one of xxh3_128, sha256)" for n in (STRUCTURE, TENSORS)],
            id="no-checksum-at-all",
        ),
    ],
)
def test_verify_uses_the_checksum_the_entry_names(
    store: Store, entry: Callable[[bytes], dict[str, object]], expected: list[str]
) -> None:
    name = _hand_written(store, entry)
    assert sorted(store.verify(name)) == expected


def test_verify_reports_progress_for_either_checksum(store: Store, slot: Path) -> None:
    new = commit_one(store, slot, 100)
    done: list[int] = []
    assert store.verify(new, done.append) == []
    assert sum(done) == 300_000 + (slot / STRUCTURE).stat().st_size
    older = Store(store.root.parent / "older")
    old = _hand_written(older, lambda data: {"bytes": len(data), "sha256": sha256(data)})
    done.clear()
    assert older.verify(old, done.append) == []
    assert sum(done) == older.manifest(old)["bytes"] > 0


# -- writeback, files written at once, a full disk -------------------------------------------------


def test_each_chunk_is_handed_to_writeback_as_it_is_written(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(store_module, "_start_writeback", lambda fd, at, n: calls.append((at, n)))
    source = tmp_path / "source"
    source.write_bytes(os.urandom(_CHUNK + 4096))
    with store.writing(7) as pending:
        digest = pending.write_shard("shard", b"HEAD", source, [(100, 200), (1000, _CHUNK + 1050)])
    assert digest.nbytes == 4 + 100 + _CHUNK + 50
    # Contiguous, in file order, from after the head to the end: the whole file, chunk by chunk.
    assert calls == [(4, 100), (104, _CHUNK), (104 + _CHUNK, 50)]


@pytest.mark.parametrize(
    ("code", "raises"),
    [(errno.EIO, True), (errno.ENOSPC, True), (errno.EINVAL, False), (errno.ESPIPE, False)],
    ids=["EIO", "ENOSPC", "EINVAL-unsupported", "ESPIPE-unsupported"],
)
def test_a_writeback_hint_raises_only_a_real_write_error(
    store: Store, slot: Path, monkeypatch: pytest.MonkeyPatch, code: int, raises: bool
) -> None:
    called: list[int] = []

    def failing(fd: int, offset: int, nbytes: int, flags: int) -> int:
        called.append(flags)
        ctypes.set_errno(code)
        return -1

    monkeypatch.setattr(store_module, "_SYNC_FILE_RANGE", failing)
    if raises:
        with pytest.raises(OSError) as info:
            commit_one(store, slot, 100)
        assert info.value.errno == code
        assert names_in(store.root) == []
    else:
        assert store.verify(commit_one(store, slot, 100)) == []
    assert called and set(called) == {2}  # SYNC_FILE_RANGE_WRITE: start writeback, wait for nothing


def test_the_writeback_hint_is_the_c_librarys_sync_file_range() -> None:
    if sys.platform != "linux":
        pytest.skip("sync_file_range is Linux's")
    assert store_module._SYNC_FILE_RANGE is not None


MODEL = "model.safetensors"
TOKEN = "t0k3n"


def _sharded_slot(folder: Path, tensors: int, each: int, per_shard: int) -> Ack:
    """A slot holding a safetensors file of ``tensors`` tensors of ``each`` random bytes and a
    config, and the ack asking for shards of ``per_shard`` tensors."""
    folder.mkdir(parents=True)
    entries = [TensorEntry(f"t{i}", "F32", (each // 4,), each) for i in range(tensors)]
    layout = plan_layout(entries, {"format": "pt", "token": TOKEN, "ack": "7"})
    (folder / MODEL).write_bytes(layout.header + os.urandom(tensors * each) + b"\xaa" * 4096)
    (folder / "config.json").write_bytes(b'{"a": 1}')
    return Ack(
        name="7",
        captured_step=30,
        slot=folder.name,
        files={MODEL: layout.total, "config.json": 8},
        token=TOKEN,
        token_file=MODEL,
        shard_bytes=per_shard * each,
        created=1.0,
    )


def _persist_sharded(store: Store, ack: Ack, slot: Path) -> str:
    with store.writing(ack.captured_step) as pending:
        Persister._copy_files(ack, slot, pending)
        return store.commit(pending, {"tags": [], "run_id": "r"}).name


@pytest.fixture
def concurrency(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many shards were being written at once, at most: ``[peak]`` once a persist ran.
    A shard write waits (2 s at most) for a second one to start, so writes that run one
    after another show a peak of 1."""
    peak = [0]
    active = [0]
    lock = threading.Lock()
    two = threading.Event()
    write_shard = PendingCheckpoint.write_shard

    def counting(self: PendingCheckpoint, *args: Any) -> Any:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            if active[0] >= 2:
                two.set()
        two.wait(timeout=2)
        try:
            return write_shard(self, *args)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(PendingCheckpoint, "write_shard", counting)
    return peak


def test_shards_are_written_at_once_with_the_files_and_digests_of_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, concurrency: list[int]
) -> None:
    ack = _sharded_slot(tmp_path / "staging" / "slot-0", tensors=8, each=64 << 10, per_shard=2)
    slot = tmp_path / "staging" / "slot-0"
    together = Store(tmp_path / "together")
    name = _persist_sharded(together, ack, slot)
    assert concurrency[0] >= 2, "the shards were written one after another"
    monkeypatch.setattr(persister_module, "_WRITERS", 1)
    alone = Store(tmp_path / "alone")
    assert _persist_sharded(alone, ack, slot) == name
    shards = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    expected = sorted([MANIFEST, "config.json", "model.safetensors.index.json", *shards])
    assert names_in(together.path_of(name)) == names_in(alone.path_of(name)) == expected
    for fname in expected[1:]:
        assert (together.path_of(name) / fname).read_bytes() == (alone.path_of(name) / fname).read_bytes()
    assert together.manifest(name)["files"] == alone.manifest(name)["files"]
    assert all("xxh3_128" in entry for entry in together.manifest(name)["files"].values())
    assert together.verify(name) == [] and alone.verify(name) == []
    assert not [t for t in threading.enumerate() if t.name.endswith(" writer")]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs: a disk that fills up mid-persist (needs root to mount)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_during_shard_writes_raises_and_leaves_no_temp_dir(
    tmp_path: Path, small_disk: Path, concurrency: list[int]
) -> None:
    ack = _sharded_slot(tmp_path / "staging" / "slot-0", tensors=8, each=2 << 20, per_shard=2)
    store = Store(small_disk / "checkpoints")
    with pytest.raises(OSError) as info:
        _persist_sharded(store, ack, tmp_path / "staging" / "slot-0")
    assert info.value.errno == errno.ENOSPC
    assert concurrency[0] >= 2, "the shards were written one after another"
    # Every writer ended before the temp dir was removed: nothing is left, nothing is still writing.
    assert names_in(store.root) == []
    assert not [t for t in threading.enumerate() if t.name.endswith(" writer")]
    assert os.statvfs(small_disk).f_bfree == os.statvfs(small_disk).f_blocks


# -- list ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b"\xff\xfe\x00garbage", id="not-utf8"),
        pytest.param(b"", id="empty"),
        pytest.param(b"[1, 2]", id="json-array"),
        pytest.param(b'{"format": 99, "step": 5}', id="unknown-format"),
        pytest.param(b'{"format": 1}', id="no-step"),
        pytest.param(b'{"format": 1, "step": "five"}', id="step-not-a-number"),
    ],
)
def test_list_skips_a_garbage_manifest_with_a_warning(
    store: Store, slot: Path, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    good = commit_one(store, slot, 100)
    bad = commit_one(store, slot, 200)
    (store.path_of(bad) / MANIFEST).write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="ckptd.store"):
        records = store.list()
    assert [r.name for r in records] == [good]
    warnings = [r for r in caplog.records if r.name == "ckptd.store" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert bad in warnings[0].getMessage()


def _copy_as(name: str) -> Callable[[Store, Path], None]:
    def make(store: Store, good: Path) -> None:
        shutil.copytree(good, store.root / name)

    return make


def _symlink_as_checkpoint(store: Store, good: Path) -> None:
    (store.root / "step-00000300").symlink_to(good, target_is_directory=True)


def _file_named_like_a_checkpoint(store: Store, good: Path) -> None:
    (store.root / "step-00000300").write_bytes(b"a stray file")


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_copy_as("step-1"), id="too-few-digits"),
        pytest.param(_copy_as("step-00000300-x"), id="bad-suffix"),
        pytest.param(_copy_as("step-00000300.bak"), id="backup-copy"),
        pytest.param(_copy_as("checkpoint-00000300"), id="other-prefix"),
        pytest.param(_copy_as("Step-00000300"), id="capitalised"),
        pytest.param(_copy_as(".tmp-00000300-abc"), id="in-flight"),
        pytest.param(_symlink_as_checkpoint, id="symlink"),
        pytest.param(
            _file_named_like_a_checkpoint,
            id="plain-file",
        ),
    ],
)
def test_list_skips_entries_that_are_not_committed_checkpoints(
    store: Store, slot: Path, make: Callable[[Store, Path], None]
) -> None:
    good = commit_one(store, slot, 100)
    make(store, store.path_of(good))
    assert [r.name for r in store.list()] == [good]


def test_list_on_missing_store_is_empty(tmp_path: Path) -> None:
    assert Store(tmp_path / "absent").list() == []


# -- lock ------------------------------------------------------------------------------------------

_HOLDER = r"""
import sys
from pathlib import Path
from ckptd.store import Store
with Store(Path(sys.argv[1])).lock():
    print("held", flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""


def test_lock_is_shared_across_processes(store: Store) -> None:
    store.ensure()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(store.root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdin is not None and holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(filelock.Timeout) as info, store.lock(timeout=0.2):
            pass
        assert isinstance(info.value, TimeoutError)
        assert time.monotonic() - started >= 0.15
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        holder.wait(timeout=10)
        with store.lock(timeout=5) as lock:
            assert lock.is_locked
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate(timeout=10)
    assert holder.returncode == 0
    assert store.list() == []  # the lock file is no checkpoint


def test_negative_step_is_refused(store: Store, slot: Path) -> None:
    store.ensure()
    with pytest.raises(StoreError), store.writing(-1) as pending:
        fill(pending, slot)
        store.commit(pending, {})
    assert names_in(store.root) == []
