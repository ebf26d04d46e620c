"""Turning a nested training state into a safetensors slot, and back.

Tensors are copied byte for byte into a shared-memory file laid out as
safetensors (one copy, no pickling). Everything else (optimizer
``param_groups``, step counters, ...) goes into ``structure.json``, which also
records the shape of the tree: dict keys keep their type (optimizer state is
keyed by int) and tuples stay tuples, so ``load_snapshot`` returns the same
structure that went in.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ckptd.errors import SnapshotError, UnsupportedLeafError
from ckptd.staging import STRUCTURE_FILE, TENSORS_FILE, Layout, TensorEntry, plan_layout

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
STRUCTURE_FORMAT = 1
_SLOT_GRANULE = 64 << 20  # grow slots in 64 MiB steps so a slightly larger state reuses the slot


def flatten_state(state: Any) -> tuple[list[tuple[str, torch.Tensor]], Any]:
    """Split ``state`` into named tensors and a JSON-able skeleton that refers to them."""
    tensors: list[tuple[str, torch.Tensor]] = []
    names: set[str] = {"__metadata__"}  # safetensors' reserved header key is never a tensor name

    def visit(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            return {"$tensor": _add_tensor(tensors, names, path, value)}
        if isinstance(value, Mapping):
            return {"$dict": [[_check_key(k, path), visit(v, f"{path}/{k}")] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"$tuple": [visit(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [visit(v, f"{path}/{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (str, bool, int, float)):
            return _scalar(value)
        raise UnsupportedLeafError(path.lstrip("/"), value)

    return tensors, visit(state, "")


def _check_key(key: Any, path: str) -> Any:
    if key is None or isinstance(key, (str, bool, int, float)):
        return key
    raise UnsupportedLeafError(f"{path.lstrip('/')}/<key {key!r}>", key)


def _scalar(value: Any) -> Any:
    # JSON has no NaN or infinity; keep them exactly, tagged.
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": repr(value)}
    return value


def _add_tensor(
    tensors: list[tuple[str, torch.Tensor]], names: set[str], path: str, tensor: torch.Tensor
) -> str:
    if tensor.layout is not torch.strided or tensor.is_quantized or tensor.dtype not in _DTYPES:
        raise UnsupportedLeafError(path.lstrip("/"), tensor)
    name = path.lstrip("/") or "tensor"
    while name in names:  # "a/b" the key and a→b the nesting would otherwise collide
        name += "#"
    names.add(name)
    tensors.append((name, tensor.detach()))
    return name


def layout_for(tensors: Sequence[tuple[str, torch.Tensor]]) -> Layout:
    entries = [
        TensorEntry(name, _DTYPES[t.dtype], tuple(t.shape), t.numel() * t.element_size())
        for name, t in tensors
    ]
    return plan_layout(entries, {"format": "ckptd"})


def encode_structure(skeleton: Any, step: int) -> bytes:
    return json.dumps({"format": STRUCTURE_FORMAT, "step": step, "tree": skeleton}).encode()


class Slot:
    """One reusable shared-memory file, mapped once and kept mapped.

    First-touch page faults make a fresh buffer several times slower than a
    warm one, so the file is reserved (``posix_fallocate``: a full /dev/shm is
    an error now, not a SIGBUS mid-copy) and pre-faulted once, then reused.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.name = directory.name
        self.capacity = 0
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._bytes: torch.Tensor | None = None

    @property
    def tensors_path(self) -> Path:
        return self.directory / TENSORS_FILE

    def ensure_capacity(self, needed: int) -> None:
        """Map a file of at least ``needed`` bytes, recreating it if it was removed or is too small."""
        if self._fd is not None and os.fstat(self._fd).st_nlink == 0:
            self.close()  # the daemon cleaned it up: our mapping no longer reaches any reader
        if self._fd is not None and needed <= self.capacity:
            return
        self.close()
        self._create(max(_SLOT_GRANULE, -(-needed // _SLOT_GRANULE) * _SLOT_GRANULE))

    def _create(self, capacity: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.tensors_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, capacity)
            mapping = mmap.mmap(fd, capacity, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except OSError as exc:
            os.close(fd)
            self.tensors_path.unlink(missing_ok=True)
            raise SnapshotError(
                f"cannot reserve {capacity / 2**20:.0f} MiB of shared memory in "
                f"{self.directory.parent}: {exc.strerror}; free space there or snapshot less"
            ) from exc
        self._fd, self._map, self.capacity = fd, mapping, capacity
        self._bytes = torch.frombuffer(mapping, dtype=torch.uint8)

    def write(self, layout: Layout, tensors: Sequence[tuple[str, torch.Tensor]], structure: bytes) -> None:
        assert self._bytes is not None and self._map is not None
        self._map[: len(layout.header)] = layout.header
        for offset, (_, tensor) in zip(layout.offsets, tensors, strict=True):
            flat = tensor.contiguous().reshape(-1).view(torch.uint8)
            self._bytes[offset : offset + flat.numel()].copy_(flat)
        (self.directory / STRUCTURE_FILE).write_bytes(structure)

    def unlink(self) -> None:
        self.close()
        for path in (self.tensors_path, self.directory / STRUCTURE_FILE):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.directory.rmdir()

    def close(self) -> None:
        self._bytes = None
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.capacity = 0


def load_snapshot(path: str | os.PathLike[str]) -> Any:
    """Load a committed checkpoint directory: the nested structure back, tensors on CPU, bit-identical."""
    directory = Path(path)
    tensors_path, structure_path = directory / TENSORS_FILE, directory / STRUCTURE_FILE
    if not structure_path.is_file() or not tensors_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a ckptd checkpoint (expected {TENSORS_FILE} and {STRUCTURE_FILE})"
        )
    document = json.loads(structure_path.read_bytes())
    if document.get("format") != STRUCTURE_FORMAT:
        raise ValueError(f"{structure_path}: unknown structure format {document.get('format')!r}")
    return _rebuild(document["tree"], load_file(str(tensors_path), device="cpu"))


def _rebuild(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_rebuild(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "$tensor" in node:
        return tensors[node["$tensor"]]
    if "$dict" in node:
        return {k: _rebuild(v, tensors) for k, v in node["$dict"]}
    if "$tuple" in node:
        return tuple(_rebuild(v, tensors) for v in node["$tuple"])
    if "$float" in node:
        return float(node["$float"])
    raise ValueError(f"unknown node in structure: {sorted(node)}")
