"""Splitting a slot's safetensors file into shards with an index, as ``save_pretrained`` does.

Pure and torch-free: the daemon reads the header of the slot's one tensors file (untrusted
input, checked strictly), plans the shards the way ``huggingface_hub``'s
``split_state_dict_into_shards_factory`` does (tensors in header order; a new shard when the
next tensor would take the current one past the bound; a tensor above the bound alone in a
shard of its own), and says, for each shard, its new header and which byte ranges of the slot
file follow it. ``ckptd.store`` writes them. Everything that fits one shard stays the one
file it was, with no index, as ``save_pretrained`` leaves it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.errors import ProtocolError
from ckptd.fields import is_count
from ckptd.staging import TensorEntry, plan_layout, read_header_bytes

# Bytes per element of every dtype a snapshot writes (``ckptd.client.snapshot._DTYPES``).
DTYPE_SIZES: Mapping[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
}
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
# huggingface_hub's parse_size_to_int, which save_pretrained's string max_shard_size goes through.
_SIZE_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}
_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class HeaderTensor:
    """One tensor of a parsed header; ``begin``/``end`` are offsets in the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A safetensors header: its ``__metadata__``, its tensors in header order, where data starts."""

    metadata: Mapping[str, str]
    tensors: tuple[HeaderTensor, ...]
    data_start: int  # 8 + the header length: the file offset of data offset 0


@dataclass(frozen=True)
class Shard:
    """One shard file: ``header`` (length, JSON, padding), then ``ranges`` of the source file."""

    name: str
    header: bytes
    ranges: tuple[tuple[int, int], ...]  # [start, end) in the source file, in order


@dataclass(frozen=True)
class ShardPlan:
    """The shard files that replace one tensors file, and the index naming each tensor's shard."""

    shards: tuple[Shard, ...]
    index_name: str
    index: bytes


