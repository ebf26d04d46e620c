"""Trainer side: the only part of ckptd that imports torch.

``CheckpointClient`` polls the control file and stages snapshots into shared
memory; ``ShardedClient`` has every rank of a sharded (FSDP2) job stage its own shards in
DCP's format; ``load_snapshot`` reads a committed checkpoint back. A ``state_fn`` may return
an ``Export`` to capture in a framework's own layout (``model.safetensors``, ``config.json``).

torch is the extra ``ckptd[torch]``: without it, importing this package raises
:class:`ckptd._torch.TorchMissingError` (a ``ModuleNotFoundError``) saying how to install it.
"""

from __future__ import annotations

from ckptd._torch import torch_required

with torch_required():
    from ckptd.client.client import CheckpointClient
    from ckptd.client.sharded import ShardedClient
    from ckptd.client.snapshot import Export, load_snapshot

__all__ = ["CheckpointClient", "Export", "ShardedClient", "load_snapshot"]
