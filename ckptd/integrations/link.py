"""What a framework callback holds of one run: the daemon's run dir, the client, the metrics log.

Both callbacks (Hugging Face, Lightning) need the same three things, opened lazily on the
process that acts (global rank 0) and closed at the end of training: one class serves both.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import IO

from ckptd.client import CheckpointClient
from ckptd.protocol import RunPaths, read_control

log = logging.getLogger("ckptd.integrations")

RUN_DIR_ENV = "CKPTD_RUN_DIR"  # set by `ckptd sidecar` for every process of its command


class RunLink:
    """The run dir (given, else ``$CKPTD_RUN_DIR``, else the framework's output dir), a
    ``CheckpointClient`` on it and the metrics JSONL the daemon follows, opened on first use."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None,
        log_name: str,
        rendezvous_timeout: float,
        overlap: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.log_name = log_name
        self.rendezvous_timeout = rendezvous_timeout
        self.overlap = overlap
        self._client: CheckpointClient | None = None
        self._log: IO[str] | None = None

    def resolve(self, framework_dir: str | os.PathLike[str] | None) -> Path:
        if self.run_dir is None:
            self.run_dir = Path(os.environ.get(RUN_DIR_ENV) or framework_dir or ".")
        return self.run_dir

    def client(self, framework_dir: str | os.PathLike[str] | None) -> CheckpointClient:
        if self._client is None:
            run_dir = self.resolve(framework_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            self._client = CheckpointClient(run_dir, rendezvous_timeout=self.rendezvous_timeout)
        return self._client

    def track(self, client: CheckpointClient, optimizer: object) -> None:
        """Let ``client`` overlap its copies with the next steps (unless ``overlap`` is off: a
        callback of the user's writes params through ``.data`` between an eval and the next
        step). An optimizer it cannot hook (not a torch optimizer, such as some engines' own)
        leaves captures whole, as before."""
        if not self.overlap:
            return
        try:
            client.track_optimizer(optimizer)
        except TypeError as exc:
            log.info("ckptd: captures will not overlap training: %s", exc)

    def log_file(self, framework_dir: str | os.PathLike[str] | None) -> IO[str]:
        if self._log is None:
            run_dir = self.resolve(framework_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            self._log = (run_dir / self.log_name).open("a", encoding="utf-8")
        return self._log

    def on_schedule(self, step: int) -> bool:
        """Whether the daemon's schedule (``--every-steps``) captures ``step``; False while no
        daemon has written its control file (or while one is being replaced)."""
        if self.run_dir is None:
            return False
        try:
            every = read_control(RunPaths(self.run_dir).control).every_steps
        except (OSError, ValueError):
            return False
        return every is not None and step > 0 and step % every == 0

    def flush(self) -> None:
        """The daemon can only judge what reached the file."""
        if self._log is not None:
            self._log.flush()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._log is not None:
            self._log.close()
            self._log = None