def parse_size(size: int | str) -> int:
    """``max_shard_size`` as ``save_pretrained`` reads it: bytes, or ``"5GB"``, ``"0.5MB"``
    (``TB``/``GB``/``MB``/``KB``, powers of 10, as ``huggingface_hub.parse_size_to_int``).

    A bound below one byte is a ``ValueError``: it would put every tensor in a shard of its own.
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"max_shard_size must be an int or a string like '5GB', not {size!r}")
    if isinstance(size, str):
        text = size.strip()
        multiplier = _SIZE_UNITS.get(text[-2:].upper())
        if multiplier is None:
            raise ValueError(f"max_shard_size {size!r}: unit must be one of TB, GB, MB, KB")
        try:
            value = float(text[:-2].strip())
        except ValueError:
            raise ValueError(f"max_shard_size {size!r}: no number before the unit") from None
        if not math.isfinite(value):
            raise ValueError(f"max_shard_size {size!r} is not a finite size")
        size = int(value * multiplier)
    if size < 1:
        raise ValueError(f"max_shard_size must be at least 1 byte, not {size}")
    return size


def read_header(path: Path, valid: int) -> Header:
    """The checked header of the safetensors file ``path`` whose first ``valid`` bytes count.

    Opened with O_NOFOLLOW (a slot file that is a symlink is refused). ``ProtocolError`` for a
    header that is malformed or does not describe exactly the ``valid`` bytes.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ProtocolError(path, f"cannot open: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as handle:
        try:
            raw = read_header_bytes(handle, valid)
        except ValueError as exc:
            raise ProtocolError(path, f"not a safetensors file: {exc}") from exc
    return parse_header(raw, valid, path)


def parse_header(raw: bytes, valid: int, where: Path | str = "<header>") -> Header:
    """Check the JSON header ``raw`` of a safetensors file of ``valid`` bytes, strictly.

    The slot is written by another process: every tensor needs a known dtype, a shape of
    counts, offsets matching its size, and together the tensors must tile the data section
    exactly (no overlap, no gap, nothing past the end). ``ProtocolError`` says what is wrong.
    """
    document = _json_object(raw, where)
    metadata = _metadata(document.pop("__metadata__", None), where)
    tensors = tuple(_tensor(name, entry, where) for name, entry in document.items())
    data_start = 8 + len(raw)
    _check_tiling(tensors, valid - data_start, where)
    return Header(metadata, tensors, data_start)


def _json_object(raw: bytes, where: Path | str) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise ProtocolError(where, "header names a key twice")
        return dict(pairs)

    try:
        document = json.loads(raw, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as exc:  # ProtocolError is a ValueError: kept as it is
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError(where, f"header is not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(document, dict):
        raise ProtocolError(where, f"header is a JSON {type(document).__name__}, not an object")
    return document


def _metadata(value: object, where: Path | str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ProtocolError(where, "header __metadata__ must map strings to strings")
    return dict(value)


def _tensor(name: str, entry: object, where: Path | str) -> HeaderTensor:
    shown = name if len(name) <= 60 else name[:57] + "..."
    if not name:
        raise ProtocolError(where, "header names a tensor ''")
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise ProtocolError(where, f"tensor {shown!r}: needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise ProtocolError(where, f"tensor {shown!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(is_count(n) for n in shape):
        raise ProtocolError(where, f"tensor {shown!r}: shape must be a list of integers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)):
        raise ProtocolError(where, f"tensor {shown!r}: data_offsets must be two integers >= 0")
    begin, end = offsets
    if end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise ProtocolError(where, f"tensor {shown!r}: data_offsets {offsets} do not fit {dtype}{shape}")
    return HeaderTensor(name, dtype, tuple(shape), begin, end)


def _check_tiling(tensors: Sequence[HeaderTensor], data_bytes: int, where: Path | str) -> None:
    """The tensors cover [0, data_bytes) exactly once, as safetensors' own loader demands."""
    position = 0
    for tensor in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if tensor.begin != position:
            problem = "overlaps another" if tensor.begin < position else "leaves a gap before it"
            raise ProtocolError(where, f"tensor {tensor.name[:60]!r} at {tensor.begin}: {problem}")
        position = tensor.end
    if position != data_bytes:
        raise ProtocolError(where, f"tensors cover {position} data bytes, the file holds {data_bytes}")


def plan_groups(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard, exactly as ``split_state_dict_into_shards_factory`` groups them.

    Names in order; a tensor that would take the current shard past ``max_shard_bytes`` starts
    a new one; a tensor larger than the bound gets a shard of its own *at once*, while the
    current shard stays open and comes after it (the library's order, kept so the files match).
    """
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, nbytes in sizes:
        if nbytes > max_shard_bytes:
            shards.append([name])
            continue
        if current_size + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += nbytes
    if current:
        shards.append(current)
    return shards


def shard_names(tensors_file: str, count: int) -> list[str]:
    """``model.safetensors`` -> ``model-00001-of-00003.safetensors``..., the library's pattern."""
    stem = _stem(tensors_file)
    return [f"{stem}-{i:05d}-of-{count:05d}{_SUFFIX}" for i in range(1, count + 1)]


def index_name(tensors_file: str) -> str:
    """``model.safetensors.index.json``: the pattern with no suffix, plus ``.index.json``."""
    return f"{_stem(tensors_file)}{_SUFFIX}.index.json"


def _stem(tensors_file: str) -> str:
    if not tensors_file.endswith(_SUFFIX) or tensors_file == _SUFFIX:
        raise ProtocolError(tensors_file, f"only a *{_SUFFIX} file can be sharded")
    return tensors_file[: -len(_SUFFIX)]


def plan_shards(header: Header, tensors_file: str, max_shard_bytes: int) -> ShardPlan | None:
    """The shards replacing ``tensors_file`` (whose ``header`` this is); None when one file holds it all."""
    groups = plan_groups(((t.name, t.nbytes) for t in header.tensors), max_shard_bytes)
    if len(groups) <= 1:
        return None
    names = shard_names(tensors_file, len(groups))
    by_name = {tensor.name: tensor for tensor in header.tensors}
    shards = tuple(
        _shard(name, [by_name[t] for t in group], header) for name, group in zip(names, groups, strict=True)
    )
    weight_map = {t: name for name, group in zip(names, groups, strict=True) for t in group}
    index = {"metadata": {"total_size": sum(t.nbytes for t in header.tensors)}, "weight_map": weight_map}
    # save_pretrained's own formatting of the index, byte for byte.
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    return ShardPlan(shards, index_name(tensors_file), text.encode())


def _shard(name: str, tensors: Sequence[HeaderTensor], header: Header) -> Shard:
    # Each shard keeps the slot's __metadata__ (format "pt": transformers refuses a shard
    # without it; the capture's token, as the unsharded file has it).
    layout = plan_layout([TensorEntry(t.name, t.dtype, t.shape, t.nbytes) for t in tensors], header.metadata)
    ranges: list[tuple[int, int]] = []
    for tensor in tensors:
        start, end = header.data_start + tensor.begin, header.data_start + tensor.end
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)  # neighbours in the slot: one range, one copy
        elif end > start:
            ranges.append((start, end))
    return Shard(name, layout.header, tuple(ranges))
