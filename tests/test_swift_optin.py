"""Opt-in: a real ms-swift ``swift sft`` under ``ckptd sidecar``, the README's recipe, on CPU.

ms-swift is a heavy install (about 1 GB besides torch) that pins its own transformers, so it
lives in an environment of its own, and these tests run only when ``CKPTD_SWIFT_PYTHON``
names that environment's Python::

    python3 -m venv /tmp/swiftenv
    /tmp/swiftenv/bin/pip install torch==2.13.0        # the CPU wheel, pinned, first
    /tmp/swiftenv/bin/pip install ms-swift==4.6.0 -e .
    CKPTD_SWIFT_PYTHON=/tmp/swiftenv/bin/python .venv/bin/python -m pytest -q tests/test_swift_optin.py

Everything is local and offline: ``tests/programs/swift_tiny.py`` builds a tiny Qwen2 (94 k
parameters, a byte-level BPE tokenizer with Qwen's special tokens) and a chat dataset that it
overfits, so eval loss bottoms out at a step that ``--save_steps 200`` never saves. The
sidecar runs ``<python> -m ckptd`` from this checkout (``PYTHONPATH``), the command is that
environment's own ``swift sft``. Each run takes about a minute on 2 cores.

Asserted: the sidecar exits 0; ckptd's best is the step whose ``eval_loss`` is the lowest in
swift's own ``logging.jsonl``, with that value; swift itself kept no checkpoint of that step;
``AutoModelForCausalLM.from_pretrained(best)`` (for LoRA, ``PeftModel.from_pretrained`` on the
base) loads and scores the logged eval loss again, with swift's own template; the best carries
swift's ``args.json`` and generation config as swift's own checkpoints do; a SIGTERM to the
sidecar reaches the trainer ``swift sft`` launches as a child.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "programs" / "swift_tiny.py"
ENV_VAR = "CKPTD_SWIFT_PYTHON"
HOW = (
    f"opt-in: set {ENV_VAR} to a Python that can `import swift` and `import ckptd` (python3 -m venv "
    "/tmp/swiftenv; /tmp/swiftenv/bin/pip install torch==2.13.0; /tmp/swiftenv/bin/pip install "
    f"ms-swift==4.6.0 -e .; {ENV_VAR}=/tmp/swiftenv/bin/python pytest tests/test_swift_optin.py)"
)
RUN_TIMEOUT_S = 600
# The README's recipe, as swift is given it: evaluate every 50 steps, save every 200.
RECIPE = ["--eval_steps", "50", "--save_steps", "200", "--save_total_limit", "2"]
RECIPE += ["--load_best_model_at_end", "true"]
SIDECAR_OPTIONS = ["--metric", "eval_loss", "--mode", "min", "--keep-best", "1", "--keep-last", "2"]


def _probe(python: str) -> tuple[dict[str, Any] | None, str]:
    """The versions that Python has, or None and why not."""
    if not python:
        return None, HOW
    code = (
        "import json, swift, transformers, torch, ckptd; print(json.dumps({'swift': swift.__version__, "
        "'transformers': transformers.__version__, 'torch': torch.__version__, 'ckptd': ckptd.__file__}))"
    )
    try:
        done = subprocess.run(
            [python, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{ENV_VAR}={python} cannot be run ({exc}); {HOW}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"{ENV_VAR}={python} cannot import swift and ckptd ({last}); {HOW}"
    return json.loads(done.stdout.strip().splitlines()[-1]), ""


SWIFT_PYTHON = os.environ.get(ENV_VAR, "")
VERSIONS, WHY_NOT = _probe(SWIFT_PYTHON)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(VERSIONS is None, reason=WHY_NOT)]


def _major(version: str) -> int:
    match = re.match(r"\d+", version)
    return int(match.group()) if match else 0


def swift_env(work: Path, shm: Path) -> dict[str, str]:
    """Offline, on CPU, one thread, caches in ``work``; this checkout's ckptd first on the path."""
    env = {
        k: v
        for k, v in os.environ.items()
        # not a sidecar's (the test may run under one), not torchrun's: swift would launch it
        if not k.startswith("CKPTD_") and k not in ("NPROC_PER_NODE", "NNODES", "PYTHONPATH")
    }
    env.update(
        PYTHONPATH=str(ROOT),
        CKPTD_SHM_ROOT=str(shm),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        USE_HF="1",
        HF_HOME=str(work / "hf-home"),
        MODELSCOPE_CACHE=str(work / "modelscope-cache"),
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    return env


def in_swift(*args: str, env: dict[str, str], timeout: float = 300) -> dict[str, Any]:
    """Run ``swift_tiny.py`` with the swift Python; its last stdout line is JSON."""
    done = subprocess.run(
        [SWIFT_PYTHON, str(TINY), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    said = f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert done.returncode == 0, f"swift_tiny.py {args[0]} failed:\n{said}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def ckptd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SWIFT_PYTHON, "-m", "ckptd", *args], capture_output=True, text=True, timeout=60, env=env
    )


@dataclass
class Tiny:
    folder: Path
    model: Path
    train: Path
    val: Path
    shm: Path
    env: dict[str, str]


@dataclass
class SwiftRun:
    """One ``ckptd sidecar ... -- swift sft ...`` and what it left."""

    tiny: Tiny
    out: Path
    argv: list[str]
    returncode: int
    output: str
    seconds: float
    version_dir: Path | None = None
    swift_evals: dict[int, float] = field(default_factory=dict)  # from swift's logging.jsonl
    ckptd_evals: dict[int, list[float]] = field(default_factory=dict)  # from ckptd-metrics.jsonl
    best: dict[str, Any] | None = None  # `ckptd best OUT --json`
    listed: list[dict[str, Any]] = field(default_factory=list)  # `ckptd ls OUT --json`
    trainer_state: dict[str, Any] = field(default_factory=dict)  # swift's last checkpoint's

    def fail(self, what: str) -> str:
        return f"{what}\n$ {' '.join(self.argv)}\n(exit {self.returncode})\n{self.output[-12000:]}"

    @property
    def best_logged(self) -> int:
        return min(self.swift_evals, key=self.swift_evals.__getitem__)

    @property
    def best_dir(self) -> Path:
        assert self.best is not None, self.fail("`ckptd best` found no checkpoint")
        return Path(self.best["path"])

    def summary(self) -> dict[str, Any]:
        state = self.trainer_state
        return {
            "out": str(self.out),
            "wall_s": round(self.seconds, 1),
            "swift_evals": self.swift_evals,
            "best_logged_step": self.best_logged if self.swift_evals else None,
            "ckptd_best_step": None if self.best is None else self.best["step"],
            "ckptd_kept_steps": [c["step"] for c in self.listed],
            "swift_best_model_checkpoint": state.get("best_model_checkpoint"),
            "swift_best_global_step": state.get("best_global_step"),
            "swift_best_metric": state.get("best_metric"),
            "versions": VERSIONS,
        }


def _step(record: dict[str, Any]) -> int:
    return int(str(record["global_step/max_steps"]).split("/")[0])


def sidecar_argv(tiny: Tiny, out: Path, *swift_args: str) -> list[str]:
    """``<python> -m ckptd sidecar ... -- swift sft ...``: the README's recipe on the tiny model."""
    swift_cli = Path(SWIFT_PYTHON).parent / "swift"
    command = [str(swift_cli)] if swift_cli.is_file() else [SWIFT_PYTHON, "-m", "swift.cli.main"]
    argv = [
        SWIFT_PYTHON, "-m", "ckptd", "sidecar", "--run-dir", str(out), *SIDECAR_OPTIONS, "--",
        *command, "sft",
        "--model", str(tiny.model), "--model_type", "qwen2", "--template", "qwen",
        "--dataset", str(tiny.train), "--val_dataset", str(tiny.val),
        "--output_dir", str(out), *RECIPE,
        "--check_model", "false",  # else swift asks ModelScope whether the local model is the latest
        "--logging_steps", "50", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
        "--per_device_eval_batch_size", "64", "--lr_scheduler_type", "constant", "--warmup_ratio", "0",
        "--report_to", "none", "--dataloader_num_workers", "0", "--dataset_num_proc", "1", "--seed", "0",
        *swift_args,
    ]  # fmt: skip
    return argv


def full_tuning() -> list[str]:
    assert VERSIONS is not None
    tuner = "--tuner_type" if _major(VERSIONS["swift"]) >= 4 else "--train_type"  # renamed in 4.0
    return [tuner, "full", "--torch_dtype", "float32"]


def sidecar_swift(tiny: Tiny, out: Path, *swift_args: str) -> SwiftRun:
    argv = sidecar_argv(tiny, out, *swift_args)
    started = time.monotonic()
    done = subprocess.run(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=RUN_TIMEOUT_S, env=tiny.env
    )
    run = SwiftRun(tiny, out, argv, done.returncode, done.stdout, time.monotonic() - started)
    (out.parent / f"{out.name}.log").write_text(done.stdout)  # beside the run, for a post-mortem

    versions = sorted(p for p in out.glob("v*-*") if p.is_dir())
    if len(versions) == 1:
        run.version_dir = versions[0]
        logging = run.version_dir / "logging.jsonl"
        if logging.is_file():
            for line in logging.read_text().splitlines():
                record = json.loads(line)
                if "eval_loss" in record:
                    run.swift_evals[_step(record)] = float(record["eval_loss"])
        checkpoints = sorted(run.version_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if checkpoints and (checkpoints[-1] / "trainer_state.json").is_file():
            run.trainer_state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    metrics = out / "ckptd-metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if "eval_loss" in record:
                run.ckptd_evals.setdefault(int(record["step"]), []).append(float(record["eval_loss"]))
    best = ckptd("best", str(out), "--json", env=tiny.env)
    if best.returncode == 0:
        run.best = json.loads(best.stdout)
    listed = ckptd("ls", str(out), "--json", env=tiny.env)
    if listed.returncode == 0:
        run.listed = json.loads(listed.stdout)
    print(f"\nswift sft under ckptd sidecar ({out.name}): {json.dumps(run.summary())}")
    return run


# -- fixtures: one build, one run per scenario, shared by the tests that read it --------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("swift")
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else folder
    shm = root / f"ckptd-test-swift-{os.getpid()}-{time.monotonic_ns()}"
    shm.mkdir()
    env = swift_env(folder, shm)
    try:
        data = folder / "data"
        built = in_swift("build", str(data), env=env)
        yield Tiny(folder, Path(built["model"]), data / "train.jsonl", data / "val.jsonl", shm, env)
    finally:
        shutil.rmtree(shm, ignore_errors=True)


@pytest.fixture(scope="module")
def full_run(tiny: Tiny) -> SwiftRun:
    """Full fine-tuning, 400 steps at a constant 3e-3: eval loss bottoms out at step 150."""
    options = ["--max_steps", "400", "--learning_rate", "3e-3"]
    return sidecar_swift(tiny, tiny.folder / "full", *full_tuning(), *options)


@pytest.fixture(scope="module")
def lora_run(tiny: Tiny) -> SwiftRun:
    """swift's default tuner (LoRA, as the README's recipe runs it), 200 steps."""
    options = ["--torch_dtype", "float32", "--max_steps", "200", "--learning_rate", "1e-2"]
    return sidecar_swift(tiny, tiny.folder / "lora", *options)


# -- full fine-tuning ---------------------------------------------------------------------------


def test_the_sidecar_exits_0_and_keeps_the_step_swift_logged_as_best(full_run: SwiftRun) -> None:
    run = full_run
    assert run.returncode == 0, run.fail("the sidecar did not exit 0")
    assert run.version_dir is not None, run.fail("swift made no single v*-* dir")
    assert sorted(run.swift_evals) == list(range(50, 401, 50)), run.fail("swift's evals")
    # The hook's callback logged each of swift's evals once, with swift's value.
    assert run.ckptd_evals == {step: [loss] for step, loss in run.swift_evals.items()}

    best_step = run.best_logged
    assert run.best is not None, run.fail("`ckptd best` found no checkpoint")
    assert run.best["step"] == best_step, run.summary()
    assert run.best["requested_step"] == best_step  # captured at the eval itself
    assert "best:eval_loss" in run.best["tags"]
    assert run.best["metrics"]["eval_loss"] == pytest.approx(run.swift_evals[best_step], rel=1e-9)
    assert best_step % 200 != 0, f"the scenario needs a best that --save_steps 200 misses: {run.swift_evals}"
    assert best_step in [c["step"] for c in run.listed]
    assert len(run.listed) <= 2  # --keep-best 1 --keep-last 2: the last two captures, the best among them


def test_swift_itself_kept_no_checkpoint_of_the_best_step(full_run: SwiftRun) -> None:
    run = full_run
    assert run.version_dir is not None, run.fail("swift made no single v*-* dir")
    best_step = run.best_logged
    saved = sorted(int(p.name.split("-")[1]) for p in run.version_dir.glob("checkpoint-*"))
    assert saved == [200, 400]
    # swift judged the same step best (best_global_step) but could not keep it: with
    # --load_best_model_at_end, transformers names a checkpoint only when one was saved there.
    state = run.trainer_state
    if "best_global_step" in state:
        assert state["best_global_step"] == best_step, run.summary()
    kept = state.get("best_model_checkpoint")
    assert kept is None or not kept.endswith(f"checkpoint-{best_step}"), run.summary()


def test_the_best_loads_with_from_pretrained_and_scores_its_logged_eval_loss(full_run: SwiftRun) -> None:
    run = full_run
    best = run.best_dir
    names = {p.name for p in best.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names, names
    scored = in_swift("score", str(best), str(run.tiny.val), env=run.tiny.env)
    assert scored["loaded"] == "Qwen2ForCausalLM"
    # The very weights that were evaluated: swift logs 8 significant digits.
    assert scored["eval_loss"] == pytest.approx(run.swift_evals[run.best_logged], rel=1e-6), scored


def test_the_best_carries_the_generation_config_swift_saves(full_run: SwiftRun) -> None:
    run = full_run
    assert run.version_dir is not None
    swifts = run.version_dir / "checkpoint-200" / "generation_config.json"
    ours = json.loads((run.best_dir / "generation_config.json").read_text())
    theirs = json.loads(swifts.read_text())
    ours.pop("transformers_version", None)
    theirs.pop("transformers_version", None)
    assert ours == theirs


def test_the_best_carries_swifts_args_json(full_run: SwiftRun) -> None:
    assert (full_run.best_dir / "args.json").is_file()


# -- LoRA (swift's default tuner) ---------------------------------------------------------------


def test_lora_best_is_the_adapter_swift_evaluated_and_loads_with_peft(lora_run: SwiftRun) -> None:
    run = lora_run
    assert run.returncode == 0, run.fail("the sidecar did not exit 0")
    assert run.version_dir is not None, run.fail("swift made no single v*-* dir")
    assert sorted(run.swift_evals) == [50, 100, 150, 200], run.fail("swift's evals")
    assert run.ckptd_evals == {step: [loss] for step, loss in run.swift_evals.items()}
    best_step = run.best_logged
    assert run.best is not None and run.best["step"] == best_step, run.summary()
    best = run.best_dir
    names = {p.name for p in best.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names, names
    assert "model.safetensors" not in names  # the adapter alone, as PEFT saves it

    swifts = run.version_dir / f"checkpoint-{best_step}"
    if swifts.is_dir():  # swift saved that step too: the same adapter, bit for bit
        from safetensors.torch import load_file

        ours = load_file(best / "adapter_model.safetensors")
        theirs = load_file(swifts / "adapter_model.safetensors")
        assert sorted(ours) == sorted(theirs)
        assert all(ours[k].equal(theirs[k]) for k in ours)
        assert json.loads((best / "adapter_config.json").read_text()) == json.loads(
            (swifts / "adapter_config.json").read_text()
        )
    tiny = run.tiny
    scored = in_swift("score", str(tiny.model), str(tiny.val), "--adapter", str(best), env=tiny.env)
    assert scored["loaded"] == "PeftModelForCausalLM(Qwen2ForCausalLM)"
    assert scored["eval_loss"] == pytest.approx(run.swift_evals[best_step], rel=1e-6), scored


# -- signals -----------------------------------------------------------------------------------


def processes_naming(path: Path) -> dict[Any, str]:
    """Live processes whose command line names ``path`` (the daemon, swift's launcher, its
    trainer), with that command line."""
    import psutil

    found = {}
    for process in psutil.process_iter(["cmdline", "status"]):
        line = " ".join(process.info["cmdline"] or ())
        if process.pid != os.getpid() and str(path) in line and process.info["status"] != "zombie":
            found[process] = line
    return found


def test_a_sigterm_to_the_sidecar_stops_swifts_trainer(tiny: Tiny) -> None:
    out = tiny.folder / "sigterm"
    argv = sidecar_argv(tiny, out, *full_tuning(), "--max_steps", "4000", "--learning_rate", "3e-3")
    metrics = out / "ckptd-metrics.jsonl"
    with (tiny.folder / "sigterm.log").open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=tiny.env)
    try:
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and "eval_loss" in metrics.read_text()):
            assert proc.poll() is None, (tiny.folder / "sigterm.log").read_text()[-6000:]
            assert time.monotonic() < deadline, "no eval within 300 s"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # a scheduler's preemption, `kill`, `docker stop`
        assert proc.wait(timeout=180) == 128 + signal.SIGTERM
        time.sleep(3.0)  # a trainer still running logs, evaluates, saves meanwhile
        left = [line[:160] for line in processes_naming(out).values()]
        assert left == [], f"still running after the sidecar exited: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for process in processes_naming(out):  # the ones this test started: its tmp dir is in their argv
            with contextlib.suppress(Exception):
                process.kill()


def test_the_swift_python_is_the_one_probed() -> None:
    # What ran is said in the report (-s prints each run's summary, versions included).
    assert VERSIONS is not None
    assert Path(VERSIONS["ckptd"]).resolve().is_relative_to(ROOT), VERSIONS  # this checkout's ckptd
    print(f"\n{ENV_VAR}={SWIFT_PYTHON}: {json.dumps(VERSIONS)} ({sys.version.split()[0]} runs pytest)")
