"""The snapshot engine side by side: ckptd's trainer stall against torch.save, safetensors and DCP.

Run by hand, not part of the test suite::

    .venv/bin/python benchmarks/snapshot_engine.py [--sizes 0.25,1,4] [--dir PATH] [--repeats N] [--json]

For each size (GiB of training state: parameters + Adam ``exp_avg`` + ``exp_avg_sq`` + the
per-parameter ``step`` tensors), one in-memory state is built: a small causal transformer LM
(token and position embeddings, per layer LayerNorms, attention q/k/v/o and a 4x MLP, all with
biases, a final LayerNorm and an untied head: hundreds of tensors from a few bytes to hundreds of
MiB), after one real forward/backward/Adam step. The same model is trained for real in row 8.
Each round (``--repeats`` of them, after one untimed warm-up capture per client) measures, in turn:

1. ckptd's blocked time: what the trainer spends inside ``CheckpointClient.maybe_snapshot``, plus,
   for an overlapped capture, the wait for the background copy before the next optimizer step
   (``wait_staged`` after the next step's forward+backward: what the client's step pre-hook waits).
   (a) overlapped: a client given ``optimizer=``, its slot warm; (b) warm, not overlapped: a client
   without the optimizer (the copy is done when ``maybe_snapshot`` returns); (c) the first capture of
   a fresh run and a fresh client (as (a) when ``optimizer=`` exists, else as (b)) with no
   ``prepare()``: the loop trains ``--every - 1`` steps (nothing due: the client may prepare a slot
   in the background) before the first periodic capture is due. Each client has its own
   ``ckptd run --every-steps K --keep-last 1`` daemon subprocess (one client serves a run).
2. ``torch.save`` of the same state into the same directory: until it returns, and until the file
   and the directory are fsynced.
3. ``safetensors.torch.save_file`` of the flat tensors (no ``param_groups``): until it returns
   (the fsync after it is in the JSON).
4. ``torch.distributed.checkpoint.async_save`` (``no_dist=True``: in this torch async_save passes
   ``no_dist`` through to ``save``, which then needs no process group): until it returns the future
   (its default stager copies the state into fresh CPU memory on the calling thread) and until the
   future is done (files written and fsynced by its thread).
5. Persist throughput: from the end of capture (b), whose ack is written before ``maybe_snapshot``
   returns, until the daemon releases the ack (copied, hashed, fsynced, renamed), polled every 2 ms
   with nothing else running; against ``dd if=/dev/zero bs=1M count=MiB conv=fsync`` of the same
   bytes into the same directory.
6. A warm memcpy: every tensor ``copy_``'d, back to back, into a preallocated, already faulted
   buffer: the floor of a non-overlapped capture.
7. The daemon's anonymous RSS (``RssAnon`` of ``/proc/PID/status``, sampled every 20 ms by a
   thread) during persist (b): its own memory, not the shared-memory slot it maps.
8. A real training loop on the same model (``--loop-steps`` steps, batch ``--batch`` x
   ``--context`` tokens): wall time with no captures, with overlapped captures every ``--every``
   steps, and with non-overlapped ones (the daemons' ``--every-steps`` asks for them: no metric log
   needed); the three loops of a round run in a rotating order. Blocked time per capture: the
   ``maybe_snapshot`` call plus the wait in the next ``optimizer.step()`` until the client's step
   pre-hook lets it run (timed by a pre-hook registered after the client's), or the final
   ``wait_staged`` when a capture is at the last step. Also the wall time each capture added (vs
   the no-capture loop of the same round): there the copy in the background and the daemon's
   persist share the CPUs with training.

After every capture the script waits until the daemon has committed it, so captures never queue
(except inside the row-8 loops, which take them as a trainer would). Every row shows the median
and the min-max over the rounds; then the issue's ratios with their targets. GB/s is 10^9 bytes
per second, MB 10^6 bytes.

Memory: about 4.6x the state plus 1 GiB with one slot per client (4 GiB: ~19 GiB), 6.6x with the
default two. Each size is checked against ``psutil.virtual_memory().available`` before it is built:
with too little for two slots each client gets one (a loop capture due while that slot is still
being persisted is then skipped, and counted), with too little for one the size is skipped and
the table says why. Time on the 2-core development VM: ~1.5 min for 0.25 GiB, ~5-9 min for 1 GiB
(the loops dominate: ``--loop-steps`` and ``--repeats`` shorten them).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib
import psutil
import torch
import torch.nn.functional as F
from benchlib import LoadMeter, daemon_status, filesystem_of, progress, scratch_dir

from ckptd.client import CheckpointClient
from ckptd.protocol import RunPaths, daemon_alive, pending_ack_paths
from ckptd.store import Store

HEAD_DIM = 64
LAYERS = 8
# Issue 10's targets: (ratio key, label, comparison, target).
TARGETS = (
    ("overlapped_over_memcpy", "overlapped blocked / warm memcpy", "<=", 0.25),
    ("loop_overlapped_over_memcpy", "loop: overlapped blocked / warm memcpy", "<=", 0.25),
    ("first_over_warm", "first capture / warm capture", "<=", 2.0),
    ("persist_over_dd", "persist GB/s / dd GB/s", ">=", 0.9),
    ("daemon_rss_anon_mb", "daemon RssAnon peak in persist, MB", "<=", 60.0),
)


# -- the model and its state -----------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    width: int
    layers: int
    vocab: int
    context: int

    @property
    def params(self) -> int:
        w = self.width
        per_layer = 12 * w * w + 13 * w  # q,k,v,o (4w^2+4w), fc1 (4w^2+4w), fc2 (4w^2+w), 2 LayerNorms
        return self.layers * per_layer + 2 * self.vocab * w + self.context * w + 2 * w


def shape_for(nbytes: float, context: int) -> Shape:
    """A transformer whose fp32 params + Adam moments (12 bytes a parameter) come to ``nbytes``.

    The width gives the layers about 70% of the parameters; the vocabulary takes the rest."""
    params = nbytes / 12
    width = max(HEAD_DIM, round(math.sqrt(0.7 * params / (12 * LAYERS)) / HEAD_DIM) * HEAD_DIM)
    rest = params - Shape(width, LAYERS, 0, context).params
    return Shape(width, LAYERS, max(256, round(rest / (2 * width))), context)


class Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(width, width) for _ in range(4))
        self.ln2 = torch.nn.LayerNorm(width)
        self.fc1 = torch.nn.Linear(width, 4 * width)
        self.fc2 = torch.nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        h = self.ln1(x)
        q, k, v = (m(h).view(batch, tokens, -1, HEAD_DIM).transpose(1, 2) for m in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attended.transpose(1, 2).reshape(batch, tokens, width))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(torch.nn.Module):
    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(shape.vocab, shape.width)
        self.position = torch.nn.Embedding(shape.context, shape.width)
        self.blocks = torch.nn.ModuleList(Block(shape.width) for _ in range(shape.layers))
        self.ln_f = torch.nn.LayerNorm(shape.width)
        self.head = torch.nn.Linear(shape.width, shape.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


@dataclass
class Trainer:
    """The model, its Adam, one fixed batch; ``fwd_bwd`` + ``step`` is one training step."""

    model: TinyLM
    optimizer: torch.optim.Adam
    batch: torch.Tensor
    vocab: int

    def fwd_bwd(self) -> None:
        logits = self.model(self.batch[:, :-1])
        F.cross_entropy(logits.reshape(-1, self.vocab), self.batch[:, 1:].reshape(-1)).backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self) -> None:
        self.fwd_bwd()
        self.step()

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}


def build_trainer(shape: Shape, batch: int) -> Trainer:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = TinyLM(shape)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.02)
            else:  # LayerNorm weights 1, biases 0
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, shape.vocab, (batch, shape.context + 1))
    trainer = Trainer(model, optimizer, tokens, shape.vocab)
    trainer.train_step()  # one real step: the Adam state exists
    return trainer


def tensors_of(value: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        return [(prefix, value)]
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in tensors_of(v, f"{prefix}/{k}" if prefix else str(k))]
    if isinstance(value, (list, tuple)):
        return [t for i, v in enumerate(value) for t in tensors_of(v, f"{prefix}/{i}")]
    return []


def nbytes_of(tensors: list[tuple[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for _, t in tensors)


# -- daemons, clients, captures --------------------------------------------------------------------


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


class Run:
    """A run directory with a real ``ckptd run --every-steps K --keep-last 1`` daemon subprocess."""

    def __init__(self, run_dir: Path, every: int) -> None:
        self.run_dir = run_dir
        self.every = every
        self.paths = RunPaths(run_dir)
        self.store = Store(self.paths.default_store)
        self.staging: Path | None = None
        self.daemon: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Run:
        self.run_dir.mkdir()
        command = [sys.executable, "-m", "ckptd", "run", str(self.run_dir), "--every-steps", str(self.every)]
        command += ["--keep-last", "1", "-q"]
        with (self.run_dir / "daemon.log").open("ab") as daemon_log:
            self.daemon = subprocess.Popen(command, stdout=daemon_log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        # Alive, and its ack watcher running: the status written before the watchers start has none.
        while not (daemon_alive(self.paths) and daemon_status(self.paths).get("watcher")):
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the ckptd daemon did not start:\n{_tail(self.run_dir / 'daemon.log')}")
            time.sleep(0.01)
        staging = json.loads(self.paths.control.read_bytes()).get("staging")
        self.staging = Path(staging) if staging else None
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.daemon is not None
        return self.daemon.pid

    def stop(self) -> None:
        daemon, self.daemon = self.daemon, None
        if daemon is None:
            return
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                progress(f"  daemon {daemon.pid} ignored SIGTERM for 60 s; killing it")
                daemon.kill()
                daemon.wait()
        leftover = self.staging
        if leftover is not None and leftover.name.startswith("ckptd-") and leftover.exists():
            progress(f"  note: {leftover} was still there after the daemon stopped; removing it")
            shutil.rmtree(leftover, ignore_errors=True)
        if daemon.returncode != 0:
            progress(
                f"  WARNING: the daemon exited with {daemon.returncode}:\n"
                + _tail(self.run_dir / "daemon.log")
            )

    def slots_in_staging(self) -> int:
        try:
            return sum(1 for entry in os.scandir(self.staging) if entry.is_dir()) if self.staging else 0
        except OSError:
            return 0

    def wait_committed(self, step: int, since: float) -> float:
        """Seconds from ``since`` until no ack is pending (polled every 2 ms); then until the store
        lists ``step`` alone (retention done), so nothing of this capture overlaps the next one."""
        deadline = time.monotonic() + 600
        while pending_ack_paths(self.paths):
            if self.daemon is None or self.daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"step {step} was not committed:\n{_tail(self.run_dir / 'daemon.log')}")
            time.sleep(0.002)
        seconds = time.perf_counter() - since
        deadline = time.monotonic() + 30
        while [r.step for r in self.store.list()] != [step]:
            if time.monotonic() > deadline:
                steps = [r.step for r in self.store.list()]
                raise RuntimeError(
                    f"the store holds steps {steps}, not [{step}]:\n{_tail(self.run_dir / 'daemon.log')}"
                )
            time.sleep(0.005)
        return seconds


def overlap_supported() -> bool:
    try:
        return "optimizer" in inspect.signature(CheckpointClient.__init__).parameters
    except (TypeError, ValueError):
        return False


def make_client(run: Run, optimizer: torch.optim.Optimizer | None, slots: int) -> CheckpointClient:
    if optimizer is None:
        return CheckpointClient(run.run_dir, slots=slots)
    # The overlapped engine's keyword; a ckptd without it raises TypeError (caught by the caller).
    return CheckpointClient(run.run_dir, slots=slots, optimizer=optimizer)


def wait_staged(client: CheckpointClient) -> float:
    """Seconds spent in ``client.wait_staged()`` (0 for a client without it)."""
    wait = getattr(client, "wait_staged", None)
    if wait is None:
        return 0.0
    started = time.perf_counter()
    wait(timeout=None)
    return time.perf_counter() - started


@dataclass
class Capturer:
    """One run (daemon) and its one client; steps only move forward."""

    run: Run
    client: CheckpointClient
    overlapped: bool
    last_step: int = 0

    def next_due(self) -> int:
        every = self.run.every
        return (self.last_step // every + 1) * every


def capture_blocked(cap: Capturer, trainer: Trainer, step: int) -> tuple[float, float]:
    """One capture at ``step`` (due) right after an optimizer step; (blocked s, maybe_snapshot s).

    Overlapped: the next step's forward+backward runs while the client copies, then the wait for
    the copy (what the step pre-hook would wait) counts as blocked; then that optimizer step."""
    started = time.perf_counter()
    taken = cap.client.maybe_snapshot(step, trainer.state)
    call = time.perf_counter() - started
    cap.last_step = step
    if not taken:
        raise RuntimeError(
            f"maybe_snapshot({step}) took no capture:\n{_tail(cap.run.run_dir / 'daemon.log')}"
        )
    blocked = call
    if cap.overlapped:
        trainer.fwd_bwd()
        blocked += wait_staged(cap.client)
        trainer.step()
    return blocked, call


class RssAnonSampler:
    """Samples ``RssAnon`` of ``pid`` every ``interval`` s in a thread; ``peak`` in bytes."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.path = Path(f"/proc/{pid}/status")
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-anon", daemon=True)

    def read(self) -> int | None:
        try:
            for line in self.path.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def _run(self) -> None:
        while True:
            value = self.read()
            if value is not None:
                self.samples.append(value)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssAnonSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int | None:
        return max(self.samples) if self.samples else None


