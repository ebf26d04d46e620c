"""Every reader of a file ckptd does not fully control, fed right-shaped JSON with wrong types.

Acks come from the trainer, control and status from a daemon of any version, state and
manifests from a daemon that may have been killed or a user with an editor. Whatever
they hold, each reader either returns well-typed values or raises its one clear error
type: never a TypeError, KeyError or AttributeError from inside the daemon (issue 7,
findings 5 and 6).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptd.daemon.state import DaemonState
from ckptd.errors import ProtocolError, StoreError
from ckptd.protocol import PROTOCOL_VERSION, Ack, Control, RunPaths, read_client_report
from ckptd.store import MANIFEST, Store

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)

VALID_ACK: dict[str, Any] = {
    "protocol": PROTOCOL_VERSION,
    "name": "12",
    "seq": 12,
    "requested_step": 0,
    "captured_step": 3,
    "slot": "slot-0",
    "files": {"tensors.safetensors": 100, "structure.json": 10},
    "tags": ["best:eval_loss"],
    "reason": "first value",
    "metrics": {"eval_loss": 0.5, "eval_acc": "nan"},
    "token": "a1b2",
    "created": 1.5,
}
VALID_CONTROL: dict[str, Any] = {
    "protocol": PROTOCOL_VERSION,
    "seq": 4,
    "run_id": "abc123",
    "staging": "/dev/shm/ckptd-abc123",
    "every_steps": 200,
    "written": 2.0,
    "eval_step": 750,
    "action": "snapshot",
    "tags": ["best:eval_loss"],
    "reason": "x",
    "metrics": {"eval_loss": 0.25},
}
VALID_STATE: dict[str, Any] = {
    "format": 1,
    "run_id": "abc123",
    "store": "/x/checkpoints",
    "criteria": ["eval_loss:min"],
    "seq": 3,
    "judged_step": 100,
    "bests": {"eval_loss": {"step": 100, "value": 0.5}},
    "cursor": {"kind": "line", "inode": 1, "offset": 0, "head": ""},
    "run_dir": "/x",
    "run_dir_inode": 7,
}
VALID_MANIFEST: dict[str, Any] = {
    "format": 1,
    "step": 750,
    "requested_step": 750,
    "tags": ["best:eval_loss"],
    "metrics": {"eval_loss": 0.25},
    "bytes": 10,
    "created": 3.0,
    "run_id": "abc123",
    "files": {
        "tensors.safetensors": {"bytes": 10, "xxh3_128": "00"},
        "structure.json": {"bytes": 10, "sha256": "00"},  # as an older ckptd wrote it
    },
}
VALID_CLIENT: dict[str, Any] = {
    "protocol": PROTOCOL_VERSION,
    "pid": 42,
    "skipped_captures": 3,
    "last_skip_reason": "no free slot",
    "last_skip_step": 40,
    "updated": 5.0,
}


def corrupted(valid: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``valid`` with some of its fields replaced by arbitrary JSON values, or dropped."""
    keys = sorted(valid)
    changes = st.dictionaries(st.sampled_from(keys), JSON_VALUES | st.just(_DROP), min_size=1, max_size=4)
    return changes.map(lambda c: _apply(valid, c))


_DROP = object()


