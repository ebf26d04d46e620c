"""Shared-memory staging slots and their safetensors layout (no torch here).

A slot is a directory under ``/dev/shm/ckptd-<run-id>/`` holding a reusable,
pre-faulted ``tensors.safetensors`` file (its capacity may exceed the bytes in
use; the ack says how many are valid) and a small ``structure.json``. The
trainer fills a slot and acks; the daemon copies the valid bytes to the store
and deletes the ack, which frees the slot. Which slots are busy is derived
from the pending acks, so there is no second source of truth to get out of step.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ckptd.errors import ProtocolError
from ckptd.protocol import RunPaths, pending_ack_paths, read_ack

TENSORS_FILE = "tensors.safetensors"
STRUCTURE_FILE = "structure.json"
DEFAULT_SLOTS = 2
# safetensors readers expect the data section to start 8-byte aligned.
_HEADER_ALIGN = 8


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


def busy_slots(paths: RunPaths) -> set[str]:
    """Slots named by an ack the daemon has not committed yet; a bad ack keeps nothing busy."""
    busy: set[str] = set()
    for path in pending_ack_paths(paths):
        try:
            busy.add(read_ack(path).slot)
        except (FileNotFoundError, ProtocolError):
            continue
    return busy
