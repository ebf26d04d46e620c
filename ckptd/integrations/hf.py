"""A Hugging Face ``Trainer`` callback: the log ckptd follows, and best snapshots in the HF layout.

::

    trainer.add_callback(CkptdCallback())          # run dir: $CKPTD_RUN_DIR, else args.output_dir
    # beside it:  ckptd run OUTPUT_DIR --log ckptd-metrics.jsonl --metric eval_loss

Every ``Trainer.log`` call becomes one JSON line ``{"step": global_step, **logs}`` in
``<run_dir>/ckptd-metrics.jsonl``. After each evaluation (whose metrics ``Trainer.evaluate``
has logged just before ``on_evaluate``) the callback waits, bounded, for the daemon's verdict,
and when the eval is a new best it captures the weights right there, before the next
optimizer step: the checkpoint holds exactly the weights that were evaluated. The checkpoint
is what ``save_pretrained`` writes (``model.safetensors`` without tied duplicates,
``config.json``, ``generation_config.json``, the tokenizer or processor files), so
``AutoModel*.from_pretrained(best_dir)`` loads it; for a ``peft.PeftModel`` it is the adapter
(``adapter_model.safetensors``, ``adapter_config.json``) that ``PeftModel.from_pretrained(base,
best_dir)`` loads. With no daemon running, the callback costs an ``os.stat`` per step and
one line per log.

Only the world process zero acts; other ranks do nothing.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

import torch
from transformers import PreTrainedModel, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ckptd.client import CheckpointClient, Export

log = logging.getLogger("ckptd.integrations.hf")

RUN_DIR_ENV = "CKPTD_RUN_DIR"
MODEL_FILE = "model.safetensors"  # transformers' SAFE_WEIGHTS_NAME
ADAPTER_FILE = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME


class CkptdCallback(TrainerCallback):
    """Writes the metrics log a ckptd daemon follows and captures the steps it asks for.

    ``run_dir`` is the daemon's RUN_DIR: by default ``$CKPTD_RUN_DIR``, else the Trainer's
    ``output_dir``. ``log_name`` is the log inside it (give the daemon ``--log`` the same).
    ``rendezvous_timeout`` bounds the wait for a verdict after each eval, in seconds.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        log_name: str = "ckptd-metrics.jsonl",
        rendezvous_timeout: float = 2.0,
    ) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.log_name = log_name
        self.rendezvous_timeout = rendezvous_timeout
        self.client: CheckpointClient | None = None
        self._log: IO[str] | None = None
        self._prepared = False
        self._training = False
        self._side_files: dict[str, bytes] | None = None  # config, tokenizer...: fixed for a run

    # -- the Trainer's events ------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        self._training = True
        self._prepared = False
        self._client(args)
        model = kwargs.get("model")
        if model is not None:
            # Saved once, now: these files do not change while the run trains.
            self._side_files = _side_files(_unwrap(model), _processing_class(kwargs))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or logs is None:
            return
        handle = self._log_file(args)
        # NaN and Infinity are written as such: ckptd's jsonl reader takes them.
        line = json.dumps({"step": state.global_step, **logs}, default=_json_value)
        handle.write(line + "\n")
        handle.flush()  # the daemon can only judge what reached the file

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        client = self._client(args)
        model = kwargs["model"]
        if not self._prepared:
            # After the first optimizer step: fault in a slot before the first eval needs it.
            # False (and retried at the next step) while no daemon has said where slots go.
            self._prepared = client.prepare(lambda: self.periodic_state(model, kwargs))
        client.maybe_snapshot(state.global_step, lambda: self.periodic_state(model, kwargs))

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        if self._log is not None:
            self._log.flush()  # Trainer.evaluate logged the metrics (on_log) just before this
        client = self._client(args)
        model = kwargs["model"]
        step = state.global_step
        try:
            if client.wait_verdict(step) is not None:
                # A best is captured now, with the weights that were just evaluated.
                client.maybe_snapshot(step, lambda: self.best_export(model, kwargs))
        finally:
            if not self._training:  # an evaluate() outside train(): no on_train_end will close it
                self._close()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        self._training = False
        self._close()

    # -- what is captured ----------------------------------------------------------------

    def best_export(self, model: torch.nn.Module, kwargs: dict[str, Any] | None = None) -> Export:
        """The model as ``save_pretrained`` writes it (the adapter alone for a PEFT model)."""
        model = _unwrap(model)
        if self._side_files is None:
            self._side_files = _side_files(model, _processing_class(kwargs or {}))
        if _is_peft(model):
            return Export(_adapter_tensors(model), ADAPTER_FILE, self._side_files, {"format": "pt"})
        return Export(_model_tensors(model), MODEL_FILE, self._side_files, {"format": "pt"})

    def periodic_state(self, model: torch.nn.Module, kwargs: dict[str, Any] | None = None) -> Export:
        """What a scheduled capture (``ckptd run --every-steps``) stores.

        For now the same weights-only export as a best: no optimizer, scheduler or RNG state,
        so it cannot resume training yet (resume snapshots come in a later step).
        """
        return self.best_export(model, kwargs)

    # -- plumbing --------------------------------------------------------------------------

    def _resolve_run_dir(self, args: TrainingArguments) -> Path:
        if self.run_dir is None:
            self.run_dir = Path(os.environ.get(RUN_DIR_ENV) or args.output_dir or ".")
        return self.run_dir

    def _client(self, args: TrainingArguments) -> CheckpointClient:
        if self.client is None:
            run_dir = self._resolve_run_dir(args)
            run_dir.mkdir(parents=True, exist_ok=True)
            self.client = CheckpointClient(run_dir, rendezvous_timeout=self.rendezvous_timeout)
        return self.client

    def _log_file(self, args: TrainingArguments) -> IO[str]:
        if self._log is None:
            run_dir = self._resolve_run_dir(args)
            run_dir.mkdir(parents=True, exist_ok=True)
            self._log = (run_dir / self.log_name).open("a", encoding="utf-8")
        return self._log

    def _close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self._log is not None:
            self._log.close()
            self._log = None


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


def _side_files(model: torch.nn.Module, processing_class: Any) -> dict[str, bytes]:
    """The small files ``save_pretrained`` writes beside the weights, saved once by their owners."""
    files: dict[str, bytes] = {}
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
    config.save_pretrained(folder)
    can_generate = getattr(model, "can_generate", None)
    generation_config = getattr(model, "generation_config", None)
    if callable(can_generate) and can_generate() and generation_config is not None:
        generation_config.save_pretrained(folder)
    return _plain_files(folder)


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
