"""Settings of one followed run, validated once, so the daemon can trust them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ckptd.errors import ConfigError
from ckptd.logs.regex import RegexFormat
from ckptd.protocol import HEARTBEAT_INTERVAL_S, RunPaths
from ckptd.records import Criterion


@dataclass(frozen=True)
class RunConfig:
    run_dir: Path
    log: Path
    store: Path
    best: tuple[tuple[Criterion, int], ...]  # each criterion with how many of its best to keep
    keep_last: int = 2
    keep_every: int | None = None
    every_steps: int | None = None
    log_format: str = "auto"
    step_key: str | None = None
    regex: str | None = None
    poll: bool = False
    poll_interval: float = 0.5
    heartbeat_interval: float = HEARTBEAT_INTERVAL_S

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.run_dir)

    @property
    def criteria(self) -> tuple[Criterion, ...]:
        return tuple(criterion for criterion, _ in self.best)

    @classmethod
    def build(
        cls,
        run_dir: str | Path,
        *,
        best: Sequence[str] = ("eval_loss",),
        keep_best: int = 1,
        min_delta: float = 0.0,
        log: str | Path | None = None,
        store: str | Path | None = None,
        keep_last: int = 2,
        keep_every: int | None = None,
        every_steps: int | None = None,
        log_format: str = "auto",
        step_key: str | None = None,
        regex: str | None = None,
        poll: bool = False,
        poll_interval: float = 0.5,
    ) -> RunConfig:
        """Resolve relative paths against the run directory and reject what cannot work.

        Each ``best`` entry is ``METRIC[:min|max][:K]``; K defaults to ``keep_best``.
        """
        run = Path(run_dir).resolve()
        if run.exists() and not run.is_dir():
            raise ConfigError(f"run directory {run} is a file, not a directory")
        criteria = tuple(parse_best(spec, keep_best, min_delta) for spec in best)
        if not criteria:
            raise ConfigError("watch at least one metric (--best METRIC[:min|max][:K])")
        metrics = [c.metric for c, _ in criteria]
        if len(set(metrics)) != len(metrics):
            raise ConfigError(f"each metric may be watched once; got {', '.join(metrics)}")
        _check_counts(keep_last=keep_last, keep_every=keep_every, every_steps=every_steps)
        if regex is not None:
            RegexFormat(regex)  # a bad pattern is a usage error now, not when the daemon starts
        if poll_interval <= 0:
            raise ConfigError(f"--poll-interval must be > 0 seconds, not {poll_interval}")
        store_path = (run / store if store else RunPaths(run).default_store).resolve()
        if store_path == run:
            raise ConfigError("the store cannot be the run directory itself; use a subdirectory")
        return cls(
            run_dir=run,
            log=(run / log if log else RunPaths(run).default_log).resolve(),
            store=store_path,
            best=criteria,
            keep_last=keep_last,
            keep_every=keep_every,
            every_steps=every_steps,
            log_format=log_format,
            step_key=step_key,
            regex=regex,
            poll=poll,
            poll_interval=poll_interval,
        )


def parse_best(spec: str, default_keep: int = 1, min_delta: float = 0.0) -> tuple[Criterion, int]:
    """``eval_loss``, ``eval_loss:min``, ``eval_acc:max:3`` → (criterion, how many to keep)."""
    head, _, last = spec.rpartition(":")
    keep = default_keep
    if head and last.strip().isdigit():
        spec, keep = head, int(last)
    try:
        criterion = Criterion.parse(spec, min_delta)
    except ValueError as exc:
        raise ConfigError(f"--best {spec!r}: {exc}") from exc
    if keep < 1:
        raise ConfigError(f"--best {spec!r}: keep at least 1 best checkpoint (the best is never deleted)")
    return criterion, keep


def _check_counts(**counts: int | None) -> None:
    if (counts["keep_last"] or 0) < 0:
        raise ConfigError(f"--keep-last must be >= 0, not {counts['keep_last']}")
    for name in ("keep_every", "every_steps"):
        value = counts[name]
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, not {value}")
