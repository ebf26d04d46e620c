"""Settings of one followed run, validated once, so the daemon can trust them."""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptd.errors import ConfigError
from ckptd.logs.detect import FORMATS
from ckptd.logs.regex import RegexFormat
from ckptd.protocol import HEARTBEAT_INTERVAL_S, RunPaths
from ckptd.records import Criterion

# Beyond a minute between polls the daemon answers a waiting trainer far too late to matter.
MAX_POLL_INTERVAL_S = 60.0


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
    # A sharded capture still missing a rank's part this long after its last part arrived is
    # removed (another node's daemon is gone).
    shard_timeout: float = 600.0
    # The remote tier (docs/remote.md): an fsspec URL, the backend's options (never secrets on a
    # command line: the backend's own environment and profiles carry those), its own policy.
    remote: str | None = None
    remote_options: Mapping[str, Any] = field(default_factory=dict)
    remote_keep_last: int = 2
    remote_keep_best: int | None = None  # None: as many as kept locally
    remote_keep_every: int | None = None

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
        shard_timeout: float = 600.0,
        remote: str | None = None,
        remote_options: Mapping[str, Any] | None = None,
        remote_keep_last: int = 2,
        remote_keep_best: int | None = None,
        remote_keep_every: int | None = None,
    ) -> RunConfig:
        """Resolve relative paths against the run directory and reject what cannot work.

        Each ``best`` entry is ``METRIC[:min|max][:K]``; K defaults to ``keep_best``.
        """
        run = Path(run_dir).resolve()
        if run.exists() and not run.is_dir():
            raise ConfigError(f"run directory {run} is a file, not a directory")
        # Every value is checked here, before the daemon touches the disk: a bad one found
        # later would leave .ckptd/ and staging dirs behind, or kill the daemon mid-log.
        _check_keep_best(keep_best)
        _check_min_delta(min_delta)
        _check_poll_interval(poll_interval)
        if not (isinstance(shard_timeout, (int, float)) and 0 < shard_timeout <= 1e7):
            raise ConfigError(f"--shard-timeout must be seconds > 0 and <= 1e7, not {shard_timeout!r}")
        _check_remote(remote, remote_keep_last, remote_keep_best, remote_keep_every)
        _check_read(log_format, step_key)
        criteria = tuple(parse_best(spec, keep_best, min_delta) for spec in best)
        if not criteria:
            raise ConfigError("watch at least one metric (--best METRIC[:min|max][:K])")
        metrics = [c.metric for c, _ in criteria]
        if len(set(metrics)) != len(metrics):
            raise ConfigError(f"each metric may be watched once; got {', '.join(metrics)}")
        _check_counts(keep_last=keep_last, keep_every=keep_every, every_steps=every_steps)
        if regex is not None:
            RegexFormat(regex)  # a bad pattern is a usage error now, not when the daemon starts
        store_path = (run / store if store else RunPaths(run).default_store).resolve()
        if store_path == run:
            raise ConfigError("the store cannot be the run directory itself; use a subdirectory")
        return cls(
            run_dir=run,
            # abspath, not resolve: a log that is a symlink is followed to where it points *now*,
            # so repointing it (ln -sfn) switches the daemon to the new file.
            log=Path(os.path.abspath(run / log if log else RunPaths(run).default_log)),
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
            shard_timeout=float(shard_timeout),
            remote=remote,
            remote_options=dict(remote_options or {}),
            remote_keep_last=remote_keep_last,
            remote_keep_best=remote_keep_best,
            remote_keep_every=remote_keep_every,
        )

    def remote_best(self) -> dict[Criterion, int]:
        """How many of each criterion's best the remote keeps."""
        return {c: (k if self.remote_keep_best is None else self.remote_keep_best) for c, k in self.best}


# What a reload may change while the run goes on; anything else needs a new daemon.
_LIVE_FIELDS = ("best", "keep_last", "keep_every", "every_steps")


def live_change(old: RunConfig, new: RunConfig) -> str | None:
    """None when ``new`` differs from ``old`` only in what applies live (how many are kept,
    thresholds, the capture schedule); else what differs, said for the user."""
    fixed = [
        name
        for name in RunConfig.__dataclass_fields__
        if name not in _LIVE_FIELDS and getattr(old, name) != getattr(new, name)
    ]
    if fixed:
        return f"{', '.join(fixed)} changed"
    watched = [(c.metric, c.mode) for c in old.criteria]
    if watched != [(c.metric, c.mode) for c in new.criteria]:
        return "the watched metrics changed"
    return None


