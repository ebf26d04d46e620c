"""Hugging Face integration with real processes: a tiny causal LM trained by a real ``Trainer``
on CPU, ``CkptdCallback`` in it, and a real ``ckptd run`` daemon beside it.

The promise under test: the best eval step, which ``save_steps`` misses, is kept in the
layout ``from_pretrained`` loads, with the very weights that were evaluated (the reloaded
model scores the logged eval loss again). Also ``Export``, the client's snapshot in a
framework's own layout, through a real slot, persister and store.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from ckptd import Export, load_snapshot  # noqa: E402
from ckptd.client import CheckpointClient  # noqa: E402
from ckptd.client.snapshot import export_tensors  # noqa: E402
from ckptd.errors import UnsupportedLeafError  # noqa: E402
from ckptd.integrations.hf import CkptdCallback  # noqa: E402
from ckptd.protocol import RunPaths, pending_ack_paths  # noqa: E402
from ckptd.store import Store  # noqa: E402
from tests.conftest import PROGRAMS, wait_for  # noqa: E402

sys.path.insert(0, str(PROGRAMS))
import hf_tiny  # noqa: E402

pytestmark = pytest.mark.slow
LOG = "ckptd-metrics.jsonl"


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic, and fair to a 2-core machine running the daemon too
    yield
    torch.set_num_threads(threads)


class WeightsAtEval(TrainerCallback):
    """The test's own record of the weights each eval saw (cloned when the eval ends)."""

    def __init__(self, state_of: Callable[[Any], dict[str, torch.Tensor]]) -> None:
        self.state_of = state_of
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.at[state.global_step] = {
            k: v.detach().clone() for k, v in self.state_of(kwargs["model"]).items()
        }


def logged_evals(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / LOG).read_text().splitlines()]
    return {line["step"]: line["eval_loss"] for line in lines if "eval_loss" in line}


def start_daemon(daemons: Any, run: Path, *extra: str) -> Any:
    return daemons(run, "--log", LOG, "--metric", "eval_loss", "--mode", "min", *extra)


