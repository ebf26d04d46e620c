"""``ckptd export``: one committed checkpoint written out as a safetensors model for serving.

The checkpoint is verified against its manifest first; one that fails is refused and nothing
is written. Its layout decides how the weights come out:

* a DCP checkpoint (``.metadata`` + ``__<rank>_0.distcp``, FSDP2's ranks): converted with
  ``dcp_to_torch_save`` into a temp file inside the output's temp dir, loaded back
  ``weights_only`` (DCP unpickles the checkpoint's ``.metadata`` on the way: export only
  checkpoints whose writers you trust); the ``"model"`` entry (what ``get_state_dict``
  returns first) is taken;
* a ckptd snapshot (``tensors.safetensors`` + ``structure.json``): read with ``load_snapshot``,
  the ``"model"`` entry again;
* a framework export (``model.safetensors``, or its shards and index, as ``save_pretrained``
  writes them): the weight files are copied as they are.

Without a ``"model"`` entry every tensor of the state is written, under its dotted path. The
output is made in a temp dir beside the destination, then renamed to it: readers see a whole
model or none. A ``config.json`` (``--config``, else the checkpoint's own) makes the folder
loadable with ``transformers``' ``from_pretrained``.

torch is imported only for the two layouts that need it, inside ``torch_required()``: the CLI
stays importable without it and the daemon never imports this module.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd._torch import torch_required
from ckptd.errors import ConfigError, StoreError
from ckptd.protocol import DCP_METADATA, fsync_dir
from ckptd.shards import read_header
from ckptd.staging import STRUCTURE_FILE, TENSORS_FILE
from ckptd.store import Progress, Store

if TYPE_CHECKING:
    import torch

MODEL_FILE = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

_MODEL_KEY = "model"  # get_state_dict's model entry; also what a snapshot's state usually names it
# Besides the weights, what a serving stack reads from a save_pretrained folder. Training state
# (optimizer.pt, trainer_state.json, rng states) stays behind: it is no part of a served model.
_SERVING_FILES = (
    CONFIG_FILE,
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
_CHUNK = 16 << 20


@dataclass(frozen=True)
class Exported:
    """What ``export`` wrote: the checkpoint, the destination, and its files."""

    name: str
    step: int
    to: Path
    tensors: int
    nbytes: int  # the files written, on disk
    files: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "step": self.step,
            "to": str(self.to),
            "tensors": self.tensors,
            "bytes": self.nbytes,
            "files": list(self.files),
        }


def export(
    store: Store, name: str, to: Path, config: Path | None = None, progress: Progress | None = None
) -> Exported:
    """Write checkpoint ``name`` of ``store`` into the new directory ``to``; ``config`` is copied
    in as ``config.json``. ``ConfigError``: a destination or config that cannot be used;
    ``StoreError``: a checkpoint that cannot be read or fails verification (nothing written).
    ``progress(nbytes)`` is called as the verification hashes."""
    dest = _destination(to, store)
    config_bytes = _config(config) if config is not None else None
    record = store.read(name)  # every field the output names, checked before the hashing
    files = _verified_files(store, name, progress)
    source = store.path_of(name)
    with _staged(dest) as staging:
        tensors = _write_weights(source, files, staging)
        _write_side_files(source, files, staging, config_bytes)
        written = tuple(sorted(p.name for p in staging.iterdir()))
        nbytes = sum((staging / f).stat().st_size for f in written)
    return Exported(name, record.step, dest, tensors, nbytes, written)


# -- what may be written where --------------------------------------------------------------------


def _destination(to: Path, store: Store) -> Path:
    """``to`` as an absolute path, refused unless it can become the export: no link, nothing
    in it, a parent that exists, and not inside the store (only ``ckptd.store`` writes there)."""
    dest = Path(os.path.abspath(to))  # normalised, but a link named ``to`` is not followed
    if not dest.name:
        raise ConfigError(f"--to {to}: not a directory ckptd can create")
    if dest.is_symlink():
        raise ConfigError(f"--to {to} is a symbolic link; refusing to write through it")
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"--to {to} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()):
        raise ConfigError(f"--to {to} exists and is not empty; nothing is overwritten, choose another")
    if not dest.parent.is_dir():
        raise ConfigError(f"--to {to}: its parent {dest.parent} does not exist")
    root = Path(os.path.realpath(store.root))
    if Path(os.path.realpath(dest.parent)).is_relative_to(root):
        raise ConfigError(f"--to {to} is inside the store {store.root}; export it elsewhere")
    return dest


def _config(path: Path) -> bytes:
    """The bytes of ``--config``, checked to be a JSON object (a mistyped file fails here, not at
    serving time)."""
    try:
        content = path.read_bytes()
        document = json.loads(content)
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"--config {path} is not valid JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"--config {path} is not a JSON object (a model's config.json is one)")
    return content


def _verified_files(store: Store, name: str, progress: Progress | None) -> frozenset[str]:
    """The files the manifest names, once every one re-hashes to it. Only those are read: a
    file that is in the directory but not in the manifest was never verified."""
    problems = store.verify(name, progress)
    if problems:
        raise StoreError(store.path_of(name), "fails verification, nothing exported: " + "; ".join(problems))
    listed = store.manifest(name).get("files")
    return frozenset(listed) if isinstance(listed, dict) else frozenset()


@contextmanager
def _staged(dest: Path) -> Iterator[Path]:
    """A temp dir beside ``dest`` to fill; renamed to ``dest`` when the block succeeds, removed
    whatever happens. A ``dest`` filled meanwhile by someone else is not replaced."""
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.export-", dir=dest.parent))
    try:
        yield staging
        _publish(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed


def _publish(staging: Path, dest: Path) -> None:
    # mkdtemp's 0700 (and the 0600 of files safetensors writes through a temp file) would keep
    # the model from the serving user: give everything what mkdir and open would.
    umask = os.umask(0)
    os.umask(umask)
    for entry in staging.iterdir():
        entry.chmod(0o666 & ~umask)
        with entry.open("rb") as handle:
            os.fsync(handle.fileno())
    staging.chmod(0o777 & ~umask)
    fsync_dir(staging)
    try:
        os.rename(staging, dest)  # replaces an empty dir; a non-empty one or a link is refused
    except OSError as exc:
        raise ConfigError(f"--to {dest} appeared meanwhile and was not replaced ({exc.strerror})") from exc
    fsync_dir(dest.parent)


# -- the weights, by layout -----------------------------------------------------------------------


def _write_weights(source: Path, files: frozenset[str], staging: Path) -> int:
    """Write the model's tensors into ``staging``; return how many there are."""
    if DCP_METADATA in files:
        return _save_model(_dcp_state(source, staging), staging / MODEL_FILE)
    if {TENSORS_FILE, STRUCTURE_FILE} <= files:
        return _save_model(_snapshot_state(source), staging / MODEL_FILE)
    if MODEL_FILE in files or MODEL_INDEX in files:
        return _copy_hf_weights(source, files, staging)
    raise ConfigError(
        f"{source} is in no layout export knows (a DCP checkpoint, a ckptd snapshot, or "
        f"{MODEL_FILE}); its files: {', '.join(sorted(files))}"
    )


