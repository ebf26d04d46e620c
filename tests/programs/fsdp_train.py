"""A real FSDP2 job for the sharded-capture tests, started by torchrun (gloo, CPU).

Every rank trains a sharded MLP (``fully_shard``) with AdamW on a global batch that depends on
the step alone, each rank taking its slice, so the loss is the same on any world size. Every
``--eval-every`` steps rank 0 logs a scripted ``eval_loss`` (``--evals``, so the best lands
where the test wants it) to ``logging.jsonl``; the full parameters are gathered and written as
``full-<step>.pt`` by rank 0, to compare with what ckptd kept; then every rank calls
``ShardedClient.maybe_snapshot(..., evaluated=True)``. Each step's global loss goes to
``losses-ws<world>.jsonl``. ``--resume DIR --from-step S`` first loads a DCP checkpoint
(``dcp.load``) and goes on from step S. ``--extra-mb`` adds a sharded buffer to the state so
that a part takes long enough to write to be interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from ckptd.client import ShardedClient

BATCH, WIDTH = 16, 32


def model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(WIDTH, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 1),
    )
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(BATCH, WIDTH, generator=generator)
    y = x[:, :4].sum(dim=1, keepdim=True).sin()
    per = BATCH // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--evals", default="", help="STEP:VALUE,... the scripted eval_loss")
    parser.add_argument("--resume", help="a DCP checkpoint to start from")
    parser.add_argument("--from-step", type=int, default=0)
    parser.add_argument("--extra-mb", type=int, default=0)
    parser.add_argument("--no-client", action="store_true")
    parser.add_argument("--gate", default="", help="STEP:FILE: every rank waits at STEP until FILE exists")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    run = Path(args.run_dir)
    model, optimizer = model_and_optimizer()
    extra = None
    if args.extra_mb:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        extra = distribute_tensor(torch.arange(args.extra_mb << 18, dtype=torch.float32), mesh, [Shard(0)])

    def state() -> dict[str, object]:
        model_state, optim_state = get_state_dict(model, optimizer)
        captured: dict[str, object] = {"model": model_state, "optim": optim_state}
        if extra is not None:
            captured["extra"] = extra
        return captured

    if args.resume:
        loaded = state()
        dcp.load(loaded, checkpoint_id=args.resume)
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])  # type: ignore[arg-type]
    scripted = {int(k): float(v) for k, v in (p.split(":") for p in args.evals.split(",") if p)}
    client = None if args.no_client else ShardedClient(run)
    blocked = []
    losses = (run / f"losses-ws{world}.jsonl").open("a") if rank == 0 else None
    gate_step, _, gate_file = args.gate.partition(":")
    for step in range(args.from_step + 1, args.steps + 1):
        if gate_step and step == int(gate_step):
            while not Path(gate_file).exists():  # the test's go-ahead: a step made deterministic
                time.sleep(0.05)
        x, y = batch(step, rank, world)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
        if losses is not None:
            losses.write(json.dumps({"step": step, "loss": total.item()}) + "\n")
        if client is not None:
            evaluated = step % args.eval_every == 0
            if evaluated:
                full = {name: p.full_tensor() for name, p in model.named_parameters()}
                if rank == 0:
                    torch.save(full, run / f"full-{step}.pt")
                    with (run / "logging.jsonl").open("a") as log:
                        log.write(
                            json.dumps(
                                {
                                    "global_step/max_steps": f"{step}/{args.steps}",
                                    "eval_loss": scripted.get(step, 1.0),
                                }
                            )
                            + "\n"
                        )
            started = time.perf_counter()
            if client.maybe_snapshot(step, state, evaluated=evaluated):
                blocked.append({"step": step, "blocked_s": time.perf_counter() - started})
    if client is not None:
        (run / f"blocked-rank{rank}.json").write_text(json.dumps(blocked))
        client.close()
    if losses is not None:
        losses.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
