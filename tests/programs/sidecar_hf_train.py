"""A plain transformers training script that knows nothing of ckptd.

``sidecar_hf_train.py OUTPUT_DIR``: a tiny GPT-2 learns a fixed sequence for 24 steps on CPU,
evaluating every 4 steps (save_strategy="no": the framework keeps nothing). Run under
``ckptd sidecar``, the hook adds ckptd's callback, which logs and captures the best eval.
"""

from __future__ import annotations

import sys

import torch
import transformers


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    example = {"input_ids": list(range(1, 17)), "labels": list(range(1, 17))}
    args = transformers.TrainingArguments(
        output_dir=sys.argv[1],
        max_steps=24,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        eval_strategy="steps",
        eval_steps=4,
        logging_steps=4,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=[example] * 8, eval_dataset=[example] * 2
    )
    trainer.train()


if __name__ == "__main__":
    main()
