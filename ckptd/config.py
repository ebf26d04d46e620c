"""Settings of one followed run, validated once, so the daemon can trust them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ckptd.errors import ConfigError
from ckptd.protocol import HEARTBEAT_INTERVAL_S, RunPaths
from ckptd.records import Criterion


@dataclass(frozen=True)
class RunConfig:
    run_dir: Path
    log: Path
    store: Path
    criteria: tuple[Criterion, ...]
    keep_best: int = 1
    keep_last: int = 2
    every_steps: int | None = None
    step_key: str | None = None
    log_format: str = "auto"
    poll: bool = False
    poll_interval: float = 0.5
    heartbeat_interval: float = HEARTBEAT_INTERVAL_S

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.run_dir)

    @classmethod
    def build(
        cls,
        run_dir: str | Path,
        *,
        log: str | Path | None = None,
        store: str | Path | None = None,
        metric: str = "eval_loss",
        mode: str | None = None,
        min_delta: float = 0.0,
        keep_best: int = 1,
        keep_last: int = 2,
        every_steps: int | None = None,
        step_key: str | None = None,
        poll: bool = False,
        poll_interval: float = 0.5,
    ) -> RunConfig:
        """Resolve relative paths against the run directory and reject what cannot work."""
        run = Path(run_dir).resolve()
        if run.exists() and not run.is_dir():
            raise ConfigError(f"run directory {run} is a file, not a directory")
        try:
            criterion = Criterion.parse(f"{metric}:{mode}" if mode else metric, min_delta)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if keep_best < 1:
            raise ConfigError(f"--keep-best must be >= 1 (the best is never deleted), not {keep_best}")
        if keep_last < 0:
            raise ConfigError(f"--keep-last must be >= 0, not {keep_last}")
        if every_steps is not None and every_steps < 1:
            raise ConfigError(f"--every-steps must be >= 1, not {every_steps}")
        if poll_interval <= 0:
            raise ConfigError(f"--poll-interval must be > 0 seconds, not {poll_interval}")
        store_path = run / store if store else RunPaths(run).default_store
        log_path = run / log if log else RunPaths(run).default_log
        if store_path.resolve() == run:
            raise ConfigError("the store cannot be the run directory itself; use a subdirectory")
        return cls(
            run_dir=run,
            log=log_path.resolve(),
            store=store_path.resolve(),
            criteria=(criterion,),
            keep_best=keep_best,
            keep_last=keep_last,
            every_steps=every_steps,
            step_key=step_key,
            poll=poll,
            poll_interval=poll_interval,
        )
