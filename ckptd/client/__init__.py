"""Trainer side: the only part of ckptd that imports torch.

``CheckpointClient`` polls the control file and stages snapshots into shared
memory; ``load_snapshot`` reads a committed checkpoint back.
"""

from __future__ import annotations

from ckptd.client.client import CheckpointClient
from ckptd.client.snapshot import load_snapshot

__all__ = ["CheckpointClient", "load_snapshot"]
