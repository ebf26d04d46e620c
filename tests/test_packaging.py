"""torch is an extra: ``pip install ckptd`` is the daemon and the CLI, and they work without it.

The torch-free tests run ckptd in subprocesses whose ``sitecustomize`` (on ``PYTHONPATH``, in
``tmp_path``) puts a finder first on ``sys.meta_path`` that refuses ``torch`` and ``torch.*``
as an absent package would, and writes down every process that tried. The parent test
process has torch: it plays the trainer with the real client.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from ckptd._torch import TORCH_HINT
from ckptd.protocol import RunPaths, pending_ack_paths
from ckptd.store import Store
from tests.conftest import append_lines, verdict, wait_for

ROOT = Path(__file__).parent.parent
TORCH_RANGE = "<3,>=2.1"  # packaging's canonical spelling of "torch>=2.1,<3"
TORCH_EXTRAS = ("torch", "hf", "lightning", "test")

BLOCKER = '''\
"""Test-only: this process tree has no torch (a finder first on sys.meta_path refuses it)."""
import os
import sys
import traceback


class _NoTorch:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "torch" and not name.startswith("torch."):
            return None
        record = os.environ.get("CKPTD_TEST_TORCH_ATTEMPTS")
        if record:
            with open(record, "a") as handle:
                handle.write(f"pid {os.getpid()} imported {name}:\\n")
                handle.write("".join(traceback.format_stack(limit=12)) + "\\n")
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, _NoTorch())
'''


# -- the metadata ------------------------------------------------------------------------------


def _torch_requirements(requires: list[str]) -> list[Requirement]:
    return [r for r in map(Requirement, requires) if r.name == "torch"]


def _extras_of(requirement: Requirement) -> set[str]:
    marker = requirement.marker
    return {extra for extra in TORCH_EXTRAS if marker is not None and marker.evaluate({"extra": extra})}


def test_installed_metadata_asks_for_torch_only_under_extras() -> None:
    requires = importlib.metadata.requires("ckptd") or []
    torch_reqs = _torch_requirements(requires)
    unconditional = [str(r) for r in torch_reqs if r.marker is None or r.marker.evaluate({"extra": ""})]
    assert not unconditional, f"torch is a core dependency again: {unconditional}"
    assert {extra for r in torch_reqs for extra in _extras_of(r)} == set(TORCH_EXTRAS), requires
    assert {str(r.specifier) for r in torch_reqs} == {TORCH_RANGE}, "the extras disagree on torch's range"
    names = {Requirement(r).name for r in requires if Requirement(r).marker is None}
    assert {"safetensors", "watchdog", "filelock", "psutil", "orjson"} <= names


def test_pyproject_declares_torch_as_the_torch_extra() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch" not in {Requirement(r).name for r in project["dependencies"]}
    assert project["optional-dependencies"]["torch"] == ["torch>=2.1,<3"]
    for extra in TORCH_EXTRAS:
        torch_reqs = _torch_requirements(project["optional-dependencies"][extra])
        assert [str(r.specifier) for r in torch_reqs] == [TORCH_RANGE], extra


def test_dev_requirements_pin_the_cpu_wheel_in_the_same_pip_call_as_the_test_extra() -> None:
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements-dev.txt").read_text().splitlines()]
    lines = [line for line in lines if line]
    # One file, one resolution: the pin constrains the torch that the [test] extra asks for.
    assert "torch==2.13.0" in lines
    assert "-e .[test]" in lines
    assert not [line for line in lines if line.startswith(("-r", "--requirement"))]


# -- without torch -----------------------------------------------------------------------------


@pytest.fixture
def no_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Child processes started from now on cannot import torch; returns the attempts record."""
    folder = tmp_path / "no-torch-site"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(BLOCKER)
    attempts = tmp_path / "torch-attempts.txt"
    path = [str(folder), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, path)))
    monkeypatch.setenv("CKPTD_TEST_TORCH_ATTEMPTS", str(attempts))
    return attempts


def _status(paths: RunPaths) -> dict[str, object]:
    try:
        return dict(json.loads(paths.status.read_bytes()))
    except (OSError, ValueError):
        return {}


def _attempts(record: Path) -> str:
    return record.read_text() if record.exists() else ""


