"""A tiny causal LM trained by a real Hugging Face ``Trainer`` on CPU, for tests and benchmarks.

Built from a config (nothing downloaded). The data is chosen so that the model overfits:
16 training sequences of a noisy "next token = previous + 1" pattern, evaluated on 32 others
of the same pattern. Eval loss falls, bottoms out around step 150 and rises again, so the
best eval lands on a step that ``save_steps=200`` never saves.

Run as a script it trains once and prints a JSON summary (``--callback`` adds
``CkptdCallback``; start ``ckptd run OUT --log ckptd-metrics.jsonl`` beside it yourself).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

VOCAB = 64
SEQ_LEN = 16


def sequences(count: int, generator: torch.Generator) -> torch.Tensor:
    tokens = torch.randint(0, 32, (count, SEQ_LEN), generator=generator)
    for j in range(1, SEQ_LEN):
        follow = torch.rand(count, generator=generator) < 0.7
        tokens[:, j] = torch.where(follow, (tokens[:, j - 1] + 1) % 32, tokens[:, j])
    return tokens


class TokenDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def datasets(train: int = 16, evaluate: int = 32, seed: int = 1) -> tuple[TokenDataset, TokenDataset]:
    generator = torch.Generator().manual_seed(seed)
    return TokenDataset(sequences(train, generator)), TokenDataset(sequences(evaluate, generator))


def tiny_model(seed: int = 0) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def tokenizer() -> Any:
    """A word-level tokenizer over the 64 ids ("t0".."t62", "<unk>"), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def training_args(output_dir: Path, **overrides: Any) -> Any:
    from transformers import TrainingArguments

    settings: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": 300,
        "eval_strategy": "steps",
        "eval_steps": 50,
        "save_strategy": "steps",
        "save_steps": 200,
        "logging_steps": 50,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 32,
        "learning_rate": 1.5e-3,
        "lr_scheduler_type": "constant",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


def trainer(output_dir: Path, model: Any = None, with_tokenizer: bool = True, **overrides: Any) -> Any:
    from transformers import Trainer, default_data_collator

    train, evaluate = datasets()
    return Trainer(
        data_collator=default_data_collator,  # equal lengths: no padding (nor a pad token) needed
        model=tiny_model() if model is None else model,
        args=training_args(output_dir, **overrides),
        train_dataset=train,
        eval_dataset=evaluate,
        processing_class=tokenizer() if with_tokenizer else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--callback", action="store_true")
    parser.add_argument("--max-steps", type=int, default=300)
    options = parser.parse_args()
    torch.set_num_threads(1)
    run = trainer(options.output_dir, max_steps=options.max_steps)
    if options.callback:
        from ckptd.integrations.hf import CkptdCallback

        run.add_callback(CkptdCallback(options.output_dir))
    start = time.perf_counter()
    run.train()
    seconds = time.perf_counter() - start
    evals = {e["step"]: e["eval_loss"] for e in run.state.log_history if "eval_loss" in e}
    print(json.dumps({"train_seconds": seconds, "evals": evals}))


if __name__ == "__main__":
    main()
