"""The GPU staging path, measured in one short run (for a machine with a CUDA device).

    .venv/bin/python benchmarks/gpu_staging.py [--gib 1.0] [--steps 6] [--json]

1. Bandwidth: the model's and Adam's tensors copied device-to-host into a plain pinned buffer
   (``torch.empty(pin_memory=True)``, ``copy_(non_blocking=True)``, one synchronize), against
   ckptd's background copy of the same tensors into a shared-memory slot registered with
   ``cudaHostRegister`` (side stream, as the client does it). Target: ckptd >= 0.8x pinned.
2. The trainer's blocked time in a real training step: a transformer-like MLP trains on the
   device; every other step a capture is due (a control file and a fresh heartbeat stand in for
   the daemon, and the acks are removed as a daemon would). Reported: time inside
   ``maybe_snapshot``, and the step time with and without a capture in flight (the optimizer
   step waits for the copy).

Without CUDA it runs on the CPU, so the script itself can be checked anywhere; its figures
then say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from ckptd.client import CheckpointClient
from ckptd.client.overlap import BackgroundCopy, Deferred
from ckptd.client.snapshot import Slot, flatten_state, layout_for
from ckptd.protocol import Control, RunPaths, atomic_write_json, pending_ack_paths, write_control


def make_model(gib: float, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    width = 4096
    layers = max(1, round(gib * 2**30 / (3 * 4 * width * width)))  # params + 2 Adam moments
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    return model, optimizer


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    model(batch).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)


def state_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, object]:
    return {"model": model.state_dict(), "optim": optimizer.state_dict()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> dict[str, float]:
    tensors, _ = flatten_state(state_of(model, optimizer))
    layout = layout_for(tensors)
    nbytes = layout.total
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    root = Path(os.environ.get("CKPTD_SHM_ROOT", "/dev/shm"))
    slot = Slot(Path(tempfile.mkdtemp(prefix="ckptd-gpu-", dir=root)) / "slot-0")
    slot.ensure_capacity(nbytes)
    plain, ours = [], []
    for _ in range(3):
        synchronize(device)
        started = time.perf_counter()
        for offset, (_, tensor) in zip(layout.offsets, tensors, strict=True):
            flat = tensor.reshape(-1).view(torch.uint8)
            pinned[offset : offset + flat.numel()].copy_(flat, non_blocking=True)
        synchronize(device)
        plain.append(time.perf_counter() - started)
        deferred = [Deferred(o, t, t._version) for o, (_, t) in zip(layout.offsets, tensors, strict=True)]
        started = time.perf_counter()
        job = BackgroundCopy(slot, deferred, lambda: None)
        job.start()
        job.join()
        ours.append(time.perf_counter() - started)
        assert job.failure is None, job.failure
    slot.unlink()
    gb = nbytes / 1e9
    return {
        "bytes": nbytes,
        "pinned_copy_GBps": gb / statistics.median(plain),
        "ckptd_staging_GBps": gb / statistics.median(ours),
        "ratio": statistics.median(plain) / statistics.median(ours),
        "slot_pinned": float(slot._pinned) if device.type == "cuda" else 0.0,
    }


def blocked(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, steps: int
) -> dict[str, float]:
    run = Path(tempfile.mkdtemp(prefix="ckptd-gpu-run-"))
    paths = RunPaths(run)
    paths.acks.mkdir(parents=True)
    shm = Path(tempfile.mkdtemp(prefix="ckptd-gpu-shm-", dir="/dev/shm"))
    os.environ["CKPTD_SHM_ROOT"] = str(shm)
    write_control(paths, Control(seq=1, run_id="gpu", staging=str(shm / "ckptd-gpu"), every_steps=2))
    atomic_write_json(paths.status, {"protocol": 1})
    stop = threading.Event()

    def heartbeat() -> None:  # the daemon's, while the trainer runs
        while not stop.wait(0.5):
            os.utime(paths.status)

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    batch = torch.randn(4096, 4096, device=device)
    train_step(model, optimizer, batch)
    inside, with_capture, without = [], [], []
    with CheckpointClient(run, optimizer=optimizer) as client:
        for step in range(1, 2 * steps + 2):
            for ack in pending_ack_paths(paths):
                ack.unlink()  # what the daemon does once it has persisted a capture
            synchronize(device)
            started = time.perf_counter()
            due = client.maybe_snapshot(step, lambda: state_of(model, optimizer))
            if due:
                inside.append(time.perf_counter() - started)
            started = time.perf_counter()
            train_step(model, optimizer, batch)
            synchronize(device)
            (with_capture if due else without).append(time.perf_counter() - started)
    stop.set()
    beat.join()
    return {
        "maybe_snapshot_ms": 1e3 * statistics.median(inside[1:] or inside),
        "step_with_capture_ms": 1e3 * statistics.median(with_capture[1:] or with_capture),
        "step_without_ms": 1e3 * statistics.median(without[1:] or without),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, optimizer = make_model(args.gib, device)
    train_step(model, optimizer, torch.randn(64, 4096, device=device))
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "bandwidth": bandwidth(model, optimizer, device),
        "blocked": blocked(model, optimizer, device, args.steps),
    }
    if args.json:
        json.dump(result, sys.stdout, indent=1)
    else:
        print_table(result)


def print_table(result: dict[str, object]) -> None:
    print(f"device: {result['device']}")
    for section in ("bandwidth", "blocked"):
        for key, value in result[section].items():  # type: ignore[attr-defined]
            print(f"  {section:9} {key:22} {value:12.3f}")


if __name__ == "__main__":
    main()
