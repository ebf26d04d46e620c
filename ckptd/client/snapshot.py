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
import sys
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


def _newer_dtypes(names: Mapping[str, str]) -> dict[torch.dtype, str]:
    # These appeared after the oldest torch this package accepts.
    return {getattr(torch, name): code for name, code in names.items() if hasattr(torch, name)}


_DTYPES.update(
    _newer_dtypes(
        {
            "uint16": "U16",
            "uint32": "U32",
            "uint64": "U64",
            "float8_e4m3fnuz": "F8_E4M3FNUZ",
            "float8_e5m2fnuz": "F8_E5M2FNUZ",
        }
    )
)
# Stored as real pairs (``view_as_real``): complex32 and complex128 have no safetensors dtype.
_COMPLEX = {torch.complex32, torch.complex64, torch.complex128}
# safetensors' torch loader cannot name these: stored as their bytes (U8), viewed back on load.
_RAW = set(_newer_dtypes({"float8_e8m0fnu": "", "float4_e2m1fn_x2": ""}))
STRUCTURE_FORMAT = 1
_SLOT_GRANULE = 64 << 20  # grow slots in 64 MiB steps so a slightly larger state reuses the slot


def flatten_state(state: Any) -> tuple[list[tuple[str, torch.Tensor]], Any]:
    """Split ``state`` into named tensors and a JSON-able skeleton that refers to them."""
    tensors: list[tuple[str, torch.Tensor]] = []
    names: set[str] = {"__metadata__"}  # safetensors' reserved header key is never a tensor name
    # numpy is optional: if it was never imported, no numpy value can be in the state.
    np = sys.modules.get("numpy")

    def visit(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            return _add_tensor(tensors, names, path, value)
        if np is not None and isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in "biufc":
            return _add_numpy(tensors, names, path, value)
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
) -> dict[str, Any]:
    """Add ``tensor`` under a fresh name; the node that refers to it says how to restore its dtype."""
    where = path.lstrip("/")
    if tensor.layout is not torch.strided:
        raise UnsupportedLeafError(where, tensor, f"unsupported tensor layout {tensor.layout}")
    dtype = tensor.dtype
    if tensor.is_quantized or not (dtype in _DTYPES or dtype in _COMPLEX or dtype in _RAW):
        raise UnsupportedLeafError(where, tensor, f"unsupported tensor dtype {dtype}")
    # A lazily negated or conjugated view is not its bytes yet: materialise it.
    tensor = tensor.detach().resolve_conj().resolve_neg()
    name = where or "tensor"
    while name in names:  # "a/b" the key and a→b the nesting would otherwise collide
        name += "#"
    names.add(name)
    if dtype in _COMPLEX:
        tensors.append((name, torch.view_as_real(tensor)))
        return {"$complex": name}
    if dtype in _RAW:
        tensors.append((name, tensor.contiguous().reshape(-1).view(torch.uint8)))
        return {"$raw": name, "dtype": str(dtype).removeprefix("torch."), "shape": list(tensor.shape)}
    tensors.append((name, tensor))
    return {"$tensor": name}


def _add_numpy(tensors: list[tuple[str, torch.Tensor]], names: set[str], path: str, value: Any) -> Any:
    """A numpy array or scalar, stored as a tensor; its numpy dtype (byte order included) is kept."""
    import numpy as np  # present: ``value`` is one of its objects

    array = np.asarray(value)
    try:
        # Native byte order and C order: what torch can view and safetensors stores.
        tensor = torch.from_numpy(np.asarray(array, dtype=array.dtype.newbyteorder("="), order="C"))
    except TypeError as exc:  # e.g. float128, which torch has no dtype for
        raise UnsupportedLeafError(path.lstrip("/"), value, f"unsupported numpy dtype {array.dtype}") from exc
    kind = "$ndarray" if isinstance(value, np.ndarray) else "$npscalar"
    return {kind: _add_tensor(tensors, names, path, tensor), "dtype": array.dtype.str}


def layout_for(
    tensors: Sequence[tuple[str, torch.Tensor]], metadata: Mapping[str, str] | None = None
) -> Layout:
    """The safetensors layout of ``tensors``; ``metadata`` (strings only) joins the header's."""
    entries = [
        TensorEntry(name, _DTYPES[t.dtype], tuple(t.shape), t.numel() * t.element_size())
        for name, t in tensors
    ]
    return plan_layout(entries, {"format": "ckptd", **(metadata or {})})


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
        try:
            self._create(max(_SLOT_GRANULE, -(-needed // _SLOT_GRANULE) * _SLOT_GRANULE))
        except SnapshotError:
            # The granule only spares regrowing; a small /dev/shm (Docker's 64 MB) may hold the
            # state itself but not the round-up.
            self._create(max(mmap.PAGESIZE, -(-needed // mmap.PAGESIZE) * mmap.PAGESIZE))

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
        """Fill the slot; the header (with its capture token) is invalid until everything else is in.

        A reader that checks the token before and after copying (``staging.read_slot_token``)
        then sees a mismatch, never a torn mix of two captures under one token.
        """
        assert self._bytes is not None and self._map is not None
        self._map[:8] = bytes(8)  # header length 0: no header, no token
        for offset, (_, tensor) in zip(layout.offsets, tensors, strict=True):
            flat = tensor.contiguous().reshape(-1).view(torch.uint8)
            self._bytes[offset : offset + flat.numel()].copy_(flat)
        (self.directory / STRUCTURE_FILE).write_bytes(structure)
        self._map[8 : len(layout.header)] = layout.header[8:]
        self._map[:8] = layout.header[:8]  # the length last: the header is valid from here on

    def unlink(self) -> None:
        self.close()
        # Best effort: whatever stands in the way (a file where the directory should be) is
        # not worth an exception in the trainer's clean-up.
        with contextlib.suppress(OSError):
            for path in (self.tensors_path, self.directory / STRUCTURE_FILE):
                path.unlink(missing_ok=True)
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
    if "$complex" in node:
        return torch.view_as_complex(tensors[node["$complex"]])
    if "$raw" in node:
        dtype = getattr(torch, node["dtype"])
        return tensors[node["$raw"]].view(dtype).reshape(node["shape"])
    if "$ndarray" in node or "$npscalar" in node:
        return _numpy(node, tensors)
    if "$dict" in node:
        return {k: _rebuild(v, tensors) for k, v in node["$dict"]}
    if "$tuple" in node:
        return tuple(_rebuild(v, tensors) for v in node["$tuple"])
    if "$float" in node:
        return float(node["$float"])
    raise ValueError(f"unknown node in structure: {sorted(node)}")


def _numpy(node: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Any:
    import numpy as np  # only a state that held numpy values needs it back

    array = _rebuild(node.get("$ndarray") or node["$npscalar"], tensors).numpy()
    dtype = np.dtype(node["dtype"])
    if array.dtype != dtype:
        array = array.astype(dtype)  # a non-native byte order: the same values, swapped back
    return array if "$ndarray" in node else array[()]
