"""A best above ``max_shard_size`` is stored as ``save_pretrained`` stores it: shards plus
``model.safetensors.index.json``, cut by a real daemon from the one file a real ``Trainer``'s
``CkptdCallback`` staged, and loaded back by ``from_pretrained`` with the evaluated weights
(tied embeddings tied again). Also the bound's default and parsing, and the ``Export`` field.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from transformers import AutoModelForCausalLM, PreTrainedModel, Trainer  # noqa: E402

from ckptd import Export  # noqa: E402
from ckptd.client.snapshot import export_tensors  # noqa: E402
from ckptd.errors import UnsupportedLeafError  # noqa: E402
from ckptd.integrations.hf import CkptdCallback  # noqa: E402
from ckptd.shards import parse_size  # noqa: E402
from ckptd.store import MANIFEST, Store  # noqa: E402
from tests.conftest import PROGRAMS  # noqa: E402
from tests.test_integration_hf import WeightsAtEval, logged_evals, start_daemon  # noqa: E402

sys.path.insert(0, str(PROGRAMS))
import hf_tiny  # noqa: E402

# The tiny GPT-2 holds 114176 bytes of weights; its MLP matrices (16384 bytes) are above this
# bound, so the plan has shards of several tensors and oversize shards of one.
SHARD_SIZE = "15KB"
INDEX = "model.safetensors.index.json"


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic (the resume is compared bit for bit), fair to the daemon
    yield
    torch.set_num_threads(threads)


def model_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("model"))


def shard_tensors(folder: Path, index: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint, read from the shard its index names."""
    tensors: dict[str, torch.Tensor] = {}
    for name, shard in index["weight_map"].items():
        with safe_open(str(folder / shard), "pt") as handle:
            assert handle.metadata()["format"] == "pt", shard  # transformers refuses a shard without it
            tensors[name] = handle.get_tensor(name)
    return tensors


@pytest.mark.slow
def test_a_best_above_the_shard_size_is_sharded_as_save_pretrained_does_and_reloads(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = start_daemon(daemons, run, "--keep-best", "1", "--keep-last", "1")
    trainer = hf_tiny.trainer(run, max_steps=100, save_strategy="no")
    seen = WeightsAtEval(lambda model: model.state_dict())
    trainer.add_callback(seen)
    trainer.add_callback(CkptdCallback(run, max_shard_size=SHARD_SIZE))
    trainer.train()
    assert daemon.stop() == 0, daemon.log()

    evals = logged_evals(run)
    best_step = min(evals, key=evals.__getitem__)
    store = Store(run / "checkpoints")
    kept = {record.step: record for record in store.list()}
    assert best_step in kept, daemon.log()
    best_dir = store.path_of(kept[best_step].name)
    checked = subprocess.run(
        [sys.executable, "-m", "ckptd", "verify", str(run), kept[best_step].name, "--json"],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)[0]["ok"]
    manifest = json.loads((best_dir / MANIFEST).read_text())
    assert INDEX in manifest["files"] and "model.safetensors" not in manifest["files"]

    # What save_pretrained writes for the same weights and the same bound.
    reference = seen.at[best_step]
    model = hf_tiny.tiny_model()
    model.load_state_dict(reference)
    theirs = tmp_path / "save_pretrained"
    model.save_pretrained(theirs, max_shard_size=SHARD_SIZE)
    assert model_files(best_dir) == model_files(theirs)
    assert len(model_files(best_dir)) >= 3 and "model.safetensors" not in model_files(best_dir)
    ours_index = json.loads((best_dir / INDEX).read_text())
    their_index = json.loads((theirs / INDEX).read_text())
    assert ours_index["weight_map"] == their_index["weight_map"]
    assert ours_index["metadata"]["total_size"] == their_index["metadata"]["total_size"]
    assert "lm_head.weight" not in ours_index["weight_map"]  # tied: stored once, as save_pretrained does
    ours_tensors = shard_tensors(best_dir, ours_index)
    their_tensors = shard_tensors(theirs, their_index)
    assert ours_tensors.keys() == their_tensors.keys()
    for name, tensor in ours_tensors.items():
        assert torch.equal(tensor, their_tensors[name]), name

    reloaded: Any = AutoModelForCausalLM.from_pretrained(best_dir)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, reference[key]), key
    _, eval_set = hf_tiny.datasets()
    inputs = eval_set.tokens[:4]
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(inputs).logits, model(inputs).logits)
    again = Trainer(model=reloaded, args=hf_tiny.training_args(tmp_path / "reeval"), eval_dataset=eval_set)
    assert again.evaluate()["eval_loss"] == pytest.approx(evals[best_step], rel=1e-6, abs=1e-6)


