"""``ckptd.metrics``: the status heartbeats as Prometheus text, in a file and over HTTP.

Every exposition is read back by the strict parser below (format 0.0.4: HELP and TYPE once
per family before its samples, a family's samples together, no series twice, label values
unescaped), so a test checks what a Prometheus server would see.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptd
from ckptd import metrics
from ckptd.metrics import collect, read_status, render, serve_http, write_textfile
from ckptd.protocol import STATUS_MAX_BYTES, RunPaths, pending_ack_paths
from tests.conftest import append_lines, wait_for

# -- a strict reader of the text format --------------------------------------------------------

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}
Series = tuple[str, frozenset[tuple[str, str]]]


@dataclass
class Exposition:
    types: dict[str, str] = field(default_factory=dict)
    helps: dict[str, str] = field(default_factory=dict)
    samples: dict[Series, float] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def of(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for family, labels in self.samples if family == name]


def _label_value(line: str, at: int) -> tuple[str, int]:
    """The quoted value starting at ``line[at] == '"'``, unescaped; and the index after it."""
    assert line[at] == '"', line
    out, at = [], at + 1
    while line[at] != '"':
        if line[at] == "\\":
            assert line[at + 1] in _ESCAPES, f"bad escape in {line!r}"
            out.append(_ESCAPES[line[at + 1]])
            at += 2
        else:
            out.append(line[at])
            at += 1
    return "".join(out), at + 1


def _labels(line: str, at: int) -> tuple[dict[str, str], int]:
    labels: dict[str, str] = {}
    at += 1  # the "{"
    while line[at] != "}":
        name = _LABEL.match(line, at)
        assert name and line[name.end()] == "=", line
        assert name.group() not in labels, f"label twice in {line!r}"
        labels[name.group()], at = _label_value(line, name.end() + 1)
        if line[at] == ",":
            at += 1
    return labels, at + 1


def _sample(line: str) -> tuple[str, dict[str, str], float]:
    name = _NAME.match(line)
    assert name, line
    labels, at = _labels(line, name.end()) if line[name.end()] == "{" else ({}, name.end())
    assert line[at] == " ", line
    value = line[at + 1 :]
    assert " " not in value, f"no timestamps (the textfile collector refuses them): {line!r}"
    return name.group(), labels, float(value)  # float() reads NaN, +Inf, -Inf as the format spells them


def parse(text: str) -> Exposition:
    assert text == "" or text.endswith("\n")
    parsed, family, closed = Exposition(), "", set()
    for line in text.split("\n")[:-1]:  # "\n" ends a line; "\x1e" or "\r" in a label do not
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in parsed.helps and name not in closed, line
            parsed.helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert name not in parsed.types and kind in ("gauge", "counter", "untyped"), line
            closed.add(family)
            parsed.types[name], family = kind, name
        else:
            name, labels, value = _sample(line)
            assert name == family, f"{name} outside its family block"
            series = (name, frozenset(labels.items()))
            assert series not in parsed.samples, f"series twice: {line!r}"
            parsed.samples[series] = value
    assert set(parsed.helps) == set(parsed.types)
    return parsed


# -- a real daemon's status --------------------------------------------------------------------


def _status(paths: RunPaths) -> dict[str, Any]:
    return read_status(paths.run_dir) or {}


def _expected_simple(status: Mapping[str, Any]) -> dict[str, float]:
    """The families that copy one status field, for each field the status holds validly."""
    fields = {
        "ckptd_log_lag_bytes": "log_lag_bytes",
        "ckptd_log_lag_seconds": "log_lag_seconds",
        "ckptd_last_persist_seconds": "last_persist_seconds",
        "ckptd_store_bytes": "store_bytes",
        "ckptd_store_checkpoints": "store_checkpoints",
        "ckptd_staged_bytes": "staged_bytes",
        "ckptd_pending_acks": "pending_acks",
        "ckptd_persists_total": "persisted",
        "ckptd_rss_bytes": "rss_bytes",
        "ckptd_rss_anon_bytes": "rss_anon_bytes",
    }
    return {
        family: float(status[key])
        for family, key in fields.items()
        if isinstance(status.get(key), (int, float)) and not isinstance(status.get(key), bool)
    }


@pytest.mark.slow
def test_a_real_daemon_status_renders_and_parses_back(tmp_path: Path, daemons, shm_root: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    daemon = daemons(run, "--best", "eval_loss:min", "--best", "eval_acc:max", "--keep-last", "0")
    from ckptd import CheckpointClient

    with CheckpointClient(run) as client:
        for step, loss, acc in ((10, 1.0, 0.5), (20, 0.5, 0.4), (30, 0.7, 0.8), (40, 0.9, 0.1)):
            append_lines(run / "logging.jsonl", {"step": step, "eval_loss": loss, "eval_acc": acc})
            client.wait_verdict(step)
            client.maybe_snapshot(step, lambda step=step: {"w": torch.full((4,), float(step))})
    paths = RunPaths(run)
    wait_for(lambda: not pending_ack_paths(paths), what="every ack persisted")
    wait_for(lambda: _status(paths).get("persisted") == 3, what="a heartbeat after the persists")
    status = _status(paths)
    parsed = parse(render([status], now=status["heartbeat"] + 0.5))

    run_labels = {"run": str(run), "run_id": status["run_id"]}
    assert parsed.value("ckptd_up", **run_labels) == 1
    assert parsed.value("ckptd_heartbeat_age_seconds", **run_labels) == pytest.approx(0.5)
    info = {**run_labels, "version": ckptd.__version__, "host": status["host"], "log_format": "jsonl"}
    assert parsed.value("ckptd_info", **info) == 1
    assert parsed.value("ckptd_last_eval_step", **run_labels) == 40
    loss, acc = {"metric": "eval_loss", "mode": "min"}, {"metric": "eval_acc", "mode": "max"}
    assert parsed.value("ckptd_best_value", **run_labels, **loss) == 0.5
    assert parsed.value("ckptd_best_step", **run_labels, **loss) == 20
    assert parsed.value("ckptd_best_value", **run_labels, **acc) == 0.8
    assert parsed.value("ckptd_best_step", **run_labels, **acc) == 30
    assert parsed.value("ckptd_has_error", **run_labels) == 0
    assert parsed.types["ckptd_persists_total"] == "counter"
    simple = {name: parsed.value(name, **run_labels) for name in _expected_simple(status)}
    assert simple == _expected_simple(status)
    assert simple["ckptd_persists_total"] == 3
    assert 0 < simple["ckptd_last_persist_seconds"] < 60
    for name, kind in parsed.types.items():
        assert name.startswith("ckptd_") and (kind == "counter") == name.endswith("_total")

    assert daemon.stop() == 0, daemon.log()
    stopped = _status(paths)
    assert parse(render([stopped], now=stopped["heartbeat"])).value("ckptd_up", **run_labels) == 0


# -- untrusted status files --------------------------------------------------------------------

HOSTILE: dict[str, Any] = {
    "run_dir": "/runs/a",
    "run_id": 42,  # not a string: an empty label, not a crash
    "state": "running",
    "heartbeat": "yesterday",
    "version": ["0.1"],
    "host": None,
    "log_lag_bytes": -5,
    "log_lag_seconds": float("nan"),
    "last_persist_seconds": float("inf"),
    "persisted": True,  # JSON true is no count
    "pending_acks": 2.5,
    "store_bytes": 2**70,  # past what any consumer holds
    "staged_bytes": "12",
    "rss_bytes": 12,
    "last_verdict": {"eval_step": -1},
    "criteria": [{"metric": "eval_loss", "mode": "sideways"}, "junk", {"metric": 3, "mode": "min"}],
    "bests": {
        "eval_loss": {"step": 5, "value": float("nan")},
        "eval_big": {"step": 6, "value": 10**400},  # finite in JSON, too large for a float
        "eval_acc": {"step": "7", "value": 0.25},
        "eval_ok": {"step": 8, "value": -1.5},
        "eval_list": [1, 2],
    },
    "malformed_lines": {"bad_json": 3, "no_step": -1, "weird": "4"},
    "trainer": "not an object",
    "last_error": 7,
}


def test_hostile_values_skip_their_samples_and_nothing_is_invented() -> None:
    parsed = parse(render([HOSTILE], now=1000.0))
    labels = {"run": "/runs/a", "run_id": ""}
    assert parsed.value("ckptd_up", **labels) == 0  # no readable heartbeat: not up
    assert parsed.value("ckptd_info", **labels, version="", host="", log_format="") == 1
    assert parsed.value("ckptd_rss_bytes", **labels) == 12
    assert parsed.of("ckptd_best_value") == [
        {**labels, "metric": name, "mode": ""} for name in ("eval_acc", "eval_ok")
    ]
    assert parsed.value("ckptd_best_value", **labels, metric="eval_ok", mode="") == -1.5
    assert parsed.of("ckptd_best_step") == [
        {**labels, "metric": name, "mode": ""} for name in ("eval_loss", "eval_big", "eval_ok")
    ]
    assert parsed.of("ckptd_malformed_lines_total") == [{**labels, "kind": "bad_json"}]
    assert parsed.value("ckptd_has_error", **labels) == 0  # a number is no error message
    for name in (
        "ckptd_heartbeat_age_seconds",
        "ckptd_last_eval_step",
        "ckptd_log_lag_bytes",
        "ckptd_log_lag_seconds",
        "ckptd_last_persist_seconds",
        "ckptd_persists_total",
        "ckptd_pending_acks",
        "ckptd_store_bytes",
        "ckptd_staged_bytes",
        "ckptd_trainer_skipped_captures_total",
    ):
        assert name not in parsed.types, name
    assert all(math.isfinite(value) for value in parsed.samples.values())


def test_a_bare_status_gives_only_what_it_says() -> None:
    parsed = parse(render([{"run_dir": "/runs/b"}], now=0.0))
    assert set(parsed.types) == {"ckptd_up", "ckptd_info"}
    assert parsed.value("ckptd_up", run="/runs/b", run_id="") == 0
    assert render([]) == ""


def test_what_is_not_a_status_is_skipped_and_a_run_is_counted_once() -> None:
    live = {"run_dir": "/r", "run_id": "abc", "state": "running", "heartbeat": 100.0, "persisted": 1}
    twin = {**live, "persisted": 9}  # the same run twice would make the scrape invalid
    other = {**live, "run_id": "def", "heartbeat": 90.0}
    statuses: list[Any] = [None, "status", [live], live, twin, other]
    parsed = parse(render(statuses, now=100.0))
    assert parsed.value("ckptd_persists_total", run="/r", run_id="abc") == 1
    assert parsed.value("ckptd_up", run="/r", run_id="abc") == 1
    assert parsed.value("ckptd_up", run="/r", run_id="def") == 0  # heartbeat 10 s old: stale
    assert parsed.value("ckptd_heartbeat_age_seconds", run="/r", run_id="def") == 10
    assert len(parsed.of("ckptd_up")) == 2


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
_KEYS = st.sampled_from(
    [
        "run_dir",
        "run_id",
        "state",
        "heartbeat",
        "bests",
        "criteria",
        "last_verdict",
        "log_lag_bytes",
        "persisted",
        "last_error",
        "malformed_lines",
        "trainer",
        "store_bytes",
        "version",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(_KEYS, _JSON, max_size=8) | _JSON, max_size=4), st.floats())
def test_any_json_renders_to_a_valid_exposition_without_nan(statuses: list[Any], now: float) -> None:
    parsed = parse(render(statuses, now=now))
    assert all(math.isfinite(value) for value in parsed.samples.values())


# -- escaping ----------------------------------------------------------------------------------


def test_label_values_are_escaped_and_read_back_unchanged() -> None:
    run_dir = 'C:\\runs\\"quoted"\nnext line'
    metric = 'eval/"loss"\\n'
    status = {
        "run_dir": run_dir,
        "run_id": "id\ud800",  # a lone surrogate json.loads lets through: not valid UTF-8
        "bests": {metric: {"step": 1, "value": 2.0}},
        "criteria": [{"metric": metric, "mode": "min"}],
    }
    text = render([status], now=0.0)
    assert 'run="C:\\\\runs\\\\\\"quoted\\"\\nnext line"' in text
    assert 'metric="eval/\\"loss\\"\\\\n"' in text
    # No raw newline from a value: up and info, then HELP, TYPE and one sample for each best family.
    assert text.count("\n") == render([{"run_dir": "x"}], now=0.0).count("\n") + 2 * 3
    text.encode("utf-8")  # every character encodable
    parsed = parse(text)
    labels = {"run": run_dir, "run_id": "id?"}
    assert parsed.value("ckptd_best_value", **labels, metric=metric, mode="min") == 2.0


def test_help_text_and_values_follow_the_format() -> None:
    assert metrics.escape_help('a\\b\n"c"') == 'a\\\\b\\n"c"'
    assert [metrics.format_value(v) for v in (3.0, 0.25, float("nan"), float("inf"), -float("inf"))] == [
        "3",
        "0.25",
        "NaN",
        "+Inf",
        "-Inf",
    ]
    for family in metrics.FAMILIES:
        assert _NAME.fullmatch(family.name) and family.kind in ("gauge", "counter")


# -- status files on disk ----------------------------------------------------------------------


def test_read_status_takes_only_a_json_object_of_sane_size(tmp_path: Path) -> None:
    runs = [tmp_path / name for name in ("good", "garbage", "list", "huge", "missing")]
    for run in runs[:4]:
        RunPaths(run).meta.mkdir(parents=True)
    RunPaths(runs[0]).status.write_text(json.dumps({"run_id": "r1", "run_dir": "/elsewhere"}))
    RunPaths(runs[1]).status.write_text('{"run_id": ')
    RunPaths(runs[2]).status.write_text("[1, 2]")
    RunPaths(runs[3]).status.write_text(json.dumps({"pad": "x" * STATUS_MAX_BYTES}))
    assert collect(runs) == [{"run_id": "r1", "run_dir": str(runs[0])}]  # the dir read, not the claim


# -- the textfile collector --------------------------------------------------------------------


def test_textfile_is_replaced_whole_and_world_readable(tmp_path: Path) -> None:
    target = tmp_path / "ckptd.prom"
    write_textfile(target, "a 1\n")
    write_textfile(target, "b 2\n")
    assert target.read_text() == "b 2\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["ckptd.prom"]


def test_textfile_readers_never_see_half_a_file(tmp_path: Path) -> None:
    target = tmp_path / "ckptd.prom"
    versions = ["a 1\n" * 50_000, "b 2\n" * 70_000]
    write_textfile(target, versions[0])
    stop = threading.Event()

    def writer() -> None:
        for i in range(60):
            write_textfile(target, versions[i % 2])
        stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    reads = 0
    while not stop.is_set() or reads == 0:
        assert target.read_text() in versions
        reads += 1
    thread.join()


def test_a_failed_textfile_write_leaves_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ckptd.prom"
    write_textfile(target, "old 1\n")
    temps: list[str] = []

    def failing_replace(src: str, dst: object) -> None:
        temps.append(os.path.basename(src))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(metrics.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        write_textfile(target, "new 2\n")
    assert target.read_text() == "old 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ckptd.prom"]
    assert not temps[0].endswith(".prom")  # the collector reads *.prom only


# -- the HTTP endpoint -------------------------------------------------------------------------


def _get(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read().decode()
    finally:
        connection.close()


def test_http_endpoint_serves_metrics_on_loopback(tmp_path: Path) -> None:
    status = {"run_id": "r1", "state": "running", "heartbeat": 1.0, "persisted": 4}
    RunPaths(tmp_path).meta.mkdir()
    RunPaths(tmp_path).status.write_text(json.dumps(status))
    failing = threading.Event()

    def provider() -> list[dict[str, Any]]:
        if failing.is_set():
            raise RuntimeError("status folder gone")
        return collect([tmp_path])

    server = serve_http(None, 0, provider)
    try:
        assert server.address == "127.0.0.1" and server.port > 0
        code, content_type, body = _get(server.port, "/metrics")
        assert code == 200 and content_type == metrics.CONTENT_TYPE
        assert parse(body).value("ckptd_persists_total", run=str(tmp_path), run_id="r1") == 4
        assert _get(server.port, "/metrics?name[]=ckptd_up")[0] == 200
        assert _get(server.port, "/")[0] == 404
        assert _get(server.port, "/metrics/x")[0] == 404
        assert _get(server.port, "/metrics", method="POST")[0] == 501
        failing.set()
        assert _get(server.port, "/metrics")[0] == 500
        failing.clear()
        assert _get(server.port, "/metrics")[0] == 200  # a failed scrape does not stop the endpoint
    finally:
        server.close()
    with pytest.raises(ConnectionRefusedError):
        _get(server.port, "/metrics")
