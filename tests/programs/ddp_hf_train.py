"""The tiny HF causal LM of ``hf_tiny.py`` trained by a real ``Trainer`` on two CPU ranks (gloo).

``torchrun --nproc-per-node 2 ddp_hf_train.py RUN_DIR [MAX_STEPS] [EVAL_STEPS]``: the Trainer
wraps the model in DDP; ``CkptdCallback`` is in it, and after it a recorder that appends the
callback's ``last_decision`` at every eval to ``RUN_DIR/decisions-rank<R>.jsonl``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hf_tiny
import torch
from transformers import TrainerCallback

from ckptd.integrations.hf import CkptdCallback


class Recorder(TrainerCallback):
    def __init__(self, ckptd: CkptdCallback, path: Path) -> None:
        self.ckptd = ckptd
        self.path = path

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.ckptd.last_decision is not None
        step, captured = self.ckptd.last_decision
        with self.path.open("a", encoding="utf-8") as out:
            line = {"step": step, "captured": captured, "global_step": state.global_step}
            out.write(json.dumps(line) + "\n")


def main() -> None:
    torch.set_num_threads(1)
    run = Path(sys.argv[1])
    max_steps = int(sys.argv[2]) if len(sys.argv) > 2 else 150
    eval_steps = int(sys.argv[3]) if len(sys.argv) > 3 else 25
    trainer = hf_tiny.trainer(
        run / "out", max_steps=max_steps, eval_steps=eval_steps, logging_steps=eval_steps,
        save_strategy="no", per_device_train_batch_size=4, ddp_backend="gloo",
    )  # fmt: skip
    rank = trainer.args.process_index
    callback = CkptdCallback(run, rendezvous_timeout=10.0)
    trainer.add_callback(callback)
    trainer.add_callback(Recorder(callback, run / f"decisions-rank{rank}.jsonl"))
    trainer.train()
    print(json.dumps({"rank": rank, "world": trainer.args.world_size}))


if __name__ == "__main__":
    main()
