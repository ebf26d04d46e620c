"""Overlapped staging: the copy of what an optimizer owns finishes while the next passes run.

A real model and a real Adam step, a control file asking for a capture every few steps and a
live heartbeat (no daemon needed: the acks stay pending, and the slots hold the captures).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load

from ckptd.client import CheckpointClient
from ckptd.client.snapshot import Slot
from ckptd.protocol import Control, RunPaths, atomic_write_json, pending_ack_paths, read_ack, write_control

EVERY = 3
WIDTH = 2048  # 16 MiB a weight matrix, 48 MiB of Adam state each: copies take tens of ms


@pytest.fixture
def run(tmp_path: Path, shm_root: Path) -> Iterator[RunPaths]:
    paths = RunPaths(tmp_path / "run")
    paths.acks.mkdir(parents=True)
    staging = str(shm_root / "ckptd-ov")
    write_control(paths, Control(seq=1, run_id="ov", staging=staging, every_steps=EVERY))
    atomic_write_json(paths.status, {"protocol": 1})
    stop = threading.Event()

    def heartbeat() -> None:  # a live daemon's, for as long as the test trains
        while not stop.wait(0.5):
            os.utime(paths.status)

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    yield paths
    stop.set()
    beat.join()


def make_model(layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    parts: list[torch.nn.Module] = []
    for _ in range(layers):
        parts += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.BatchNorm1d(WIDTH)]
    return torch.nn.Sequential(*parts)


def state_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, object]:
    return {"model": model.state_dict(), "optim": optimizer.state_dict()}


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    model(batch).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def flat_copy(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the state, by the name the slot gives it, cloned."""
    copied = {f"model/{k}": v.clone() for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        copied.update({f"optim/state/{index}/{k}": v.clone() for k, v in state.items()})
    return copied


def staged(paths: RunPaths, shm_root: Path) -> dict[int, dict[str, torch.Tensor]]:
    """What each pending ack's slot holds, by captured step (only the bytes the ack names)."""
    found = {}
    for path in pending_ack_paths(paths):
        ack = read_ack(path)
        data = (shm_root / "ckptd-ov" / ack.slot / ack.token_file).read_bytes()
        found[ack.captured_step] = load(data[: ack.files[ack.token_file]])
    return found


def free_slots(paths: RunPaths) -> None:
    """What the daemon does once it has persisted a capture: the ack goes, the slot is free."""
    for path in pending_ack_paths(paths):
        path.unlink()


@pytest.fixture
def trained() -> Iterator[tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]]:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = torch.randn(64, WIDTH)
    train_step(model, optimizer, batch)  # Adam's state exists from here on
    yield model, optimizer, batch


def test_captures_are_bit_identical_while_the_next_steps_run(
    run: RunPaths, shm_root: Path, trained: tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]
) -> None:
    model, optimizer, batch = trained
    expected = {}
    with CheckpointClient(run.run_dir, optimizer=optimizer) as client:
        for step in range(1, 2 * EVERY + 1):
            # The gradients first, so that the step that changes every captured weight and
            # moment follows the capture at once; then a forward, in which BatchNorm updates its
            # running stats (copied before maybe_snapshot returns: no optimizer owns them).
            model(batch).square().mean().backward()
            if client.maybe_snapshot(step, lambda: state_of(model, optimizer)):
                expected[step] = flat_copy(model, optimizer)
            optimizer.step()
            optimizer.zero_grad()
            model(batch)
        client.wait_staged()
        got = staged(run, shm_root)
    assert sorted(got) == [EVERY, 2 * EVERY]
    for step, tensors in expected.items():
        assert set(tensors) <= set(got[step])
        for name, tensor in tensors.items():
            assert torch.equal(got[step][name], tensor), f"step {step}: {name} differs"


def test_the_optimizer_step_waits_for_the_copy(
    run: RunPaths, trained: tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]
) -> None:
    model, optimizer, batch = trained
    acked_before_step: list[bool] = []

    with CheckpointClient(run.run_dir, optimizer=optimizer) as client:
        # Registered after the client's hook, so it runs after it: the ack must be written by then.
        optimizer.register_step_pre_hook(
            lambda *_: acked_before_step.append(bool(pending_ack_paths(run)))
        )
        model(batch).square().mean().backward()
        assert client.maybe_snapshot(EVERY, lambda: state_of(model, optimizer))
        acked_on_return = bool(pending_ack_paths(run))
        optimizer.step()  # at once: the copy cannot have ended by itself
    assert not acked_on_return, "maybe_snapshot returned after the whole copy: nothing overlapped"
    assert acked_before_step == [True]


def test_without_an_optimizer_the_copy_ends_before_maybe_snapshot_returns(
    run: RunPaths, trained: tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]
) -> None:
    model, optimizer, _ = trained
    with CheckpointClient(run.run_dir) as client:
        assert client.maybe_snapshot(EVERY, lambda: state_of(model, optimizer))
        assert pending_ack_paths(run)


