"""The checkpoint store on real directories: write-then-commit, crash leftovers, refusals to delete
anything but a committed checkpoint inside the store, verification, listing, and the cross-process lock."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import filelock
import pytest

from ckptd.errors import StoreError
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
        TENSORS: {"bytes": 300_000, "sha256": sha256(tensors)},
        STRUCTURE: {"bytes": len(structure), "sha256": sha256(structure)},
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
        assert (digest.nbytes, digest.sha256) == (nbytes, sha256(data[:nbytes]))
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
        pytest.param(_flip_a_byte, "sha256", id="flipped-byte"),
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
