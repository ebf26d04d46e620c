"""A plain two-rank DDP loop (gloo, CPU) using ckptd the way its integrations do.

``torchrun --nproc-per-node 2 ddp_train.py RUN_DIR [STEPS] [EVAL_EVERY]``: a tiny regressor
that overfits (the val loss falls, then rises) trains under ``DistributedDataParallel``, each
rank on its half of the data. Every ``EVAL_EVERY`` steps every rank evaluates (the loss is
averaged over the ranks); rank 0 alone logs the line ckptd follows, waits for the verdict and
captures a best, then ``agree`` tells every rank whether it did. Each rank appends
``{"step", "captured"}`` to ``RUN_DIR/decisions-rank<R>.jsonl``; the per-step path sends nothing.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ckptd.client import CheckpointClient
from ckptd.client.collective import agree, is_leader

IN, HIDDEN = 8, 64


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(IN, generator=generator) / IN**0.5
    x_train = torch.randn(16, IN, generator=generator)
    y_train = x_train @ w + 1.0 * torch.randn(16, generator=generator)
    x_val = torch.randn(256, IN, generator=generator)
    return x_train, y_train, x_val, x_val @ w


def main() -> None:
    torch.set_num_threads(1)
    run = Path(sys.argv[1])
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    every = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank (DDP broadcasts them anyway)
    net = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))
    model = DistributedDataParallel(net)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    x_train, y_train, x_val, y_val = data()
    x_mine, y_mine = x_train[rank::world], y_train[rank::world]  # this rank's shard
    batch = 2

    client = CheckpointClient(run, rendezvous_timeout=10.0) if is_leader() else None
    log = (run / "metrics.jsonl").open("a", encoding="utf-8") if client is not None else None
    decisions = (run / f"decisions-rank{rank}.jsonl").open("a", encoding="utf-8")

    def state() -> dict[str, object]:
        return {"model": net.state_dict(), "optimizer": optimizer.state_dict()}

    prepared = False
    for step in range(1, steps + 1):
        start = ((step - 1) * batch) % len(x_mine)
        x, y = x_mine[start : start + batch], y_mine[start : start + batch]
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x).squeeze(-1), y).backward()
        optimizer.step()
        if client is not None and not prepared:
            prepared = client.prepare(state)  # per step: rank 0 alone, no collective
        if step % every:
            continue
        with torch.no_grad():
            loss = torch.nn.functional.mse_loss(net(x_val).squeeze(-1), y_val)
        dist.all_reduce(loss)  # the job's own collective: every rank evaluates
        val_loss = float(loss) / world
        captured = False
        if client is not None and log is not None:
            log.write(json.dumps({"step": step, "val_loss": val_loss}) + "\n")
            log.flush()
            if client.wait_verdict(step) is not None:
                captured = client.maybe_snapshot(step, state)
        agreed = agree(captured)  # every rank, at every eval
        decisions.write(json.dumps({"step": step, "captured": agreed, "mine": captured}) + "\n")
        decisions.flush()

    decisions.close()
    if log is not None:
        log.close()
    if client is not None:
        client.close()
    dist.barrier()
    dist.destroy_process_group()
    print(json.dumps({"rank": rank, "world": world, "pid": os.getpid()}))


if __name__ == "__main__":
    main()
