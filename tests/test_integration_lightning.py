"""Lightning integration with real processes: a tiny regressor trained by a real Lightning
``Trainer`` on CPU, ``CkptdCallback`` in it, and a real ``ckptd run`` daemon beside it.

The promises under test: the best validation step, which the ``--every-steps`` schedule
misses, is kept with the very weights that were validated (they score the logged val_loss
again); a scheduled "last" snapshot is a full Lightning checkpoint that ``Trainer.fit(...,
ckpt_path=...)`` resumes from at its global step; and under ``ckptd sidecar`` a script that
never imports ckptd gets the same, through the start-up hook.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from ckptd import load_snapshot  # noqa: E402
from ckptd.integrations.lightning import CkptdCallback, to_lightning_checkpoint  # noqa: E402
from ckptd.protocol import RunPaths, pending_ack_paths  # noqa: E402
from ckptd.store import Store  # noqa: E402
from tests.conftest import PROGRAMS, wait_for  # noqa: E402

sys.path.insert(0, str(PROGRAMS))
import lightning_tiny  # noqa: E402

pytestmark = pytest.mark.slow
LOG = "ckptd-metrics.jsonl"
EVERY = 8  # the schedule's period; validations come every 5 steps, 40 steps in all


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)  # deterministic, and fair to a 2-core machine running the daemon too
    yield
    torch.set_num_threads(threads)
    # Trainer(deterministic=True) switches it on for the whole process: later tests in this
    # process (float4 tensors, say) must not inherit it.
    torch.use_deterministic_algorithms(deterministic)


class Seen(pl.Callback):
    """The test's own record: the weights and val_loss each validation saw, the steps trained."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.val_loss: dict[int, float] = {}
        self.first_step: int | None = None
        self.batches = 0
        self.final: dict[str, torch.Tensor] = {}

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            step = trainer.global_step
            self.weights[step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            self.val_loss[step] = float(trainer.callback_metrics["val_loss"])

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.first_step is None:
            self.first_step = trainer.global_step
        self.batches += 1

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.final = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


class SlotsFreeAtSchedule(pl.Callback):
    """Before each scheduled step's capture point, wait until the daemon has persisted what was
    acked: a periodic capture finding both slots held is skipped by design, and on a loaded
    machine (two test workers) the daemon can lag a tiny model's steps. Put it before ckptd's."""

    def __init__(self, run: Path) -> None:
        self.paths = RunPaths(run)

    def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
        if trainer.global_step % EVERY == 0:
            wait_for(lambda: not pending_ack_paths(self.paths), timeout=60, what="acked captures persisted")


def fit(root: Path, model: Any, *callbacks: Any, **fit_kwargs: Any) -> Any:
    trainer = lightning_tiny.trainer(root, callbacks=list(callbacks))
    train, val = lightning_tiny.loaders()
    trainer.fit(model, train, val, **fit_kwargs)
    return trainer


def logged_evals(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / LOG).read_text().splitlines()]
    return {line["step"]: line["val_loss"] for line in lines if "val_loss" in line}


def validate(model: Any, root: Path) -> float:
    _, val = lightning_tiny.loaders()
    trainer = lightning_tiny.trainer(root)
    return float(trainer.validate(model, val, verbose=False)[0]["val_loss"])


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key, tensor in a.items():
        assert torch.equal(tensor, b[key]), key


def start_daemon(daemons: Any, run: Path) -> Any:
    return daemons(
        run, "--log", LOG, "--metric", "val_loss", "--mode", "min",
        "--every-steps", str(EVERY), "--keep-best", "1", "--keep-last", "2",
    )  # fmt: skip