def _dcp_state(source: Path, staging: Path) -> Any:
    """The whole state of a DCP checkpoint, through a torch.save file (removed again) in the
    output's own temp dir: nothing is written outside it, however large the state.

    DCP itself unpickles the checkpoint's ``.metadata`` (and any non-tensor item): export only
    checkpoints whose every writer you trust, as with any DCP or ``torch.load`` of a file."""
    with torch_required():
        import torch
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    saved = staging / ".state.pt"
    try:
        dcp_to_torch_save(source, saved)
        # mmap: the tensors stay in the page cache instead of a second copy in memory.
        return torch.load(saved, weights_only=True, mmap=True)
    # DCP and pickle raise many types, and DCP's CheckpointException is a BaseException: every
    # one means "cannot read".
    except (Exception, CheckpointException) as exc:
        raise StoreError(source, f"cannot read the DCP checkpoint: {type(exc).__name__}: {exc}") from exc
    finally:
        saved.unlink(missing_ok=True)  # a mapping keeps the data until it is dropped


def _snapshot_state(source: Path) -> Any:
    with torch_required():
        from ckptd.client import load_snapshot
    try:
        return load_snapshot(source)
    except (ValueError, KeyError) as exc:  # a structure.json that does not match its tensors
        raise StoreError(source, f"cannot read the snapshot: {exc}") from exc


def _save_model(state: Any, path: Path) -> int:
    """The ``"model"`` entry of ``state`` (else all of it) as one safetensors file."""
    with torch_required():
        from safetensors.torch import save_file

    model = state.get(_MODEL_KEY) if isinstance(state, Mapping) else None
    tensors = _flat_tensors(model if isinstance(model, Mapping) else state)
    if not tensors:
        raise StoreError(path.parent, "the checkpoint holds no tensor to export")
    save_file(_unshared(tensors), str(path), metadata={"format": "pt"})
    return len(tensors)


def _flat_tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor under ``tree`` by its dotted path (a state dict's own keys stay as they are);
    other leaves (steps, learning rates) are no weights and are left out."""
    import torch

    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items: Any = tree.items() if isinstance(tree, Mapping) else ()
    if isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    found: dict[str, torch.Tensor] = {}
    for key, value in items:
        found |= _flat_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    return found


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing memory with another: safetensors refuses both
    strided views and aliases (tied weights, such as an LM head and its embedding)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        plain = tensor.detach().cpu().contiguous()
        pointer = plain.untyped_storage().data_ptr()
        if pointer in seen and plain.numel():
            plain = plain.clone()
        seen.add(plain.untyped_storage().data_ptr())
        out[key] = plain
    return out


def _copy_hf_weights(source: Path, files: frozenset[str], staging: Path) -> int:
    """``model.safetensors``, or its index and every shard it names, copied as they are."""
    if MODEL_FILE in files:
        weights = [MODEL_FILE]
    else:
        index = json.loads((source / MODEL_INDEX).read_bytes())
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        shards = set(weight_map.values()) if isinstance(weight_map, dict) else set()
        if not shards or not shards <= files:
            raise StoreError(source / MODEL_INDEX, "names shards the manifest does not list")
        weights = [MODEL_INDEX, *sorted(shards)]
    tensors = 0
    for name in weights:
        _copy(source / name, staging / name)
        if name != MODEL_INDEX:
            tensors += len(read_header(staging / name, (staging / name).stat().st_size).tensors)
    return tensors


def _write_side_files(source: Path, files: frozenset[str], staging: Path, config: bytes | None) -> None:
    """``config`` as config.json, and the checkpoint's own serving files (its config.json only
    when no ``config`` was given)."""
    if config is not None:
        (staging / CONFIG_FILE).write_bytes(config)
    for name in _SERVING_FILES:
        if name in files and not (staging / name).exists():
            _copy(source / name, staging / name)


def _copy(source: Path, target: Path) -> None:
    """Copy a store file, never through a link planted in its place."""
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as src, target.open("xb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)
