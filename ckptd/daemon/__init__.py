"""The daemon side: one run's loop, its persister, its durable state. Never imports torch."""

from __future__ import annotations

from ckptd.daemon.run import RunDaemon

__all__ = ["RunDaemon"]
