"""Shared-memory staging slots and their safetensors layout (no torch here).

A slot is a directory under ``/dev/shm/ckptd-<run-id>/`` (``slot-N``) holding a reusable,
pre-faulted ``tensors.safetensors`` file (its capacity may exceed the bytes in
use; the ack says how many are valid) and a small ``structure.json``. The
trainer fills a slot and acks; the daemon copies the valid bytes to the store
and deletes the ack, which frees the slot. Which slots are busy is derived
from the pending acks, so there is no second source of truth to get out of step.

Where shared memory cannot hold a capture (a container's 64 MB ``/dev/shm``), or would eat
into the memory the host keeps in reserve, slots go to ``<run-dir>/.ckptd/staging/``
(``disk-N``) on local disk instead: slower, but the best is still captured. Both sides derive
a slot's directory from its name (``slot_dir``), never from a path anyone wrote down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import psutil

from ckptd.errors import ProtocolError
from ckptd.protocol import RunPaths, pending_ack_paths, read_ack

log = logging.getLogger("ckptd.staging")

TENSORS_FILE = "tensors.safetensors"
STRUCTURE_FILE = "structure.json"
DEFAULT_SLOTS = 2
# safetensors readers expect the data section to start 8-byte aligned.
_HEADER_ALIGN = 8
# safetensors' own readers refuse larger headers; a bigger length is garbage, not a header.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the safetensors header describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Layout:
    """Where every byte of a safetensors file goes: the header, then each tensor back to back."""

    header: bytes
    offsets: tuple[int, ...]
    total: int


def plan_layout(entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None = None) -> Layout:
    """Lay out ``entries`` as a safetensors file (header + contiguous data, no holes)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    position = 0
    relative: list[int] = []
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [position, position + entry.nbytes],
        }
        relative.append(position)
        position += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % _HEADER_ALIGN)
    prefix = struct.pack("<Q", len(text)) + text
    return Layout(prefix, tuple(len(prefix) + r for r in relative), len(prefix) + position)