def _apply(valid: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(valid)
    for key, value in changes.items():
        if value is _DROP:
            out.pop(key)
        else:
            out[key] = value
    return out


SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def assert_only(error: type[Exception], read: Callable[[], object]) -> object | None:
    try:
        return read()
    except error:
        return None


@SETTINGS
@given(corrupted(VALID_ACK))
def test_ack_reader_raises_only_protocol_error(data: dict[str, Any]) -> None:
    ack = assert_only(ProtocolError, lambda: Ack.from_json(Path("acks/12.json"), data))
    if isinstance(ack, Ack):
        assert isinstance(ack.captured_step, int) and ack.captured_step >= 0
        assert isinstance(ack.created, float) and math.isfinite(ack.created)
        assert all(isinstance(t, str) for t in ack.tags)
        assert all(isinstance(v, float) for v in ack.metrics.values())
        assert "/" not in ack.slot and ack.slot not in (".", "..")
        assert all("/" not in name and isinstance(n, int) for name, n in ack.files.items())


@SETTINGS
@given(corrupted(VALID_CONTROL))
def test_control_reader_raises_only_protocol_error(data: dict[str, Any]) -> None:
    control = assert_only(ProtocolError, lambda: Control.from_json(Path("control.json"), data))
    if isinstance(control, Control):
        assert isinstance(control.seq, int) and isinstance(control.written, float)
        assert "/" not in control.run_id
        if control.verdict is not None:
            assert control.verdict.action in ("snapshot", "skip")
            assert isinstance(control.verdict.eval_step, int)


@SETTINGS
@given(corrupted(VALID_STATE))
def test_state_reader_raises_only_protocol_error(data: dict[str, Any]) -> None:
    state = assert_only(ProtocolError, lambda: DaemonState.from_json(Path("state.json"), data))
    if isinstance(state, DaemonState):
        assert "/" not in state.run_id and ".." not in state.run_id
        assert isinstance(state.seq, int) and isinstance(state.judged_step, int)
        assert all(isinstance(b.step, int) and math.isfinite(b.value) for b in state.bests.values())
        json.dumps(state.to_json(), allow_nan=False)  # what it read, it can write back


@SETTINGS
@given(corrupted(VALID_CLIENT))
def test_client_report_reader_returns_none_for_anything_bad(
    tmp_path_factory: Any, data: dict[str, Any]
) -> None:
    paths = RunPaths(tmp_path_factory.mktemp("run"))
    paths.meta.mkdir()
    paths.client_report.write_text(json.dumps(data))
    report = read_client_report(paths)
    if report is not None:
        assert isinstance(report["skipped_captures"], int) and isinstance(report["last_skip_reason"], str)


@SETTINGS
@given(corrupted(VALID_MANIFEST))
def test_manifest_readers_raise_only_store_errors(tmp_path_factory: Any, data: dict[str, Any]) -> None:
    store = Store(tmp_path_factory.mktemp("store"))
    checkpoint = store.root / "step-00000750"
    checkpoint.mkdir()
    (checkpoint / MANIFEST).write_text(json.dumps(data))
    assert_only(StoreError, lambda: store.read(checkpoint.name))
    assert_only(StoreError, lambda: store.verify(checkpoint.name))
    for record in store.list():  # an unreadable manifest is left out, never raised
        assert isinstance(record.step, int) and isinstance(record.run_id, str)


@pytest.mark.parametrize("owner", [[1], {"format": 1, "run_ids": "x"}, {"format": 1, "store_inode": "7"}])
def test_a_corrupt_store_owner_file_is_set_aside(tmp_path: Path, owner: object) -> None:
    store = Store(tmp_path / "store")
    store.ensure()
    (store.root / ".ckptd-store.json").write_text(json.dumps(owner))
    assert store.claim("mine", tmp_path / "run") == {"mine"}
    assert list(store.root.glob(".ckptd-store.json.corrupt-*"))


VALID_STATUS: dict[str, Any] = {
    "protocol": PROTOCOL_VERSION,
    "state": "running",
    "pid": 1,
    "host": "h",
    "rss_bytes": 10,
    "rss_anon_bytes": 5,
    "log": "/x/logging.jsonl",
    "log_format": "jsonl",
    "watcher": "inotify",
    "log_lag_bytes": 0,
    "criteria": [{"metric": "eval_loss", "mode": "min", "keep": 1}],
    "bests": {"eval_loss": {"step": 5, "value": 0.5}},
    "last_verdict": {"eval_step": 5, "action": "snapshot", "reason": "r"},
    "persisted": 1,
    "pending_acks": 0,
    "malformed_lines": {"json": 2},
    "trainer": {"skipped_captures": 1, "last_skip_step": 3, "last_skip_reason": "x"},
    "log_notes": ["n"],
    "last_error": None,
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(corrupted(VALID_STATUS))
def test_status_command_survives_any_status_file(
    tmp_path_factory: Any, capsys: pytest.CaptureFixture[str], data: dict[str, Any]
) -> None:
    from ckptd.cli import main

    paths = RunPaths(tmp_path_factory.mktemp("run"))
    paths.meta.mkdir()
    paths.status.write_text(json.dumps(data))
    assert main(["status", str(paths.run_dir)]) in (0, 1)
    assert "daemon" in capsys.readouterr().out
