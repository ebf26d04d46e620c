"""Prometheus text exposition (format 0.0.4) of the daemons' ``status.json`` heartbeats.

``render(statuses)`` is pure: one block per metric family (``# HELP``/``# TYPE`` once, then
a sample per run), every sample labelled ``run`` (the run dir, as :func:`read_status` adds it
under ``run_dir``) and ``run_id``. ``write_textfile`` replaces a ``.prom`` file atomically for
node-exporter's textfile collector; ``serve_http`` answers ``GET /metrics`` from a daemon thread.
``ckptd_up`` is 1 when the status says ``running`` and its ``heartbeat`` is at most
``STALE_AFTER_S`` old (a killed daemon's last status still says running); samples carry no
timestamps (the textfile collector refuses them).

A status file is untrusted input (another version's daemon, a user's editor, a truncated
copy): a field of the wrong type, out of range or absent skips that one sample, nothing is
made up and nothing raises. No sample is ever NaN or infinite: the daemon never records a
NaN or infinite best (they are never best), and a lag or a duration cannot be one, so such a
value in a status file is corruption and is skipped like any other bad value (an absent
series is Prometheus's "unknown"). Strings from the status file only ever become label
values, escaped; metric and label names are this module's constants. Two statuses naming
the same run (same ``run`` and ``run_id``) would make a scrape invalid: the first one wins.

The standard library is enough here (no prometheus-client): the statuses are read fresh at
each scrape rather than kept in a registry, the format is a few lines of text, and the node
daemon stays without another dependency. No torch either: the daemon and the CLI import this.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import socketserver
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ckptd.fields import is_count
from ckptd.protocol import STALE_AFTER_S, RunPaths
from ckptd.protocol import read_status as protocol_read_status

log = logging.getLogger("ckptd.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_ADDRESS = "127.0.0.1"  # a scrape endpoint is not for the whole network unless asked
_LABEL_MAX_CHARS = 4096

Labels = tuple[tuple[str, str], ...]
Sample = tuple[Labels, float]
Extract = Callable[[Mapping[str, Any], float], Iterable[Sample]]
Provider = Callable[[], Sequence[Mapping[str, Any]]]


@dataclass(frozen=True)
class Family:
    """One metric family: its name, type, help text, and how a status yields its samples."""

    name: str
    kind: str  # "gauge" or "counter"
    help: str
    extract: Extract


# -- reading values out of untrusted JSON ------------------------------------------------------


def _number(value: object) -> float | None:
    """A finite int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return number if math.isfinite(number) else None


def _nonnegative(value: object) -> float | None:
    number = _number(value)
    return number if number is not None and number >= 0 else None


def _count(value: object) -> float | None:
    """An int >= 0 (a step, a byte count), not a bool."""
    return float(value) if isinstance(value, int) and is_count(value) else None


def _text(value: object) -> str:
    """A label value: strings only (anything else is empty), valid UTF-8, bounded."""
    if not isinstance(value, str):
        return ""
    return value[:_LABEL_MAX_CHARS].encode("utf-8", "replace").decode("utf-8")


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


# -- what each family reads --------------------------------------------------------------------


def _field(key: str, check: Callable[[object], float | None]) -> Extract:
    """A sample holding the status field ``key`` when ``check`` accepts it."""

    def extract(status: Mapping[str, Any], now: float) -> Iterator[Sample]:
        value = check(status.get(key))
        if value is not None:
            yield (), value

    return extract


def _heartbeat_age(status: Mapping[str, Any], now: float) -> float | None:
    heartbeat = _number(status.get("heartbeat"))
    return None if heartbeat is None else now - heartbeat


def _up(status: Mapping[str, Any], now: float) -> Iterator[Sample]:
    age = _heartbeat_age(status, now)
    alive = status.get("state") == "running" and age is not None and age <= STALE_AFTER_S
    yield (), 1.0 if alive else 0.0


def _age(status: Mapping[str, Any], now: float) -> Iterator[Sample]:
    age = _heartbeat_age(status, now)
    if age is not None:
        yield (), age


def _info(status: Mapping[str, Any], now: float) -> Iterator[Sample]:
    keys = ("version", "host", "log_format")
    yield tuple((key, _text(status.get(key))) for key in keys), 1.0


def _last_eval_step(status: Mapping[str, Any], now: float) -> Iterator[Sample]:
    step = _count(_mapping(status.get("last_verdict")).get("eval_step"))
    if step is not None:
        yield (), step


