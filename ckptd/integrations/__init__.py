"""Framework integrations; each is imported only when used.

``from ckptd.integrations.hf import CkptdCallback`` (or ``ckptd.integrations.CkptdCallback``)
for a Hugging Face ``Trainer``. Importing this package imports neither torch nor transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["CkptdCallback"]

if TYPE_CHECKING:
    from ckptd.integrations.hf import CkptdCallback


def __getattr__(name: str) -> Any:
    if name == "CkptdCallback":
        from ckptd.integrations import hf

        return hf.CkptdCallback
    raise AttributeError(f"module 'ckptd.integrations' has no attribute {name!r}")
