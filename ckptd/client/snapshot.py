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
import errno
import json
import math
import mmap
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ckptd.errors import SnapshotError, UnsupportedLeafError
from ckptd.staging import (
    STRUCTURE_FILE,
    TENSORS_FILE,
    Layout,
    TensorEntry,
    no_room,
    not_private,
    plan_layout,
)

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


# What a checkpoint may name a file (``ckptd.protocol``'s rule for ack file names): one plain
# component. MANIFEST.json is the store's; structure.json belongs to the nested-state layout.
_PLAIN_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_RESERVED_FILES = frozenset({"MANIFEST.json", STRUCTURE_FILE})


@dataclass(frozen=True)
class Export:
    """A snapshot in a framework's own layout, returned by a ``state_fn`` instead of a nested state.

    ``tensors`` (flat names, as the framework's loader expects them) go into one safetensors
    file named ``tensors_file``, whose header ``__metadata__`` is ``metadata`` plus the capture's
    ``token`` and ``ack``; each of ``files`` is written beside it as it is. No ``structure.json``:
    the checkpoint directory is what the framework's own ``save`` would have written, so its own
    ``load`` (``from_pretrained``) reads it. File names are single plain components.

    Two names may not share a tensor's bytes (tied weights): safetensors has no aliasing, so
    keep one name per storage, as the framework's ``save`` does.

    ``max_shard_bytes`` asks the daemon to store ``tensors_file`` as shards of at most that many
    bytes plus an index (``model-00001-of-00002.safetensors``, ``model.safetensors.index.json``)
    when it does not fit one, as ``save_pretrained(max_shard_size=...)`` does. The slot stays
    one file: the trainer's copy is the same either way.
    """

    tensors: Mapping[str, torch.Tensor]
    tensors_file: str = "model.safetensors"
    files: Mapping[str, bytes] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=lambda: {"format": "pt"})
    max_shard_bytes: int | None = None