# -- the baselines ---------------------------------------------------------------------------------


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save_once(trainer: Trainer, root: Path) -> tuple[float, float]:
    """(seconds until torch.save returns, until the file and its directory entry are fsynced)."""
    path = root / "torch-save.pt"
    try:
        started = time.perf_counter()
        torch.save(trainer.state(), path)
        saved = time.perf_counter()
        fsync_path(path)
        fsync_path(root, directory=True)
        return saved - started, time.perf_counter() - started
    finally:
        path.unlink(missing_ok=True)


def safetensors_once(trainer: Trainer, root: Path) -> tuple[float, float]:
    """(seconds until save_file of the flat tensors returns, until the file is fsynced too)."""
    from safetensors.torch import save_file

    path = root / "state.safetensors"
    try:
        started = time.perf_counter()
        save_file(dict(tensors_of(trainer.state())), path)
        saved = time.perf_counter()
        fsync_path(path)
        fsync_path(root, directory=True)
        return saved - started, time.perf_counter() - started
    finally:
        path.unlink(missing_ok=True)


def dcp_once(trainer: Trainer, root: Path) -> tuple[float, float]:
    """(seconds until DCP async_save returns its future, until the future is done)."""
    import torch.distributed.checkpoint as dcp

    path = root / "dcp"
    try:
        started = time.perf_counter()
        response = dcp.async_save(trainer.state(), checkpoint_id=str(path), no_dist=True)
        returned = time.perf_counter()
        future: Future[Any] = getattr(response, "upload_completion", response)
        future.result()
        return returned - started, time.perf_counter() - started
    finally:
        shutil.rmtree(path, ignore_errors=True)