def test_best_validation_step_is_kept_with_the_validated_weights(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = start_daemon(daemons, run)
    seen = Seen()
    fit(run, lightning_tiny.model(), seen, SlotsFreeAtSchedule(run), CkptdCallback(run))
    assert daemon.stop() == 0, daemon.log()

    evals = logged_evals(run)
    assert sorted(evals) == list(range(5, 41, 5))  # not the sanity check's
    assert evals == pytest.approx(seen.val_loss, rel=0, abs=0)  # the line is what Lightning computed
    best_step = min(evals, key=evals.__getitem__)
    assert best_step % EVERY != 0, f"the scenario needs a best the schedule misses: {evals}"
    assert max(evals.values()) > evals[best_step] < evals[40], f"val_loss must improve, then worsen: {evals}"

    store = Store(run / "checkpoints")
    kept = {record.step: record for record in store.list()}
    assert sorted(kept) == sorted({best_step, 32, 40}), daemon.log()
    best = kept[best_step]
    assert "best:val_loss" in best.tags
    assert best.requested_step == best_step  # captured at the validation itself
    assert best.metrics["val_loss"] == evals[best_step]
    assert store.verify(best.name) == []

    state = load_snapshot(store.path_of(best.name))
    assert state["global_step"] == best_step
    # A best off the schedule holds the weights, not Adam's two moments per weight.
    assert "optimizer_states" not in state and "state_dict" in state
    assert "optimizer_states" in load_snapshot(store.path_of(kept[32].name))
    model = lightning_tiny.model(seed=1)
    model.load_state_dict(state["state_dict"])
    assert_same_weights(model.state_dict(), seen.weights[best_step])
    assert validate(model, tmp_path / "reval") == pytest.approx(evals[best_step], rel=1e-6, abs=1e-7)

    # The best is a whole Lightning checkpoint too: load_from_checkpoint takes it.
    ckpt = to_lightning_checkpoint(store.path_of(best.name), tmp_path / "best.ckpt")
    loaded = lightning_tiny.TinyRegressor.load_from_checkpoint(ckpt)
    assert_same_weights(loaded.state_dict(), seen.weights[best_step])
    assert not pending_ack_paths(RunPaths(run))
    assert not list(shm_root.iterdir()), "slots must not outlive the run in shared memory"


def test_a_last_snapshot_resumes_training_at_its_step_as_if_never_stopped(
    tmp_path: Path, daemons: Any, shm_root: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = start_daemon(daemons, run)
    tag = PurePosixPath("an/object/the/snapshot/format/cannot/hold")  # among the hyperparameters
    seen = Seen()
    fit(run, lightning_tiny.model(tag=tag), seen, SlotsFreeAtSchedule(run), CkptdCallback(run))
    assert daemon.stop() == 0, daemon.log()
    store = Store(run / "checkpoints")
    kept = {record.step: record for record in store.list()}
    assert 32 in kept and "periodic" in kept[32].tags, (kept, daemon.log())

    ckpt = to_lightning_checkpoint(store.path_of(kept[32].name), tmp_path / "last.ckpt")
    raw = torch.load(ckpt, weights_only=False)
    assert raw["global_step"] == 32 and raw["epoch"] == 7
    assert raw["hyper_parameters"]["tag"] == tag and raw["hyper_parameters"]["lr"] == 0.02
    assert raw["optimizer_states"][0]["state"][0]["exp_avg"].shape == (64, 8)
    assert raw["lr_schedulers"][0]["last_epoch"] == 32

    again = Seen()
    model = lightning_tiny.model(seed=1, tag=tag)
    # An object among the hyperparameters: Lightning itself loads it only with weights_only=False.
    trainer = fit(tmp_path / "resumed", model, again, ckpt_path=ckpt, weights_only=False)
    assert again.first_step == 32 and again.batches == 8  # steps 33..40, no more
    assert trainer.global_step == 40
    assert sorted(again.val_loss) == [35, 40]
    # Weights, Adam moments, scheduler, data position: all restored, so training went on exactly.
    assert_same_weights(again.final, seen.final)
    assert again.val_loss[40] == seen.val_loss[40]


def test_a_lightning_script_that_never_imports_ckptd_keeps_its_best_under_the_sidecar(
    tmp_path: Path, shm_root: Path
) -> None:
    run = tmp_path / "run"
    script = [sys.executable, str(PROGRAMS / "lightning_train.py"), str(run / "root")]
    assert "ckptd" not in (PROGRAMS / "lightning_train.py").read_text().split('"""')[2]
    done = subprocess.run(
        [
            sys.executable, "-m", "ckptd", "sidecar", "--run-dir", str(run), "--metric", "val_loss",
            "--mode", "min", "--keep-best", "1", "--keep-last", "2", "--", *script,
        ],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["global_step"] == 40
    assert report["callbacks"].count("ckptd.integrations.lightning.CkptdCallback") == 1, report
    assert "ckptd hook: warning" not in done.stderr

    evals = logged_evals(run)  # $CKPTD_RUN_DIR, not the Trainer's default_root_dir
    assert sorted(evals) == list(range(5, 41, 5))
    best_step = min(evals, key=evals.__getitem__)
    best = subprocess.run(
        [sys.executable, "-m", "ckptd", "best", str(run)], capture_output=True, text=True, timeout=60
    )
    assert best.returncode == 0, best.stderr
    best_dir = Path(best.stdout.strip())
    assert best_dir.name == f"step-{best_step:08d}"
    assert f"best: {best_dir}" in done.stderr
    state = load_snapshot(best_dir)
    assert state["global_step"] == best_step
    model = lightning_tiny.model(seed=1)
    model.load_state_dict(state["state_dict"])
    assert validate(model, tmp_path / "reval") == pytest.approx(evals[best_step], rel=1e-6, abs=1e-7)
