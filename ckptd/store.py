"""The checkpoint store: the one module that creates, renames into, and deletes from it.

A checkpoint is written into a ``.tmp-*`` directory, every file hashed as it is
written (xxh3_128; manifests of older versions name sha256 and are still verified)
and fsynced, the ``MANIFEST.json`` written last, the directory renamed to
``step-<step>`` and the store fsynced. Readers only ever see directories with a
manifest, so a crash at any point leaves either nothing visible or a complete
checkpoint. Deletion renames a checkpoint out of sight first, then removes it, and
refuses anything that is not a committed checkpoint directly inside the store.

A sharded checkpoint (one DCP file per rank, written by the daemons of several nodes into
one shared store) is gathered in ``.shard-<capture>``: each rank's files are written and
fsynced there, then a ``.rank-<r>.json`` marker naming them with their checksums. Only the
leader commits: once every rank's marker is there it writes the manifest, removes the
markers and renames the directory into place, so it becomes visible whole, once.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import xxhash
from filelock import FileLock

from ckptd.errors import CorruptCheckpoint, StoreError, StoreOwned
from ckptd.fields import Fields, is_count, is_token
from ckptd.protocol import (
    atomic_write_json,
    fsync_dir,
    is_plain_name,
    metrics_from_json,
    metrics_to_json,
    read_small_file,
    read_small_json,
)
from ckptd.records import CheckpointRecord

log = logging.getLogger("ckptd.store")

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = 1
TMP_PREFIX = ".tmp-"
SHARD_PREFIX = ".shard-"
_RANK_MARKER = re.compile(r"^\.rank-(\d{1,7})\.json$")
_MARKER_MAX_BYTES = 4 << 20  # a rank's marker names its files: KiBs, never this
# A manifest (a sharded one names every rank's files) is KiBs to MiBs: a FIFO, /dev/zero or a
# 100 GB file planted as one must neither hang nor fill the daemon's (or ls's) memory.
_MANIFEST_MAX_BYTES = 16 << 20
_MAX_WORLD = 1 << 20  # as an ack may say (protocol.py): a marker's world is a range built in memory
LOCK_NAME = ".ckptd-store.lock"
OWNER_NAME = ".ckptd-store.json"
OWNER_FORMAT = 1
_NAME = re.compile(r"^step-(\d{8,})(?:-(\d+))?$")
_CHUNK = 16 << 20  # measured: 8 and 64 MiB were no faster on a 1 GiB persist
# Store has a method called list: inside its body, list[...] would name the method.
Progress = Callable[[int], None]  # bytes just done
Names = list[str]
Paths = list[Path]
Ranges = Sequence[tuple[int, int]]  # [start, end) byte ranges of a source file, in order


class Hasher(Protocol):
    """What a checksum of ``CHECKSUMS`` makes: ``hashlib``'s and ``xxhash``'s objects alike."""

    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


# The one table of checksums a manifest may name for a file, in order of preference: the first is
# what new checkpoints record; the others are still verified (sha256: manifests of ckptd before
# xxh3_128). xxh3_128 hashes at memory speed (~5-8 GB/s on one core, sha256 ~1.1), so the persist
# runs at disk speed; it guards against corruption, not tampering (nor did sha256 without a
# signed manifest).
CHECKSUMS: dict[str, Callable[[], Hasher]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
CHECKSUM = next(iter(CHECKSUMS))
# Hashes run beside the writes, one per file being written. Both xxhash (inputs over 64 KiB,
# xxhash >= 3) and hashlib release the GIL, so a hash overlaps its write.
_HASHERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ckptd-hash")


def checkpoint_name(step: int, attempt: int = 1) -> str:
    base = f"step-{step:08d}"
    return base if attempt == 1 else f"{base}-{attempt}"


@dataclass(frozen=True)
class FileDigest:
    nbytes: int
    algorithm: str  # a key of CHECKSUMS
    digest: str  # hex

    def manifest_entry(self) -> dict[str, int | str]:
        """The file's entry under the manifest's ``files``: ``{"bytes": n, algorithm: digest}``."""
        return {"bytes": self.nbytes, self.algorithm: self.digest}


@dataclass
class PendingCheckpoint:
    """A checkpoint being written: a temp directory nobody else reads."""

    directory: Path
    step: int
    files: dict[str, FileDigest] = field(default_factory=dict)
    # Several files may be written at once (a sharded checkpoint), each from its own thread.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def copy_in(self, name: str, source: Path, nbytes: int) -> FileDigest:
        """Copy the first ``nbytes`` of ``source`` into the checkpoint as ``name``, hashing as it goes."""
        return self._write(name, b"", source, [(0, nbytes)] if nbytes else [])

    def write_shard(self, name: str, header: bytes, source: Path, ranges: Ranges) -> FileDigest:
        """Write ``name`` as ``header`` (a safetensors header) followed by the byte ``ranges``
        ``[start, end)`` of ``source``, in order: one shard cut out of a slot's tensors file."""
        return self._write(name, header, source, ranges)

    def add_file(self, name: str, content: bytes) -> FileDigest:
        """Write ``content`` as ``name`` (a small file made here, such as a shard index)."""
        return self._write(name, content, None, [])

    def _write(self, name: str, head: bytes, source: Path | None, ranges: Ranges) -> FileDigest:
        """The one way a file enters a checkpoint: ``head``, then ``ranges`` of ``source``,
        hashed as written, fsynced once; recorded for the manifest. Safe to call from
        several threads at once for different names."""
        target = self.directory / _plain(name)
        digest = CHECKSUMS[CHECKSUM]()
        digest.update(head)
        # The source is opened first: one that is missing or a link leaves no file behind.
        with (
            _open_regular(source) if source else nullcontext() as src,
            open(target, "xb", buffering=0, opener=_new_file) as dst,
        ):
            _write_all(dst.fileno(), head)
            if src is not None and source is not None:
                _copy_ranges(src.fileno(), source, ranges, dst.fileno(), len(head), digest)
            os.fsync(dst.fileno())
        nbytes = len(head) + sum(end - start for start, end in ranges)
        written = FileDigest(nbytes, CHECKSUM, digest.hexdigest())
        with self._lock:
            self.files[name] = written
        return written


