"""A tiny Lightning regression that overfits: the test suite's and the benchmark's model and data.

Nothing here imports ckptd. A 2-layer MLP (width 64) learns ``y = x @ w`` from 16 noisy samples
(noise of std 1.0, twice the signal), 4 batches of 4 per epoch, no shuffling; it is validated
on 256 clean samples every ``val_every`` optimizer steps. The validation loss falls while it
learns the signal, then rises as it fits the noise: the best step is in the middle of the run.
Everything is seeded, and on CPU with one thread two runs give the same numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl  # type: ignore[no-redef]

IN, HIDDEN = 8, 64


class TinyRegressor(pl.LightningModule):
    def __init__(self, lr: float = 0.02, hidden: int = HIDDEN, tag: object = None) -> None:
        super().__init__()  # tag: any object, kept among the hyperparameters
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(IN, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y), on_epoch=True)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def datasets(seed: int = 0) -> tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(IN, generator=generator) / IN**0.5
    x_train = torch.randn(16, IN, generator=generator)
    y_train = x_train @ w + 1.0 * torch.randn(16, generator=generator)
    x_val = torch.randn(256, IN, generator=generator)
    return (
        torch.utils.data.TensorDataset(x_train, y_train),
        torch.utils.data.TensorDataset(x_val, x_val @ w),
    )


def loaders() -> tuple[torch.utils.data.DataLoader[Any], torch.utils.data.DataLoader[Any]]:
    train, val = datasets()
    return (
        torch.utils.data.DataLoader(train, batch_size=4, shuffle=False),
        torch.utils.data.DataLoader(val, batch_size=256),
    )


def trainer(root: Path | str, *, max_steps: int = 40, val_every: int = 5, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "default_root_dir": str(root),
        "max_steps": max_steps,
        "val_check_interval": val_every,
        "check_val_every_n_epoch": None,  # val_check_interval counts optimizer steps across epochs
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,  # the framework keeps nothing: what is kept is ckptd's
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 1,
        "deterministic": True,
        **kwargs,
    }
    return pl.Trainer(**options)


def model(seed: int = 0, **hparams: Any) -> TinyRegressor:
    torch.manual_seed(seed)
    return TinyRegressor(**hparams)