def export_tensors(export: Export) -> list[tuple[str, torch.Tensor]]:
    """Check ``export`` and return its tensors in order; ``UnsupportedLeafError`` names what is wrong."""
    _check_export_name(export.tensors_file, "tensors_file", export.tensors_file)
    if not export.tensors_file.endswith(".safetensors"):
        raise UnsupportedLeafError(
            "tensors_file", export.tensors_file, f"{export.tensors_file!r} must end in .safetensors"
        )
    for name, content in export.files.items():
        _check_export_name(name, f"files/{name}", content)
        if name == export.tensors_file:
            raise UnsupportedLeafError(f"files/{name}", content, "is also the tensors_file")
        if not isinstance(content, (bytes, bytearray, memoryview)):
            raise UnsupportedLeafError(f"files/{name}", content, "file contents must be bytes")
    _check_shard_bound(export)
    for key, value in export.metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise UnsupportedLeafError(f"metadata/{key}", value, "metadata keys and values must be str")
    tensors: list[tuple[str, torch.Tensor]] = []
    for name, tensor in export.tensors.items():
        where = f"tensors/{name}"
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise UnsupportedLeafError(where, tensor, f"bad tensor name {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise UnsupportedLeafError(where, tensor, f"unsupported type {type(tensor).__qualname__}")
        if tensor.layout is not torch.strided or tensor.device.type == "meta":
            problem = f"unsupported tensor {tensor.layout} on {tensor.device}"
            raise UnsupportedLeafError(where, tensor, problem)
        if tensor.is_quantized or tensor.dtype not in _DTYPES:
            # No structure.json to say how to view it back: only dtypes safetensors names.
            raise UnsupportedLeafError(where, tensor, f"unsupported tensor dtype {tensor.dtype}")
        tensors.append((name, tensor.detach().resolve_conj().resolve_neg()))
    _refuse_shared(tensors)
    return tensors


def _check_shard_bound(export: Export) -> None:
    """``max_shard_bytes`` is a byte count an ack can carry, and no file is named like a shard."""
    bound = export.max_shard_bytes
    if bound is None:
        return
    if not isinstance(bound, int) or isinstance(bound, bool) or not 1 <= bound < 2**63:
        raise UnsupportedLeafError(
            "max_shard_bytes", bound, "max_shard_bytes must be an int >= 1 (bytes) or None"
        )
    # The daemon names the shards and the index after tensors_file: a file of the export
    # holding one of those names would be refused there, long after this capture.
    stem = re.escape(export.tensors_file.removesuffix(".safetensors"))
    shard = re.compile(rf"{stem}-\d{{5}}-of-\d{{5}}\.safetensors|{stem}\.safetensors\.index\.json")
    for name in export.files:
        if shard.fullmatch(name):
            raise UnsupportedLeafError(
                f"files/{name}", name, "is named like a shard of tensors_file or its index"
            )


def _check_export_name(name: object, where: str, value: object) -> None:
    if not isinstance(name, str) or not _PLAIN_FILE.match(name) or name in _RESERVED_FILES:
        raise UnsupportedLeafError(
            where,
            value,
            f"file name {name!r} must be one plain component ([A-Za-z0-9_][A-Za-z0-9._-]*, no '/'), "
            f"not {' or '.join(sorted(_RESERVED_FILES))}",
        )


def _refuse_shared(tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Two names over the same bytes (tied weights) would load as two separate tensors."""
    seen: dict[tuple[str, int], list[tuple[int, int, str]]] = {}
    for name, tensor in tensors:
        if tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage()
        start = int(tensor.storage_offset()) * tensor.element_size()
        end = start + _span(tensor) * tensor.element_size()
        spans = seen.setdefault((str(tensor.device), storage.data_ptr()), [])
        for other_start, other_end, other in spans:
            if start < other_end and other_start < end:
                raise UnsupportedLeafError(
                    f"tensors/{name}",
                    tensor,
                    f"shares its storage with {other!r} (tied weights?); keep one of the names, "
                    "as save_pretrained does",
                )
        spans.append((start, end, name))


def _span(tensor: torch.Tensor) -> int:
    """How many elements of its storage ``tensor`` reaches over, from its offset."""
    return 1 + sum(
        (int(size) - 1) * abs(int(stride)) for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )


def layout_for(
    tensors: Sequence[tuple[str, torch.Tensor]], metadata: Mapping[str, str] | None = None
) -> Layout:
    """The safetensors layout of ``tensors``; ``metadata`` (strings only) joins the header's."""
    return export_layout(tensors, {"format": "ckptd", **(metadata or {})})


def export_layout(tensors: Sequence[tuple[str, torch.Tensor]], metadata: Mapping[str, str]) -> Layout:
    """The safetensors layout of ``tensors`` with exactly ``metadata`` as the header's ``__metadata__``."""
    entries = [
        TensorEntry(name, _DTYPES[t.dtype], tuple(t.shape), t.numel() * t.element_size())
        for name, t in tensors
    ]
    return plan_layout(entries, metadata)


def encode_structure(skeleton: Any, step: int) -> bytes:
    return json.dumps({"format": STRUCTURE_FORMAT, "step": step, "tree": skeleton}).encode()


class Slot:
    """One reusable shared-memory file, mapped once and kept mapped.

    First-touch page faults make a fresh buffer several times slower than a
    warm one, so the file is reserved (``posix_fallocate``: a full /dev/shm is
    an error now, not a SIGBUS mid-copy) and pre-faulted once, then reused.
    """

    def __init__(self, directory: Path, *, in_memory: bool = True) -> None:
        self.directory = directory
        self.name = directory.name
        self.in_memory = in_memory  # a tmpfs slot: its pages are the host's RAM
        self.capacity = 0
        # The safetensors file the slot maps: tensors.safetensors, or an Export's tensors_file.
        self.data_file = TENSORS_FILE
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._bytes: torch.Tensor | None = None
        self._pinned = False  # registered with CUDA (``pin``); unregistered before unmapping

    @property
    def tensors_path(self) -> Path:
        return self.directory / self.data_file

    def ensure_capacity(self, needed: int, data_file: str = TENSORS_FILE) -> None:
        """Map a file of at least ``needed`` bytes named ``data_file``, recreating it if it was
        removed, is too small, or has another name (the slot held the other layout)."""
        if self._fd is not None and os.fstat(self._fd).st_nlink == 0:
            self.close()  # the daemon cleaned it up: our mapping no longer reaches any reader
        if self._fd is not None and needed <= self.capacity and data_file == self.data_file:
            return
        self.close()
        if data_file != self.data_file:
            with contextlib.suppress(OSError):  # the old name's bytes: no pending ack names this slot
                self.tensors_path.unlink(missing_ok=True)
            self.data_file = data_file
        try:
            self._create(max(_SLOT_GRANULE, -(-needed // _SLOT_GRANULE) * _SLOT_GRANULE))
        except SnapshotError:
            # The granule only spares regrowing; a small /dev/shm (Docker's 64 MB) may hold the
            # state itself but not the round-up.
            self._create(max(mmap.PAGESIZE, -(-needed // mmap.PAGESIZE) * mmap.PAGESIZE))

    def _create(self, capacity: int) -> None:
        # Checked before any byte is reserved: a tmpfs that fills up, or a host that runs out
        # of memory, must cost this capture, never the trainer's life.
        problem = no_room(self.directory, capacity, in_memory=self.in_memory, reusing=self.allocated())
        if problem is not None:
            raise SnapshotError(f"no room to stage {capacity / 2**20:.0f} MiB: {problem}")
        for folder in (self.directory.parent, self.directory):
            # Checked before anything is made: a folder planted as a link to elsewhere must
            # not get a slot created in its target.
            problem = not_private(folder)
            if problem is not None:
                raise SnapshotError(f"refusing to stage into it: {problem}")
            folder.mkdir(exist_ok=True, mode=0o700)
        self._refuse_links()
        fd = _open_for_writing(self.tensors_path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, capacity)
            mapping = mmap.mmap(fd, capacity, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except OSError as exc:
            os.close(fd)
            self.tensors_path.unlink(missing_ok=True)
            raise SnapshotError(
                f"cannot reserve {capacity / 2**20:.0f} MiB of staging space in "
                f"{self.directory.parent}: {exc.strerror}; free space there or snapshot less"
            ) from exc
        self._fd, self._map, self.capacity = fd, mapping, capacity
        self._bytes = torch.frombuffer(mapping, dtype=torch.uint8)

    def write(self, layout: Layout, tensors: Sequence[tuple[str, torch.Tensor]], structure: bytes) -> None:
        """Fill the slot with a nested state: its tensors and ``structure.json``."""
        self.write_files(layout, tensors, {STRUCTURE_FILE: structure})

    def allocated(self) -> int:
        """Bytes the slot's data file holds now: freed when it is recreated."""
        try:
            return os.lstat(self.tensors_path).st_blocks * 512
        except OSError:
            return 0

    def write_files(
        self, layout: Layout, tensors: Sequence[tuple[str, torch.Tensor]], files: Mapping[str, bytes]
    ) -> None:
        """Fill the slot at once: ``begin``, every tensor, ``seal``."""
        self.begin(files)
        for offset, (_, tensor) in zip(layout.offsets, tensors, strict=True):
            self.copy_tensor(offset, tensor)
        self.seal(layout)

    def begin(self, files: Mapping[str, bytes]) -> None:
        """Invalidate the header, then write ``files`` (plain names) beside the tensors.

        Until ``seal`` the header carries no token, so a reader that checks the token before
        and after copying (``staging.read_slot_token``) sees a mismatch, never a torn mix of two
        captures under one token. Files an earlier capture of the other layout left are removed.
        """
        assert self._map is not None
        self._map[:8] = bytes(8)  # header length 0: no header, no token
        self._remove_others(files)
        for name, content in files.items():
            _write_file(self.directory / name, content)

    def copy_tensor(self, offset: int, tensor: torch.Tensor, non_blocking: bool = False) -> None:
        """Copy ``tensor``'s bytes to ``offset`` of the data file (``non_blocking``: a CUDA
        tensor's copy is queued on the current stream, into pinned pages when registered)."""
        assert self._bytes is not None
        flat = tensor.contiguous().reshape(-1).view(torch.uint8)
        self._bytes[offset : offset + flat.numel()].copy_(flat, non_blocking=non_blocking)

    def seal(self, layout: Layout) -> None:
        """Write ``layout``'s header, its length last: the header is valid from here on."""
        assert self._map is not None
        self._map[8 : len(layout.header)] = layout.header[8:]
        self._map[:8] = layout.header[:8]

    def pin(self) -> bool:
        """Register the mapping as pinned memory for CUDA (``cudaHostRegister``), once: device
        to host copies into it then run asynchronously at full speed. False when that fails."""
        if self._pinned or self._bytes is None:
            return self._pinned
        ptr, size = self._bytes.data_ptr(), self._bytes.numel()
        # Flag 1 (cudaHostRegisterPortable), as torch.cuda._pin_memory_utils registers memory.
        self._pinned = int(torch.cuda.cudart().cudaHostRegister(ptr, size, 1)) == 0
        return self._pinned

    def _refuse_links(self) -> None:
        """A slot or staging dir that is a symlink could point anywhere: never write through it."""
        for folder in (self.directory.parent, self.directory):
            if folder.is_symlink():
                raise SnapshotError(f"{folder} is a symbolic link; refusing to stage through it")

    def _remove_others(self, keep: Mapping[str, bytes]) -> None:
        # The slot is free (no pending ack names it): nothing in it is anyone's but ours.
        if self.directory.is_symlink() or self.directory.parent.is_symlink():
            return  # never delete through a link
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.directory):
                if (
                    entry.name != self.data_file
                    and entry.name not in keep
                    and entry.is_file(follow_symlinks=False)
                ):
                    os.unlink(entry.path)

    def unlink(self) -> None:
        self.close()
        # Best effort: whatever stands in the way (a file where the directory should be) is
        # not worth an exception in the trainer's clean-up.
        with contextlib.suppress(OSError):
            self._remove_others({})
            self.tensors_path.unlink(missing_ok=True)
            self.directory.rmdir()

    def close(self) -> None:
        if self._pinned and self._bytes is not None:
            int(torch.cuda.cudart().cudaHostUnregister(self._bytes.data_ptr()))
        self._pinned = False
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


def _open_for_writing(path: Path, mode: int) -> int:
    """Create or truncate ``path`` itself: O_NOFOLLOW, so a symlink planted there is refused
    instead of truncating whatever it points at."""
    try:
        return os.open(path, mode | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SnapshotError(f"{path} is a symbolic link; refusing to write through it") from exc
        raise


def _write_file(path: Path, content: bytes) -> None:
    with os.fdopen(_open_for_writing(path, os.O_WRONLY), "wb") as handle:
        handle.write(content)
