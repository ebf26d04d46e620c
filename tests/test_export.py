"""``ckptd export``: a committed checkpoint (DCP, ckptd snapshot, save_pretrained layout) written
out as one safetensors model, checked tensor by tensor against the model that was saved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptd import export
from ckptd._torch import TORCH_HINT
from ckptd.cli import main
from ckptd.client.snapshot import Slot, encode_structure, flatten_state, layout_for
from ckptd.protocol import RunPaths
from ckptd.staging import STRUCTURE_FILE, TENSORS_FILE
from ckptd.store import Store
from tests.test_packaging import BLOCKER

# DCP's note that it saves without a process group: exactly what these tests mean to do.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

BEST = {"tags": ["best:eval_loss"], "criteria": {"eval_loss": "min"}}


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))


def trained_state(model: torch.nn.Module) -> dict[str, Any]:
    """``{"model", "optim", "step"}`` after one Adam step, as a trainer checkpoints it."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(5, 4)).square().mean().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": 7}


def commit_files(store: Store, step: int, source: Path, loss: float, tags: list[str]) -> str:
    """Every file of ``source`` committed as checkpoint ``step``, as the persister commits."""
    with store.writing(step) as pending:
        for path in sorted(source.iterdir()):
            pending.copy_in(path.name, path, path.stat().st_size)
        manifest = {**BEST, "tags": tags, "metrics": {"eval_loss": loss}}
        return store.commit(pending, manifest).name


def commit_dcp(run: Path, step: int, state: Mapping[str, Any], loss: float, tags: list[str]) -> str:
    source = run.parent / f"dcp-{step}"
    dcp.save(dict(state), checkpoint_id=source)  # one process, no process group: DCP's own files
    assert {".metadata", "__0_0.distcp"} <= {p.name for p in source.iterdir()}
    return commit_files(Store(RunPaths(run).default_store), step, source, loss, tags)


def commit_snapshot(run: Path, step: int, state: Any, loss: float) -> str:
    """``state`` staged in a slot as the client does, then committed as the daemon does."""
    tensors, skeleton = flatten_state(state)
    layout, structure = layout_for(tensors), encode_structure(skeleton, step)
    slot = Slot(run.parent / "shm" / "slot-0")
    slot.ensure_capacity(layout.total)
    slot.write(layout, tensors, structure)
    source = run.parent / f"snap-{step}"
    source.mkdir()
    (source / TENSORS_FILE).write_bytes(slot.tensors_path.read_bytes()[: layout.total])
    (source / STRUCTURE_FILE).write_bytes(structure)
    slot.unlink()
    return commit_files(Store(RunPaths(run).default_store), step, source, loss, ["best:eval_loss"])


