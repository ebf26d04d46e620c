"""A Hugging Face ``Trainer`` callback: the log ckptd follows, and best snapshots in the HF layout.

::

    trainer.add_callback(CkptdCallback())          # run dir: $CKPTD_RUN_DIR, else args.output_dir
    # beside it:  ckptd run OUTPUT_DIR --log ckptd-metrics.jsonl --metric eval_loss

Every ``Trainer.log`` call becomes one JSON line ``{"step": global_step, **logs}`` in
``<run_dir>/ckptd-metrics.jsonl``. After each evaluation (whose metrics ``Trainer.evaluate``
has logged just before ``on_evaluate``) the callback waits, bounded, for the daemon's verdict,
and when the eval is a new best it captures the weights right there, before the next
optimizer step: the checkpoint holds exactly the weights that were evaluated. The checkpoint
is what ``save_pretrained`` writes (``model.safetensors`` without tied duplicates, or above
``max_shard_size`` its shards and ``model.safetensors.index.json``, cut by the daemon from the
one file the trainer staged; ``config.json``, ``generation_config.json``, the tokenizer or
processor files), so ``AutoModel*.from_pretrained(best_dir)`` loads it; for a
``peft.PeftModel`` it is the adapter (``adapter_model.safetensors``, ``adapter_config.json``)
that ``PeftModel.from_pretrained(base, best_dir)`` loads. With no daemon running, the
callback costs an ``os.stat`` per step and one line per log.

A scheduled capture (``ckptd run --every-steps N``, taken at the step's end) is a full
``Trainer`` checkpoint: the same weights and files plus ``optimizer.pt``, ``scheduler.pt``,
``rng_state.pth``, ``trainer_state.json`` and ``training_args.bin`` (``scaler.pt`` too with a
gradient scaler), so ``trainer.train(resume_from_checkpoint=that_dir)`` continues from it:
on CPU, bit for bit as the uninterrupted run. The pickles are ``torch.save``d to memory at
the capture, the one cost it adds to the trainer. At a step that is evaluated the capture
waits for ``on_evaluate`` (the eval draws from the RNG, and the Trainer saves after it), and a
best of that eval is the same capture. Not carried yet: the live state of other stateful
callbacks (``EarlyStoppingCallback``: its state from the start of training is kept), FLOPs
not yet folded into ``total_flos``, and the sharded layouts of DeepSpeed and FSDP. A step
whose eval is asked for by a callback after this one is captured before that eval's draws.

Only the world process zero acts: it alone reads the control file and captures (under DDP
every rank holds the same weights). After each eval it broadcasts whether it captured the step
over the job's process group (``ckptd.client.collective.agree``), so every rank agrees on it
(``last_decision``); the per-step path sends nothing. Without a process group nothing changes.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import io
import json
import logging
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

from ckptd._torch import torch_required

with torch_required():  # without torch: say which extra to install
    import torch
from transformers import PreTrainedModel, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ckptd.client import Export
from ckptd.client.collective import agree, is_leader
from ckptd.integrations.link import RunLink
from ckptd.protocol import read_small_file
from ckptd.shards import parse_size

LAUNCHER_ARGS_FILE = "args.json"  # ms-swift's record of its command line, in output_dir
_LAUNCHER_ARGS_MAX = 1 << 20

log = logging.getLogger("ckptd.integrations.hf")

MODEL_FILE = "model.safetensors"  # transformers' SAFE_WEIGHTS_NAME
ADAPTER_FILE = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME
# The names transformers.trainer saves a checkpoint's training state under and reads back on resume.
OPTIMIZER_FILE = "optimizer.pt"  # OPTIMIZER_NAME
SCHEDULER_FILE = "scheduler.pt"  # SCHEDULER_NAME
SCALER_FILE = "scaler.pt"  # SCALER_NAME
TRAINER_STATE_FILE = "trainer_state.json"  # TRAINER_STATE_NAME
TRAINING_ARGS_FILE = "training_args.bin"  # TRAINING_ARGS_NAME
# save_pretrained's max_shard_size default in transformers 5.x, should its signature not say.
_SHARD_SIZE_FALLBACK = "50GB"


class CkptdCallback(TrainerCallback):
    """Writes the metrics log a ckptd daemon follows and captures the steps it asks for.

    ``run_dir`` is the daemon's RUN_DIR: by default ``$CKPTD_RUN_DIR``, else the Trainer's
    ``output_dir``. ``log_name`` is the log inside it (give the daemon ``--log`` the same).
    ``rendezvous_timeout`` bounds the wait for a verdict after each eval, in seconds.
    ``max_shard_size`` is ``save_pretrained``'s: weights above it are stored as shards plus
    ``model.safetensors.index.json`` (bytes, or a string such as ``"5GB"``); by default the
    installed transformers' own default. A PEFT adapter stays one file, as PEFT saves it.
    ``overlap`` (default on) lets a capture's copy of the weights run while the next step's
    forward and backward do (the optimizer's step waits for it); turn it off when a callback of
    yours writes the params through ``.data`` between an eval and the next step.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        log_name: str = "ckptd-metrics.jsonl",
        rendezvous_timeout: float = 2.0,
        max_shard_size: int | str | None = None,
        overlap: bool = True,
    ) -> None:
        self.link = RunLink(run_dir, log_name, rendezvous_timeout, overlap)
        # Parsed now: a bad size is the user's mistake to see at once, not at the first best.
        self.max_shard_bytes = parse_size(
            _save_pretrained_shard_size() if max_shard_size is None else max_shard_size
        )
        self._prepared = False
        self._training = False
        self._side_files: dict[str, bytes] | None = None  # config, tokenizer...: fixed for a run
        self._deferred_step = -1  # a step whose end left its capture to the eval that follows
        # (step, captured) of the last eval, as rank 0 decided it: the same on every rank.
        self.last_decision: tuple[int, bool] | None = None

    # -- the Trainer's events ------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not _acts(state):
            return
        self._training = True
        self._prepared = False
        self._deferred_step = -1
        client = self.link.client(args.output_dir)
        optimizer = kwargs.get("optimizer")
        if optimizer is not None:
            # The copy of the weights then overlaps the next step's forward and backward.
            self.link.track(client, optimizer)
        model = kwargs.get("model")
        if model is not None:
            # Saved once, now: these files do not change while the run trains.
            self._side_files = _side_files(_unwrap(model), _processing_class(kwargs), args.output_dir)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not _acts(state) or logs is None:
            return
        handle = self.link.log_file(args.output_dir)
        # NaN and Infinity are written as such: ckptd's jsonl reader takes them.
        line = json.dumps({"step": state.global_step, **logs}, default=_json_value)
        handle.write(line + "\n")
        handle.flush()  # the daemon can only judge what reached the file

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not _acts(state):
            return
        client = self.link.client(args.output_dir)
        model = kwargs["model"]

        def full() -> Export:
            return self.periodic_state(model, kwargs, args=args, state=state, control=control)

        if not self._prepared:
            # After the first optimizer step: fault in a slot before the first eval needs it.
            # False (and retried at the next step) while no daemon has said where slots go.
            self._prepared = client.prepare(full)
        if control.should_evaluate:
            # An eval follows at this step, and it draws from torch's RNG (every DataLoader
            # iterator does): what is captured here is captured after it, in on_evaluate, so the
            # RNG state is the one the next step starts from, as in the Trainer's own save.
            self._deferred_step = state.global_step
            return
        client.maybe_snapshot(state.global_step, full)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        captured = False
        try:
            if _acts(state):
                captured = self._evaluated(args, state, control, kwargs)
        finally:
            # Every rank evaluates, so every rank comes here: rank 0 tells the others whether
            # this eval's step was captured (a collective under DDP; nothing without a group).
            self.last_decision = (state.global_step, agree(captured))

    def _evaluated(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, kwargs: dict[str, Any]
    ) -> bool:
        """Process zero's rendezvous after an eval: whether it captured the step."""
        self.link.flush()  # Trainer.evaluate logged the metrics (on_log) just before this
        client = self.link.client(args.output_dir)
        model = kwargs["model"]
        step = state.global_step
        try:
            verdict = client.wait_verdict(step)
            deferred, self._deferred_step = self._deferred_step, -1
            if self._training and step == deferred and self.link.on_schedule(step):
                # The step's end left its capture to now: a scheduled one, in the resumable
                # layout, and a best of this eval with it (one capture; that layout is a superset).
                return client.maybe_snapshot(
                    step, lambda: self.periodic_state(model, kwargs, args=args, state=state, control=control)
                )
            if verdict is not None:
                # A best is captured now, with the weights that were just evaluated.
                return client.maybe_snapshot(step, lambda: self.best_export(model, kwargs))
            return False
        finally:
            if not self._training:  # an evaluate() outside train(): no on_train_end will close it
                self.link.close()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not _acts(state):
            return
        self._training = False
        self.link.close()

    # -- what is captured ----------------------------------------------------------------

    def best_export(self, model: torch.nn.Module, kwargs: dict[str, Any] | None = None) -> Export:
        """The model as ``save_pretrained`` writes it (the adapter alone for a PEFT model)."""
        model = _unwrap(model)
        if self._side_files is None:
            self._side_files = _side_files(model, _processing_class(kwargs or {}))
        if _is_peft(model):
            return Export(_adapter_tensors(model), ADAPTER_FILE, self._side_files, {"format": "pt"})
        return Export(
            _model_tensors(model), MODEL_FILE, self._side_files, {"format": "pt"}, self.max_shard_bytes
        )

    def periodic_state(
        self,
        model: torch.nn.Module,
        kwargs: dict[str, Any] | None = None,
        *,
        args: TrainingArguments | None = None,
        state: TrainerState | None = None,
        control: TrainerControl | None = None,
    ) -> Export:
        """What a scheduled capture (``ckptd run --every-steps``) stores: a ``Trainer`` checkpoint.

        ``best_export`` plus what ``Trainer.train(resume_from_checkpoint=...)`` reads: the
        optimizer, scheduler (and gradient scaler) state dicts, the RNG states, the trainer
        state at ``state.global_step`` and the arguments, as ``Trainer._save_checkpoint``
        names them. Without ``state`` or the ``optimizer`` and ``lr_scheduler`` of
        ``kwargs`` (the Trainer's callback events carry them), the weights alone.
        """
        export = self.best_export(model, kwargs)
        kwargs = kwargs or {}
        optimizer = kwargs.get("optimizer")
        scheduler = kwargs.get("lr_scheduler")
        if state is None or optimizer is None or scheduler is None:
            return export
        files = dict(export.files)
        files[OPTIMIZER_FILE] = _saved(optimizer.state_dict())
        files[SCHEDULER_FILE] = _saved(scheduler.state_dict())
        scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer holds it
        if scaler is not None:
            files[SCALER_FILE] = _saved(scaler.state_dict())
        # Only process zero captures: other ranks find no file of theirs and resume unseeded.
        rng_file = (
            "rng_state.pth" if args is None or args.world_size <= 1 else f"rng_state_{args.process_index}.pth"
        )
        files[rng_file] = _saved(_rng_states(args))
        files[TRAINER_STATE_FILE] = _trainer_state_json(state, control)
        if args is not None:
            files[TRAINING_ARGS_FILE] = _saved(args)
        return dataclasses.replace(export, files=files)  # sharded as the best is, as the Trainer saves

    # -- plumbing --------------------------------------------------------------------------