def dd_once(nbytes: int, root: Path) -> tuple[float, int]:
    """(seconds dd reports for ``nbytes`` rounded up to MiB with conv=fsync, the bytes written)."""
    count = max(1, math.ceil(nbytes / 2**20))
    path = root / "dd.bin"
    command = ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={count}", "conv=fsync"]
    try:
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
        wall = time.perf_counter() - started
    finally:
        path.unlink(missing_ok=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    found = re.search(r"copied, ([0-9.]+) s", result.stderr)
    return (float(found.group(1)) if found else wall), count * 2**20


def memcpy_once(trainer: Trainer, nbytes: int) -> float:
    """Seconds to ``copy_`` every tensor of the state, back to back, into a faulted-in buffer."""
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    buffer.fill_(1)  # every page faulted in before the timing
    started = time.perf_counter()
    offset = 0
    for _, tensor in tensors_of(trainer.state()):
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        buffer[offset : offset + flat.numel()].copy_(flat)
        offset += flat.numel()
    seconds = time.perf_counter() - started
    del buffer
    return seconds


# -- 8. the training loop --------------------------------------------------------------------------


class StepClock:
    """The optimizer's last step pre-hook: ``reached`` is when the hooks before it (the client's
    wait for an unfinished copy; global hooks run before per-optimizer ones) let the step go on."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.reached = 0.0
        self.handle = optimizer.register_step_pre_hook(self._mark)

    def _mark(self, *_: object) -> None:
        self.reached = time.perf_counter()

    def ensure_last(self) -> None:
        """Registered again if a hook was added after it (a client that hooks lazily)."""
        hooks = getattr(self.optimizer, "_optimizer_step_pre_hooks", None)
        if hooks and next(reversed(hooks)) != self.handle.id:
            self.handle.remove()
            self.handle = self.optimizer.register_step_pre_hook(self._mark)


def train_loop(trainer: Trainer, clock: StepClock, steps: int, cap: Capturer | None) -> dict[str, Any]:
    """``steps`` training steps, with ``maybe_snapshot`` after each optimizer step when ``cap``.

    Blocked per capture: the ``maybe_snapshot`` call, plus the wait in the next ``optimizer.step``
    before the hooks let it run (the client's pre-hook waiting for the copy), or, for a capture
    at the last step, the final ``wait_staged``."""
    clock.ensure_last()
    every = cap.run.every if cap else 0
    base = -(-cap.last_step // every) * every if cap else 0  # a multiple of K: due at base + K, ...
    hook_s: list[float] = []
    calls: dict[int, tuple[bool, float]] = {}  # index of a due step -> (taken, maybe_snapshot s)
    end_wait = 0.0
    started = time.perf_counter()
    for index in range(steps):
        trainer.fwd_bwd()
        begun = time.perf_counter()
        trainer.step()  # the overlapped client's pre-hook waits here for an unfinished copy
        hook_s.append(clock.reached - begun)
        if cap is not None:
            step = base + index + 1
            begun = time.perf_counter()
            taken = cap.client.maybe_snapshot(step, trainer.state)
            if step % every == 0:
                calls[index] = (taken, time.perf_counter() - begun)
    if cap is not None and cap.overlapped:
        end_wait = wait_staged(cap.client)  # the last copy must finish for the capture to count
    wall = time.perf_counter() - started
    result: dict[str, Any] = {"wall_s": wall, "pre_hook_s": hook_s, "end_wait_s": end_wait}
    if cap is None:
        return result
    cap.last_step = base + steps
    blocked = [
        call + (hook_s[index + 1] if index + 1 < steps else end_wait)
        for index, (taken, call) in sorted(calls.items())
        if taken
    ]
    taken_steps = [base + i + 1 for i, (taken, _) in calls.items() if taken]
    if taken_steps:
        cap.run.wait_committed(max(taken_steps), time.perf_counter())
    result.update(
        {
            "captures": len(taken_steps),
            "skipped": len(calls) - len(taken_steps),
            "blocked_s": blocked,
            "slots_in_staging": cap.run.slots_in_staging(),
        }
    )
    return result


# -- one size --------------------------------------------------------------------------------------


def memory_need(nbytes: int, slots: int) -> int:
    """The state, its gradients (1/3), two clients' slots, one transient copy (the first-capture
    client's slot, the memcpy buffer, DCP's staged copy), a quarter of the state for what the
    allocator keeps of freed copies, and 1 GiB for activations and the rest."""
    return int(nbytes * (1 + 1 / 3 + 2 * slots + 1 + 1 / 4)) + 2**30


def skip_reason(gib: float, root: Path) -> str | None:
    target = int(gib * 2**30)
    available = psutil.virtual_memory().available
    if available < memory_need(target, 1):
        need = memory_need(target, 1) / 2**30
        return f"needs ~{need:.1f} GiB of memory, {available / 2**30:.1f} GiB available"
    disk_free = shutil.disk_usage(root).free
    if disk_free < 6 * target:
        return f"needs ~{6 * gib:.1f} GiB free on disk, {disk_free / 2**30:.1f} GiB free"
    return None


class SizeBench:
    """Every row for one size: the state, the two warm clients (each with its daemon), the rounds."""

    def __init__(self, gib: float, args: argparse.Namespace, root: Path) -> None:
        self.args, self.root = args, root
        target = int(gib * 2**30)
        self.slots = 2 if psutil.virtual_memory().available >= memory_need(target, 2) else 1
        self.shape = shape_for(target, args.context)
        progress(f"\n== {gib:g} GiB: building {self.shape} ...")
        self.trainer = build_trainer(self.shape, args.batch)
        tensors = tensors_of(self.trainer.state())
        self.nbytes = nbytes_of(tensors)
        began = time.perf_counter()
        self.trainer.train_step()
        step_s = time.perf_counter() - began
        progress(
            f"  {self.nbytes / 2**30:.3f} GiB in {len(tensors)} tensors; {self.slots} slot(s) per "
            f"client; one training step {step_s:.2f} s"
        )
        self.rows: dict[str, list[float]] = {}
        self.result: dict[str, Any] = {
            "gib": gib,
            "shape": self.shape.__dict__,
            "state_bytes": self.nbytes,
            "tensors": len(tensors),
            "slots_per_client": self.slots,
            "train_step_s": step_s,
            "rows": self.rows,
        }
        self.plain: Capturer | None = None
        self.over: Capturer | None = None

    def add(self, key: str, value: float) -> None:
        self.rows.setdefault(key, []).append(value)

    def run(self) -> dict[str, Any]:
        args, trainer = self.args, self.trainer
        with ExitStack() as stack:
            gib = self.result["gib"]
            run = stack.enter_context(Run(self.root / f"plain-{gib:g}", args.every))
            self.plain = Capturer(run, stack.enter_context(make_client(run, None, self.slots)), False)
            if overlap_supported():
                run = stack.enter_context(Run(self.root / f"overlap-{gib:g}", args.every))
                try:
                    client = stack.enter_context(make_client(run, trainer.optimizer, self.slots))
                    self.over = Capturer(run, client, True)
                except Exception as exc:  # an engine without the keyword, or one that fails
                    self.result["overlap_error"] = f"CheckpointClient(optimizer=...) raised {exc!r}"
            else:
                self.result["overlap_error"] = "CheckpointClient has no optimizer= parameter"
            if self.over is None:
                progress(f"  overlapped rows not available: {self.result['overlap_error']}")
            # Registered after the overlapped client's hook: it runs once that hook stops waiting.
            clock = StepClock(trainer.optimizer)
            stack.callback(lambda: clock.handle.remove())
            warm_up = {}
            for cap in (c for c in (self.over, self.plain) if c is not None):  # untimed: the slots
                step = cap.next_due()
                warm_up["overlapped" if cap.overlapped else "plain"] = capture_blocked(cap, trainer, step)[0]
                cap.run.wait_committed(step, time.perf_counter())
            self.result["warm_up_blocked_s"] = warm_up
            for round_ in range(args.repeats):
                progress(f"  round {round_ + 1}/{args.repeats}:")
                self.captures(round_)
                self.baselines()
                self.loops(round_, clock)
            self.result["idle_rss_anon_bytes"] = RssAnonSampler(self.plain.run.pid).read()
        self.result["first_capture_overlapped"] = self.over is not None
        return self.result

    def captures(self, round_: int) -> None:
        """Rows 1, 5 and 7."""
        trainer, every = self.trainer, self.args.every
        assert self.plain is not None
        if self.over is not None:
            step = self.over.next_due()
            blocked, call = capture_blocked(self.over, trainer, step)
            self.over.run.wait_committed(step, time.perf_counter())
            self.add("overlapped_s", blocked)
            self.add("overlapped_call_s", call)
            progress(
                f"    1a overlapped: blocked {blocked * 1e3:.1f} ms (maybe_snapshot {call * 1e3:.1f} ms)"
            )
        # A warm capture without the optimizer; its persist timed alone, the daemon sampled.
        step = self.plain.next_due()
        with RssAnonSampler(self.plain.run.pid) as rss:
            blocked, _ = capture_blocked(self.plain, trainer, step)
            persist = self.plain.run.wait_committed(step, time.perf_counter())
        stored = next(r.nbytes for r in self.plain.run.store.list() if r.step == step)
        self.add("plain_s", blocked)
        self.add("persist_s", persist)
        self.add("persist_gbps", stored / persist / 1e9)
        if rss.peak is not None:
            self.add("rss_anon_bytes", rss.peak)
        progress(
            f"    1b warm: blocked {blocked * 1e3:.1f} ms; persist {persist:.2f} s "
            f"({stored / persist / 1e9:.3f} GB/s); daemon RssAnon peak {(rss.peak or 0) / 1e6:.1f} MB"
        )
        # A fresh run and client, as 1a when it exists: steps before the first capture is due.
        with Run(self.root / f"first-{self.result['gib']:g}-{round_}", every) as run:
            optimizer = trainer.optimizer if self.over is not None else None
            with make_client(run, optimizer, 1) as client:
                fresh = Capturer(run, client, self.over is not None)
                for step in range(1, every):
                    trainer.train_step()
                    if client.maybe_snapshot(step, trainer.state):
                        raise RuntimeError(f"a capture at step {step}, before --every-steps {every}")
                trainer.train_step()
                blocked, _ = capture_blocked(fresh, trainer, every)
                run.wait_committed(every, time.perf_counter())
        self.add("first_overlapped_s" if self.over is not None else "first_plain_s", blocked)
        progress(f"    1c first capture: blocked {blocked * 1e3:.1f} ms")

    def baselines(self) -> None:
        """Rows 2, 3, 4, 5 (dd) and 6."""
        trainer, root = self.trainer, self.root
        self.add("memcpy_s", memcpy_once(trainer, self.nbytes))
        saved, durable = torch_save_once(trainer, root)
        self.add("torch_save_s", saved)
        self.add("torch_save_fsync_s", durable)
        saved, durable = safetensors_once(trainer, root)
        self.add("safetensors_s", saved)
        self.add("safetensors_fsync_s", durable)
        try:
            blocking, total = dcp_once(trainer, root)
            self.add("dcp_blocking_s", blocking)
            self.add("dcp_total_s", total)
        except Exception as exc:  # said in its row
            self.result["dcp_error"] = f"{type(exc).__name__}: {exc}"
            progress(f"    DCP async_save failed: {self.result['dcp_error']}")
        dd_s, dd_bytes = dd_once(self.nbytes, root)
        self.add("dd_s", dd_s)
        self.add("dd_gbps", dd_bytes / dd_s / 1e9)
        rows = self.rows
        progress(
            f"    memcpy {rows['memcpy_s'][-1] * 1e3:.1f} ms, torch.save {rows['torch_save_s'][-1]:.2f} s, "
            f"safetensors {saved:.2f} s, DCP {rows.get('dcp_blocking_s', [0])[-1] * 1e3:.1f} ms blocking, "
            f"dd {dd_s:.2f} s"
        )

    def loops(self, round_: int, clock: StepClock) -> None:
        """Row 8: the three loops, in an order that rotates from round to round."""
        loops: list[tuple[str, Capturer | None]] = [("none", None), ("plain", self.plain)]
        if self.over is not None:
            loops.append(("overlapped", self.over))
        shift = round_ % len(loops)
        for name, cap in loops[shift:] + loops[:shift]:
            outcome = train_loop(self.trainer, clock, self.args.loop_steps, cap)
            self.add(f"loop_{name}_wall_s", outcome["wall_s"])
            note = ""
            if cap is not None:
                for blocked in outcome["blocked_s"]:
                    self.add(f"loop_{name}_blocked_s", blocked)
                for key in ("captures", "skipped", "slots_in_staging"):
                    self.add(f"loop_{name}_{key}", outcome[key])
                blocked_ms = ", ".join(f"{b * 1e3:.0f}" for b in outcome["blocked_s"])
                note = f", {outcome['captures']} captures ({outcome['skipped']} skipped)"
                note += f", blocked {blocked_ms} ms"
            progress(f"    loop {name}: {outcome['wall_s']:.2f} s{note}")


# -- report -----------------------------------------------------------------------------------------


def median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def derived(size: dict[str, Any]) -> dict[str, float | None]:
    """The ratios (of medians) and the loops' wall time added per capture."""
    rows = size["rows"]
    med = {key: median(values) for key, values in rows.items()}

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def added(name: str) -> float | None:
        walls, captures = rows.get(f"loop_{name}_wall_s"), rows.get(f"loop_{name}_captures")
        if not walls or not captures:
            return None
        per_round = zip(walls, rows["loop_none_wall_s"], captures, strict=True)
        return statistics.median((wall - none) / max(1, n) for wall, none, n in per_round)

    if size.get("first_capture_overlapped"):
        first, warm = med.get("first_overlapped_s"), med.get("overlapped_s")
    else:
        first, warm = med.get("first_plain_s"), med.get("plain_s")
    peak_rss = max(rows["rss_anon_bytes"]) if rows.get("rss_anon_bytes") else None
    return {
        "overlapped_over_memcpy": div(med.get("overlapped_s"), med.get("memcpy_s")),
        "loop_overlapped_over_memcpy": div(med.get("loop_overlapped_blocked_s"), med.get("memcpy_s")),
        "first_over_warm": div(first, warm),
        "persist_over_dd": div(med.get("persist_gbps"), med.get("dd_gbps")),
        "daemon_rss_anon_mb": peak_rss / 1e6 if peak_rss is not None else None,
        "plain_over_memcpy": div(med.get("plain_s"), med.get("memcpy_s")),
        "loop_plain_over_memcpy": div(med.get("loop_plain_blocked_s"), med.get("memcpy_s")),
        "loop_overlapped_over_dcp": div(med.get("loop_overlapped_blocked_s"), med.get("dcp_blocking_s")),
        "loop_plain_over_dcp": div(med.get("loop_plain_blocked_s"), med.get("dcp_blocking_s")),
        "loop_overlapped_added_s": added("overlapped"),
        "loop_plain_added_s": added("plain"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    meter = LoadMeter()
    sizes = []
    with scratch_dir(args.dir, "ckptd-engine-") as root:
        disk = filesystem_of(root)
        progress(
            f"disk: {disk['path']} on {disk['device']} ({disk['fstype']}, mounted at {disk['mount']}, "
            f"{disk['free_bytes'] / 2**30:.0f} GiB free)"
        )
        if disk["fstype"] in ("tmpfs", "ramfs"):
            progress("  WARNING: that is memory, not a disk: the durable figures mean nothing there")
        for gib in args.sizes:
            gc.collect()  # the last size's state, slots and buffers are gone before this one is sized
            reason = skip_reason(gib, root)
            if reason is not None:
                progress(f"\n== {gib:g} GiB skipped: {reason}")
                sizes.append({"gib": gib, "skipped": reason})
                continue
            bench = SizeBench(gib, args, root)
            size = bench.run()
            del bench
            size["derived"] = derived(size)
            sizes.append(size)
    return {
        "benchmark": "snapshot_engine",
        **meter.report(),
        "machine": benchlib.machine_info(torch=torch.__version__, torch_threads=torch.get_num_threads()),
        "disk": disk,
        "config": {
            "sizes_gib": args.sizes,
            "repeats": args.repeats,
            "every": args.every,
            "loop_steps": args.loop_steps,
            "batch": args.batch,
            "context": args.context,
        },
        "overlap_available": overlap_supported(),
        "sizes": sizes,
    }


def _spread(values: list[float], scale: float, digits: int) -> str:
    middle = f"{statistics.median(values) * scale:.{digits}f}"
    if len(values) == 1:
        return middle
    return f"{middle} ({min(values) * scale:.{digits}f}-{max(values) * scale:.{digits}f})"


MS, S, MB = (1e3, 1), (1.0, 2), (1e-6, 1)


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    """The table: a label, then one cell per size."""
    sizes, config = result["sizes"], result["config"]
    every, steps = config["every"], config["loop_steps"]
    rows: list[list[str]] = [["", *[f"{size['gib']:g} GiB" for size in sizes]]]

    def each(render: Callable[[dict[str, Any]], str]) -> list[str]:
        return ["skipped" if "skipped" in size else render(size) for size in sizes]

    def measured(label: str, key: str, unit: tuple[float, int], suffix: str, missing: str = "n/a") -> None:
        def render(size: dict[str, Any]) -> str:
            values = size["rows"].get(key)
            return _spread(values, *unit) + suffix if values else missing

        rows.append([label, *each(render)])

    def rate(key: str) -> None:
        def render(size: dict[str, Any]) -> str:
            values = size["rows"].get(key)
            return f"{size['state_bytes'] / statistics.median(values) / 1e9:.3f} GB/s" if values else "n/a"

        rows.append(["     GB/s", *each(render)])

    def ratio(label: str, key: str) -> None:
        def render(size: dict[str, Any]) -> str:
            value = size["derived"].get(key)
            return "n/a" if value is None else f"{value:.3f}"

        rows.append([label, *each(render)])

    def added(name: str, label: str) -> None:
        def render(size: dict[str, Any]) -> str:
            value = size["derived"].get(f"loop_{name}_added_s")
            if value is None:
                return not_available
            counts = size["rows"]
            taken, skipped = sum(counts[f"loop_{name}_captures"]), sum(counts[f"loop_{name}_skipped"])
            slots = max(counts[f"loop_{name}_slots_in_staging"])
            return f"{value * 1e3:.0f} ms ({taken:.0f} taken, {skipped:.0f} skipped; {slots:.0f} slot(s))"

        rows.append([f"8  wall added per capture, {label}", *each(render)])

    not_available = "not available"
    rows.append(
        [
            "   state: params + Adam",
            *each(lambda z: f"{z['state_bytes'] / 2**30:.3f} GiB, {z['tensors']} tensors"),
        ]
    )
    measured("1a ckptd blocked, overlapped", "overlapped_s", MS, " ms", not_available)
    measured("     of which in maybe_snapshot", "overlapped_call_s", MS, " ms", not_available)
    measured("1b ckptd blocked, warm, not overlapped", "plain_s", MS, " ms")
    measured("1c ckptd blocked, first capture, as 1a", "first_overlapped_s", MS, " ms", "as 1b (below)")
    measured("1c ckptd blocked, first capture, as 1b", "first_plain_s", MS, " ms", "as 1a (above)")
    measured("2  torch.save, returns", "torch_save_s", S, " s")
    measured("2  torch.save + fsync", "torch_save_fsync_s", S, " s")
    measured("3  safetensors save_file, returns", "safetensors_s", S, " s")
    measured("4  DCP async_save, blocking part", "dcp_blocking_s", MS, " ms", "failed (below)")
    measured("4  DCP async_save, total", "dcp_total_s", S, " s", "failed (below)")
    measured("5  ckptd persist, ack -> released", "persist_s", S, " s")
    rate("persist_s")
    measured("5  dd bs=1M conv=fsync", "dd_s", S, " s")
    rate("dd_s")
    measured("6  warm memcpy", "memcpy_s", MS, " ms")
    rate("memcpy_s")
    measured("7  daemon RssAnon peak in persist, MB", "rss_anon_bytes", MB, "")
    measured(f"8  loop wall, {steps} steps, no captures", "loop_none_wall_s", S, " s")
    measured(f"8  loop wall, overlapped every {every}", "loop_overlapped_wall_s", S, " s", not_available)
    measured(f"8  loop wall, not overlapped every {every}", "loop_plain_wall_s", S, " s")
    added("overlapped", "overlapped")
    added("plain", "not overlapped")
    measured("8  blocked per capture, overlapped", "loop_overlapped_blocked_s", MS, " ms", not_available)
    ratio("     / warm memcpy", "loop_overlapped_over_memcpy")
    ratio("     / DCP async_save blocking part", "loop_overlapped_over_dcp")
    measured("8  blocked per capture, not overlapped", "loop_plain_blocked_s", MS, " ms")
    ratio("     / warm memcpy", "loop_plain_over_memcpy")
    ratio("     / DCP async_save blocking part", "loop_plain_over_dcp")
    ratio("   1b / warm memcpy", "plain_over_memcpy")
    for key, label, cmp, target in TARGETS:

        def verdict(size: dict[str, Any], key: str = key, cmp: str = cmp, target: float = target) -> str:
            value = size["derived"].get(key)
            if value is None:
                return "n/a"
            ok = value <= target if cmp == "<=" else value >= target
            return f"{value:.3f} {'PASS' if ok else 'MISS'}"

        rows.append([f"=> {label} (target {cmp} {target:g})", *each(verdict)])
    return rows


def print_table(result: dict[str, Any]) -> None:
    m, d, c = result["machine"], result["disk"], result["config"]
    load = result["load_avg_1min"]
    print(f"\nsnapshot_engine  {result['date']}")
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, "
        f"Linux {m['kernel']}, Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads); "
        f"disk {d['device']} {d['fstype']} at {d['mount']}; load {load['start']:.2f} -> {load['end']:.2f}, "
        f"other processes {result['others_cpu_share']:.0%} of the CPUs; {c['repeats']} rounds; "
        f"loops of {c['loop_steps']} steps, {c['batch']}x{c['context']} tokens, captures every {c['every']}"
    )
    rows = table_rows(result)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  " + "  ".join(f"{text:<{widths[i]}}" for i, text in enumerate(row)).rstrip())
    for size in result["sizes"]:
        for key in ("skipped", "overlap_error", "dcp_error"):
            if size.get(key):
                print(f"{size['gib']:g} GiB, {key.replace('_', ' ')}: {size[key]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default="0.25,1,4", help="GiB of state, comma-separated (0.25,1,4)")
    parser.add_argument("--dir", help="where to write (default: a temp dir on the repo's filesystem)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per size (3)")
    parser.add_argument("--every", type=int, default=4, help="capture every K steps in the loops (4)")
    parser.add_argument("--loop-steps", type=int, default=14, help="steps of each training loop (14)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per training batch (2)")
    parser.add_argument("--context", type=int, default=64, help="tokens per sequence (64)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    try:
        args.sizes = [float(v) for v in args.sizes.split(",") if v.strip()]
    except ValueError:
        parser.error("--sizes takes numbers, e.g. 0.25,1,4")
    if not args.sizes or min(args.sizes) <= 0 or args.repeats < 1:
        parser.error("--sizes must be > 0 and --repeats >= 1")
    if args.every < 2 or args.loop_steps <= args.every:
        parser.error("--every must be >= 2 and --loop-steps > --every")
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
