"""A Lightning callback: the log ckptd follows, and resumable snapshots of the steps it asks for.

::

    trainer = Trainer(callbacks=[CkptdCallback()])   # run dir: $CKPTD_RUN_DIR, else default_root_dir
    # beside it:  ckptd run RUN_DIR --log ckptd-metrics.jsonl --metric val_loss --every-steps 200

After each validation run of ``fit`` (not the sanity check) the callback appends one JSON line
``{"step": global_step, **scalar callback_metrics}`` to ``<run_dir>/ckptd-metrics.jsonl`` and
flushes it, waits (bounded) for the daemon's verdict and, when the validation is a new best,
captures right there, before the next optimizer step: the checkpoint holds exactly the weights
that were validated. Lightning's ``CSVLogger`` writes its validation row late (at its next
flush), so following ``metrics.csv`` makes each rendezvous wait; this line is written at once.
After every optimizer step it lets a scheduled capture (``--every-steps``) happen.

A scheduled ("last") capture is the checkpoint dictionary ``Trainer.save_checkpoint`` writes
(``dump_checkpoint(weights_only=False)``: the weights under ``"state_dict"``, optimizer and LR
scheduler states, loops, callbacks' states, hyperparameters). A best is the same dictionary
``save_checkpoint(weights_only=True)`` writes: the module's state dict with what
``load_from_checkpoint`` needs (hyperparameters, global step), no optimizer state, which with
Adam is twice the weights and no use to a kept best. A best the schedule also captures is one
capture, the full one. So::

    state = ckptd.load_snapshot(best_dir)
    model.load_state_dict(state["state_dict"])          # the validated weights, bit-identical
    to_lightning_checkpoint(last_dir, "last.ckpt")      # a .ckpt file
    trainer.fit(model, ckpt_path="last.ckpt")           # resumes at the snapshot's global step

A value the snapshot format cannot hold (an object among the hyperparameters, a callback's
custom state) is pickled into a uint8 tensor under a ``{"$ckptd_pickle": tensor}`` node, and
``to_lightning_checkpoint`` unpickles it: the ``.ckpt`` file holds what Lightning would have
saved. ``load_snapshot`` alone returns such nodes as they are.

Only the global rank zero acts, and the capture reads the state of its own process: fine for
one device and for DDP (every rank holds the whole model and optimizer); with a sharded
strategy (FSDP, DeepSpeed) the callback only logs and says once that it does not capture.
After each validation global zero broadcasts whether it captured the step over the job's
process group (``ckptd.client.collective.agree``), so every rank agrees on it
(``last_decision``); the per-step path sends nothing.
With no daemon running, it costs an ``os.stat`` per step and one line per validation.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd._torch import torch_required

with torch_required():  # without torch: say which extra to install
    import torch

from ckptd.client import load_snapshot
from ckptd.client.collective import agree
from ckptd.integrations.link import RunLink

if TYPE_CHECKING:
    import lightning.pytorch as pl
else:
    try:
        import lightning.pytorch as pl
    except ImportError:  # the standalone package
        import pytorch_lightning as pl

log = logging.getLogger("ckptd.integrations.lightning")

PICKLED = "$ckptd_pickle"  # a value the snapshot format cannot hold, pickled into uint8 bytes

__all__ = ["CkptdCallback", "checkpoint_state", "from_snapshot", "to_lightning_checkpoint"]


class CkptdCallback(pl.Callback):
    """Writes the metrics log a ckptd daemon follows and captures the steps it asks for.

    ``run_dir`` is the daemon's RUN_DIR: by default ``$CKPTD_RUN_DIR``, else the Trainer's
    ``default_root_dir``. ``log_name`` is the log inside it (give the daemon ``--log`` the same).
    ``rendezvous_timeout`` bounds the wait for a verdict after each validation, in seconds.
    ``overlap`` (default on) lets a capture's copy of the weights run while the next step's
    forward and backward do (every optimizer step waits for it); turn it off when a callback of
    yours writes the params through ``.data`` between a validation and the next step.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        log_name: str = "ckptd-metrics.jsonl",
        rendezvous_timeout: float = 2.0,
        overlap: bool = True,
    ) -> None:
        super().__init__()
        self.link = RunLink(run_dir, log_name, rendezvous_timeout, overlap)
        self._prepared = False
        self._capturing: bool | None = None  # decided at the first capture point of a fit
        # (step, captured) of the last validation, as global zero decided it: the same on every rank.
        self.last_decision: tuple[int, bool] | None = None

    # -- Lightning's events ------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prepared = False
        self._capturing = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero or not self._can_capture(trainer):
            return
        step = trainer.global_step
        if step < 1:
            return  # no optimizer step yet (gradient accumulation): nothing to capture
        client = self.link.client(trainer.default_root_dir)
        if not self._prepared:
            # The copy of the weights then overlaps the next step's forward and backward.
            for optimizer in trainer.optimizers:
                self.link.track(client, optimizer)
            # After the first optimizer step the optimizer state exists: fault in a slot of the
            # checkpoint's size before the first validation needs it. False (and retried at the
            # next step) while no daemon has said where slots go.
            self._prepared = client.prepare(lambda: checkpoint_state(trainer))
        client.maybe_snapshot(step, lambda: checkpoint_state(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not _fitting(trainer):
            return
        captured = False
        try:
            if trainer.is_global_zero:
                captured = self._validated(trainer)
        finally:
            # Every rank validates, so every rank comes here: rank 0 tells the others whether
            # this step was captured (a collective under DDP; nothing without a process group).
            self.last_decision = (trainer.global_step, agree(captured))

    def _validated(self, trainer: pl.Trainer) -> bool:
        """Global zero's rendezvous after a validation: whether it captured the step."""
        step = trainer.global_step
        handle = self.link.log_file(trainer.default_root_dir)
        # NaN and Infinity are written as such: ckptd's jsonl reader takes them.
        handle.write(json.dumps({"step": step, **_scalars(trainer.callback_metrics)}) + "\n")
        handle.flush()  # the daemon can only judge what reached the file
        client = self.link.client(trainer.default_root_dir)
        if client.wait_verdict(step) is None or not self._can_capture(trainer):
            return False
        # A best is captured now, with the weights that were just validated; whole when the
        # schedule wants this step too, so that one capture serves both.
        weights_only = not self.link.on_schedule(step)
        return client.maybe_snapshot(step, lambda: checkpoint_state(trainer, weights_only=weights_only))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.link.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.link.close()  # also after an exception, when on_train_end never came

    # -- plumbing ----------------------------------------------------------------------------

    def _can_capture(self, trainer: pl.Trainer) -> bool:
        if self._capturing is None:
            self._capturing = not _sharded(trainer)
            if not self._capturing:
                log.warning(
                    "ckptd: %s shards the model or optimizer across ranks; this callback logs "
                    "validations but captures nothing (one device and DDP are supported)",
                    type(trainer.strategy).__name__,
                )
        return self._capturing


# -- what is captured, and back ------------------------------------------------------------------


def checkpoint_state(trainer: pl.Trainer, *, weights_only: bool = False) -> dict[str, Any]:
    """The dictionary ``trainer.save_checkpoint(weights_only=...)`` would write now, in a form a
    snapshot holds."""
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=weights_only)
    stored: dict[str, Any] = _storable(checkpoint)
    return stored


def from_snapshot(state: Any) -> Any:
    """``load_snapshot``'s result with the pickled values restored: what Lightning saved."""
    if isinstance(state, Mapping):
        if set(state) == {PICKLED} and isinstance(state[PICKLED], torch.Tensor):
            return pickle.loads(state[PICKLED].numpy().tobytes())
        return {key: from_snapshot(value) for key, value in state.items()}
    if isinstance(state, list):
        return [from_snapshot(value) for value in state]
    if isinstance(state, tuple):
        return tuple(from_snapshot(value) for value in state)
    return state


def to_lightning_checkpoint(snapshot_dir: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Write the snapshot in ``snapshot_dir`` as a Lightning ``.ckpt`` file at ``out_path``.

    ``Trainer.fit(model, ckpt_path=out_path)`` resumes from it (at the snapshot's global step,
    with its optimizer, scheduler and loop states); ``Module.load_from_checkpoint(out_path)``
    loads it. Returns ``out_path``.
    """
    out = Path(out_path)
    torch.save(from_snapshot(load_snapshot(snapshot_dir)), out)
    return out


def _storable(value: Any) -> Any:
    """``value`` with every leaf the snapshot format cannot hold pickled into a uint8 tensor."""
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        if all(key is None or isinstance(key, (str, bool, int, float)) for key in value):
            return {key: _storable(item) for key, item in value.items()}
    elif isinstance(value, list):
        return [_storable(item) for item in value]
    elif isinstance(value, tuple) and type(value) is tuple:  # a namedtuple is pickled whole
        return tuple(_storable(item) for item in value)
    elif _plain_numpy(value):
        return value
    data = bytearray(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    return {PICKLED: torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)}


def _plain_numpy(value: Any) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in "biufc"


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The one-number metrics, as floats (a tensor with one element, a Python or numpy number)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() == 1:
                out[str(key)] = float(value.detach().item())
        elif _number(value):
            out[str(key)] = float(value)
    return out


def _number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) or (_plain_numpy(value) and getattr(value, "size", 0) == 1)


def _fitting(trainer: pl.Trainer) -> bool:
    fn = getattr(trainer.state, "fn", None)
    return str(getattr(fn, "value", fn)) == "fit"


def _sharded(trainer: pl.Trainer) -> bool:
    """True for strategies whose rank zero does not hold the whole state (FSDP, DeepSpeed, ...)."""
    if trainer.world_size <= 1:
        return False
    names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
    return "DDPStrategy" not in names or any("DeepSpeed" in name for name in names)