def read_slot_token(slot_dir: Path, tensors_file: str = TENSORS_FILE) -> str | None:
    """The capture token in the safetensors header of ``slot_dir``'s tensors file, or None.

    The writer zeroes the header before it touches the tensor data and writes the header
    with the new token last, so reading the token before and after copying a slot tells a
    reader whether the bytes it copied belong to the ack carrying that token. None when the
    file is missing or unreadable, the header is invalidated (being rewritten) or malformed,
    or it carries no token. Reads the 8-byte length and the header only, never the data.
    """
    try:
        fd = os.open(slot_dir / tensors_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            raw = read_header_bytes(handle, os.fstat(handle.fileno()).st_size)
    except (OSError, ValueError):
        return None
    return _token_of(raw)


CAPTURE_FILE = "capture.json"  # a sharded slot's token: written by the trainer after DCP's files
_CAPTURE_FILE_BYTES = 4096


def read_capture_token(slot_dir: Path) -> str | None:
    """The token in a sharded (DCP) slot's ``capture.json``, or None (missing, a link, not a
    small JSON object with a string token). The trainer removes it before writing the slot
    and writes it last, so it plays the safetensors header's part for DCP's files."""
    try:
        fd = os.open(slot_dir / CAPTURE_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            data = json.loads(handle.read(_CAPTURE_FILE_BYTES + 1)[:_CAPTURE_FILE_BYTES])
    except (OSError, ValueError, RecursionError):
        return None
    token = data.get("token") if isinstance(data, dict) else None
    return token if isinstance(token, str) and token else None


def read_header_bytes(handle: BinaryIO, valid: int) -> bytes:
    """The JSON header of the safetensors file open as ``handle``, read from its start.

    ``valid`` is how many bytes of the file count (a slot file is longer than its capture).
    Only the 8-byte length and the header are read, never the data; a length of 0 (a writer
    invalidated the header), above ``MAX_HEADER_BYTES`` or past ``valid`` is a ``ValueError``.
    """
    prefix = handle.read(8)
    if len(prefix) < 8 or valid < 8:
        raise ValueError("shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", prefix)
    if length == 0:
        raise ValueError("header length 0 (invalidated while being rewritten?)")
    if length > MAX_HEADER_BYTES or length > valid - 8:
        raise ValueError(f"header length {length} exceeds the file ({valid} bytes) or {MAX_HEADER_BYTES}")
    raw = handle.read(length)
    if len(raw) < length:
        raise ValueError(f"ends inside its {length}-byte header")
    return raw


def _token_of(raw: bytes) -> str | None:
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    token = metadata.get("token") if isinstance(metadata, dict) else None
    return token if isinstance(token, str) and token else None


def default_shm_root() -> Path:
    """``/dev/shm`` where it exists (Linux), else the temp dir; ``CKPTD_SHM_ROOT`` overrides."""
    override = os.environ.get("CKPTD_SHM_ROOT")
    if override:
        return Path(override)
    shm = Path("/dev/shm")
    return shm if shm.is_dir() else Path(tempfile.gettempdir())


def staging_dir_for(run_id: str, root: Path | None = None) -> Path:
    return (root or default_shm_root()) / f"ckptd-{run_id}"


def slot_name(index: int) -> str:
    return f"slot-{index}"


DISK_SLOT_PREFIX = "disk-"
RESERVE_ENV = "CKPTD_MEMORY_RESERVE"
_WARNED: set[str] = set()  # bad values of it, said once each
_MIN_RESERVE = 512 << 20


def disk_slot_name(index: int) -> str:
    return f"{DISK_SLOT_PREFIX}{index}"


def disk_staging_dir(paths: RunPaths) -> Path:
    """Where slots go when shared memory cannot take them: the run's own ``.ckptd/``."""
    return paths.meta / "staging"


def slot_dir(shm_staging: Path, paths: RunPaths, slot: str) -> Path:
    """The directory of the slot an ack names: ``disk-N`` on local disk, else in shared memory."""
    home = disk_staging_dir(paths) if slot.startswith(DISK_SLOT_PREFIX) else shm_staging
    return home / slot


def memory_reserve() -> int:
    """Bytes of memory staging leaves to the host: ``$CKPTD_MEMORY_RESERVE`` (bytes, or a size
    such as ``2GB``; anything else is warned about once and ignored), else 5%
    of the RAM and at least 512 MiB. Pages in ``/dev/shm`` are memory that nobody can swap out
    or reclaim: staging into the last of it would push the trainer into the OOM killer."""
    default = max(_MIN_RESERVE, psutil.virtual_memory().total // 20)
    text = os.environ.get(RESERVE_ENV, "").strip()
    if not text:
        return default
    from ckptd.shards import parse_size  # here: shards builds on this module's layout

    try:
        return int(text) if text.isascii() and text.isdigit() else parse_size(text)
    except ValueError:
        if text not in _WARNED:
            _WARNED.add(text)
            log.warning(
                "ckptd: ignoring %s=%r (bytes, or a size such as 2GB); reserving %d MiB",
                RESERVE_ENV,
                text,
                default >> 20,
            )
        return default


def no_room(folder: Path, nbytes: int, *, in_memory: bool, reusing: int = 0) -> str | None:
    """Why ``nbytes`` more cannot be staged in ``folder`` (the nearest existing parent counts),
    or None when they can. ``reusing``: bytes of a slot there that this one replaces.
    ``in_memory``: the folder is a tmpfs, so its pages also come out of the host's RAM."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free + reusing
    except OSError as exc:
        return f"cannot tell the free space in {probe}: {exc.strerror}"
    if free < nbytes:
        return f"{probe} has {free / 2**20:.0f} MiB free, {nbytes / 2**20:.0f} MiB are needed"
    if in_memory:
        reserve = memory_reserve()
        available = psutil.virtual_memory().available + reusing
        if available - nbytes < reserve:
            return (
                f"{nbytes / 2**20:.0f} MiB more of shared memory would leave the host less than "
                f"its {reserve / 2**20:.0f} MiB reserve ({available / 2**20:.0f} MiB available; "
                f"${RESERVE_ENV} sets it)"
            )
    return None


def busy_slots(paths: RunPaths) -> set[str]:
    """Slots named by an ack the daemon has not committed yet; a bad ack keeps nothing busy."""
    busy: set[str] = set()
    for path in pending_ack_paths(paths):
        try:
            busy.add(read_ack(path).slot)
        except (FileNotFoundError, ProtocolError):
            continue
    return busy


def allocated_bytes(folder: Path) -> int:
    """Bytes of memory the files below ``folder`` occupy (allocated blocks, not sizes: a slot
    is reserved larger than what it holds). 0 when there is no such folder."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def not_private(folder: Path) -> str | None:
    """Why ``folder`` is not a staging dir only this user can touch, or None when it is (or is
    not there yet). Another user's folder at that name (``/dev/shm`` is shared and the run id
    is no secret) would let that user read the weights and forge a slot."""
    try:
        info = os.lstat(folder)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return f"{folder} is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return f"{folder} is not a directory"
    if info.st_uid != os.geteuid():
        return f"{folder} belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()})"
    if info.st_mode & 0o022:  # slots are 0600: only a writable folder lets others swap them
        return f"{folder} is writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
    return None