def _save_pretrained_shard_size() -> int | str:
    """The default ``max_shard_size`` of the installed ``save_pretrained`` ("50GB" in transformers 5.x)."""
    try:
        default = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    except (KeyError, TypeError, ValueError):  # a transformers without the parameter
        return _SHARD_SIZE_FALLBACK
    return (
        default if isinstance(default, (int, str)) and not isinstance(default, bool) else _SHARD_SIZE_FALLBACK
    )


def _saved(value: Any) -> bytes:
    """``torch.save(value, path)``'s bytes, written to memory."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _rng_states(args: TrainingArguments | None) -> dict[str, Any]:
    """What ``Trainer._save_rng_state`` saves and ``_load_rng_state`` restores (CPU and CUDA)."""
    import numpy as np  # a dependency of transformers

    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        distributed = args is not None and getattr(args.parallel_mode, "value", None) == "distributed"
        cuda = torch.cuda.random
        states["cuda"] = cuda.get_rng_state_all() if distributed else cuda.get_rng_state()
    return states


def _trainer_state_json(state: TrainerState, control: TrainerControl | None) -> bytes:
    """``TrainerState.save_to_json``'s text for ``state`` as it is now, the trainer's own left as it is.

    ``Trainer._save_checkpoint`` first records the stateful callbacks' current state; of those
    the callback sees only ``control``. The others keep what the state holds (their state when
    training began).
    """
    document = dataclasses.asdict(state)
    callbacks = dict(document.get("stateful_callbacks") or {})
    if control is not None:
        callbacks[type(control).__name__] = control.state()
    document["stateful_callbacks"] = callbacks
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _processing_class(kwargs: dict[str, Any]) -> Any:
    # transformers < 4.46 passes the tokenizer as ``tokenizer``.
    return kwargs.get("processing_class") or kwargs.get("tokenizer")


def _json_value(value: Any) -> Any:
    """A log value json cannot write as it is: a tensor or numpy number as its number."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            number = item()
        except (TypeError, ValueError, RuntimeError):
            return str(value)
        return number if isinstance(number, (int, float)) or number is None else str(number)
    return str(value)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside wrappers: DDP-style (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _is_peft(model: torch.nn.Module) -> bool:
    peft = sys.modules.get("peft")  # never imported: the model cannot be one of its classes
    return peft is not None and isinstance(model, peft.PeftModel)


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as ``save_pretrained`` stores it: ignored keys and tied copies removed."""
    state: dict[str, torch.Tensor] = dict(model.state_dict())
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    if isinstance(model, PreTrainedModel):
        try:
            from transformers.modeling_utils import remove_tied_weights_from_state_dict
        except ImportError:  # another transformers: the storage check below does the same job
            pass
        else:
            state = remove_tied_weights_from_state_dict(state, model)
        try:
            from transformers.core_model_loading import revert_weight_conversion
        except ImportError:
            pass
        else:
            # save_pretrained's default (save_original_format): names and fusions as on the Hub.
            state = revert_weight_conversion(model, state)
    return _drop_aliases(state)


def _drop_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the first name of each tensor view (a tied weight loads back from it); copy the
    rare tensor that overlaps another without being the same view."""
    kept: dict[str, torch.Tensor] = {}
    seen: dict[tuple[str, int], list[torch.Tensor]] = {}
    for name, tensor in state.items():
        if tensor.numel() == 0 or tensor.device.type == "meta":
            kept[name] = tensor
            continue
        others = seen.setdefault((str(tensor.device), tensor.untyped_storage().data_ptr()), [])
        if any(_same_view(tensor, other) for other in others):
            continue
        if others:
            tensor = tensor.clone()  # shares bytes with another name: safetensors cannot alias
        else:
            others.append(tensor)
        kept[name] = tensor
    return kept


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.storage_offset() == b.storage_offset()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def _adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The active adapter's weights, named as ``PeftModel.save_pretrained`` names them."""
    from peft import get_peft_model_state_dict

    adapter = _active_adapter(model)
    state: dict[str, torch.Tensor] = get_peft_model_state_dict(model, adapter_name=adapter)
    # PeftModel.save_pretrained keeps every name and clones the ones sharing storage.
    kept: dict[str, torch.Tensor] = {}
    storages: set[tuple[str, int]] = set()
    for name, tensor in state.items():
        key = (str(tensor.device), tensor.untyped_storage().data_ptr())
        kept[name] = tensor.clone() if key in storages and tensor.numel() else tensor
        storages.add(key)
    return kept


def _active_adapter(model: torch.nn.Module) -> str:
    active = getattr(model, "active_adapter", "default")
    return active if isinstance(active, str) else str(active[0])


def _launcher_args(output_dir: str | None) -> dict[str, bytes]:
    if output_dir is None:
        return {}
    try:  # regular file, no link, no FIFO waited on, bounded: checked on the open file itself
        return {LAUNCHER_ARGS_FILE: read_small_file(Path(output_dir, LAUNCHER_ARGS_FILE), _LAUNCHER_ARGS_MAX)}
    except (OSError, ValueError):
        return {}


def _acts(state: TrainerState) -> bool:
    """Whether this process talks to the daemon: the Trainer's world process zero, and rank 0
    of torch.distributed when a group exists. Both, because a launcher can start a process
    group the Trainer does not see (ms-swift under torchrun on CPU): every rank is then its
    "process zero", and two writers of one metrics log would mislabel the best."""
    return bool(state.is_world_process_zero) and is_leader()


def _side_files(
    model: torch.nn.Module, processing_class: Any, output_dir: str | None = None
) -> dict[str, bytes]:
    """The small files ``save_pretrained`` writes beside the weights, saved once by their owners,
    and the launcher's ``args.json`` from the Trainer's output dir: ms-swift writes one there
    and copies it into each checkpoint, where ``swift infer --model CKPT`` reads it back."""
    files: dict[str, bytes] = _launcher_args(output_dir)
    with tempfile.TemporaryDirectory(prefix="ckptd-hf-") as tmp:
        if processing_class is not None and hasattr(processing_class, "save_pretrained"):
            processing_class.save_pretrained(os.path.join(tmp, "processor"))
            files.update(_plain_files(Path(tmp, "processor")))
        if _is_peft(model):
            files.update(_adapter_files(model, Path(tmp, "adapter")))
        else:
            files.update(_model_files(model, Path(tmp, "model")))
    return files


def _model_files(model: torch.nn.Module, folder: Path) -> dict[str, bytes]:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    # What save_pretrained records in the config, on a copy: the user's config stays as it is.
    config = copy.deepcopy(config)
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):  # transformers 5 names it dtype; 4.x torch_dtype
        name = "dtype" if hasattr(config, "dtype") or not hasattr(config, "torch_dtype") else "torch_dtype"
        setattr(config, name, str(dtype).split(".")[1])
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    folder.mkdir(parents=True, exist_ok=True)
    if _is_remote_code(model):
        # A trust_remote_code model: its modeling_*.py (and config's auto_map) go with it, as
        # save_pretrained does, else from_pretrained on the checkpoint cannot find its class.
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, folder, config=config)
    config.save_pretrained(folder)
    can_generate = getattr(model, "can_generate", None)
    # ms-swift swaps its run's sampling settings into model.generation_config and keeps the
    # model's own as origin_generation_config, which is what its checkpoints carry: so do we.
    generation_config = getattr(model, "origin_generation_config", None) or getattr(
        model, "generation_config", None
    )
    if callable(can_generate) and can_generate() and generation_config is not None:
        generation_config.save_pretrained(folder)
    return _plain_files(folder)


