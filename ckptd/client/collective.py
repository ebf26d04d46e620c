"""Agreement across the ranks of a distributed job (DDP, torchrun): rank 0 decides, all follow.

Only rank 0 reads the control file and talks to the daemon; at a rendezvous (after an eval)
it broadcasts what it decided over the job's own default process group, so every rank agrees
on whether a capture happened at that step. Every rank must call ``agree`` at the same
points, unconditionally, or the job deadlocks; it is meant for the per-eval rendezvous only,
never for the per-step path. With no process group (one process), nothing is sent and the
decision comes back as it is.
"""

from __future__ import annotations

import torch

__all__ = ["agree", "device", "distributed", "is_leader"]


def distributed() -> bool:
    """Whether a default process group is up (``torch.distributed`` available and initialized)."""
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized())


def is_leader() -> bool:
    """True on the rank that talks to the daemon: global rank 0, or the only process there is."""
    return not distributed() or torch.distributed.get_rank() == 0


def agree(decision: bool) -> bool:
    """Rank 0's ``decision`` on every rank of the default process group (``decision`` itself without one).

    A one-element tensor is broadcast from global rank 0: on the current CUDA device when the
    group's backend is NCCL alone, on the CPU otherwise (gloo, or a CPU-and-CUDA group).
    What other ranks pass is ignored. A collective: every rank must call it at the same point.
    """
    if not distributed():
        return decision
    flag = torch.tensor([1 if decision else 0], dtype=torch.uint8, device=device())
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def device() -> torch.device:
    """Where the default group's backend takes a tensor: CUDA for NCCL alone, else the CPU."""
    backend = str(torch.distributed.get_backend()).lower()
    if "nccl" in backend and "gloo" not in backend and "cpu" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
