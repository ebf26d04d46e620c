"""The remote tier: committed checkpoints mirrored to object storage through fsspec.

A remote checkpoint is ``<root>/step-<step>/`` with the local checkpoint's files and, written
last, its ``MANIFEST.json``: object stores have no atomic rename, so a reader (``list``) counts
only directories whose manifest is there, and an upload cut short is invisible. Every file is
verified after upload by reading it back and hashing it (the manifest's checksum), before the
manifest goes up. Deletion removes the manifest first, so a half-deleted checkpoint is invisible
too. fsspec and the backend (``s3fs`` for ``s3://``) are imported when a remote is opened, never
by a daemon that has none.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.errors import CkptdError
from ckptd.records import CheckpointRecord
from ckptd.store import CHECKSUMS, MANIFEST, Store, record_from_manifest

_NAME = re.compile(r"step-[0-9]{8,}(?:-[0-9]+)?")  # fullmatch: no trailing newline slips through
_CHUNK = 8 << 20
# s3fs sends a large file as parts, by default 50 MiB each, 10 at a time, and aiohttp copies each
# part once more: about 1 GiB of the daemon's memory for a 1 GiB file (measured). 16 MiB parts,
# 4 at a time, bound that to about 128 MiB.
_S3_PARTS = {"chunksize": 16 << 20, "max_concurrency": 4}
_MANIFEST_MAX_BYTES = 16 << 20
Progress = Callable[[int], None]
Problems = list[str]  # RemoteStore has a method called list: inside its body, list[...] is the method


class RemoteError(CkptdError, OSError):
    """The remote store failed an operation (network, credentials, a missing bucket, a mismatch).

    Carries the remote location as a string: a URL is no local ``Path``."""

    def __init__(self, location: str, problem: str, *, action: str | None = None) -> None:
        self.location = location
        self.problem = problem
        self.action = action
        super().__init__(f"cannot {action} {location}: {problem}" if action else f"{location}: {problem}")


@dataclass(frozen=True)
class Transfer:
    name: str
    files: int
    nbytes: int


class RemoteStore:
    """One directory (a prefix) of an fsspec filesystem holding checkpoints."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        try:
            import fsspec  # type: ignore[import-untyped]  # no type hints of its own
        except ModuleNotFoundError:
            raise RemoteError(url, "needs fsspec: pip install 'ckptd[remote]' (or ckptd[s3])") from None
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **dict(options or {}))
        except (ImportError, ValueError, TypeError) as exc:  # an unknown protocol or option, no backend
            raise RemoteError(url, f"cannot open: {exc}") from exc
        self.url = url
        self.root = root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self._local = bool({"file", "local"} & set(protocols))
        self._put_options = _S3_PARTS if {"s3", "s3a"} & set(protocols) else {}

    def path(self, name: str, file: str = "") -> str:
        if not _NAME.fullmatch(name) or "/" in file or file in ("..", "."):
            raise RemoteError(f"{self.url}/{name}/{file}", "not a checkpoint name or a plain file name")
        directory = posixpath.join(self.root, name)
        joined = posixpath.join(directory, file) if file else directory
        # file:// only (object stores have no links): a link planted in the remote, a checkpoint
        # dir or a file, would make an upload write, a rotation delete, a pull read outside it.
        if self._local and (os.path.islink(directory) or os.path.islink(joined)):
            raise RemoteError(joined, "is a symbolic link; refusing to go through it")
        return joined

    # -- writing -------------------------------------------------------------------------------

    def upload(self, store: Store, name: str, progress: Progress | None = None) -> Transfer:
        """Copy the committed local checkpoint ``name``: every file, each read back and checked
        against the local manifest's checksum, then the manifest. Raises on any failure; what
        was sent before it stays invisible (no manifest) and is sent again next time."""
        manifest = store.manifest(name)
        files = _manifest_files(manifest, name)
        directory = self.path(name)
        if self._local:  # object stores have no folders; their makedirs would create a bucket
            self._call("create", directory, lambda: self.fs.makedirs(directory, exist_ok=True))
        for file, expected in files.items():
            target = self.path(name, file)
            source = store.path_of(name) / file
            put = functools.partial(self.fs.put_file, str(source), target, **self._put_options)
            self._call("upload", target, put)
            self._check(target, expected)
            if progress is not None:
                progress(int(expected["bytes"]))
        payload = json.dumps(manifest, indent=1, sort_keys=True).encode()
        self._call(
            "write the manifest", directory, lambda: self.fs.pipe_file(self.path(name, MANIFEST), payload)
        )
        return Transfer(name, len(files), sum(int(e["bytes"]) for e in files.values()))

    def delete(self, name: str) -> None:
        """The manifest first (the checkpoint disappears), then everything else."""
        directory = self.path(name)
        self._call("delete", directory, lambda: self.fs.rm_file(self.path(name, MANIFEST)))
        self._call("delete", directory, lambda: self.fs.rm(directory, recursive=True))

    # -- reading -------------------------------------------------------------------------------

    def list(self, lineage: frozenset[str] | None = None) -> list[CheckpointRecord]:
        """Checkpoints whose manifest is there, oldest step first (unreadable ones left out);
        with ``lineage``, only those of these run ids (a remote prefix may be shared)."""
        self.fs.invalidate_cache(self.root)
        try:
            entries = self._call("list", self.root, lambda: self.fs.ls(self.root, detail=False))
        except RemoteError as exc:
            if exc.__cause__ is not None and isinstance(exc.__cause__, FileNotFoundError):
                return []
            raise
        records = []
        for entry in entries:
            name = posixpath.basename(str(entry).rstrip("/"))
            if not _NAME.fullmatch(name):
                continue
            try:
                record = record_from_manifest(name, self.manifest(name))
            except (OSError, ValueError, RecursionError):  # CorruptCheckpoint is an OSError
                continue  # no manifest (an upload cut short), or one that is not ckptd's
            if lineage is None or record.run_id in lineage:
                records.append(record)
        return sorted(records, key=lambda r: (r.step, r.created, r.name))

    def owner(self, name: str) -> str | None:
        """The run id whose checkpoint ``name`` is on the remote (None: there is none)."""
        try:
            run_id = self.manifest(name).get("run_id")
        except (RemoteError, RecursionError):
            return None
        return run_id if isinstance(run_id, str) else ""

    def manifest(self, name: str) -> dict[str, Any]:
        """A remote manifest, read as untrusted: a regular object of bounded size (a 400 MB one,
        a FIFO or /dev/zero behind a file:// link must not fill memory or hang)."""
        path = self.path(name, MANIFEST)
        info = self._call("read", path, lambda: self.fs.info(path))
        size = info.get("size")
        if info.get("type") != "file" or not isinstance(size, int) or size > _MANIFEST_MAX_BYTES:
            raise RemoteError(path, f"not a manifest file of at most {_MANIFEST_MAX_BYTES} bytes")
        raw = self._call("read", path, lambda: self.fs.cat_file(path, start=0, end=_MANIFEST_MAX_BYTES))
        try:
            document = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise RemoteError(path, "manifest is not valid JSON") from exc
        if not isinstance(document, dict):
            raise RemoteError(path, "manifest is not a JSON object")
        return document

    def download(self, name: str, to: Path, progress: Progress | None = None) -> Transfer:
        """Fetch ``name`` into the new directory ``to``, checking every file's checksum."""
        manifest = self.manifest(name)
        files = _manifest_files(manifest, name)
        to.mkdir(parents=False, exist_ok=False)
        for file, expected in files.items():
            target = to / file
            self._call(
                "download",
                self.path(name, file),
                functools.partial(self.fs.get_file, self.path(name, file), str(target)),
            )
            problem = _local_problem(target, expected)
            if problem:
                raise RemoteError(self.path(name, file), problem)
            if progress is not None:
                progress(int(expected["bytes"]))
        (to / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        return Transfer(name, len(files), sum(int(e["bytes"]) for e in files.values()))

    def verify(self, name: str) -> Problems:
        """Problems found reading every file of ``name`` back (empty: intact)."""
        problems = []
        for file, expected in _manifest_files(self.manifest(name), name).items():
            try:
                self._check(self.path(name, file), expected)
            except RemoteError as exc:
                problems.append(f"{file}: {exc.problem}")
        return problems

    # -- helpers -------------------------------------------------------------------------------

    def _check(self, path: str, expected: Mapping[str, Any]) -> None:
        algorithm = next(a for a in CHECKSUMS if a in expected)
        digest = CHECKSUMS[algorithm]()
        size = 0

        def read() -> None:
            nonlocal size
            with self.fs.open(path, "rb", block_size=_CHUNK) as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)

        self._call("read back", path, read)
        if size != expected["bytes"]:
            raise RemoteError(path, f"{size} bytes read back, the manifest says {expected['bytes']}")
        if digest.hexdigest() != expected[algorithm]:
            raise RemoteError(
                path, f"{algorithm} mismatch: the remote file is not the one the manifest names"
            )

    def _call(self, action: str, path: str, operation: Callable[[], Any]) -> Any:
        """Run one backend call; whatever the backend raises becomes a RemoteError naming it."""
        try:
            return operation()
        except RemoteError:
            raise
        except Exception as exc:  # backends raise their own types (botocore, aiohttp, ...)
            raise RemoteError(path, f"{type(exc).__name__}: {exc}", action=action) from exc


def _manifest_files(manifest: Mapping[str, Any], name: str) -> dict[str, Mapping[str, Any]]:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise RemoteError(name, "manifest lists no files")
    for file, entry in files.items():
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("bytes"), int)
            and any(a in entry for a in CHECKSUMS)
        )
        if not ok or not file or "/" in file or file in (".", "..", MANIFEST):
            raise RemoteError(name, f"bad manifest entry {file!r}")
    return files


def _local_problem(path: Path, expected: Mapping[str, Any]) -> str | None:
    algorithm = next(a for a in CHECKSUMS if a in expected)
    digest = CHECKSUMS[algorithm]()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    if size != expected["bytes"]:
        return f"{size} bytes, the manifest says {expected['bytes']}"
    return None if digest.hexdigest() == expected[algorithm] else f"{algorithm} mismatch"
