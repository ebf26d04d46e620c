"""Node mode (``ckptd serve``): every run on a GPU node that opts in, in one service."""

from __future__ import annotations

from ckptd.node.serve import NodeDaemon, serve

__all__ = ["NodeDaemon", "serve"]
