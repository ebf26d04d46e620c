"""A plain Lightning training script that knows nothing of ckptd.

``lightning_train.py ROOT_DIR [MAX_STEPS]``: the tiny overfitting regressor of
``lightning_tiny.py`` (validated every 5 steps, no checkpointing of its own) trains on CPU.
Run under ``ckptd sidecar``, the hook adds ckptd's callback, which logs and captures the best
validation. It prints one JSON line: the callbacks its Trainer had and the final global step.
"""

from __future__ import annotations

import json
import sys

import lightning_tiny
import torch


def main() -> None:
    torch.set_num_threads(1)
    root = sys.argv[1]
    max_steps = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    model = lightning_tiny.model()
    trainer = lightning_tiny.trainer(root, max_steps=max_steps, val_every=5)
    train, val = lightning_tiny.loaders()
    trainer.fit(model, train, val)
    names = [f"{type(cb).__module__}.{type(cb).__name__}" for cb in trainer.callbacks]
    print(json.dumps({"callbacks": names, "global_step": trainer.global_step}))


if __name__ == "__main__":
    main()
