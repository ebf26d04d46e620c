"""The checkpoint store: the one module that creates, renames into, and deletes from it.

A checkpoint is written into a ``.tmp-*`` directory, every file fsynced, the
``MANIFEST.json`` written last, the directory renamed to ``step-<step>`` and the
store fsynced. Readers only ever see directories with a manifest, so a crash at
any point leaves either nothing visible or a complete checkpoint. Deletion
renames a checkpoint out of sight first, then removes it, and refuses anything
that is not a committed checkpoint directly inside the store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from filelock import FileLock

from ckptd.errors import CorruptCheckpoint, StoreError
from ckptd.protocol import fsync_dir, metrics_from_json, metrics_to_json
from ckptd.records import CheckpointRecord

log = logging.getLogger("ckptd.store")

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = 1
TMP_PREFIX = ".tmp-"
LOCK_NAME = ".ckptd-store.lock"
_NAME = re.compile(r"^step-(\d{8,})(?:-(\d+))?$")
_CHUNK = 16 << 20
_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptd-sha256")


def checkpoint_name(step: int, attempt: int = 1) -> str:
    base = f"step-{step:08d}"
    return base if attempt == 1 else f"{base}-{attempt}"


@dataclass(frozen=True)
class FileDigest:
    nbytes: int
    sha256: str


@dataclass
class PendingCheckpoint:
    """A checkpoint being written: a temp directory nobody else reads."""

    directory: Path
    step: int
    files: dict[str, FileDigest] = field(default_factory=dict)

    def copy_in(self, name: str, source: Path, nbytes: int) -> FileDigest:
        """Copy the first ``nbytes`` of ``source`` into the checkpoint as ``name``, hashing as it goes."""
        target = self.directory / _plain(name)
        digest = hashlib.sha256()
        with source.open("rb") as src, target.open("xb") as dst:
            size = os.fstat(src.fileno()).st_size
            if size < nbytes:
                raise StoreError(source, f"ends after {size} of {nbytes} bytes")
            if nbytes:
                _copy_hashing(src.fileno(), nbytes, dst, digest)
            dst.flush()
            os.fsync(dst.fileno())
        self.files[name] = FileDigest(nbytes, digest.hexdigest())
        return self.files[name]


def _copy_hashing(fd: int, nbytes: int, dst: BinaryIO, digest: Any) -> None:
    """Write straight from a mapping of the source while another thread hashes the same bytes.

    Both ``write`` and ``sha256.update`` release the GIL on large buffers, so hashing
    overlaps the disk instead of following it, and the mapping spares a read copy.
    """
    # Every view is released, and the hash finished, before the mapping closes, also when
    # the write fails (a full disk): else closing the mapping raises over the real error.
    with mmap.mmap(fd, nbytes, prot=mmap.PROT_READ) as mapped, memoryview(mapped) as view:
        for offset in range(0, nbytes, _CHUNK):
            with view[offset : offset + _CHUNK] as chunk:
                hashing = _HASHER.submit(digest.update, chunk)
                try:
                    dst.write(chunk)
                finally:
                    hashing.result()


class Store:
    """One directory of committed checkpoints."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def lock(self, timeout: float = -1) -> FileLock:
        """The lock every deleter holds (daemon retention, ``ckptd prune``)."""
        return FileLock(str(self.root / LOCK_NAME), timeout=timeout)

    def clean_temp(self) -> list[str]:
        """Remove what a crash left behind: temp directories are never a checkpoint."""
        removed = []
        for entry in self._entries():
            if entry.name.startswith(TMP_PREFIX) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        return removed

    @contextmanager
    def writing(self, step: int) -> Iterator[PendingCheckpoint]:
        """A temp directory to fill; removed again if the block raises before ``commit``."""
        if step < 0:
            raise StoreError(self.root, f"refusing a checkpoint of negative step {step}")
        self.ensure()
        pending = PendingCheckpoint(
            Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{step:08d}-", dir=self.root)), step
        )
        try:
            yield pending
        finally:
            if pending.directory.exists():
                shutil.rmtree(pending.directory, ignore_errors=True)

    def commit(self, pending: PendingCheckpoint, manifest: Mapping[str, Any]) -> CheckpointRecord:
        """Write the manifest last, then rename into place: the checkpoint appears whole or not at all."""
        document = {
            **manifest,
            "format": MANIFEST_FORMAT,
            "step": pending.step,
            "files": {n: {"bytes": d.nbytes, "sha256": d.sha256} for n, d in pending.files.items()},
            "bytes": sum(d.nbytes for d in pending.files.values()),
            "metrics": metrics_to_json(manifest.get("metrics", {})),
            "created": time.time(),
        }
        with (pending.directory / MANIFEST).open("x") as handle:
            json.dump(document, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        fsync_dir(pending.directory)
        name = self._rename_into_place(pending)
        fsync_dir(self.root)
        return _record(name, document)

    def _rename_into_place(self, pending: PendingCheckpoint) -> str:
        # A resumed trainer can capture the same step twice; the second gets a suffix, never a merge.
        for attempt in range(1, 1000):
            name = checkpoint_name(pending.step, attempt)
            try:
                os.rename(pending.directory, self.root / name)
            except OSError as exc:
                if (self.root / name).exists():
                    continue
                raise StoreError(self.root / name, f"cannot commit: {exc.strerror}") from exc
            return name
        raise StoreError(self.root, f"too many checkpoints of step {pending.step}")

    def list(self) -> list[CheckpointRecord]:
        """Committed checkpoints, oldest step first; unreadable manifests are logged and left out."""
        records = []
        for entry in self._entries():
            if not _NAME.match(entry.name) or entry.is_symlink() or not entry.is_dir():
                continue
            try:
                records.append(self.read(entry.name))
            except FileNotFoundError:
                continue  # being deleted, or not committed
            except StoreError as exc:
                log.warning("skipping %s", exc)
        return sorted(records, key=lambda r: (r.step, r.created, r.name))

    def read(self, name: str) -> CheckpointRecord:
        return _record(name, self.manifest(name))

    def manifest(self, name: str) -> dict[str, Any]:
        path = self.root / _plain(name) / MANIFEST
        try:
            document = json.loads(path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(path, f"manifest is not valid JSON ({exc})") from exc
        if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
            raise StoreError(path, "not a ckptd manifest of a known format")
        return document

    def path_of(self, name: str) -> Path:
        return self.root / _plain(name)

    def delete(self, name: str) -> None:
        """Remove one committed checkpoint; the caller holds ``lock()``."""
        if not _NAME.match(name):
            raise StoreError(self.root / name, "refusing to delete: not a checkpoint name")
        target = self.root / name
        if target.is_symlink() or not (target / MANIFEST).is_file():
            raise StoreError(target, "refusing to delete: not a committed checkpoint")
        # Out of sight first: a crash mid-removal leaves a temp dir, never a half checkpoint.
        doomed = self.root / f"{TMP_PREFIX}del-{name}-{os.getpid()}"
        os.rename(target, doomed)
        shutil.rmtree(doomed)

    def verify(self, name: str) -> list[str]:
        """Problems found re-hashing every file against the manifest (empty: intact)."""
        document = self.manifest(name)
        problems = []
        for fname, expected in document.get("files", {}).items():
            path = self.path_of(name) / _plain(fname)
            try:
                actual = _digest_file(path)
            except FileNotFoundError:
                problems.append(f"{fname}: missing")
                continue
            if actual.nbytes != expected.get("bytes"):
                problems.append(f"{fname}: {actual.nbytes} bytes, manifest says {expected.get('bytes')}")
            elif actual.sha256 != expected.get("sha256"):
                problems.append(f"{fname}: sha256 mismatch")
        return problems

    def _entries(self) -> list[Path]:
        try:
            return list(self.root.iterdir())
        except FileNotFoundError:
            return []


def _plain(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise StoreError(name, "not a plain file name")
    return name


def _digest_file(path: Path) -> FileDigest:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileDigest(size, digest.hexdigest())


def _record(name: str, document: Mapping[str, Any]) -> CheckpointRecord:
    try:
        requested = document.get("requested_step")
        return CheckpointRecord(
            name=name,
            step=int(document["step"]),
            tags=tuple(str(t) for t in document.get("tags", ())),
            metrics=metrics_from_json(document.get("metrics")),
            requested_step=None if requested is None else int(requested),
            nbytes=int(document.get("bytes", 0)),
            created=float(document.get("created", 0.0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpoint(name, f"manifest lacks a valid field ({exc})") from exc
