"""Property-based tests: random and corrupted input never escapes as an exception, NaN is never best.

Every parser and the follower are fed what hypothesis makes up (random bytes, real
fixture lines with bytes flipped, cut or spliced) and must answer only with an
event, None, or a counted MalformedLine.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptd.errors import MalformedLine
from ckptd.logs import LogFollower
from ckptd.logs.csvlog import LightningCsvFormat
from ckptd.logs.hf import HfStateSource, HfStdoutFormat
from ckptd.logs.jsonl import JsonlFormat
from ckptd.logs.regex import RegexFormat
from ckptd.policy import judge
from ckptd.records import Best, Criterion, LogEvent
from tests.conftest import FIXTURES

SAMPLES = [
    *(FIXTURES / "ms-swift" / "runA_loadbest_logging.jsonl").read_bytes().splitlines()[:60],
    *(FIXTURES / "hf-trainer" / "hf_stdout.log").read_bytes().splitlines()[:40],
    *(FIXTURES / "lightning" / "metrics_before_rewrite.csv").read_bytes().splitlines(),
    b'{"step": 5, "eval_loss": NaN}',
    b"{'eval_loss': nan, 'epoch': '0.5'}",
]


@st.composite
def corrupted_lines(draw: st.DrawFn) -> bytes:
    """A real line with bytes flipped, cut, spliced or repeated, or plain random bytes."""
    line = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(0, 4))):
        if not line:
            break
        at = draw(st.integers(0, len(line) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        if action == "flip":
            line[at] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del line[at:]
        elif action == "insert":
            line[at:at] = draw(st.binary(max_size=8))
        else:
            line[at:at] = line[at : at + draw(st.integers(1, 32))]
    return bytes(line).replace(b"\n", b"")


any_line = st.one_of(corrupted_lines(), st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")))

FORMATS = {
    "jsonl": lambda: JsonlFormat(),
    "jsonl-watched": lambda: JsonlFormat(watched=["eval_loss", "val_loss"]),
    "jsonl-step-key": lambda: JsonlFormat(step_key="a.step"),
    "hf-stdout": HfStdoutFormat,
    "lightning-csv": LightningCsvFormat,
    "regex": lambda: RegexFormat(r"step (?P<step>\d+).*?loss[=:] ?(?P<eval_loss>\S+)"),
}


@pytest.mark.parametrize("name", FORMATS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(any_line, max_size=20))
def test_no_line_makes_a_parser_raise_anything_but_malformed(name: str, lines: list[bytes]) -> None:
    fmt = FORMATS[name]()
    for line in lines:
        try:
            event = fmt.parse(line)
        except MalformedLine as exc:
            assert exc.kind  # counted under a kind
            continue
        assert event is None or (isinstance(event, LogEvent) and event.step >= 0)
        if event is not None:
            assert all(isinstance(v, float) for v in event.metrics.values())


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf])),
        min_size=1,
        max_size=40,
    ),
    mode=st.sampled_from(["min", "max"]),
)
def test_nan_and_infinity_are_never_best_through_parser_and_judge(values: list[float], mode: str) -> None:
    criterion = Criterion("eval_loss", mode)  # type: ignore[arg-type]
    fmt = JsonlFormat(watched=["eval_loss"])
    bests: dict[str, Best] = {}
    for step, value in enumerate(values, start=1):
        literal = (
            repr(value)
            if math.isfinite(value)
            else {"nan": "NaN", "inf": "Infinity"}.get(repr(value), "-Infinity")
        )
        event = fmt.parse(f'{{"step": {step}, "eval_loss": {literal}}}'.encode())
        assert event is not None
        judgement = judge([criterion], bests, event)
        assert judgement.verdict is not None
        if not math.isfinite(value):
            assert judgement.verdict.action == "skip"
        bests = dict(judgement.bests)
        if "eval_loss" in bests:
            assert math.isfinite(bests["eval_loss"].value)
    finite = [v for v in values if math.isfinite(v)]
    if finite:
        assert bests["eval_loss"].value == (min(finite) if mode == "min" else max(finite))


@st.composite
def append_plan(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    """Writes of random chunks (some holding newlines, some not) with reads in between."""
    line = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")) | corrupted_lines()
    ops: list[tuple[str, bytes]] = []
    for _ in range(draw(st.integers(1, 25))):
        if draw(st.booleans()):
            ops.append(("read", b""))
        chunk = b"\n".join(draw(st.lists(line, max_size=4)))
        if draw(st.booleans()):
            chunk += b"\n"
        ops.append(("write", chunk))
    return ops


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=append_plan())
def test_follower_returns_exactly_the_complete_lines_of_an_appended_file(
    tmp_path_factory: pytest.TempPathFactory, plan: list[tuple[str, bytes]]
) -> None:
    log = tmp_path_factory.mktemp("follow") / "log"
    follower = LogFollower(log, max_line_bytes=1 << 20)
    got: list[bytes] = []
    written = b""
    for op, chunk in plan:
        if op == "read":
            got += follower.read_lines()
        else:
            with log.open("ab") as handle:
                handle.write(chunk)
            written += chunk
    got += follower.read_lines()
    follower.close()
    complete = written[: written.rfind(b"\n") + 1]
    expected = [line[:-1] if line.endswith(b"\r") else line for line in complete.split(b"\n")[:-1]]
    assert got == expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("write"), st.binary(max_size=300)),
            st.tuples(st.sampled_from(["read", "truncate", "rotate", "delete"]), st.just(b"")),
        ),
        max_size=30,
    ),
    bound=st.integers(1, 64),
)
def test_follower_survives_any_mix_of_writes_truncation_rotation_and_deletion(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, bytes]], bound: int
) -> None:
    folder = tmp_path_factory.mktemp("chaos")
    log = folder / "log"
    follower = LogFollower(log, max_line_bytes=bound)
    written_lines: set[bytes] = set()
    everything = b""
    for index, (op, data) in enumerate(ops):
        if op == "write":
            with log.open("ab") as handle:
                handle.write(data)
            everything += data
        elif op == "truncate" and log.exists():
            os.truncate(log, 0)
        elif op == "rotate" and log.exists():
            log.rename(folder / f"log.{index}")
        elif op == "delete" and log.exists():
            log.unlink()
        for line in follower.read_lines() if op == "read" else ():
            assert len(line) <= bound, "an over-long line must be skipped, not returned"
            written_lines.add(line)
    for line in follower.read_lines():
        assert len(line) <= bound
        written_lines.add(line)
    follower.close()
    pieces = {p.rstrip(b"\r") for p in everything.split(b"\n")}
    # Every line returned is a piece of what was written between newlines (or a tail of one,
    # when a truncation landed mid-line): never two lines glued, never invented bytes.
    assert all(b"\n" not in line and any(line in piece for piece in pieces) for line in written_lines)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(contents=st.lists(st.one_of(st.binary(max_size=200), corrupted_lines()), min_size=1, max_size=6))
def test_trainer_state_source_never_raises_on_garbage(
    tmp_path_factory: pytest.TempPathFactory, contents: list[bytes]
) -> None:
    path: Path = tmp_path_factory.mktemp("state") / "trainer_state.json"
    source = HfStateSource(path)
    for content in contents:
        path.write_bytes(content)
        for event in source.read_events():
            assert isinstance(event, LogEvent)
    source.close()


FIXTURE_EVENTS = next((FIXTURES / "hf-trainer" / "runs").rglob("events.out.tfevents.*")).read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cut=st.integers(0, len(FIXTURE_EVENTS)),
    flips=st.lists(st.tuples(st.integers(0, len(FIXTURE_EVENTS) - 1), st.integers(1, 255)), max_size=4),
    garbage=st.binary(max_size=200),
)
def test_tensorboard_source_never_raises_on_cut_or_corrupted_event_files(
    tmp_path_factory: pytest.TempPathFactory, cut: int, flips: list[tuple[int, int]], garbage: bytes
) -> None:
    from ckptd.logs.tensorboard import TensorBoardSource

    runs = tmp_path_factory.mktemp("tb")
    data = bytearray(FIXTURE_EVENTS[:cut])
    for at, mask in flips:
        if at < len(data):
            data[at] ^= mask
    (runs / "events.out.tfevents.1.a").write_bytes(bytes(data))
    (runs / "events.out.tfevents.2.b").write_bytes(garbage)
    source = TensorBoardSource(runs)
    for event in source.read_events():
        assert isinstance(event, LogEvent) and event.metrics
    source.close()
