"""Load a DCP checkpoint into a fresh FSDP2 model (any world size) and write its full parameters.

``torchrun --nproc-per-node N fsdp_load.py CHECKPOINT OUT.pt``: the model of ``fsdp_train.py``,
sharded anew over N ranks, restored with ``dcp.load``; rank 0 writes the gathered parameters.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from fsdp_train import model_and_optimizer


def main() -> None:
    checkpoint, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    model, optimizer = model_and_optimizer()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()  # nothing the load does not write may pass for restored
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    full = {name: p.full_tensor() for name, p in model.named_parameters()}
    if dist.get_rank() == 0:
        torch.save(full, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