def assert_exported(directory: Path, want: Mapping[str, torch.Tensor]) -> None:
    got = load_file(directory / "model.safetensors")
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key
        assert got[key].dtype == tensor.dtype, key
    with safe_open(directory / "model.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    directory = tmp_path / "run"
    directory.mkdir()
    return directory


@pytest.fixture
def two_dcp(run: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Step 100 (eval_loss 0.9) and step 150 (0.5, the best), different weights."""
    worse, better = make_model(1), make_model(2)
    commit_dcp(run, 100, trained_state(worse), 0.9, ["best:eval_loss"])
    commit_dcp(run, 150, trained_state(better), 0.5, ["best:eval_loss"])
    return worse, better


def test_default_exports_the_best_dcp_checkpoint_bit_identical(
    run: Path, two_dcp: tuple[torch.nn.Module, torch.nn.Module], capsys: pytest.CaptureFixture[str]
) -> None:
    worse, better = two_dcp
    assert main(["best", str(run)]) == 0
    assert capsys.readouterr().out.strip().endswith("step-00000150")
    out = run.parent / "served"
    assert main(["export", str(run), "--to", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "step-00000150" in summary
    assert f"{len(better.state_dict())} tensors" in summary and str(out) in summary
    assert_exported(out, better.state_dict())
    assert not torch.equal(worse.state_dict()["0.weight"], better.state_dict()["0.weight"])
    assert sorted(p.name for p in run.parent.iterdir()) == ["dcp-100", "dcp-150", "run", "served"]
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777, (out / "model.safetensors").stat().st_mode & 0o777) == (
        0o777 & ~umask,
        0o666 & ~umask,
    )  # readable by the serving user as any new folder is, not mkdtemp's 0700


def test_named_checkpoint_and_json(
    run: Path, two_dcp: tuple[torch.nn.Module, torch.nn.Module], capsys: pytest.CaptureFixture[str]
) -> None:
    worse, _ = two_dcp
    out = run.parent / "older"
    assert main(["export", str(run), "step-00000100", "--to", str(out), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document == {
        "name": "step-00000100",
        "step": 100,
        "to": str(out),
        "tensors": len(worse.state_dict()),
        "bytes": (out / "model.safetensors").stat().st_size,
        "files": ["model.safetensors"],
    }
    assert_exported(out, worse.state_dict())


def test_real_cli_process_exports(run: Path, two_dcp: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    out = run.parent / "served"
    done = subprocess.run(
        [sys.executable, "-m", "ckptd", "export", str(run), "--to", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["name"] == "step-00000150"
    assert_exported(out, two_dcp[1].state_dict())


def test_corrupt_distcp_byte_is_refused_and_nothing_is_written(
    run: Path, two_dcp: tuple[torch.nn.Module, torch.nn.Module], capsys: pytest.CaptureFixture[str]
) -> None:
    shard = RunPaths(run).default_store / "step-00000150" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    before = sorted(p.name for p in run.parent.iterdir())
    assert main(["export", str(run), "--to", str(run.parent / "served")]) == 4
    err = capsys.readouterr().err
    assert "fails verification" in err and "__0_0.distcp" in err and "mismatch" in err
    assert sorted(p.name for p in run.parent.iterdir()) == before  # no DIR, no temp sibling


def test_existing_non_empty_dir_is_not_overwritten(
    run: Path, two_dcp: tuple[torch.nn.Module, torch.nn.Module], capsys: pytest.CaptureFixture[str]
) -> None:
    out = run.parent / "served"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(run), "--to", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".served")]


def test_empty_dir_is_filled(run: Path, two_dcp: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    out = run.parent / "served"
    out.mkdir()
    assert main(["export", str(run), "--to", str(out)]) == 0
    assert_exported(out, two_dcp[1].state_dict())


def test_symlink_dir_and_dir_in_the_store_are_refused(
    run: Path, two_dcp: tuple[torch.nn.Module, torch.nn.Module], capsys: pytest.CaptureFixture[str]
) -> None:
    target = run.parent / "elsewhere"
    target.mkdir()
    link = run.parent / "link"
    link.symlink_to(target)
    assert main(["export", str(run), "--to", str(link)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert not list(target.iterdir())
    inside = RunPaths(run).default_store / "exported"
    assert main(["export", str(run), "--to", str(inside)]) == 2
    assert "inside the store" in capsys.readouterr().err
    assert not inside.exists()


def test_unknown_name_and_no_best_exit_1(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run.parent / "served"
    assert main(["export", str(run), "--to", str(out), "--json"]) == 1  # an empty store: no best
    assert capsys.readouterr().out.strip() == "null"
    commit_dcp(run, 100, trained_state(make_model(1)), 0.9, ["best:eval_loss"])
    assert main(["export", str(run), "step-00000999", "--to", str(out)]) == 1
    assert "no checkpoint named step-00000999" in capsys.readouterr().err
    assert not out.exists()


def test_snapshot_layout_exports_its_model_entry(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model(3)
    commit_snapshot(run, 40, trained_state(model), 0.4)
    out = run.parent / "served"
    assert main(["export", str(run), "--to", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 40
    assert_exported(out, model.state_dict())


def test_snapshot_without_model_entry_exports_every_tensor_by_dotted_path(run: Path) -> None:
    ema, head = torch.randn(3, 2), torch.arange(6, dtype=torch.int64)
    commit_snapshot(run, 5, {"ema": {"w": ema}, "heads": [head], "lr": 0.1}, 0.4)
    out = run.parent / "served"
    assert main(["export", str(run), "--to", str(out)]) == 0
    assert_exported(out, {"ema.w": ema, "heads.0": head})


def test_config_is_copied_and_overrides_the_checkpoints_own(run: Path, tmp_path: Path) -> None:
    source = tmp_path / "hf"
    source.mkdir()
    weights = {"w": torch.randn(2, 3), "b": torch.zeros(3)}
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    (source / "config.json").write_text('{"model_type": "own"}')
    (source / "optimizer.pt").write_bytes(b"training state, not served")
    commit_files(Store(RunPaths(run).default_store), 9, source, 0.1, ["best:eval_loss"])
    own = tmp_path / "own"
    assert main(["export", str(run), "--to", str(own)]) == 0
    assert sorted(p.name for p in own.iterdir()) == ["config.json", "model.safetensors"]
    assert (own / "config.json").read_text() == '{"model_type": "own"}'
    assert_exported(own, weights)
    given = tmp_path / "config.json"
    given.write_text('{"model_type": "given"}')
    other = tmp_path / "other"
    assert main(["export", str(run), "--to", str(other), "--config", str(given)]) == 0
    assert (other / "config.json").read_text() == '{"model_type": "given"}'


def test_config_given_with_a_dcp_checkpoint(
    run: Path, two_dcp: tuple[torch.nn.Module, torch.nn.Module], tmp_path: Path
) -> None:
    given = tmp_path / "my-config.json"
    given.write_text('{"model_type": "gpt2"}')
    out = tmp_path / "served"
    assert main(["export", str(run), "--to", str(out), "--config", str(given)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "config.json").read_bytes() == given.read_bytes()
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert main(["export", str(run), "--to", str(tmp_path / "x"), "--config", str(bad)]) == 2
    assert not (tmp_path / "x").exists()


def test_tied_weights_are_written_once_each(tmp_path: Path) -> None:
    """safetensors refuses two names on one storage; the export clones the second."""
    embedding = torch.randn(4, 3)
    state = {"model": {"embed.weight": embedding, "head.weight": embedding, "view": embedding[1:]}}
    out = tmp_path / "model.safetensors"
    assert export._save_model(state, out) == 3
    got = load_file(out)
    assert torch.equal(got["embed.weight"], embedding) and torch.equal(got["head.weight"], embedding)
    assert torch.equal(got["view"], embedding[1:])


def test_without_torch_dcp_says_how_to_install_and_hf_layout_still_exports(
    run: Path, two_dcp: tuple[torch.nn.Module, torch.nn.Module], tmp_path: Path
) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(Path.cwd())])}

    def ckptd(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "ckptd", "export", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)

    done = ckptd(str(run), "--to", str(tmp_path / "served"))
    assert done.returncode == 2, done.stderr
    assert TORCH_HINT in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "served").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".served")]
    source = tmp_path / "hf"
    source.mkdir()
    save_file({"w": torch.ones(2)}, source / "model.safetensors", metadata={"format": "pt"})
    commit_files(Store(RunPaths(run).default_store), 200, source, 0.1, ["best:eval_loss"])
    done = ckptd(str(run), "--to", str(tmp_path / "copied"), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tensors"] == 1


def test_hf_model_loads_with_from_pretrained(run: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    tokens = torch.randint(0, 32, (2, 16))
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()  # trained weights, not the fresh init from_pretrained could also produce
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    commit_dcp(run, 30, state, 0.3, ["best:eval_loss"])
    config.save_pretrained(tmp_path / "cfg")
    out = tmp_path / "served"
    assert (
        main(["export", str(run), "--to", str(out), "--config", str(tmp_path / "cfg" / "config.json")]) == 0
    )
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out)
    want = model.state_dict()
    got = loaded.state_dict()
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key