def test_a_weight_changed_in_place_during_the_copy_drops_the_capture(
    run: RunPaths, trained: tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]
) -> None:
    model, optimizer, _ = trained
    with CheckpointClient(run.run_dir, optimizer=optimizer) as client:
        assert client.maybe_snapshot(EVERY, lambda: state_of(model, optimizer))
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.clamp_(-10, 10)  # weight clipping outside the optimizer, no wait_staged
        client.wait_staged()
    assert pending_ack_paths(run) == [], "a capture mixing two states was acknowledged"
    report = json.loads(run.client_report.read_text())
    assert report["skipped_by_cause"] == {"modified-during-staging": 1}


def test_wait_staged_before_an_in_place_change_keeps_the_capture(
    run: RunPaths, shm_root: Path, trained: tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]
) -> None:
    model, optimizer, _ = trained
    with CheckpointClient(run.run_dir, optimizer=optimizer) as client:
        assert client.maybe_snapshot(EVERY, lambda: state_of(model, optimizer))
        expected = flat_copy(model, optimizer)
        assert client.wait_staged()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(0.5)
    got = staged(run, shm_root)[EVERY]
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.items())


def test_an_accelerate_style_wrapper_is_looked_through(
    run: RunPaths, trained: tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]
) -> None:
    model, optimizer, batch = trained
    model(batch).square().mean().backward()

    class Wrapper(torch.optim.Optimizer):
        """Like accelerate's AcceleratedOptimizer: an Optimizer whose step calls the inner one's."""

        def __init__(self, inner: torch.optim.Optimizer) -> None:
            self.optimizer = inner

        def step(self, closure: object = None) -> None:  # type: ignore[override]
            self.optimizer.step()

    with CheckpointClient(run.run_dir, optimizer=Wrapper(optimizer)) as client:
        assert client.maybe_snapshot(EVERY, lambda: state_of(model, optimizer))
        assert not pending_ack_paths(run)  # overlapped: the wrapper's optimizer was tracked
        Wrapper(optimizer).step()
        assert pending_ack_paths(run), "the inner optimizer's step did not wait for the copy"


def test_a_second_capture_of_the_same_shapes_faults_no_new_pages(
    run: RunPaths, trained: tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]
) -> None:
    model, optimizer, batch = trained
    pages = sum(t.numel() * t.element_size() for t in flat_copy(model, optimizer).values()) // 4096
    faults = []
    with CheckpointClient(run.run_dir) as client:
        for step in (EVERY, 2 * EVERY):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            assert client.maybe_snapshot(step, lambda: state_of(model, optimizer))
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
            free_slots(run)
            train_step(model, optimizer, batch)
    assert faults[0] > pages // 2, faults  # the first capture faulted its fresh slot in
    assert faults[1] < pages // 50, faults  # the second reused it, page for page


def test_the_first_capture_finds_a_slot_prepared_at_a_quiet_step(
    run: RunPaths, trained: tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]
) -> None:
    model, optimizer, _ = trained
    pages = sum(t.numel() * t.element_size() for t in flat_copy(model, optimizer).values()) // 4096
    with CheckpointClient(run.run_dir) as client:
        # Step 1 asks for nothing: the client sizes the state and faults a slot in behind it.
        assert not client.maybe_snapshot(1, lambda: state_of(model, optimizer))
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        assert client.maybe_snapshot(EVERY, lambda: state_of(model, optimizer))
        faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
    assert faults < pages // 50, (faults, pages)


def test_an_optimizer_the_client_was_not_given_waits_too(
    run: RunPaths, shm_root: Path, trained: tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]
) -> None:
    model, optimizer, batch = trained
    # A second optimizer over the same params, fused: its kernels bump no version counter,
    # so only waiting can keep it from writing under the copy.
    other = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    acked_before_step: list[bool] = []
    other.register_step_pre_hook(lambda *_: acked_before_step.append(bool(pending_ack_paths(run))))
    model(batch).square().mean().backward()
    with CheckpointClient(run.run_dir, optimizer=optimizer) as client:
        assert client.maybe_snapshot(EVERY, lambda: {"model": model.state_dict()})
        expected = {f"model/{k}": v.clone() for k, v in model.state_dict().items()}
        other.step()
    assert acked_before_step == [True]
    got = staged(run, shm_root)[EVERY]
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.items())


