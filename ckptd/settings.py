"""Settings from TOML files and ``CKPTD_*`` variables, merged in one order, checked by name.

A node file (``/etc/ckptd/ckptd.toml``) has a ``[serve]`` table for ``ckptd serve`` and a
``[run]`` table of defaults for every run; a run file (``RUN_DIR/ckptd.toml``, or the file
``ckptd run --config`` names) has a ``[run]`` table. The ``[run]`` keys are the options of
``ckptd run`` with ``_`` for ``-`` (``keep_last = 3``). Every layer is a plain dict of the
keys it sets; the later layer wins::

    defaults < node file [run] < run file [run] < CKPTD_* environment < command line

An unknown key or a value of the wrong type is a ``ConfigError`` that names the file (or the
variable), the key and what is allowed, found before anything is created.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptd.config import RunConfig
from ckptd.errors import ConfigError
from ckptd.logs.detect import FORMATS
from ckptd.protocol import read_small_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

RUN_FILE = "ckptd.toml"  # a run dir holding one opts into a node daemon, and sets its policy
ENV_PREFIX = "CKPTD_"
LOG_LEVELS = ("debug", "info", "warning", "error")

Check = Callable[[object], bool]
_MAX_SECONDS = 10**7  # about 115 days: beyond it a timeout is a typo (and overflows a wait)
_MAX_CONFIG_BYTES = 1 << 20


def _is_str(value: object) -> bool:
    # TOML may spell a NUL ("\u0000"): no path, metric or URL holds one, and os calls refuse it.
    return isinstance(value, str) and bool(value.strip()) and "\x00" not in value


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_seconds(value: object) -> bool:
    return _is_finite(value) and 0 < float(value) <= _MAX_SECONDS  # type: ignore[arg-type]


def _is_delta(value: object) -> bool:
    return _is_finite(value) and float(value) >= 0  # type: ignore[arg-type]


def _is_finite(value: object) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past any float (TOML integers are unbounded): no number of seconds
        return False


def _is_strings(value: object) -> bool:
    return isinstance(value, list) and all(_is_str(item) for item in value)


def _is_table(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535


def _is_level(value: object) -> bool:
    return isinstance(value, str) and value.lower() in LOG_LEVELS


@dataclass(frozen=True)
class Key:
    """One setting: how to check a value and how to say what is allowed."""

    check: Check
    allowed: str


# The options of `ckptd run`, by their dest name.
RUN_KEYS: dict[str, Key] = {
    "metric": Key(_is_str, "a metric name, e.g. \"eval_loss\""),
    "mode": Key(lambda v: v in ("min", "max"), '"min" or "max"'),
    "best": Key(_is_strings, 'a list of "METRIC[:min|max][:K]" strings'),
    "min_delta": Key(_is_delta, "a number >= 0"),
    "keep_best": Key(_is_positive, "an integer >= 1 (the best is never deleted)"),
    "keep_last": Key(_is_count, "an integer >= 0"),
    "keep_every": Key(_is_positive, "an integer >= 1"),
    "every_steps": Key(_is_positive, "an integer >= 1"),
    "store": Key(_is_str, "a path, relative to the run dir or absolute"),
    "log": Key(_is_str, "a path, relative to the run dir or absolute"),
    "format": Key(lambda v: v in FORMATS, " or ".join(f'"{name}"' for name in FORMATS)),
    "step_key": Key(_is_str, "a dotted JSON key, e.g. \"trainer.step\""),
    "regex": Key(_is_str, "a regular expression with a (?P<step>...) group"),
    "poll": Key(_is_bool, "true or false"),
    "poll_interval": Key(_is_seconds, "a number of seconds > 0 and <= 1e7"),
    "shard_timeout": Key(_is_seconds, "a number of seconds > 0 and <= 1e7"),
    "remote": Key(_is_str, 'an fsspec URL, e.g. "s3://bucket/runs/exp1"'),
    "remote_options": Key(_is_table, "a table of the backend's options, e.g. {client_kwargs = {...}}"),
    "remote_keep_last": Key(_is_count, "an integer >= 0"),
    "remote_keep_best": Key(_is_positive, "an integer >= 1 (the best is never deleted)"),
    "remote_keep_every": Key(_is_positive, "an integer >= 1"),
}
# Only in the file `ckptd run --config` names (a systemd instance's file): which run it is.
RUN_DIR_KEY = "dir"

SERVE_KEYS: dict[str, Key] = {
    "roots": Key(lambda v: _is_strings(v) and bool(v), "a non-empty list of directories"),
    "adopt": Key(_is_strings, 'a list of log globs relative to a root, e.g. ["*/logging.jsonl"]'),
    "run_file": Key(lambda v: _is_str(v) and "/" not in str(v), "a file name (no /)"),
    "scan_interval": Key(_is_seconds, "a number of seconds > 0 and <= 1e7"),
    "idle_timeout": Key(_is_seconds, "a number of seconds > 0 and <= 1e7"),
    "drain_timeout": Key(_is_seconds, "a number of seconds > 0 and <= 1e7"),
    "max_runs": Key(_is_positive, "an integer >= 1"),
    "metrics_textfile": Key(_is_str, "a file path (node-exporter's textfile collector)"),
    "metrics_port": Key(_is_port, "a TCP port, 0 to 65535 (0: off)"),
    "metrics_address": Key(_is_str, 'an address to bind, e.g. "127.0.0.1"'),
    "log_level": Key(_is_level, " or ".join(f'"{level}"' for level in LOG_LEVELS)),
}


@dataclass(frozen=True)
class ServeSettings:
    """``[serve]`` of a node file, with the defaults of every key it leaves out."""

    roots: tuple[Path, ...]
    adopt: tuple[str, ...] = ()
    run_file: str = RUN_FILE
    scan_interval: float = 5.0
    idle_timeout: float = 1800.0
    drain_timeout: float = 60.0
    max_runs: int = 64
    metrics_textfile: Path | None = None
    metrics_port: int = 0
    metrics_address: str = "127.0.0.1"
    log_level: str = "info"


@dataclass(frozen=True)
class FileSettings:
    """One TOML file, checked: its ``[run]`` keys and (node files) its ``[serve]`` keys."""

    path: Path
    run: Mapping[str, Any] = field(default_factory=dict)
    serve: Mapping[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None

    def serve_settings(self) -> ServeSettings:
        if "roots" not in self.serve:
            raise ConfigError(f"{self.path}: [serve] needs roots = [\"/path/to/runs\", ...]")
        values = dict(self.serve)
        values["roots"] = tuple(_resolve(self.path, root) for root in values["roots"])
        values["adopt"] = tuple(values.get("adopt", ()))
        if "metrics_textfile" in values:
            values["metrics_textfile"] = _resolve(self.path, values["metrics_textfile"])
        if "log_level" in values:
            values["log_level"] = values["log_level"].lower()
        return ServeSettings(**values)


def load_file(path: str | os.PathLike[str], *, tables: tuple[str, ...] = ("run", "serve")) -> FileSettings:
    """Read and check one TOML file; ``tables`` are the tables this kind of file may hold."""
    where = Path(path)
    try:
        # A FIFO named as the config must not hang the daemon (or its reload); a link to
        # /etc/ckptd/... is fine: the admin put it there.
        raw = read_small_file(where, _MAX_CONFIG_BYTES, follow=True)
        document = tomllib.loads(raw.decode())
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"{where}: not valid TOML: {type(exc).__name__}: {exc}") from None
    except ValueError as exc:  # not a regular file, or too large
        raise ConfigError(f"{exc}; not a config file") from None
    return _checked(where, document, tables)


def _checked(where: Path, document: Mapping[str, Any], tables: tuple[str, ...]) -> FileSettings:
    for name, value in document.items():
        if name not in tables:
            allowed = ", ".join(f"[{table}]" for table in tables)
            raise ConfigError(f"{where}: unknown key {name!r}; this file may hold {allowed}")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {name!r} must be a table ([{name}])")
    run = dict(document.get("run", {}))
    run_dir = run.pop(RUN_DIR_KEY, None)
    if run_dir is not None and not _is_str(run_dir):
        raise ConfigError(f"{where}: [run] {RUN_DIR_KEY}: must be a directory path")
    _check_table(where, "run", run, RUN_KEYS)
    serve = dict(document.get("serve", {}))
    _check_table(where, "serve", serve, SERVE_KEYS)
    return FileSettings(
        where, run, serve, _resolve(where, run_dir) if isinstance(run_dir, str) else None
    )


def _check_table(where: Path, table: str, values: Mapping[str, Any], keys: Mapping[str, Key]) -> None:
    for name, value in values.items():
        key = keys.get(name)
        if key is None:
            known = ", ".join(sorted(keys))
            raise ConfigError(f"{where}: unknown key [{table}] {name!r}; known keys: {known}")
        if not key.check(value):
            raise ConfigError(f"{where}: [{table}] {name} = {value!r}: must be {key.allowed}")


def _resolve(config_file: Path, path: str) -> Path:
    """A path in a config file is relative to that file's folder, as in most tools' configs."""
    return Path(os.path.abspath(config_file.parent / Path(path).expanduser()))


def run_file_of(run_dir: Path, name: str = RUN_FILE) -> FileSettings | None:
    """``RUN_DIR/ckptd.toml`` checked, or None when the run has none."""
    path = run_dir / name
    if not path.is_file():
        return None
    settings = load_file(path, tables=("run",))
    if settings.run_dir is not None:
        raise ConfigError(f"{path}: [run] {RUN_DIR_KEY} has no meaning in a run's own file; remove it")
    return settings


def environment_layer(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``CKPTD_<KEY>`` variables that set run options (``CKPTD_KEEP_LAST=3``), parsed."""
    environ = os.environ if environ is None else environ
    layer: dict[str, Any] = {}
    for name, key in RUN_KEYS.items():
        variable = ENV_PREFIX + name.upper()
        raw = environ.get(variable)
        if raw is None or raw == "":
            continue
        value = _parse_env(variable, raw, key)
        if not key.check(value):
            raise ConfigError(f"${variable}={raw!r}: must be {key.allowed}")
        layer[name] = value
    return layer