def _copy_ranges(fd: int, source: Path, ranges: Ranges, dst: int, at: int, digest: Hasher) -> None:
    """Copy each ``[start, end)`` of ``fd`` to ``dst`` (from its offset ``at``) through ``digest``;
    the source must hold them."""
    if any(not 0 <= start <= end for start, end in ranges):
        raise StoreError(source, f"bad byte ranges {list(ranges)[:4]}")
    needed = max((end for _, end in ranges), default=0)
    size = os.fstat(fd).st_size
    if size < needed:
        raise StoreError(source, f"ends after {size} of {needed} bytes")
    if needed:
        _copy_hashing(fd, needed, ranges, dst, at, digest)


def _open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file itself, not a link to one: a slot
    file that is a symlink would copy whatever it points at (``/etc/passwd``) into the store."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreError(path, "is a symbolic link; refusing to read through it") from exc
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StoreError(path, "is not a regular file")
    return os.fdopen(fd, "rb")


def _copy_hashing(fd: int, nbytes: int, ranges: Ranges, dst: int, at: int, digest: Hasher) -> None:
    """Write ``ranges`` straight from a mapping of the source's first ``nbytes`` (to ``dst``
    from its offset ``at``) while another thread hashes the same bytes, and start each
    chunk's writeback as soon as it is written.

    ``write`` and the checksum's ``update`` both release the GIL on large buffers, so the
    hash overlaps the copy instead of following it, and the mapping spares a read copy
    (its pages are the slot's shared ones: the daemon's anonymous memory stays flat).
    Without the writeback hint the disk idles until the final fsync (measured on the
    development VM, 1 GiB from /dev/shm to ext4: 0.7x ``dd conv=fsync``'s rate without
    it, 1.0-1.3x with it).
    """
    # Every view is released, and the hash finished, before the mapping closes, also when
    # the write fails (a full disk): else closing the mapping raises over the real error.
    with mmap.mmap(fd, nbytes, prot=mmap.PROT_READ) as mapped, memoryview(mapped) as view:
        for start, end in ranges:
            for offset in range(start, end, _CHUNK):
                with view[offset : min(offset + _CHUNK, end)] as chunk:
                    hashing = _HASHERS.submit(digest.update, chunk)
                    try:
                        _write_all(dst, chunk)
                    finally:
                        hashing.result()
                    _start_writeback(dst, at, len(chunk))
                    at += len(chunk)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """``write`` until all of ``data`` is written (a regular file may take less at once)."""
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """The C library's ``sync_file_range`` (Linux; Python's ``os`` lacks it), or None."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the dirty pages, do not wait


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + nbytes)`` of ``fd`` to disk now.

    A hint, not a sync: the one ``fsync`` per file still makes it durable (and still
    reports write errors: this flag alone consumes none). A disk error or a full disk it
    meets anyway is raised; anything else (a filesystem or sandbox without it) is ignored.
    """
    if _SYNC_FILE_RANGE is None or not nbytes:
        return
    if _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE) != 0:
        code = ctypes.get_errno()
        if code in (errno.EIO, errno.ENOSPC, errno.EDQUOT):
            raise OSError(code, os.strerror(code))