def test_ctrl_c_during_the_wait_leaves_the_next_step_waiting(
    run: RunPaths, shm_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    copy_tensor = Slot.copy_tensor

    def slow_copy(self: Slot, *args: Any, **kwargs: Any) -> None:
        time.sleep(0.1)  # a copy long enough to be interrupted in
        copy_tensor(self, *args, **kwargs)

    monkeypatch.setattr(Slot, "copy_tensor", slow_copy)
    # Ctrl-C as Python handles it by default: an earlier test in this process may have left a
    # handler of its own on SIGINT (a daemon's request_stop), which raises nothing.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    acked_before_step: list[bool] = []
    with CheckpointClient(run.run_dir, optimizer=optimizer) as client:
        optimizer.register_step_pre_hook(lambda *_: acked_before_step.append(bool(pending_ack_paths(run))))
        assert client.maybe_snapshot(EVERY, lambda: {"model": model.state_dict()})
        expected = {f"model/{k}": v.clone() for k, v in model.state_dict().items()}
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            with pytest.raises(KeyboardInterrupt):
                optimizer.step()  # interrupted while it waits for the copy
        finally:
            signal.signal(signal.SIGINT, previous)
        optimizer.step()  # run again, as in a notebook: it must wait all the same
    assert acked_before_step == [True]
    got = staged(run, shm_root)[EVERY]
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.items())


def test_a_tensor_written_in_every_forward_costs_one_capture_not_all(run: RunPaths) -> None:
    torch.manual_seed(0)
    # Embedding(max_norm=...) renormalises its weight in place in every forward.
    model = torch.nn.Sequential(torch.nn.Embedding(50_000, 256, max_norm=1.0), torch.nn.Linear(256, 256))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 50_000, (4096,))
    with CheckpointClient(run.run_dir, optimizer=optimizer) as client:
        for step in range(1, 6 * EVERY + 1):
            model(tokens).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            client.maybe_snapshot(step, lambda: state_of(model, optimizer))
            free_slots(run)
        client.wait_staged()
    report = json.loads(run.client_report.read_text()) if run.client_report.exists() else {}
    assert report.get("skipped_captures", 0) <= 1, report


def test_a_client_dropped_without_close_lets_the_next_one_serve(
    run: RunPaths, trained: tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]
) -> None:
    model, optimizer, _ = trained
    first = CheckpointClient(run.run_dir, optimizer=optimizer)
    assert first.maybe_snapshot(EVERY, lambda: state_of(model, optimizer))
    first.wait_staged()
    del first
    gc.collect()
    free_slots(run)
    with CheckpointClient(run.run_dir, optimizer=optimizer) as second:
        assert second.maybe_snapshot(2 * EVERY, lambda: state_of(model, optimizer)), "the lock was kept"


def test_a_capture_right_after_another_waits_for_it_and_takes_the_other_slot(
    run: RunPaths,
    shm_root: Path,
    trained: tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, optimizer, batch = trained
    copy_tensor = Slot.copy_tensor

    def slow_copy(self: Slot, *args: Any, **kwargs: Any) -> None:
        time.sleep(0.01)  # the first copy is still running when the second capture comes
        copy_tensor(self, *args, **kwargs)

    monkeypatch.setattr(Slot, "copy_tensor", slow_copy)
    with CheckpointClient(run.run_dir, optimizer=optimizer) as client:
        assert client.maybe_snapshot(EVERY, lambda: state_of(model, optimizer))
        first = flat_copy(model, optimizer)
        # No optimizer step in between: the next capture itself must not touch the slot still
        # being filled, nor start before the first is acknowledged.
        assert client.maybe_snapshot(2 * EVERY, lambda: state_of(model, optimizer))
        slots = {read_ack(p).captured_step: read_ack(p).slot for p in pending_ack_paths(run)}
        assert slots.get(EVERY) is not None, "the second capture started before the first's ack"
        train_step(model, optimizer, batch)
        client.wait_staged()
        got = staged(run, shm_root)
    assert sorted(slots) in ([EVERY], [EVERY, 2 * EVERY])
    assert len({read_ack(p).slot for p in pending_ack_paths(run)}) == 2  # never the same slot
    for step in (EVERY, 2 * EVERY):
        assert all(torch.equal(got[step][name], tensor) for name, tensor in first.items()), step


@pytest.mark.parametrize("overlap", [True, False])
def test_the_integrations_overlap_unless_told_not_to(
    run: RunPaths,
    trained: tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
    overlap: bool,
) -> None:
    from ckptd.integrations.link import RunLink

    model, optimizer, _ = trained
    copy_tensor = Slot.copy_tensor

    def slow_copy(self: Slot, *args: Any, **kwargs: Any) -> None:
        time.sleep(0.01)
        copy_tensor(self, *args, **kwargs)

    monkeypatch.setattr(Slot, "copy_tensor", slow_copy)
    link = RunLink(run.run_dir, "metrics.jsonl", 2.0, overlap)
    client = link.client(None)
    link.track(client, optimizer)  # what both callbacks do with the framework's optimizer
    try:
        assert client.maybe_snapshot(EVERY, lambda: state_of(model, optimizer))
        assert bool(pending_ack_paths(run)) is not overlap  # acked at return only when not overlapped
    finally:
        link.close()
