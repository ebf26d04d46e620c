"""The control-file protocol on real files: atomic replacement under a concurrent reader in another
process, control and ack round trips, hostile or malformed files, pending acks, and the heartbeat."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ckptd.errors import ProtocolError
from ckptd.protocol import (
    PROTOCOL_VERSION,
    STALE_AFTER_S,
    Ack,
    Control,
    RunPaths,
    atomic_write_json,
    daemon_alive,
    heartbeat_age,
    pending_ack_paths,
    read_ack,
    read_control,
    write_ack,
    write_control,
)
from ckptd.records import Verdict

NAN = math.nan
INF = math.inf


@pytest.fixture
def paths(tmp_path: Path) -> RunPaths:
    run = RunPaths(tmp_path / "run")
    run.acks.mkdir(parents=True)
    return run


def _reject_constant(token: str) -> float:
    raise AssertionError(f"{token} is not JSON: a strict reader would choke on it")


# -- atomic_write_json ---------------------------------------------------------------------------

# Reads in a tight loop until the stop file appears; every read must be one whole document
# (its pad matches its n) and the counter i must never go back (old file or new, never a mix).
_READER = r"""
import json, os, sys
path, stop = sys.argv[1], sys.argv[2]
reads = bad = regress = 0
last = -1
seen = set()
samples = []
announced = False
while not os.path.exists(stop):
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        doc = json.loads(raw)
        ok = doc["pad"] == "x" * doc["n"]
    except Exception as exc:
        ok, doc = False, None
        raw = repr(exc).encode() + b" " + raw[:80]
    reads += 1
    if not ok:
        bad += 1
        if len(samples) < 3:
            samples.append(raw[:120].decode(errors="replace"))
        continue
    if doc["i"] < last:
        regress += 1
    last = doc["i"]
    seen.add(doc["i"])
    if not announced:
        print("ready", flush=True)
        announced = True
print(json.dumps({"reads": reads, "bad": bad, "regress": regress, "distinct": len(seen),
                  "samples": samples}), flush=True)