def parse_best(spec: str, default_keep: int = 1, min_delta: float = 0.0) -> tuple[Criterion, int]:
    """``eval_loss``, ``eval_loss:min``, ``eval_acc:max:3`` → (criterion, how many to keep)."""
    head, _, last = spec.rpartition(":")
    keep, keep_from = default_keep, "--keep-best"
    if head and last.strip().isdigit():
        spec, keep, keep_from = head, int(last), f"--best {spec!r}"
    try:
        criterion = Criterion.parse(spec, min_delta)
    except ValueError as exc:
        raise ConfigError(f"--best {spec!r}: {exc}") from exc
    if keep < 1:  # name the option the 0 came from, not --best when the user typed --keep-best
        raise ConfigError(f"{keep_from}: keep at least 1 best checkpoint (the best is never deleted)")
    return criterion, keep


def preflight_store(path: str | Path) -> None:
    """Raise ConfigError unless ``path`` (or, while it does not exist, its nearest existing
    ancestor, where it will be created) is a directory this process can write.

    Leaves nothing behind (as root, a probe file is created and removed at once): better
    refused at start than a daemon that judges evals and then cannot keep a checkpoint.
    """
    target = Path(path)
    existing = target
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if existing == target and not existing.is_dir():
        raise ConfigError(f"cannot use the store {target}: not a directory")
    if not existing.is_dir():
        raise ConfigError(f"cannot use the store {target}: {existing} is a file, not a directory")
    problem = _not_writable(existing)
    if problem:
        where = "" if existing == target else f" (it would be created in {existing})"
        raise ConfigError(f"cannot write the store {target}{where}: {problem}")


def _not_writable(directory: Path) -> str | None:
    """Why ``directory`` cannot take new entries, or None."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return "permission denied or read-only filesystem"
    if os.geteuid() != 0:
        return None
    # Root passes access() on permission bits but still fails on a read-only mount, an
    # immutable dir or a root-squashed NFS export: only a real write tells.
    try:
        fd, probe = tempfile.mkstemp(prefix=".ckptd-probe-", dir=directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(probe)
    return None


def _check_keep_best(keep_best: int) -> None:
    if not _is_int(keep_best) or keep_best < 1:
        raise ConfigError(
            f"--keep-best: keep at least 1 best checkpoint (the best is never deleted), not {keep_best!r}"
        )


def _check_min_delta(min_delta: float) -> None:
    if not _is_number(min_delta) or not math.isfinite(min_delta) or min_delta < 0:
        raise ConfigError(f"--min-delta must be a finite number >= 0, not {min_delta!r}")


def _check_remote(url: str | None, keep_last: int, keep_best: int | None, keep_every: int | None) -> None:
    if url is not None and (not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://\S+", url) or len(url) > 4096):
        # A bare path would be taken relative to wherever the daemon happens to run.
        raise ConfigError(
            f"--remote needs a URL such as s3://bucket/runs/exp1 or file:///abs/dir, not {url!r}"
        )
    _require_count("--remote-keep-last", keep_last, 0)
    if keep_best is not None:
        _require_count("--remote-keep-best", keep_best, 1)  # the best is never deleted remotely either
    if keep_every is not None:
        _require_count("--remote-keep-every", keep_every, 1)


def _require_count(option: str, value: object, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f"{option} must be an integer >= {least}, not {value!r}")


def _check_poll_interval(seconds: float) -> None:
    if not _is_number(seconds) or not math.isfinite(seconds) or not 0 < seconds <= MAX_POLL_INTERVAL_S:
        raise ConfigError(
            f"--poll-interval must be a number of seconds > 0 and <= {MAX_POLL_INTERVAL_S:g}, not {seconds!r}"
        )


def _check_read(log_format: str, step_key: str | None) -> None:
    if log_format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    if step_key is None:
        return
    if not isinstance(step_key, str) or not all(step_key.split(".")):
        raise ConfigError(
            f"--step-key {step_key!r}: a dotted JSON key such as trainer.step, "
            "with no empty part (no leading, trailing or doubled dot)"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_counts(**counts: int | None) -> None:
    keep_last = counts["keep_last"]
    if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 0:
        raise ConfigError(f"--keep-last must be >= 0, not {keep_last!r}")
    for name in ("keep_every", "every_steps"):
        value = counts[name]
        if value is not None and (not _is_int(value) or value < 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, not {value}")