def _is_remote_code(model: torch.nn.Module) -> bool:
    check = getattr(model, "is_remote_code", None)  # transformers 5
    if callable(check):
        return bool(check())
    return getattr(model, "_auto_class", None) is not None  # transformers 4: how it decides


def _adapter_files(model: torch.nn.Module, folder: Path) -> dict[str, bytes]:
    """adapter_config.json (and PEFT's model card) exactly as ``PeftModel.save_pretrained`` writes
    them; the adapter's weights it writes too are dropped (the capture takes them live)."""
    adapter = _active_adapter(model)
    model.save_pretrained(str(folder), selected_adapters=[adapter])  # type: ignore[operator]
    if adapter == "default":
        files = _plain_files(folder)
    else:  # PEFT saves another adapter name into a subfolder; the snapshot is flat
        files = _plain_files(folder / adapter)
        if (folder / "README.md").is_file():
            files["README.md"] = (folder / "README.md").read_bytes()
    files.pop(ADAPTER_FILE, None)
    files.pop("adapter_model.bin", None)
    return files


def _plain_files(folder: Path) -> dict[str, bytes]:
    """The regular files directly in ``folder`` (a checkpoint is flat; subfolders are said and left)."""
    if not folder.is_dir():
        return {}
    files: dict[str, bytes] = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and not entry.is_symlink():
            files[entry.name] = entry.read_bytes()
        else:
            log.warning("ckptd: %s is not a plain file; snapshots leave it out", entry)
    return files