def _modes(status: Mapping[str, Any]) -> dict[str, str]:
    """metric -> "min"/"max" from the status's criteria; what is ill-formed is left out."""
    criteria = status.get("criteria")
    modes: dict[str, str] = {}
    for criterion in criteria if isinstance(criteria, list) else []:
        entry = _mapping(criterion)
        metric, mode = entry.get("metric"), entry.get("mode")
        if isinstance(metric, str) and mode in ("min", "max"):
            modes[metric] = mode
    return modes


def _bests(key: str, check: Callable[[object], float | None]) -> Extract:
    """Per watched metric (labels ``metric``, ``mode``; mode empty when unknown): ``key`` of its best."""

    def extract(status: Mapping[str, Any], now: float) -> Iterator[Sample]:
        modes = _modes(status)
        for metric, best in _mapping(status.get("bests")).items():
            value = check(_mapping(best).get(key))
            if isinstance(metric, str) and value is not None:
                yield (("metric", _text(metric)), ("mode", modes.get(metric, ""))), value

    return extract


def _has_error(status: Mapping[str, Any], now: float) -> Iterator[Sample]:
    if "last_error" in status:
        error = status["last_error"]
        yield (), 1.0 if isinstance(error, str) and error else 0.0


def _malformed(status: Mapping[str, Any], now: float) -> Iterator[Sample]:
    for kind, count in _mapping(status.get("malformed_lines")).items():
        value = _count(count)
        if isinstance(kind, str) and value is not None:
            yield (("kind", _text(kind)),), value


def _trainer_skips(status: Mapping[str, Any], now: float) -> Iterator[Sample]:
    skipped = _count(_mapping(status.get("trainer")).get("skipped_captures"))
    if skipped is not None:
        yield (), skipped


FAMILIES: tuple[Family, ...] = (
    Family("ckptd_up", "gauge", "1 while the daemon runs and its heartbeat is fresh, else 0.", _up),
    Family("ckptd_heartbeat_age_seconds", "gauge", "Seconds since the daemon's last heartbeat.", _age),
    Family("ckptd_info", "gauge", "Always 1; the daemon's version, host and log format.", _info),
    Family("ckptd_last_eval_step", "gauge", "Step of the last eval the daemon judged.", _last_eval_step),
    Family("ckptd_best_value", "gauge", "Best value of each watched metric.", _bests("value", _number)),
    Family("ckptd_best_step", "gauge", "Step of the best of each watched metric.", _bests("step", _count)),
    Family("ckptd_log_lag_bytes", "gauge", "Bytes of the log not read yet.", _field("log_lag_bytes", _count)),
    Family(
        "ckptd_log_lag_seconds",
        "gauge",
        "Seconds the daemon has been behind the log (0 while it keeps up).",
        _field("log_lag_seconds", _nonnegative),
    ),
    Family(
        "ckptd_last_persist_seconds",
        "gauge",
        "Seconds the last persist took (copy, hash, fsync, rename).",
        _field("last_persist_seconds", _nonnegative),
    ),
    Family(
        "ckptd_store_bytes", "gauge", "Bytes held by the store's checkpoints.", _field("store_bytes", _count)
    ),
    Family(
        "ckptd_store_checkpoints",
        "gauge",
        "Checkpoints committed in the store.",
        _field("store_checkpoints", _count),
    ),
    Family(
        "ckptd_staged_bytes", "gauge", "Shared memory held by staging slots.", _field("staged_bytes", _count)
    ),
    Family(
        "ckptd_pending_acks", "gauge", "Acked snapshots not persisted yet.", _field("pending_acks", _count)
    ),
    Family(
        "ckptd_persists_total",
        "counter",
        "Checkpoints persisted by this daemon.",
        _field("persisted", _count),
    ),
    Family("ckptd_has_error", "gauge", "1 when the daemon reports a last error, else 0.", _has_error),
    Family("ckptd_malformed_lines_total", "counter", "Log lines skipped, by kind.", _malformed),
    Family(
        "ckptd_trainer_skipped_captures_total",
        "counter",
        "Captures the trainer-side client had to skip.",
        _trainer_skips,
    ),
    Family("ckptd_rss_bytes", "gauge", "Resident memory of the daemon.", _field("rss_bytes", _count)),
    Family(
        "ckptd_rss_anon_bytes",
        "gauge",
        "Anonymous resident memory of the daemon (RSS without the shared pages of a slot it reads).",
        _field("rss_anon_bytes", _count),
    ),
)


# -- the text format ---------------------------------------------------------------------------