"""


def _document(i: int) -> dict[str, Any]:
    # Sizes from a few bytes to ~8 KiB: a torn write would show as a short or mixed document.
    n = (i * 997) % 8192
    return {"i": i, "n": n, "pad": "x" * n}


def test_atomic_write_json_reader_in_another_process_never_sees_a_torn_file(tmp_path: Path) -> None:
    target = tmp_path / "control.json"
    stop = tmp_path / "stop"
    atomic_write_json(target, _document(0))
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, str(target), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None
        assert reader.stdout.readline().strip() == "ready", reader.stderr.read() if reader.stderr else ""
        # Thousands of rewrites; past the first thousand, a loaded machine may stop early.
        deadline = time.monotonic() + 2.0
        i = 0
        while i < 3000 and (i < 1000 or time.monotonic() < deadline):
            i += 1
            atomic_write_json(target, _document(i))
        stop.touch()
        out, err = reader.communicate(timeout=30)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0, err
    result = json.loads(out)
    assert result["bad"] == 0, f"reader saw torn files: {result['samples']}"
    assert result["regress"] == 0
    # The reader really ran while the file was being replaced, not only before or after.
    assert result["reads"] >= 100
    assert result["distinct"] >= 20
    assert json.loads(target.read_bytes()) == _document(i)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["control.json", "stop"]


@pytest.mark.parametrize("durable", [False, True], ids=["plain", "durable"])
def test_atomic_write_json_leaves_no_temp_files(tmp_path: Path, durable: bool) -> None:
    target = tmp_path / "state.json"
    for value in range(3):
        atomic_write_json(target, {"value": value}, durable=durable)
    assert json.loads(target.read_bytes()) == {"value": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def _circular() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        pytest.param({"fn": object()}, TypeError, id="object"),
        pytest.param({"a": 1, "z": {1, 2}}, TypeError, id="set-after-good-keys"),
        pytest.param({"loop": _circular()}, ValueError, id="circular"),
    ],
)
@pytest.mark.parametrize("durable", [False, True], ids=["plain", "durable"])
def test_atomic_write_json_failed_serialization_keeps_old_file(
    tmp_path: Path, bad: Any, error: type[Exception], durable: bool
) -> None:
    target = tmp_path / "control.json"
    atomic_write_json(target, {"seq": 7})
    before = target.read_bytes()
    with pytest.raises(error):
        atomic_write_json(target, bad, durable=durable)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["control.json"]


@pytest.mark.parametrize("durable", [False, True], ids=["plain", "durable"])
def test_atomic_write_json_failed_replace_removes_its_temp_file(tmp_path: Path, durable: bool) -> None:
    # The temp file is written, then the rename fails: a directory stands where the file should go.
    target = tmp_path / "control.json"
    target.mkdir()
    (target / "inside").write_text("keep")
    with pytest.raises(OSError):
        atomic_write_json(target, {"seq": 1}, durable=durable)
    assert [p.name for p in tmp_path.iterdir()] == ["control.json"]
    assert (target / "inside").read_text() == "keep"


# -- Control ---------------------------------------------------------------------------------------


def _control(verdict: Verdict | None, every_steps: int | None) -> Control:
    return Control(
        seq=12,
        run_id="run-abc",
        staging="/dev/shm/ckptd-run-abc",
        every_steps=every_steps,
        verdict=verdict,
        written=1712345678.123456,
    )


SNAPSHOT = Verdict(
    eval_step=1050,
    action="snapshot",
    tags=("best:eval_loss", "best:eval_acc"),
    reason="eval_loss 0.25 < 0.31 (step 1000)",
    metrics={"eval_loss": 0.25, "eval_acc": 0.75, "grad_norm": NAN, "up": INF, "down": -INF},
)
SKIP = Verdict(eval_step=1100, action="skip", reason="no improvement", metrics={"eval_loss": 0.5})


def _same_metrics(got: Any, want: Any) -> bool:
    if set(got) != set(want):
        return False
    return all(
        isinstance(got[k], float) and (math.isnan(got[k]) if math.isnan(want[k]) else got[k] == want[k])
        for k in want
    )


@pytest.mark.parametrize(
    ("verdict", "every_steps"),
    [
        pytest.param(None, None, id="no-verdict-no-schedule"),
        pytest.param(None, 200, id="schedule-only"),
        pytest.param(SNAPSHOT, None, id="snapshot-verdict-with-non-finite-metrics"),
        pytest.param(SKIP, 50, id="skip-verdict-and-schedule"),
    ],
)
def test_control_round_trip(paths: RunPaths, verdict: Verdict | None, every_steps: int | None) -> None:
    sent = _control(verdict, every_steps)
    write_control(paths, sent)
    got = read_control(paths.control)
    assert (got.seq, got.run_id, got.staging, got.every_steps, got.written) == (
        12,
        "run-abc",
        "/dev/shm/ckptd-run-abc",
        every_steps,
        1712345678.123456,
    )
    if verdict is None:
        assert got.verdict is None
        return
    assert got.verdict is not None
    assert (got.verdict.eval_step, got.verdict.action, got.verdict.tags, got.verdict.reason) == (
        verdict.eval_step,
        verdict.action,
        verdict.tags,
        verdict.reason,
    )
    assert isinstance(got.verdict.tags, tuple)
    assert _same_metrics(got.verdict.metrics, verdict.metrics), got.verdict.metrics


def test_control_non_finite_metrics_travel_as_strings_in_strict_json(paths: RunPaths) -> None:
    write_control(paths, _control(SNAPSHOT, None))
    on_disk = json.loads(paths.control.read_bytes(), parse_constant=_reject_constant)
    assert on_disk["protocol"] == PROTOCOL_VERSION
    assert on_disk["metrics"] == {
        "eval_loss": 0.25,
        "eval_acc": 0.75,
        "grad_norm": "nan",
        "up": "inf",
        "down": "-inf",
    }
    got = read_control(paths.control)
    assert got.verdict is not None
    assert math.isnan(got.verdict.metrics["grad_norm"])
    assert got.verdict.metrics["up"] == INF and got.verdict.metrics["down"] == -INF


def test_read_control_without_file_is_file_not_found(paths: RunPaths) -> None:
    with pytest.raises(FileNotFoundError):
        read_control(paths.control)


def _valid_control() -> dict[str, Any]:
    return _control(SNAPSHOT, 200).to_json()


def _without(key: str) -> dict[str, Any]:
    data = _valid_control()
    del data[key]
    return data


def _with(**changes: Any) -> dict[str, Any]:
    return {**_valid_control(), **changes}


def _json(data: Any) -> bytes:
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("raw", "mentions"),
    [
        pytest.param(b"{not json", "not valid JSON", id="not-json"),
        pytest.param(b"", "not valid JSON", id="empty-file"),
        pytest.param(b"\xff\xfe{}", "not valid JSON", id="not-utf8"),
        pytest.param(_json([1, 2, 3]), "list", id="json-array"),
        pytest.param(_json("control"), "str", id="json-string"),
        pytest.param(_json(_without("protocol")), "None", id="missing-protocol"),
        pytest.param(_json(_with(protocol=2)), "2", id="unknown-protocol-version"),
        pytest.param(_json(_with(protocol="1")), "'1'", id="protocol-as-string"),
        pytest.param(_json(_without("seq")), "seq", id="missing-seq"),
        pytest.param(_json(_with(seq="12")), "seq", id="seq-as-string"),
        pytest.param(_json(_with(seq=True)), "seq", id="seq-as-bool"),
        pytest.param(_json(_with(seq=12.0)), "seq", id="seq-as-float"),
        pytest.param(_json(_without("run_id")), "run_id", id="missing-run-id"),
        pytest.param(_json(_with(staging=5)), "staging", id="staging-as-int"),
        pytest.param(_json(_without("written")), "written", id="missing-written"),
        pytest.param(_json(_with(written="yesterday")), "written", id="written-as-string"),
        pytest.param(_json(_with(written=False)), "written", id="written-as-bool"),
        pytest.param(_json(_with(action="explode")), "explode", id="unknown-action"),
        pytest.param(_json(_with(action=1)), "action", id="action-as-int"),
        pytest.param(_json(_without("eval_step")), "eval_step", id="action-without-eval-step"),
        pytest.param(_json(_with(eval_step="1050")), "eval_step", id="eval-step-as-string"),
        pytest.param(_json(_with(tags="best:eval_loss")), "tags", id="tags-not-a-list"),
        pytest.param(_json(_with(every_steps=0)), "every_steps", id="every-steps-zero"),
        pytest.param(_json(_with(every_steps=-5)), "every_steps", id="every-steps-negative"),
        pytest.param(_json(_with(every_steps="200")), "every_steps", id="every-steps-as-string"),
        pytest.param(_json(_with(every_steps=True)), "every_steps", id="every-steps-as-bool"),
    ],
)
def test_bad_control_raises_protocol_error_naming_the_file(
    paths: RunPaths, raw: bytes, mentions: str
) -> None:
    paths.control.write_bytes(raw)
    with pytest.raises(ProtocolError) as info:
        read_control(paths.control)
    assert isinstance(info.value, ValueError)
    assert info.value.path == paths.control
    assert str(paths.control) in str(info.value)
    assert mentions in str(info.value)


# -- Ack -------------------------------------------------------------------------------------------

VERDICT_ACK = Ack(
    name=Ack.name_for(12, 1051),
    captured_step=1051,
    slot="slot-1",
    files={"tensors.safetensors": 123_456, "structure.json": 789},
    seq=12,
    requested_step=1050,
    tags=("best:eval_loss",),
    reason="eval_loss 0.25 < 0.31",
    created=1712345678.5,
)
PERIODIC_ACK = Ack(
    name=Ack.name_for(None, 200),
    captured_step=200,
    slot="slot-0",
    files={"tensors.safetensors": 0, "structure.json": 2},
    requested_step=200,
    tags=("periodic",),
    reason="every 200 steps",
    created=1712345000.0,
)


@pytest.mark.parametrize(
    ("ack", "file_name"),
    [
        pytest.param(VERDICT_ACK, "12.json", id="verdict"),
        pytest.param(PERIODIC_ACK, "step-200.json", id="periodic"),
    ],
)
def test_ack_round_trip(paths: RunPaths, ack: Ack, file_name: str) -> None:
    written = write_ack(paths, ack)
    assert written == paths.acks / file_name
    assert [p.name for p in paths.acks.iterdir()] == [file_name]
    got = read_ack(written)
    assert got == ack
    assert isinstance(got.tags, tuple)
    assert pending_ack_paths(paths) == [written]


def _hostile(**changes: Any) -> dict[str, Any]:
    return {**VERDICT_ACK.to_json(), **changes}


@pytest.mark.parametrize(
    ("data", "mentions"),
    [
        pytest.param(_hostile(slot="../../etc"), "../../etc", id="slot-climbs-out"),
        pytest.param(_hostile(slot="a/b"), "a/b", id="slot-with-separator"),
        pytest.param(_hostile(slot=".."), "..", id="slot-dotdot"),
        pytest.param(_hostile(slot=""), "slot", id="slot-empty"),
        pytest.param(_hostile(slot="/etc"), "/etc", id="slot-absolute"),
        pytest.param(_hostile(slot=None), "slot", id="slot-missing"),
        pytest.param(_hostile(files={"../x": 10}), "../x", id="file-name-climbs-out"),
        pytest.param(_hostile(files={"a/b": 10}), "a/b", id="file-name-with-separator"),
        pytest.param(_hostile(files={"tensors.safetensors": -1}), "-1", id="negative-size"),
        pytest.param(_hostile(files={"tensors.safetensors": "10"}), "'10'", id="size-as-string"),
        pytest.param(_hostile(files={"tensors.safetensors": 1.5}), "1.5", id="size-as-float"),
        pytest.param(_hostile(files=["tensors.safetensors"]), "files", id="files-as-list"),
        pytest.param(_hostile(captured_step="1051"), "captured_step", id="captured-step-as-string"),
        pytest.param(_hostile(captured_step=None), "captured_step", id="captured-step-missing"),
        pytest.param(_hostile(seq="12"), "seq", id="seq-as-string"),
        pytest.param(_hostile(protocol=2), "2", id="unknown-protocol"),
        pytest.param(
            _hostile(files={"tensors.safetensors": True}),
            "True",
            id="size-as-bool",
        ),
        pytest.param(
            _hostile(captured_step=-1),
            "captured_step",
            id="negative-captured-step",
        ),
    ],
)
def test_hostile_ack_is_rejected(paths: RunPaths, data: dict[str, Any], mentions: str) -> None:
    path = paths.acks / "12.json"
    path.write_bytes(_json(data))
    with pytest.raises(ProtocolError) as info:
        read_ack(path)
    assert info.value.path == path
    assert str(path) in str(info.value)
    assert mentions in str(info.value)


# -- pending acks ----------------------------------------------------------------------------------


def test_pending_ack_paths_oldest_first_and_ignores_temp_and_rejected(paths: RunPaths) -> None:
    now = time.time()
    real = {"12.json": now - 30, "step-200.json": now - 20, "3.json": now - 10}
    noise = [".12.json.abc.tmp", ".step-200.json.x1y2.tmp", "5.json.rejected", "notes.txt", "12.json.tmp"]
    for name, mtime in real.items():
        (paths.acks / name).write_text("{}")
        os.utime(paths.acks / name, (mtime, mtime))
    for name in noise:
        (paths.acks / name).write_text("{}")
    assert [p.name for p in pending_ack_paths(paths)] == ["12.json", "step-200.json", "3.json"]


def test_pending_ack_paths_without_acks_dir_is_empty(tmp_path: Path) -> None:
    assert pending_ack_paths(RunPaths(tmp_path / "nowhere")) == []


# -- heartbeat -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "stale_after", "alive"),
    [
        pytest.param(None, STALE_AFTER_S, False, id="no-status"),
        pytest.param(0.0, STALE_AFTER_S, True, id="fresh"),
        pytest.param(10.0, STALE_AFTER_S, False, id="10s-old-default"),
        pytest.param(10.0, 30.0, True, id="10s-old-lenient"),
        pytest.param(3.0, 1.0, False, id="3s-old-strict"),
    ],
)
def test_daemon_alive_and_heartbeat_age(
    paths: RunPaths, age: float | None, stale_after: float, alive: bool
) -> None:
    if age is not None:
        paths.status.write_text("{}")
        stamp = time.time() - age
        os.utime(paths.status, (stamp, stamp))
    measured = heartbeat_age(paths)
    if age is None:
        assert measured is None
    else:
        assert measured is not None and abs(measured - age) < 1.0
    assert daemon_alive(paths, stale_after) is alive
    if stale_after == STALE_AFTER_S:
        assert daemon_alive(paths) is alive


def test_heartbeat_age_with_explicit_now(paths: RunPaths) -> None:
    paths.status.write_text("{}")
    os.utime(paths.status, (1000.0, 1000.0))
    assert heartbeat_age(paths, now=1042.5) == pytest.approx(42.5)
    assert heartbeat_age(paths, now=900.0) == 0.0  # a clock that went back is no negative age
