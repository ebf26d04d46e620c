"""Overlapped staging: the copy that finishes while the next forward and backward run.

A forward and a backward pass read the parameters and write gradients; only the optimizer
step writes the parameters and its own state. So the tensors an optimizer owns (its params
and its state: Adam's moments) may be copied into the slot after ``maybe_snapshot`` returns,
by a thread (``copy_`` releases the GIL), as long as the optimizer's next step waits for that
copy: a step pre-hook on every optimizer the client was given does that. Every other tensor
(buffers such as BatchNorm's running stats, which a forward updates; EMA weights; anything
the client cannot prove untouched) is copied before ``maybe_snapshot`` returns.

Every torch optimizer's step waits (a global step pre-hook), not only the tracked ones': a
second optimizer over the same params must not write them under a copy either.

A tensor changed some other way while its copy runs (weights clipped in place, an EMA written
into the params) would make the capture a mix of two steps. torch's version counter, which
in-place ops bump, tells: such a capture is dropped rather than acknowledged, and the client
copies that tensor before returning from then on. Writes through ``.data`` bypass the version
counter and cannot be seen: ``CheckpointClient.wait_staged`` is the barrier for loops that
write params outside ``optimizer.step()``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ckptd.client.snapshot import Slot


@dataclass(frozen=True)
class Deferred:
    """One tensor whose copy into the slot runs in the background."""

    offset: int
    tensor: torch.Tensor
    version: int  # its version counter when captured: a change means it was modified meanwhile


class Drop(Exception):
    """The background copy cannot stand for the captured step; ``kind`` names why, for the
    client's skip counters."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


def version_of(tensor: torch.Tensor) -> int | None:
    """``tensor``'s version counter, or None when it has none (an inference-mode tensor)."""
    try:
        return int(tensor._version)
    except RuntimeError:
        return None


def storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    return str(tensor.device), tensor.untyped_storage().data_ptr()


class Optimizers:
    """The optimizers a client was given: what they own is what may be copied in the
    background. Held weakly: the client keeps no optimizer (nor model) alive."""

    def __init__(self) -> None:
        self._tracked: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()

    def add(self, optimizer: object) -> None:
        """Track ``optimizer`` (or the torch optimizer a wrapper holds, such as accelerate's
        ``AcceleratedOptimizer``); a second call for the same one changes nothing."""
        self._tracked.add(innermost(optimizer))
        _hook_every_optimizer()

    def __bool__(self) -> bool:
        return len(self._tracked) > 0

    def owned(self) -> set[tuple[str, int]]:
        """The storages of every tracked optimizer's params and state tensors: what only
        their ``step`` writes."""
        return {storage_key(t) for t in self._tensors()}

    def _tensors(self) -> Iterator[torch.Tensor]:
        for optimizer in list(self._tracked):
            for group in optimizer.param_groups:
                yield from (p for p in group["params"] if isinstance(p, torch.Tensor))
            for state in optimizer.state.values():
                if isinstance(state, dict):
                    yield from (v for v in state.values() if isinstance(v, torch.Tensor))


# Copies still running, in this process. Every torch optimizer's step waits for them, not only
# the tracked ones': a second optimizer over the same params (a fused one changes them without
# bumping their version counters) must not write them under a copy either.
_RUNNING: set[BackgroundCopy] = set()
_RUNNING_LOCK = threading.Lock()
_HOOKED = False


def _hook_every_optimizer() -> None:
    global _HOOKED
    if not _HOOKED:
        register_optimizer_step_pre_hook(_before_any_step)
        _HOOKED = True


def _before_any_step(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
    wait_for_copies()


def wait_for_copies() -> None:
    """Block until no background copy of this process is running."""
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for job in running:
        job.join()


def innermost(optimizer: object) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` that ``optimizer`` is or wraps (``.optimizer`` chains)."""
    seen = 0
    while not _is_plain_optimizer(optimizer) and seen < 8:
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            break
        optimizer, seen = inner, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        kind = type(optimizer).__name__
        raise TypeError(f"expected a torch.optim.Optimizer (or a wrapper of one), not {kind}")
    return optimizer


def _is_plain_optimizer(optimizer: object) -> bool:
    # A wrapper may subclass Optimizer too (accelerate does) while its hooks never run: look
    # through anything that holds another optimizer.
    return isinstance(optimizer, torch.optim.Optimizer) and not isinstance(
        getattr(optimizer, "optimizer", None), torch.optim.Optimizer
    )


class BackgroundCopy:
    """Copies ``deferred`` tensors into ``slot`` on a thread, then calls ``finish`` (seal and
    ack) when every tensor is still the captured one; any failure is kept for the client."""

    def __init__(self, slot: Slot, deferred: Sequence[Deferred], finish: Callable[[], None]) -> None:
        self.slot = slot
        self._deferred = deferred
        self._finish = finish
        self.failure: Drop | None = None
        self.changed: frozenset[tuple[str, int]] = frozenset()  # storages written meanwhile
        # Set by the thread as its last act. Waiting on it, not on Thread.join: a join
        # interrupted by Ctrl-C (Python 3.11) marks the thread stopped while it still runs.
        self._done = threading.Event()
        # Recorded on the trainer's stream now: a CUDA copy starts from the step's values.
        self._ready = _record_events(deferred)
        self._thread = threading.Thread(target=self._run, name="ckptd-stage", daemon=True)

    def start(self) -> None:
        with _RUNNING_LOCK:
            _RUNNING.add(self)
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def _run(self) -> None:
        try:
            self._copy()
            changed = [d for d in self._deferred if version_of(d.tensor) != d.version]
            if changed:
                self.changed = frozenset(storage_key(d.tensor) for d in changed)
                raise Drop(
                    "modified-during-staging",
                    f"{len(changed)} tensor(s) were modified in place while being staged, outside "
                    "an optimizer step (call wait_staged() before such updates); they are copied "
                    "before maybe_snapshot returns from now on",
                )
            self._finish()
        except Drop as exc:
            self.failure = exc
        except Exception as exc:  # the trainer learns of it at its next wait, never as a crash
            self.failure = Drop(type(exc).__name__, f"{type(exc).__name__}: {exc}")
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(self)
            self._done.set()

    def _copy(self) -> None:
        on_cpu = [d for d in self._deferred if not d.tensor.is_cuda]
        for item in on_cpu:
            self.slot.copy_tensor(item.offset, item.tensor)
        for device, event in self._ready.items():
            self._copy_from(device, event)

    def _copy_from(self, device: torch.device, event: torch.cuda.Event) -> None:
        """Device-to-host copies on a side stream that first waits for the captured step."""
        pinned = self.slot.pin()
        stream = torch.cuda.Stream(device=device)
        with torch.cuda.stream(stream):
            stream.wait_event(event)
            for item in self._deferred:
                if item.tensor.device == device:
                    self.slot.copy_tensor(item.offset, item.tensor, non_blocking=pinned)
        stream.synchronize()


def _record_events(deferred: Sequence[Deferred]) -> dict[torch.device, torch.cuda.Event]:
    events: dict[torch.device, torch.cuda.Event] = {}
    for item in deferred:
        device = item.tensor.device
        if item.tensor.is_cuda and device not in events:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events[device] = event
    return events