def ckptd(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``ckptd`` console script (``python -m ckptd`` where there is none)."""
    script = Path(sys.executable).parent / "ckptd"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ckptd"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)


def python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_the_blocker_really_hides_torch(no_torch: Path) -> None:
    done = python("import torch")
    assert done.returncode == 1
    assert "ModuleNotFoundError: No module named 'torch'" in done.stderr
    assert "imported torch" in _attempts(no_torch)


PROBE = """
import json
results = {}
for name, statement in [
    ("ckptd", "from ckptd import CheckpointClient"),
    ("ckptd.load_snapshot", "from ckptd import load_snapshot"),
    ("ckptd.client", "from ckptd.client import CheckpointClient"),
]:
    try:
        exec(statement)
    except ImportError as exc:
        results[name] = [type(exc).__name__, isinstance(exc, ModuleNotFoundError), exc.name, str(exc)]
    else:
        results[name] = "imported"
print(json.dumps(results))
"""


def test_the_client_without_torch_says_how_to_install_it(no_torch: Path) -> None:
    done = python(PROBE)
    assert done.returncode == 0, done.stderr
    for name, result in json.loads(done.stdout).items():
        assert result == ["TorchMissingError", True, "torch", TORCH_HINT], name
    uncaught = python("from ckptd import CheckpointClient")
    assert uncaught.returncode == 1
    assert uncaught.stderr.rstrip().splitlines()[-1] == f"ckptd._torch.TorchMissingError: {TORCH_HINT}"


@pytest.mark.parametrize("module", ["ckptd.integrations.hf", "ckptd.integrations.lightning", "ckptd.demo"])
def test_an_integration_without_torch_says_how_to_install_it(no_torch: Path, module: str) -> None:
    done = python(f"import {module}")
    assert done.returncode == 1
    assert done.stderr.rstrip().splitlines()[-1] == f"ckptd._torch.TorchMissingError: {TORCH_HINT}"


def test_safetensors_reads_a_header_without_torch(no_torch: Path, tmp_path: Path) -> None:
    blob = tmp_path / "t.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    blob.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    done = python(f"import safetensors; print(safetensors.deserialize(open({str(blob)!r}, 'rb').read()))")
    assert done.returncode == 0, done.stderr
    assert "'w'" in done.stdout and "F32" in done.stdout
    assert _attempts(no_torch) == ""


def test_metrics_render_without_torch(no_torch: Path) -> None:
    code = "from ckptd.metrics import render; print(render([{'run_dir': 'r', 'persisted': 2}]), end='')"
    done = python(code)
    assert done.returncode == 0, done.stderr
    assert 'ckptd_persists_total{run="r",run_id=""} 2' in done.stdout
    assert _attempts(no_torch) == ""


def test_cli_help_without_torch(no_torch: Path) -> None:
    top = ckptd("--help")
    assert top.returncode == 0, top.stderr
    assert "examples:" in top.stdout
    for command in ("run", "ls", "best", "status", "verify", "sidecar"):
        done = ckptd(command, "--help")
        assert done.returncode == 0, (command, done.stderr)
    assert _attempts(no_torch) == ""


@pytest.mark.slow
def test_daemon_and_queries_work_without_torch(
    tmp_path: Path, daemons, shm_root: Path, no_torch: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run, "--metric", "eval_loss", "--keep-last", "0")
    from ckptd import CheckpointClient  # the trainer, in this process, has torch

    with CheckpointClient(run) as client:
        for step, loss in ((10, 1.0), (20, 0.5), (30, 0.7)):
            append_lines(run / "logging.jsonl", {"step": step, "eval_loss": loss})
            client.wait_verdict(step)
            client.maybe_snapshot(step, lambda step=step: {"w": torch.full((4,), float(step))})
    paths = RunPaths(run)
    assert verdict(paths) == (30, "skip")
    wait_for(lambda: [r.step for r in Store(run / "checkpoints").list()] == [20], what="step 20 alone kept")
    wait_for(lambda: not pending_ack_paths(paths), what="every ack persisted")
    wait_for(lambda: _status(paths).get("persisted") == 2, what="a heartbeat after the persists")

    status = ckptd("status", str(run))
    assert status.returncode == 0, status.stderr
    assert "running" in status.stdout and "eval_loss 0.5 at step 20" in status.stdout
    listing = ckptd("ls", str(run))
    assert listing.returncode == 0 and "step-00000020" in listing.stdout, listing.stderr
    best = ckptd("best", str(run))
    assert best.returncode == 0 and best.stdout.strip() == str(run / "checkpoints" / "step-00000020")
    verified = ckptd("verify", str(run))
    assert verified.returncode == 0 and "step-00000020  ok" in verified.stdout, verified.stdout
    assert daemon.stop() == 0, daemon.log()
    assert "Traceback" not in daemon.log(), daemon.log()
    assert _attempts(no_torch) == "", _attempts(no_torch)
