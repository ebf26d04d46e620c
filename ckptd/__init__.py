"""ckptd: an asynchronous checkpoint manager that follows the training log and keeps the best.

The public trainer-side API is ``CheckpointClient``, ``Export`` and ``load_snapshot``. They are
imported lazily so that ``import ckptd.daemon`` or ``import ckptd.cli`` never pulls in
torch: the daemon must stay small on a GPU node. torch is the extra ``ckptd[torch]``; without
it, ``from ckptd import CheckpointClient`` raises ``ckptd._torch.TorchMissingError`` (a
``ModuleNotFoundError``) that says how to install it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["CheckpointClient", "Export", "__version__", "load_snapshot"]

if TYPE_CHECKING:
    from ckptd.client import CheckpointClient, Export, load_snapshot


def __getattr__(name: str) -> Any:
    if name in ("CheckpointClient", "Export", "load_snapshot"):
        from ckptd import client

        return getattr(client, name)
    raise AttributeError(f"module 'ckptd' has no attribute {name!r}")