def escape_label(value: str) -> str:
    """A label value as the text format quotes it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text: backslash and newline escaped (a quote stays as it is)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def _sample_line(name: str, labels: Labels, value: float) -> str:
    inner = ",".join(f'{key}="{escape_label(text)}"' for key, text in labels)
    return f"{name}{{{inner}}} {format_value(value)}"


def _identity(status: Mapping[str, Any]) -> Labels:
    return (("run", _text(status.get("run_dir"))), ("run_id", _text(status.get("run_id"))))


def _distinct_runs(statuses: Sequence[Mapping[str, Any]]) -> list[tuple[Labels, Mapping[str, Any]]]:
    """Each status with its identity labels; non-mappings and repeated identities dropped."""
    runs: dict[Labels, Mapping[str, Any]] = {}
    for status in statuses:
        if isinstance(status, Mapping):
            runs.setdefault(_identity(status), status)
    return list(runs.items())


def _family_lines(family: Family, runs: list[tuple[Labels, Mapping[str, Any]]], now: float) -> list[str]:
    seen: set[Labels] = set()
    lines: list[str] = []
    for identity, status in runs:
        for extra, value in family.extract(status, now):
            labels = identity + extra
            if labels not in seen and math.isfinite(value):
                seen.add(labels)
                lines.append(_sample_line(family.name, labels, value))
    if not lines:
        return []
    return [f"# HELP {family.name} {escape_help(family.help)}", f"# TYPE {family.name} {family.kind}", *lines]


def render(statuses: Sequence[Mapping[str, Any]], now: float | None = None) -> str:
    """The exposition of every run's status; ``now`` (epoch seconds) is for the heartbeat age.

    A family none of the statuses has a sample for is left out; "" when there is no status.
    """
    runs = _distinct_runs(statuses)
    moment = time.time() if now is None else now
    lines = [line for family in FAMILIES for line in _family_lines(family, runs, moment)]
    return "".join(line + "\n" for line in lines)


# -- reading status files ----------------------------------------------------------------------


def read_status(run_dir: Path | str) -> dict[str, Any] | None:
    """``RUN/.ckptd/status.json`` with ``run_dir`` set to ``run_dir``; None when there is no
    such file or it is not a JSON object (too large, unreadable, garbage)."""
    status = protocol_read_status(RunPaths(Path(run_dir)))
    if not status:
        return None
    status["run_dir"] = str(run_dir)
    return status


def collect(run_dirs: Iterable[Path | str]) -> list[dict[str, Any]]:
    """The readable statuses of ``run_dirs``, in their order (a provider for ``serve_http``)."""
    return [status for status in map(read_status, run_dirs) if status is not None]


# -- the textfile collector --------------------------------------------------------------------


def write_textfile(path: Path | str, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (a temp file in the same folder, renamed), so
    node-exporter's textfile collector reads the old file or the new one, never half of one.

    The temp name does not end in ``.prom``, which the collector would read; the file is made
    world-readable (0644), since the collector usually runs as another user.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
            os.fchmod(handle.fileno(), 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- the HTTP endpoint -------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    # An idle connection is dropped after this long: each holds a thread until then.
    timeout = 10
    server: _Server

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self._answer(404, b"not found; metrics are at /metrics\n")
            return
        try:
            body = render(self.server.provider()).encode("utf-8")
        except Exception:
            log.exception("rendering metrics failed")
            self._answer(500, b"rendering metrics failed; see the daemon's log\n")
            return
        self._answer(200, body, CONTENT_TYPE)

    def _answer(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics endpoint: " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], provider: Provider, family: socket.AddressFamily) -> None:
        self.address_family = family
        self.provider = provider
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """As HTTPServer's, without its reverse DNS lookup of the address (slow or hanging on
        a node without DNS); the name only appears in the server's own logs."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


@dataclass
class MetricsServer:
    """A running endpoint: where it listens, and ``close()`` to stop it."""

    address: str
    port: int
    _server: _Server
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def serve_http(address: str | None, port: int, provider: Provider) -> MetricsServer:
    """Answer ``GET /metrics`` with ``render(provider())`` from a daemon thread; 404 elsewhere.

    ``address`` None binds 127.0.0.1 (give "0.0.0.0" or "::" to be scraped from elsewhere);
    ``port`` 0 takes a free one (see ``.port``). A provider that raises answers 500.
    """
    host = DEFAULT_ADDRESS if address is None else address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = _Server((host, port), provider, family)
    thread = threading.Thread(target=server.serve_forever, name="ckptd-metrics", daemon=True)
    thread.start()
    return MetricsServer(host, server.server_address[1], server, thread)