class Store:
    """One directory of committed checkpoints."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def ensure(self) -> None:
        with _doing("create the store", self.root):
            self.root.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)

    def lock(self, timeout: float = -1) -> FileLock:
        """The lock every deleter holds (daemon retention, ``ckptd prune``)."""
        return FileLock(str(self.root / LOCK_NAME), timeout=timeout, mode=_LOCK_MODE)

    def clean_temp(self) -> Names:
        """Remove what a crash left behind: temp directories are never a checkpoint."""
        removed = []
        for entry in self._entries():
            # The link test first: is_dir() follows a link, and one to a folder this user may
            # not search (another user's run) raises PermissionError, which stopped the daemon.
            if entry.name.startswith(TMP_PREFIX) and not entry.is_symlink() and entry.is_dir():
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
            "files": {n: d.manifest_entry() for n, d in pending.files.items()},
            "bytes": sum(d.nbytes for d in pending.files.values()),
            "metrics": metrics_to_json(manifest.get("metrics", {})),
            "created": time.time(),
        }
        with open(pending.directory / MANIFEST, "x", opener=_new_file) as handle:
            json.dump(document, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        fsync_dir(pending.directory)
        name = self._rename_into_place(pending)
        fsync_dir(self.root)
        return record_from_manifest(name, document)

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

    # -- sharded checkpoints, gathered from every rank (and node) ------------------------------

    def shard_dir(self, capture: str) -> Path:
        if not is_token(capture):
            raise StoreError(self.root, f"refusing capture id {capture!r}: not a plain identifier")
        return self.root / f"{SHARD_PREFIX}{capture}"

    def rank_stored(self, capture: str, rank: int) -> bool:
        """Whether ``rank``'s part of ``capture`` is durable already (its marker is written)."""
        return (self.shard_dir(capture) / f".rank-{rank}.json").is_file()

    @contextmanager
    def writing_rank(self, capture: str, step: int, names: Sequence[str]) -> Iterator[PendingCheckpoint]:
        """The shared directory of ``capture``, with ``names`` (one rank's files, left by an
        attempt that died before its marker) removed; the caller fills it and calls
        ``mark_rank``. Nothing is removed on error: other ranks' files live there too."""
        if step < 0:
            raise StoreError(self.root, f"refusing a checkpoint of negative step {step}")
        self.ensure()
        directory = self.shard_dir(capture)
        with _doing("create the shard directory", directory):
            directory.mkdir(mode=_DIR_MODE, exist_ok=True)
            if directory.is_symlink() or not directory.is_dir():
                raise StoreError(directory, "is not a plain directory; refusing to write into it")
            for name in names:
                (directory / _plain(name)).unlink(missing_ok=True)
        yield PendingCheckpoint(directory, step)

    def mark_rank(
        self,
        pending: PendingCheckpoint,
        capture: str,
        rank: int,
        world_size: int,
        manifest: Mapping[str, Any],
    ) -> None:
        """Record ``rank``'s files (written and fsynced) durably: the rank's part is stored."""
        marker = {
            "capture": capture,
            "rank": rank,
            "world_size": world_size,
            "step": pending.step,
            "files": {n: d.manifest_entry() for n, d in pending.files.items()},
            "manifest": {**manifest, "metrics": metrics_to_json(manifest.get("metrics", {}))},
        }
        with _doing("write the rank marker", pending.directory):
            atomic_write_json(pending.directory / f".rank-{rank}.json", marker, durable=True)

    def shard_captures(self) -> list[tuple[str, float]]:
        """Sharded captures being gathered: (capture id, when something was last added)."""
        found = []
        for entry in self._entries():
            capture = entry.name[len(SHARD_PREFIX) :]
            if not entry.name.startswith(SHARD_PREFIX) or not is_token(capture) or entry.is_symlink():
                continue
            try:
                newest = max([entry.stat().st_mtime] + [f.stat().st_mtime for f in entry.iterdir()])
            except OSError:
                continue  # committed or abandoned meanwhile
            found.append((capture, newest))
        return found

    def missing_ranks(self, capture: str) -> list[int] | None:
        """Ranks whose part of ``capture`` is not stored yet (None: no rank's is, or the
        markers disagree about the world size and the capture cannot complete)."""
        try:
            parts = _rank_parts(self.shard_dir(capture), capture)
        except StoreError:
            return None
        if not parts:
            return None
        world_size = parts[0].data["world_size"]
        return [r for r in range(world_size) if r not in {p.rank for p in parts}]

    def commit_shards(self, capture: str) -> CheckpointRecord | None:
        """Commit ``capture`` if every rank's part is stored (None: not yet).

        With every marker there, the manifest is (re)made from them and replaces any earlier
        one atomically; a manifest without all markers is the one a commit cut short wrote
        (only this method writes one: an ack may not name MANIFEST.json). Then the files are
        checked against it (each there, regular, its size; nothing else beside them), the
        markers removed and the directory renamed into place."""
        directory = self.shard_dir(capture)
        whole = _sharded_manifest(_rank_parts(directory, capture), capture)
        if whole is not None:
            document = whole
            # Checked before the manifest is written: a capture that fails the check must not
            # look fresh at every retry, or it would never reach --shard-timeout and be removed.
            _check_gathered(directory, document)
            with _doing("write the manifest", directory):
                atomic_write_json(directory / MANIFEST, document, durable=True)
        elif (directory / MANIFEST).is_file():
            document = self._manifest_at(directory)
            _check_gathered(directory, document)
        else:
            return None
        for leftover in directory.iterdir():  # markers, and writes of them cut short
            if _RANK_MARKER.match(leftover.name) or _cut_short(leftover.name):
                leftover.unlink()
        fsync_dir(directory)
        step = Fields(directory, document).count("step")
        name = self._rename_into_place(PendingCheckpoint(directory, step))
        fsync_dir(self.root)
        return record_from_manifest(name, document)

    def abandon_shards(self, capture: str) -> None:
        """Remove an incomplete sharded capture: out of sight first, as ``delete`` does."""
        directory = self.shard_dir(capture)
        if directory.is_symlink() or not directory.is_dir():
            return
        doomed = self.root / f"{TMP_PREFIX}abandoned-{capture}-{os.getpid()}"
        os.rename(directory, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def _manifest_at(self, directory: Path) -> dict[str, Any]:
        document = read_small_json(directory / MANIFEST, _MARKER_MAX_BYTES)
        if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
            raise StoreError(directory / MANIFEST, "not a ckptd manifest of a known format")
        return document

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

    def checkpoint_dirs(self) -> Names:
        """Directories named like a checkpoint, step order, whether their manifest reads or not.

        ``list`` leaves out what it cannot read; ``verify`` must account for exactly those.
        """
        named = [e for e in self._entries() if _NAME.match(e.name) and not e.is_symlink() and e.is_dir()]
        return sorted((e.name for e in named), key=_name_order)

    def read(self, name: str) -> CheckpointRecord:
        return record_from_manifest(name, self.manifest(name))

    def manifest(self, name: str) -> dict[str, Any]:
        path = self.root / _plain(name) / MANIFEST
        try:
            with _doing("read the manifest", path):
                raw = read_small_file(path, _MANIFEST_MAX_BYTES, follow=True)
            document = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested past the parser's stack
            raise StoreError(path, f"manifest is not valid JSON ({type(exc).__name__})") from exc
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

    def verify(self, name: str, progress: Progress | None = None) -> Names:
        """Problems found re-hashing every file against the manifest (empty: intact).
        ``progress(nbytes)`` is called as each chunk is hashed."""
        document = self.manifest(name)
        files = document.get("files")
        if not isinstance(files, dict) or not files:
            return ["manifest lists no files"]
        problems = []
        for fname, expected in files.items():
            problem = self._check_file(name, fname, expected, progress)
            if problem:
                problems.append(f"{fname}: {problem}")
        return problems

    def _check_file(
        self, name: str, fname: str, expected: object, progress: Progress | None = None
    ) -> str | None:
        if not isinstance(expected, dict):
            return "manifest entry is not an object"
        if not _is_plain(fname):
            return "not a plain file name"
        # The entry names its checksum: xxh3_128 now, sha256 in manifests of older versions.
        algorithm = next((a for a in CHECKSUMS if a in expected), None)
        if algorithm is None:
            return f"no known checksum (expected one of {', '.join(CHECKSUMS)})"
        try:
            actual = _digest_file(self.path_of(name) / fname, algorithm, progress)
        except FileNotFoundError:
            return "missing"
        except OSError as exc:
            return f"cannot read: {exc.strerror or exc}"
        if actual.nbytes != expected.get("bytes"):
            return f"{actual.nbytes} bytes, manifest says {expected.get('bytes')!r}"
        if actual.digest != expected[algorithm]:
            return f"{algorithm} mismatch"
        return None

    def claim(self, run_id: str, run_dir: Path) -> frozenset[str]:
        """Make this store the run's own; return the run ids whose checkpoints it may rotate.

        A store belongs to one run: two daemons rotating one store would delete each
        other's checkpoints. The owner file names the run; a run that lost its state
        (same run dir), a copied store (another inode) or a store whose run dir is gone
        is adopted, and the ids of earlier owners are kept: their checkpoints are this
        run's history. Anything else is refused with :class:`StoreOwned`.
        """
        with self.lock(timeout=60):
            inode = self.root.stat().st_ino
            owner = self._read_owner()
            lineage: tuple[str, ...] = (run_id,)
            if owner is not None:
                earlier = owner.texts("run_ids")
                if run_id not in earlier and not _adoptable(owner, run_dir, inode):
                    raise StoreOwned(self.root, owner.text("run_id", "?"), owner.text("run_dir", "?"))
                lineage = (*[r for r in earlier if r != run_id], run_id)
            document = {
                "format": OWNER_FORMAT,
                "run_id": run_id,
                "run_dir": str(run_dir),
                "store_inode": inode,
                "run_ids": list(lineage),
            }
            atomic_write_json(self.root / OWNER_NAME, document, durable=True)
        return frozenset(lineage)

    def owner_run_dir(self) -> str | None:
        """The run dir the owner file names (the run whose daemon claimed the store last)."""
        owner = self._read_owner()
        return owner.text("run_dir", "") or None if owner is not None else None

    def lineage(self) -> frozenset[str]:
        """The run ids the owner file names (the store's run and its earlier owners): whose
        checkpoints retention may delete. Empty for a store no daemon has claimed."""
        owner = self._read_owner()
        return frozenset(owner.texts("run_ids")) if owner is not None else frozenset()

    def _read_owner(self) -> Fields | None:
        path = self.root / OWNER_NAME
        try:
            owner = Fields(path, json.loads(read_small_file(path, _MARKER_MAX_BYTES, follow=True)))
            owner.texts("run_ids")
            owner.count("store_inode")
            return owner
        except FileNotFoundError:
            return None
        except (ValueError, RecursionError) as exc:
            aside = path.with_name(f"{OWNER_NAME}.corrupt-{int(time.time())}")
            os.rename(path, aside)
            log.error("owner file %s is unreadable (%s); moved to %s", path, exc, aside.name)
            return None

    def _entries(self) -> Paths:
        try:
            with _doing("list the store", self.root):
                return list(self.root.iterdir())
        except FileNotFoundError:
            return []


@dataclass(frozen=True)
class _RankPart:
    rank: int
    data: Mapping[str, Any]  # the marker, checked


def _rank_parts(directory: Path, capture: str) -> list[_RankPart]:
    """The markers of ``capture``'s stored ranks, each checked (they may come from another
    node's daemon: untrusted input like any file ckptd reads)."""
    parts = []
    with _doing("list the shard directory", directory):
        entries = sorted(directory.iterdir()) if directory.is_dir() and not directory.is_symlink() else []
    for entry in entries:
        found = _RANK_MARKER.match(entry.name)
        if not found:
            continue
        try:
            parts.append(_rank_part(entry, int(found[1]), capture))
        except (OSError, ValueError, RecursionError) as exc:  # ProtocolError is a ValueError
            raise StoreError(entry, f"unreadable rank marker: {type(exc).__name__}: {exc}") from exc
    return parts


def _rank_part(path: Path, rank: int, capture: str) -> _RankPart:
    fields = Fields(path, read_small_json(path, _MARKER_MAX_BYTES))
    world_size = fields.count("world_size")
    if world_size > _MAX_WORLD:
        raise ValueError(f"world_size {world_size} is more than {_MAX_WORLD} ranks")
    if fields.count("rank") != rank or not rank < world_size or fields.text("capture") != capture:
        raise ValueError("marker does not match its name, rank or capture")
    fields.count("step")
    # Present, as objects: the commit reads them as they are (a null one is no "absent: empty").
    if not isinstance(fields.data.get("files"), dict) or not isinstance(fields.data.get("manifest"), dict):
        raise ValueError("marker lacks its files or its manifest object")
    for name, entry in fields.mapping("files").items():
        if not is_plain_name(name) or not isinstance(entry, dict):
            raise ValueError(f"bad file entry {name!r}")
    fields.mapping("manifest")
    return _RankPart(rank, fields.data)


def _check_gathered(directory: Path, document: Mapping[str, Any]) -> None:
    """Every file the manifest names is in ``directory``, a regular file of its size, and
    nothing else is (markers and the manifest aside): a part that lied, or a stray file, never
    becomes a visible checkpoint."""
    files = document.get("files")
    if not isinstance(files, dict) or not files:
        raise StoreError(directory, "the gathered manifest lists no files")
    for name, entry in files.items():
        try:
            info = (directory / _plain(name)).lstat()
        except FileNotFoundError:
            raise StoreError(directory / name, "named by a rank's part but missing") from None
        if not stat.S_ISREG(info.st_mode) or info.st_size != (entry or {}).get("bytes"):
            raise StoreError(directory / name, "not the regular file of the size its part names")
    strays = [
        e.name
        for e in directory.iterdir()
        if e.name not in files
        and e.name != MANIFEST
        and not _RANK_MARKER.match(e.name)
        and not _cut_short(e.name)
    ]
    if strays:
        raise StoreError(directory, f"holds files no rank's part names: {sorted(strays)[:5]}")


def _cut_short(name: str) -> bool:
    """A temp file of ``atomic_write_json`` (``.<name>.<random>.tmp``) writing the manifest or a
    rank's marker: what a daemon killed mid-write leaves. A part's own files cannot be named so
    (a slot's names start with a letter, a digit or ``_``, or are ``.metadata``)."""
    return name.startswith((f".{MANIFEST}.", "..rank-"))


def _sharded_manifest(parts: Sequence[_RankPart], capture: str) -> dict[str, Any] | None:
    """The manifest of a sharded checkpoint, from rank 0's fields and every rank's files;
    None until every rank is stored. Parts that disagree (world size, step, a file named
    twice) are a ``StoreError``: they will never make one checkpoint."""
    if not parts:
        return None
    world_size, step = parts[0].data["world_size"], parts[0].data["step"]
    if any((p.data["world_size"], p.data["step"]) != (world_size, step) for p in parts):
        raise StoreError(capture, "ranks disagree on the world size or the step")
    if {p.rank for p in parts} != set(range(world_size)):
        return None
    files: dict[str, Any] = {}
    for part in parts:
        for name, entry in part.data["files"].items():
            if name in files:
                raise StoreError(capture, f"ranks {part.rank} and another both stored {name}")
            files[name] = entry
    nbytes = sum(e.get("bytes", 0) for e in files.values() if is_count(e.get("bytes")))
    leader = next(p for p in parts if p.rank == 0)
    return {
        **leader.data["manifest"],
        "format": MANIFEST_FORMAT,
        "step": step,
        "files": files,
        "bytes": nbytes,
        "ranks": world_size,
        "capture": capture,
        "created": time.time(),
    }


def _adoptable(owner: Fields, run_dir: Path, inode: int) -> bool:
    owner_dir = owner.text("run_dir", "")
    return (
        owner_dir == str(run_dir)  # the same run, restarted without its state
        or owner.count("store_inode") != inode  # a copy of the store: the original is elsewhere
        or not owner_dir
        or not Path(owner_dir).is_dir()  # the run that made it is gone
    )


def _name_order(name: str) -> tuple[int, int]:
    found = _NAME.match(name)
    return (int(found[1]), int(found[2] or 1)) if found else (-1, 0)


@contextmanager
def _doing(action: str, path: Path) -> Iterator[None]:
    """Turn a bare ``[Errno 13] Permission denied`` into "cannot <action> <path>: ...".

    FileNotFoundError passes through untouched: callers treat it as "not there (yet)".
    """
    try:
        yield
    except (FileNotFoundError, StoreError):
        raise
    except OSError as exc:
        raise StoreError(path, exc.strerror or str(exc), action=action, code=exc.errno) from exc


# What the store creates is never world-writable, whatever the umask (a daemon started under
# umask 000 by a careless unit or container); group bits still follow the umask (shared groups).
_DIR_MODE, _FILE_MODE, _LOCK_MODE = 0o775, 0o664, 0o644


def _new_file(path: str, flags: int) -> int:
    return os.open(path, flags, _FILE_MODE)


def _is_plain(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def _plain(name: str) -> str:
    if not _is_plain(name):
        raise StoreError(name, "not a plain file name")
    return name


def _digest_file(path: Path, algorithm: str, progress: Progress | None = None) -> FileDigest:
    """``path``'s size and ``algorithm`` checksum, read in chunks into one reused buffer."""
    digest = CHECKSUMS[algorithm]()
    size = 0
    buffer = bytearray(_CHUNK)
    with path.open("rb", buffering=0) as handle, memoryview(buffer) as view:
        while count := handle.readinto(view):
            with view[:count] as chunk:
                digest.update(chunk)
            size += count
            if progress is not None:
                progress(count)
    return FileDigest(size, algorithm, digest.hexdigest())


def record_from_manifest(name: str, document: Mapping[str, Any]) -> CheckpointRecord:
    """The record of checkpoint ``name`` from its manifest (a local or a remote one)."""
    fields = Fields(f"{name}/{MANIFEST}", document)
    try:
        return CheckpointRecord(
            name=name,
            step=fields.count("step"),
            tags=fields.texts("tags"),
            metrics=metrics_from_json(fields.mapping("metrics")),
            requested_step=fields.optional_count("requested_step"),
            nbytes=fields.count("bytes", 0),
            created=fields.number("created", 0.0),
            run_id=fields.text("run_id", ""),
        )
    except ValueError as exc:
        raise CorruptCheckpoint(name, f"manifest lacks a valid field ({exc})") from exc
