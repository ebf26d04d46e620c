"""A tiny local Qwen2 model, tokenizer and chat dataset for a real ``swift sft`` run, offline.

Run with the Python that has ms-swift (its transformers, tokenizers, peft)::

    python swift_tiny.py build DIR
    python swift_tiny.py score MODEL_DIR VAL_JSONL [--adapter ADAPTER_DIR]

``build`` writes ``DIR/model`` (``config.json``, ``model.safetensors``,
``generation_config.json`` and a byte-level BPE tokenizer with Qwen's special tokens,
``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``, and a ChatML chat template),
``DIR/train.jsonl`` and ``DIR/val.jsonl`` (``{"messages": [...]}`` rows) and prints a JSON
summary. Nothing is downloaded.

``score`` loads ``MODEL_DIR`` with ``AutoModelForCausalLM.from_pretrained`` (and
``ADAPTER_DIR`` on it with ``PeftModel.from_pretrained``), encodes the validation rows with
swift's own ``qwen`` template, and prints the eval loss as swift's ``Trainer.evaluate``
computes it (batches of 64, the mean of the batch losses): the weights swift evaluated at a
step score that step's logged ``eval_loss`` again.

The data is chosen so that the model overfits, as ``tests/programs/hf_tiny.py`` does: each
reply is a noisy "next word = previous + 1" sequence of the words ``t0``..``t31``. A small
training set is memorized noise and all, a larger validation set of the same pattern is
not, so eval loss falls, bottoms out and rises again.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SYSTEM = "You are a helpful assistant."  # swift's qwen template's default system
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = 32
REPLY_LEN = 12


def reply(first: int, rng: random.Random, follow: float = 0.7) -> list[int]:
    words = [first]
    for _ in range(REPLY_LEN - 1):
        words.append((words[-1] + 1) % WORDS if rng.random() < follow else rng.randrange(WORDS))
    return words


def rows(count: int, rng: random.Random) -> list[dict[str, Any]]:
    out = []
    for _ in range(count):
        first = rng.randrange(WORDS)
        words = reply(first, rng)
        out.append(
            {
                "messages": [
                    {"role": "user", "content": f"count from t{first}"},
                    {"role": "assistant", "content": " ".join(f"t{w}" for w in words[1:])},
                ]
            }
        )
    return out


def build_tokenizer(corpus: list[str], folder: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + 3 + 120,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_model(tokenizer: Any, folder: Path, seed: int) -> dict[str, Any]:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, max_new_tokens=16
    )
    model.save_pretrained(folder)
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": config.vocab_size}


def build(folder: Path, train: int, val: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    train_rows, val_rows = rows(train, rng), rows(val, rng)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (("train.jsonl", train_rows), ("val.jsonl", val_rows)):
        with (folder / name).open("w", encoding="utf-8") as handle:
            for row in data:
                handle.write(json.dumps(row) + "\n")
    corpus = [SYSTEM, "system user assistant"] + [
        m["content"] for row in train_rows + val_rows for m in row["messages"]
    ]
    model_dir = folder / "model"
    tokenizer = build_tokenizer(corpus * 4, model_dir)
    summary = build_model(tokenizer, model_dir, seed)
    return {"model": str(model_dir), "train": len(train_rows), "val": len(val_rows), **summary}


def score(model_dir: Path, val: Path, adapter: Path | None, batch_size: int = 64) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        from swift import get_processor, get_template
    except ImportError:  # ms-swift 3.x
        from swift.llm import get_processor, get_template  # type: ignore[no-redef]

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    loaded = type(model).__name__
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
        loaded = f"{type(model).__name__}({loaded})"
    model.eval()
    template = get_template(get_processor(str(model_dir), model_type="qwen2"), template_type="qwen")
    template.set_mode("train")
    rows = [json.loads(line) for line in val.read_text(encoding="utf-8").splitlines() if line.strip()]
    encoded = [template.encode(row) for row in rows]
    losses: list[tuple[float, int]] = []
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            batch = template.data_collator(chunk)
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch.get("attention_mask"),
                labels=batch["labels"],
            )
            losses.append((float(out.loss), len(chunk)))
    total = sum(n for _, n in losses)
    return {"eval_loss": sum(loss * n for loss, n in losses) / total, "rows": total, "loaded": loaded}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="write the model, tokenizer and dataset")
    make.add_argument("folder", type=Path)
    make.add_argument("--train", type=int, default=32)
    make.add_argument("--val", type=int, default=256)
    make.add_argument("--seed", type=int, default=0)
    check = commands.add_parser("score", help="load a checkpoint and score the validation rows")
    check.add_argument("model", type=Path)
    check.add_argument("val", type=Path)
    check.add_argument("--adapter", type=Path)
    options = parser.parse_args()
    if options.command == "build":
        result = build(options.folder, options.train, options.val, options.seed)
    else:
        result = score(options.model, options.val, options.adapter)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