def _parse_env(variable: str, raw: str, key: Key) -> object:
    """A variable's text as the type its key wants: TOML's own syntax for one value."""
    if key.check is _is_strings:
        return [item.strip() for item in raw.split(",") if item.strip()]
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):  # RecursionError: "[[[[..." past the parser's stack
        return raw  # a bare word: a string (checked against the key next)


def merged(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """The layers in rising precedence; a key a later layer sets replaces the earlier value."""
    out: dict[str, Any] = {}
    for layer in layers:
        out.update({key: value for key, value in layer.items() if value is not None})
    return out


def run_config(run_dir: str | Path, options: Mapping[str, Any]) -> RunConfig:
    """The merged options of one run as a checked ``RunConfig``.

    ``metric`` (with ``mode``) is the first criterion and ``best`` adds more, as on the
    command line; with neither, ``eval_loss``.
    """
    metric, mode = options.get("metric"), options.get("mode")
    if metric is not None and not str(metric).strip():
        raise ConfigError("--metric needs a metric name, e.g. --metric eval_loss")
    extra = list(options.get("best") or [])
    if metric is None and not extra:
        metric = "eval_loss"
    primary = [f"{metric}:{mode}" if mode else str(metric)] if metric is not None else []
    given = {key: options[key] for key in _BUILD_KEYS if options.get(key) is not None}
    if "format" in given:
        given["log_format"] = given.pop("format")
    return RunConfig.build(run_dir, best=primary + extra, **given)


# The options RunConfig.build takes as they are (`format` under the name log_format).
_BUILD_KEYS = (
    "keep_best", "min_delta", "log", "store", "keep_last", "keep_every", "every_steps",
    "format", "step_key", "regex", "poll", "poll_interval", "shard_timeout",
    "remote", "remote_options", "remote_keep_last", "remote_keep_best", "remote_keep_every",
)