def test_best_eval_step_is_kept_in_the_hf_layout_and_reloads_to_the_logged_eval_loss(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = start_daemon(daemons, run, "--keep-best", "1", "--keep-last", "2")
    trainer = hf_tiny.trainer(run)
    seen = WeightsAtEval(lambda model: model.state_dict())
    trainer.add_callback(seen)
    trainer.add_callback(CkptdCallback(run))
    trainer.train()
    assert daemon.stop() == 0, daemon.log()

    evals = logged_evals(run)
    assert sorted(evals) == [50, 100, 150, 200, 250, 300]
    best_step = min(evals, key=evals.__getitem__)
    assert best_step % 200 != 0, f"the scenario needs a best that save_steps misses: {evals}"
    assert not (run / f"checkpoint-{best_step}").exists()  # the Trainer's own saves missed it

    store = Store(run / "checkpoints")
    kept = {record.step: record for record in store.list()}
    assert best_step in kept, daemon.log()
    best = kept[best_step]
    assert "best:eval_loss" in best.tags
    assert best.requested_step == best_step  # captured at the eval step itself
    assert best.metrics["eval_loss"] == evals[best_step]
    assert store.verify(best.name) == []
    best_dir = store.path_of(best.name)
    assert sorted(p.name for p in best_dir.iterdir()) == [
        "MANIFEST.json",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    with safe_open(str(best_dir / "model.safetensors"), "pt") as handle:
        assert handle.metadata()["format"] == "pt"
        names = set(handle.keys())
    assert "lm_head.weight" not in names  # tied to the input embedding: stored once, as save_pretrained does
    assert "transformer.wte.weight" in names

    reloaded = AutoModelForCausalLM.from_pretrained(best_dir)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
    reference = seen.at[best_step]
    assert reloaded.state_dict().keys() == reference.keys()
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, reference[key]), key
    _, eval_set = hf_tiny.datasets()
    again = Trainer(
        model=reloaded, args=hf_tiny.training_args(tmp_path / "reeval"), eval_dataset=eval_set
    ).evaluate()
    assert again["eval_loss"] == pytest.approx(evals[best_step], rel=1e-6, abs=1e-6)
    assert AutoTokenizer.from_pretrained(best_dir)("t3 t4 t5")["input_ids"] == [3, 4, 5]
    assert not pending_ack_paths(RunPaths(run))
    assert not list(shm_root.iterdir()), "slots must not outlive the run in shared memory"


def test_lora_run_keeps_an_adapter_only_best_that_peft_loads(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = start_daemon(daemons, run, "--keep-best", "1", "--keep-last", "1")
    base = hf_tiny.tiny_model()
    frozen = {key: tensor.clone() for key, tensor in base.state_dict().items()}
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True
    )
    model = peft.get_peft_model(base, config)
    trainer = hf_tiny.trainer(
        run, model=model, with_tokenizer=False, max_steps=100, learning_rate=1e-2, save_strategy="no"
    )
    seen = WeightsAtEval(peft.get_peft_model_state_dict)
    trainer.add_callback(seen)
    trainer.add_callback(CkptdCallback(run))
    trainer.train()
    assert daemon.stop() == 0, daemon.log()

    evals = logged_evals(run)
    best_step = min(evals, key=evals.__getitem__)
    store = Store(run / "checkpoints")
    kept = {record.step: record for record in store.list()}
    assert best_step in kept, daemon.log()
    best_dir = store.path_of(kept[best_step].name)
    files = {p.name for p in best_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "MANIFEST.json"} <= files
    assert "model.safetensors" not in files and "config.json" not in files  # the adapter alone
    assert store.verify(kept[best_step].name) == []

    fresh = hf_tiny.tiny_model(seed=123)
    fresh.load_state_dict(frozen)  # the same base weights, from elsewhere
    loaded = peft.PeftModel.from_pretrained(fresh, best_dir)
    adapter = peft.get_peft_model_state_dict(loaded)
    reference = seen.at[best_step]
    assert adapter.keys() == reference.keys() and adapter
    for key, tensor in adapter.items():
        assert torch.equal(tensor, reference[key]), key
    _, eval_set = hf_tiny.datasets()
    again = Trainer(model=loaded, args=hf_tiny.training_args(tmp_path / "reeval"), eval_dataset=eval_set)
    assert again.evaluate()["eval_loss"] == pytest.approx(evals[best_step], rel=1e-6, abs=1e-6)


def _committed(store: Store, step: int) -> Path:
    wait_for(lambda: any(r.step == step for r in store.list()), what=f"step {step} committed")
    return store.path_of(next(r.name for r in store.list() if r.step == step))


def test_export_round_trips_through_a_slot_and_the_persister_and_slots_switch_layouts(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run, "--every-steps", "1", "--keep-last", "5")
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    half = torch.linspace(-1, 1, 5, dtype=torch.bfloat16)
    export = Export(
        {"layer.weight": weight.t(), "layer.half": half},  # a non-contiguous view too
        "model.safetensors",
        {"config.json": b'{"a": 1}\n', "notes.txt": b"hello"},
        {"format": "pt", "origin": "test"},
    )
    store = Store(run / "checkpoints")
    with CheckpointClient(run) as client:
        assert client.prepare(lambda: export)
        assert client.maybe_snapshot(1, lambda: export)
        first = _committed(store, 1)
        assert client.maybe_snapshot(2, lambda: {"w": weight})  # the same slot, nested layout
        second = _committed(store, 2)
        wait_for(lambda: not pending_ack_paths(RunPaths(run)), what="slots free")
        assert client.maybe_snapshot(3, lambda: export)  # and back
        third = _committed(store, 3)
    assert daemon.stop() == 0, daemon.log()

    for folder in (first, third):
        assert sorted(p.name for p in folder.iterdir()) == [
            "MANIFEST.json",
            "config.json",
            "model.safetensors",
            "notes.txt",
        ]
        assert (folder / "config.json").read_bytes() == b'{"a": 1}\n'
        assert (folder / "notes.txt").read_bytes() == b"hello"
        with safe_open(str(folder / "model.safetensors"), "pt") as handle:
            metadata = handle.metadata()
            assert torch.equal(handle.get_tensor("layer.weight"), weight.t())
            assert torch.equal(handle.get_tensor("layer.half"), half)
        assert metadata["format"] == "pt" and metadata["origin"] == "test"
        assert metadata["token"] and metadata["ack"] == "step-" + folder.name.split("-")[-1].lstrip("0")
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        assert manifest["files"]["notes.txt"]["bytes"] == 5
        assert store.verify(folder.name) == []
    assert sorted(p.name for p in second.iterdir()) == [
        "MANIFEST.json",
        "structure.json",
        "tensors.safetensors",
    ]
    assert torch.equal(load_snapshot(second)["w"], weight)


@pytest.mark.parametrize(
    ("export", "complaint"),
    [
        (Export({"w": torch.ones(2)}, files={"sub/config.json": b"{}"}), "plain component"),
        (Export({"w": torch.ones(2)}, files={"..": b""}), "plain component"),
        (Export({"w": torch.ones(2)}, files={"MANIFEST.json": b"{}"}), "MANIFEST.json"),
        (Export({"w": torch.ones(2)}, files={"model.safetensors": b""}), "also the tensors_file"),
        (Export({"w": torch.ones(2)}, tensors_file="../model.safetensors"), "plain component"),
        (Export({"w": torch.ones(2)}, tensors_file="model.bin"), ".safetensors"),
        (Export({"w": torch.ones(2)}, files={"a.txt": "text"}), "bytes"),  # type: ignore[dict-item]
        (Export({"w": torch.ones(2, dtype=torch.complex64)}), "dtype"),
        (Export({"w": [1.0]}), "unsupported type"),  # type: ignore[dict-item]
    ],
)
def test_export_refuses_what_a_checkpoint_cannot_hold(export: Export, complaint: str) -> None:
    with pytest.raises(UnsupportedLeafError, match=complaint.replace(".", r"\.")):
        export_tensors(export)


def test_export_refuses_two_names_over_the_same_bytes_but_not_disjoint_views() -> None:
    weight = torch.ones(4, 3)
    with pytest.raises(UnsupportedLeafError, match="shares its storage with 'embed'"):
        export_tensors(Export({"embed": weight, "head": weight}))
    with pytest.raises(UnsupportedLeafError, match="shares its storage"):
        export_tensors(Export({"embed": weight, "head": weight[1:]}))
    names = [name for name, _ in export_tensors(Export({"q": weight[:2], "k": weight[2:]}))]
    assert names == ["q", "k"]


def test_a_bad_export_raises_at_the_first_capture(tmp_path: Path, daemons: Any, shm_root: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemons(run, "--every-steps", "1")
    bad = Export({"w": torch.ones(2)}, files={"nested/file.json": b"{}"})
    with (
        CheckpointClient(run) as client,
        pytest.raises(UnsupportedLeafError, match=re.escape("files/nested/file.json")),
    ):
        client.maybe_snapshot(1, lambda: bad)
    assert not pending_ack_paths(RunPaths(run))


def test_only_the_world_process_zero_writes_the_log(tmp_path: Path) -> None:
    args = hf_tiny.training_args(tmp_path / "out")
    callback = CkptdCallback(tmp_path / "run")
    callback.on_log(
        args, TrainerState(is_world_process_zero=False), TrainerControl(), logs={"eval_loss": 1.0}
    )
    assert not (tmp_path / "run" / LOG).exists()
    state = TrainerState(global_step=7)
    callback.on_log(args, state, TrainerControl(), logs={"eval_loss": float("nan"), "epoch": 0.5})
    callback.on_train_end(args, state, TrainerControl())
    assert (tmp_path / "run" / LOG).read_text() == '{"step": 7, "eval_loss": NaN, "epoch": 0.5}\n'


def test_importing_the_integrations_package_imports_neither_torch_nor_transformers() -> None:
    probe = (
        "import ckptd.integrations, ckptd.daemon, ckptd.cli, sys; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'leaked'; "
        "assert ckptd.integrations.__all__ == ['CkptdCallback']"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)


class StepsSeen(TrainerCallback):
    """The steps a Trainer ran and logged, as it reported them."""

    def __init__(self) -> None:
        self.ended: list[int] = []
        self.logged: list[int] = []

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.ended.append(state.global_step)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.logged.append(state.global_step)


RESUME_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


def _torch_file(path: Path) -> Any:
    return torch.load(path, weights_only=False)


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal nested values, tensors compared exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}/{index}")
    elif hasattr(a, "dtype") and hasattr(a, "shape"):  # numpy
        assert (a == b).all(), where
    else:
        assert a == b, where


def test_a_scheduled_snapshot_is_a_trainer_checkpoint_that_resumes_the_run_exactly(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = start_daemon(daemons, run, "--every-steps", "100", "--keep-last", "2")
    trainer = hf_tiny.trainer(run)  # save_steps=200: the Trainer's own checkpoint-200 to compare with
    trainer.add_callback(CkptdCallback(run))
    trainer.train()
    assert daemon.stop() == 0, daemon.log()
    uninterrupted = {key: tensor.clone() for key, tensor in trainer.model.state_dict().items()}

    store = Store(run / "checkpoints")
    at_200 = [record for record in store.list() if record.step == 200]
    assert len(at_200) == 1, [record.name for record in store.list()]
    ours = store.path_of(at_200[0].name)
    assert ours.name == "step-00000200"
    assert store.verify(ours.name) == []
    files = {path.name for path in ours.iterdir()}
    assert RESUME_FILES | {"model.safetensors", "config.json", "tokenizer.json"} <= files, files

    # The same training state the Trainer's own save at step 200 holds.
    theirs = run / "checkpoint-200"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        _assert_same(_torch_file(ours / name), _torch_file(theirs / name), name)
    state = json.loads((ours / "trainer_state.json").read_text())
    reference = json.loads((theirs / "trainer_state.json").read_text())
    assert state["global_step"] == reference["global_step"] == 200
    for key in ("epoch", "max_steps", "train_batch_size", "num_train_epochs", "log_history"):
        assert state[key] == reference[key], key
    assert _torch_file(ours / "training_args.bin").to_dict() == trainer.args.to_dict()

    resumed = hf_tiny.trainer(tmp_path / "resumed")
    seen = StepsSeen()
    resumed.add_callback(seen)
    resumed.train(resume_from_checkpoint=str(ours))
    assert seen.ended[0] == 201 and seen.ended[-1] == 300
    assert min(seen.logged) > 200
    assert resumed.state.global_step == 300
    # Weights, optimizer moments, learning rate, RNG (dropout) and data order all carried over:
    # on CPU, one thread, the resumed run ends bit for bit where the uninterrupted one did.
    final = resumed.model.state_dict()
    assert final.keys() == uninterrupted.keys()
    for key, tensor in final.items():
        assert torch.equal(tensor, uninterrupted[key]), key


def test_scheduled_steps_are_resumable_and_a_best_on_the_schedule_is_the_same_capture(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = start_daemon(daemons, run, "--every-steps", "25", "--keep-last", "5")
    trainer = hf_tiny.trainer(run, max_steps=50, save_strategy="no")  # evaluated at step 50 only
    trainer.add_callback(CkptdCallback(run))
    trainer.train()
    assert daemon.stop() == 0, daemon.log()

    records = Store(run / "checkpoints").list()
    assert [record.step for record in records] == [25, 50], [record.name for record in records]
    plain, evaluated = records  # step 25: captured at its end; step 50: after its eval
    assert "best:eval_loss" in evaluated.tags and "best:eval_loss" not in plain.tags
    assert evaluated.metrics["eval_loss"] == logged_evals(run)[50]
    store = Store(run / "checkpoints")
    for record in records:
        folder = store.path_of(record.name)
        assert RESUME_FILES | {"model.safetensors", "config.json"} <= {p.name for p in folder.iterdir()}
        assert store.verify(record.name) == []
        state = json.loads((folder / "trainer_state.json").read_text())
        assert state["global_step"] == record.step
        scheduler = _torch_file(folder / "scheduler.pt")
        assert scheduler["last_epoch"] == record.step  # stepped once per optimizer step
        optimizer = _torch_file(folder / "optimizer.pt")
        assert {int(group["step"]) for group in optimizer["state"].values()} == {record.step}
    logged = json.loads((store.path_of(evaluated.name) / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in logged if "eval_loss" in entry] == [50]  # its own eval included
