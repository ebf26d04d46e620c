"""What ms-swift (and any trust_remote_code model) needs in a best, found by a real swift run.

- A ``trust_remote_code`` model's best carries its ``modeling_*.py`` and ``auto_map``, as
  ``save_pretrained`` writes them, so ``from_pretrained(best, trust_remote_code=True)`` loads it.
- A model whose ``origin_generation_config`` is set (ms-swift swaps its sampling settings into
  ``generation_config`` for the run) is saved with its own generation config.
- The launcher's ``args.json`` in the Trainer's output dir travels with the best.
- Under a process group the Trainer does not know of, only rank 0 writes the metrics log.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from ckptd.client.snapshot import export_tensors
from ckptd.integrations.hf import CkptdCallback
from tests.conftest import PROGRAMS

sys.path.insert(0, str(PROGRAMS))
import hf_tiny

CONFIG_CODE = """
from transformers import PretrainedConfig

class TinyConfig(PretrainedConfig):
    model_type = "ckptdtiny"

    def __init__(self, width=8, vocab=16, **kwargs):
        self.width, self.vocab = width, vocab
        super().__init__(**kwargs)
"""
MODEL_CODE = """
import torch
from transformers import PreTrainedModel
from .configuration_ckptdtiny import TinyConfig

class TinyModel(PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab, config.width)
        self.head = torch.nn.Linear(config.width, config.vocab)
        self.post_init()

    def forward(self, input_ids, **kwargs):
        return self.head(self.embed(input_ids))
"""


def remote_code_model(folder: Path) -> torch.nn.Module:
    """A model loaded with trust_remote_code from a folder holding its own code."""
    source = folder / "src"
    source.mkdir(parents=True)
    (source / "configuration_ckptdtiny.py").write_text(textwrap.dedent(CONFIG_CODE))
    (source / "modeling_ckptdtiny.py").write_text(textwrap.dedent(MODEL_CODE))
    (source / "config.json").write_text(
        json.dumps(
            {
                "model_type": "ckptdtiny",
                "width": 8,
                "vocab": 16,
                "auto_map": {
                    "AutoConfig": "configuration_ckptdtiny.TinyConfig",
                    "AutoModelForCausalLM": "modeling_ckptdtiny.TinyModel",
                },
            }
        )
    )
    config = AutoConfig.from_pretrained(source, trust_remote_code=True)
    return AutoModelForCausalLM.from_config(config, trust_remote_code=True)


def write_best(folder: Path, export_files: dict[str, bytes], tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    for name, content in export_files.items():
        (folder / name).write_bytes(content)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", {"format": "pt"})
    return folder


def test_a_remote_code_models_best_carries_its_code_and_loads(tmp_path: Path) -> None:
    model = remote_code_model(tmp_path)
    export = CkptdCallback(tmp_path / "run").best_export(model)
    assert "modeling_ckptdtiny.py" in export.files and "configuration_ckptdtiny.py" in export.files
    assert "AutoModelForCausalLM" in json.loads(export.files["config.json"])["auto_map"]
    best = write_best(tmp_path / "best", dict(export.files), dict(export_tensors(export)))
    loaded = AutoModelForCausalLM.from_pretrained(best, trust_remote_code=True)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(ids), model(ids))


def test_the_models_own_generation_config_is_saved_not_the_launchers_swap(tmp_path: Path) -> None:
    model = hf_tiny.tiny_model()
    own = GenerationConfig(max_new_tokens=16)
    model.origin_generation_config = own  # as ms-swift keeps it
    model.generation_config = GenerationConfig(max_new_tokens=64, temperature=0.3, do_sample=True)
    saved = json.loads(CkptdCallback(tmp_path / "run").best_export(model).files["generation_config.json"])
    assert saved["max_new_tokens"] == 16 and "temperature" not in saved


def test_the_launchers_args_json_travels_with_the_best(tmp_path: Path) -> None:
    from ckptd.integrations.hf import _side_files

    out = tmp_path / "out"
    out.mkdir()
    (out / "args.json").write_text(json.dumps({"model_type": "qwen2", "template": "qwen"}))
    files = _side_files(hf_tiny.tiny_model(), None, str(out))
    assert json.loads(files["args.json"]) == {"model_type": "qwen2", "template": "qwen"}
    (out / "args.json").unlink()
    (out / "args.json").symlink_to("/etc/hostname")
    assert "args.json" not in _side_files(hf_tiny.tiny_model(), None, str(out)), "a link is not followed"


RANKS = """
import json, os, sys
import torch.distributed as dist
from transformers.trainer_callback import TrainerState
from ckptd.integrations.hf import _acts
dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=int(sys.argv[2]), world_size=2)
state = TrainerState()
state.is_world_process_zero = True  # what transformers says when it does not see the group
print(json.dumps(_acts(state)))
dist.barrier()  # the peer may still be connecting its side of the mesh: leave only together
dist.destroy_process_group()
"""


def test_only_rank_zero_acts_when_the_trainer_sees_no_process_group(tmp_path: Path) -> None:
    env = {"PYTHONPATH": f"{PROGRAMS.parent.parent}:{PROGRAMS}", "PATH": "/usr/bin:/bin"}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANKS, str(tmp_path / "rendezvous"), str(rank)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    answers = [json.loads(proc.communicate(timeout=120)[0]) for proc in ranks]
    assert answers == [True, False]
