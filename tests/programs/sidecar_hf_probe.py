"""Build real transformers Trainers and report what the ckptd hook did to them.

``sidecar_hf_probe.py OUT.json``: imports transformers, builds a Trainer (a tiny GPT-2 from
its config, two examples, no training) and two subclass instances (one that passes a
callback of the hooked class itself), and writes what a test compares as JSON.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import tempfile

import transformers


class SubTrainer(transformers.Trainer):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.sub_init_done = True


def hooked_class() -> type | None:
    spec = os.environ.get("CKPTD_HF_CALLBACK") or "ckptd.integrations.hf:CkptdCallback"
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return None


def main() -> None:
    init = transformers.Trainer.__init__
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    data = [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}] * 2
    callback_cls = hooked_class()
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(output_dir=out, report_to="none", use_cpu=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        sub = SubTrainer(model=model, args=args, train_dataset=data)
        given = [callback_cls()] if callback_cls is not None else []
        sub_given = SubTrainer(model=model, args=args, train_dataset=data, callbacks=given)

    def count(t: transformers.Trainer) -> int:
        if callback_cls is None:
            return -1
        return sum(isinstance(cb, callback_cls) for cb in t.callback_handler.callbacks)

    report = {
        "signature": str(inspect.signature(transformers.Trainer.__init__)),
        "subclass_signature": str(inspect.signature(SubTrainer)),
        "same_class": transformers.Trainer is transformers.trainer.Trainer,
        "class_module": transformers.Trainer.__module__,
        "init_name": init.__qualname__,
        "hooked": bool(getattr(init, "__ckptd_hook__", False)),
        "isinstance": isinstance(trainer, transformers.Trainer) and isinstance(sub, transformers.Trainer),
        "issubclass": issubclass(SubTrainer, transformers.Trainer),
        "type_is": type(trainer) is transformers.Trainer,
        "callbacks": count(trainer),
        "sub_callbacks": count(sub),
        "sub_given_callbacks": count(sub_given),
        "sub_init_done": getattr(sub, "sub_init_done", False),
        "callback_names": [type(cb).__name__ for cb in trainer.callback_handler.callbacks],
    }
    with open(sys.argv[1], "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