@pytest.mark.slow
def test_a_sharded_scheduled_capture_still_resumes_the_run(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = start_daemon(daemons, run, "--every-steps", "25", "--keep-last", "2")
    trainer = hf_tiny.trainer(run, max_steps=50, save_strategy="no")
    trainer.add_callback(CkptdCallback(run, max_shard_size=SHARD_SIZE))
    trainer.train()
    assert daemon.stop() == 0, daemon.log()
    uninterrupted = {key: tensor.clone() for key, tensor in trainer.model.state_dict().items()}

    store = Store(run / "checkpoints")
    at_25 = store.path_of(next(r.name for r in store.list() if r.step == 25))
    files = {p.name for p in at_25.iterdir()}
    assert INDEX in files and "model.safetensors" not in files and "optimizer.pt" in files
    resumed = hf_tiny.trainer(tmp_path / "resumed", max_steps=50, save_strategy="no")
    resumed.train(resume_from_checkpoint=str(at_25))  # the Trainer reads the index itself
    final = resumed.model.state_dict()
    for key, tensor in final.items():
        assert torch.equal(tensor, uninterrupted[key]), key


# -- the bound -------------------------------------------------------------------------------------


def test_the_default_bound_is_the_installed_save_pretrained_default(tmp_path: Path) -> None:
    default = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    assert CkptdCallback(tmp_path).max_shard_bytes == parse_size(default)
    assert CkptdCallback(tmp_path, max_shard_size=SHARD_SIZE).max_shard_bytes == 15_000
    assert CkptdCallback(tmp_path, max_shard_size=12345).max_shard_bytes == 12345


@pytest.mark.parametrize("size", ["15KiB", "big", 0, -5])
def test_a_bad_bound_is_refused_when_the_callback_is_made(tmp_path: Path, size: Any) -> None:
    with pytest.raises(ValueError, match="max_shard_size"):
        CkptdCallback(tmp_path, max_shard_size=size)


def test_the_bound_travels_with_the_best_and_the_scheduled_export_but_not_an_adapter(tmp_path: Path) -> None:
    callback = CkptdCallback(tmp_path, max_shard_size=SHARD_SIZE)
    model = hf_tiny.tiny_model()
    assert callback.best_export(model).max_shard_bytes == 15_000
    assert callback.periodic_state(model).max_shard_bytes == 15_000
    adapter = peft.get_peft_model(
        hf_tiny.tiny_model(), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    export = CkptdCallback(tmp_path, max_shard_size=SHARD_SIZE).best_export(adapter)
    assert export.tensors_file == "adapter_model.safetensors" and export.max_shard_bytes is None


@pytest.mark.parametrize(
    ("export", "complaint"),
    [
        (Export({"w": torch.ones(2)}, max_shard_bytes=0), "max_shard_bytes"),
        (Export({"w": torch.ones(2)}, max_shard_bytes=True), "max_shard_bytes"),
        (Export({"w": torch.ones(2)}, max_shard_bytes="5GB"), "max_shard_bytes"),  # type: ignore[arg-type]
        (Export({"w": torch.ones(2)}, max_shard_bytes=2**63), "max_shard_bytes"),
        (Export({"w": torch.ones(2)}, files={INDEX: b"{}"}, max_shard_bytes=10), "named like a shard"),
        (
            Export({"w": torch.ones(2)}, files={"model-00001-of-00002.safetensors": b""}, max_shard_bytes=10),
            "named like a shard",
        ),
    ],
)
def test_an_export_with_a_bad_bound_is_refused(export: Export, complaint: str) -> None:
    with pytest.raises(UnsupportedLeafError, match=complaint):
        export_tensors(export)


def test_an_export_without_a_bound_may_name_any_file() -> None:
    export = Export({"w": torch.ones(2)}, files={INDEX: b"{}"})
    assert [name for name, _ in export_tensors(export)] == ["w"]
