"""HfStdoutFormat and HfStateSource on real transformers/ms-swift output and on hand-made edge cases."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from ckptd.errors import MalformedLine
from ckptd.logs.hf import HfStateSource, HfStdoutFormat
from ckptd.logs.jsonl import JsonlFormat
from ckptd.logs.source import LineSource
from ckptd.records import LogEvent

FIXTURES = Path(__file__).parent / "fixtures"
HF = FIXTURES / "hf-trainer"
MS_SWIFT = FIXTURES / "ms-swift"
# (step, eval_loss) as hf-trainer/README.txt gives them, to 4 decimals.
HF_README_EVALS = [
    (20, 3.1976),
    (40, 2.5518),
    (60, 2.2408),
    (80, 2.0483),
    (100, 1.9363),
    (120, 1.8693),
    (140, 1.8281),
    (160, 1.8051),
    (180, 1.7779),
    (200, 1.7705),
]
BAR_20 = "\r 10%|█         | 20/200 [00:00<00:01, 107.59it/s]"
BAR_25 = "\r 12%|█▎        | 25/200 [00:00<00:01, 112.83it/s]"
CLEAR = "\r" + " " * 49 + "\r"


def parse_all(fmt: HfStdoutFormat, lines: list[bytes]) -> list[LogEvent]:
    events = []
    for line in lines:
        event = fmt.parse(line)
        if event is not None:
            events.append(event)
    return events


def parse_file(path: Path) -> list[LogEvent]:
    return parse_all(HfStdoutFormat(), path.read_bytes().split(b"\n"))


def sig4(value: float) -> float:
    """What transformers 5.x / ms-swift print: the value to 4 significant digits."""
    return float(f"{value:.4g}")


def history(name: str) -> list[dict[str, float]]:
    return json.loads((HF / name / "trainer_state.json").read_bytes())["log_history"]


# -- stdout on the real fixtures ---------------------------------------------------------------


def test_hf_stdout_evals_come_at_their_eval_steps_with_readme_values() -> None:
    evals = [e for e in parse_file(HF / "hf_stdout.log") if "eval_loss" in e.metrics]
    assert [e.step for e in evals] == [step for step, _ in HF_README_EVALS]
    for event, (_, loss) in zip(evals, HF_README_EVALS, strict=True):
        assert event.metrics["eval_loss"] == pytest.approx(loss, abs=5e-4)
    # Exactly what was printed: the trainer_state value to 4 significant digits.
    exact = [e["eval_loss"] for e in history("checkpoint-200") if "eval_loss" in e]
    assert [e.metrics["eval_loss"] for e in evals] == [sig4(v) for v in exact]
    assert evals[0].metrics == {
        "eval_loss": 3.198,
        "eval_runtime": 0.0181,
        "eval_samples_per_second": 14150.0,  # printed as the string '1.415e+04'
        "eval_steps_per_second": 221.1,
        "epoch": 0.1562,
    }


def test_hf_stdout_every_dict_gets_the_step_trainer_state_logged_it_at() -> None:
    # The bar drawn before a training-log dict lags on fast steps (0/200 before the step-5 dict);
    # the one redrawn after it does not. trainer_state.json is the truth for each step.
    events = parse_file(HF / "hf_stdout.log")
    truth = history("checkpoint-200")
    assert len(events) == len(truth) + 1  # + the final train_runtime summary
    assert [e.step for e in events[:-1]] == [entry["step"] for entry in truth]
    for event, entry in zip(events[:-1], truth, strict=True):
        key = "loss" if "loss" in entry else "eval_loss"
        assert event.metrics[key] == sig4(entry[key])
    assert events[-1] == LogEvent(
        200,
        {
            "train_runtime": 1.574,
            "train_samples_per_second": 2033.0,
            "train_steps_per_second": 127.1,
            "train_loss": 2.253,
            "epoch": 1.562,
        },
    )


def test_hf_stdout_followed_live_in_odd_chunks(tmp_path: Path) -> None:
    data = (HF / "hf_stdout.log").read_bytes()
    log = tmp_path / "stdout.log"
    log.write_bytes(b"")
    source = LineSource(log, HfStdoutFormat())
    events: list[LogEvent] = []
    with log.open("ab") as out:
        for start in range(0, len(data), 997):  # cuts lines, bars and dicts anywhere
            out.write(data[start : start + 997])
            out.flush()
            events += source.read_events()
    events += source.read_events()
    assert events == parse_file(HF / "hf_stdout.log")
    assert source.malformed.counts == {}


@pytest.mark.parametrize(("run", "best_step", "best_loss"), [("runA", 1200, 0.1996), ("runC", 600, 0.8652)])
def test_ms_swift_stdout_matches_its_logging_jsonl(run: str, best_step: int, best_loss: float) -> None:
    events = parse_file(MS_SWIFT / f"{run}_stdout.log")
    jsonl_name = {"runA": "runA_loadbest_logging.jsonl", "runC": "runC_oodval_logging.jsonl"}[run]
    jsonl = JsonlFormat()
    logged = [jsonl.parse(line) for line in (MS_SWIFT / jsonl_name).read_bytes().splitlines()]
    logged_events = [e for e in logged if e is not None]
    # The same logs in the same order at the same steps, values rounded to 4 significant digits.
    assert [e.step for e in events] == [e.step for e in logged_events]
    for printed, exact in zip(events, logged_events, strict=True):
        assert printed.metrics.keys() == exact.metrics.keys() - {"total_flos"}  # not printed
        for key, value in printed.metrics.items():
            assert value == sig4(exact.metrics[key]), (printed.step, key)
    evals = [e for e in events if "eval_loss" in e.metrics]
    assert [e.step for e in evals] == list(range(50, 1201, 50))
    best = min(evals, key=lambda e: e.metrics["eval_loss"])
    assert (best.step, best.metrics["eval_loss"]) == (best_step, best_loss)
    assert events[-1].metrics["train_loss"] == 0.4175  # the summary dict is a normal event


# -- stdout, hand-made -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dict_text", "metrics"),
    [
        ("{'eval_loss': '3.198', 'epoch': '0.1562'}", {"eval_loss": 3.198, "epoch": 0.1562}),
        ("{'eval_loss': 3.1975715, 'epoch': 0.16}", {"eval_loss": 3.1975715, "epoch": 0.16}),  # 4.x
        ("{'eval_loss': '1.415e+04'}", {"eval_loss": 14150.0}),
        ("{'loss': 2, 'total_flos': 10**3}", None),  # an expression, not a literal: counted
        ("{'a': '0s', 'b': True, 'c': None, 'd': [1.0], 'e': {'f': 1.0}, 'g': 'x', 'h': 1}", {"h": 1.0}),
    ],
)
def test_dict_values(dict_text: str, metrics: dict[str, float] | None) -> None:
    fmt = HfStdoutFormat()
    if metrics is None:
        with pytest.raises(MalformedLine) as caught:
            fmt.parse((BAR_20 + CLEAR + dict_text).encode())
        assert caught.value.kind == "dict"
        return
    assert fmt.parse((BAR_20 + CLEAR + dict_text).encode()) is None  # waits for the redraw
    assert fmt.parse(BAR_20.encode()) == LogEvent(20, metrics)


@pytest.mark.parametrize(
    "text", ["{'eval_loss': nan, 'x': inf, 'y': -inf}", "{'eval_loss': 'nan', 'x': 'inf', 'y': '-inf'}"]
)
def test_nan_and_inf_bare_or_as_strings(text: str) -> None:
    fmt = HfStdoutFormat()
    fmt.parse(text.encode())
    event = fmt.parse(BAR_20.encode())
    assert event is not None and event.step == 20
    assert math.isnan(event.metrics["eval_loss"])
    assert (event.metrics["x"], event.metrics["y"]) == (math.inf, -math.inf)


def test_real_eval_block_with_nested_bar_and_escape_codes() -> None:
    # The bytes transformers 5.19 wrote around the step-20 eval (hf_stdout.log, abridged), the evaluation
    # bar drawn one line lower and followed by ESC[A.
    lines = [
        BAR_20,
        "\r  0%|          | 0/4 [00:00<?, ?it/s]\x1b[A" + CLEAR,
        "\r                                     \r\x1b[A{'eval_loss': '3.198', 'epoch': '0.1562'}",
        BAR_20,
        "\r100%|██████████| 4/4 [00:00<00:00, 327.85it/s]\x1b[A",
        "\r                                              \x1b[A\r 12%|█▏        | 23/200 [00:00<00:01]",
    ]
    events = parse_all(HfStdoutFormat(), [line.encode() for line in lines])
    assert events == [LogEvent(20, {"eval_loss": 3.198, "epoch": 0.1562})]


def test_nested_bar_drawn_first_is_passed_over() -> None:
    # tqdm redraws its bars in no fixed order: the evaluation bar (4/4) may come first.
    fmt = HfStdoutFormat()
    assert fmt.parse(b"\x1b[A{'eval_loss': '2.5'}") is None
    assert fmt.parse(b"") is None
    redraw = f"\r100%|##########| 4/4 [00:00<00:00]\x1b[A{BAR_20}"
    assert fmt.parse(redraw.encode()) == LogEvent(20, {"eval_loss": 2.5})


def test_dict_resolved_by_the_bar_after_it_not_before() -> None:
    fmt = HfStdoutFormat()
    # The bar drawn last before the dict says 20, but tqdm's redraw after it says 25.
    assert fmt.parse(f"{BAR_20}{CLEAR}{{'loss': '1.5'}}".encode()) is None
    assert fmt.parse(f"{BAR_25}{CLEAR}{{'loss': '1.4'}}".encode()) == LogEvent(25, {"loss": 1.5})
    assert fmt.parse("\r 15%|█▌        | 30/200 [00:01<00:01]".encode()) == LogEvent(30, {"loss": 1.4})


def test_a_dict_with_no_bar_after_it_is_counted_never_guessed() -> None:
    fmt = HfStdoutFormat()
    assert fmt.parse(b"{'eval_loss': '3.1'}") is None  # no bar yet: it waits
    with pytest.raises(MalformedLine) as caught:
        fmt.parse(b"{'eval_loss': '3.0'}")  # another dict before any bar: the first has no step
    assert caught.value.kind == "no-step"
    # The second came right after the first (a burst: stdout buffered), so the bar says nothing of it.
    with pytest.raises(MalformedLine) as caught:
        fmt.parse(BAR_20.encode())
    assert caught.value.kind == "no-step"
    assert fmt.parse(b"{'eval_loss': '2.9'}") is None
    assert fmt.parse(BAR_25.encode()) == LogEvent(25, {"eval_loss": 2.9})


def test_no_step_is_counted_once_per_kind_through_a_source(tmp_path: Path) -> None:
    log = tmp_path / "stdout.log"
    log.write_bytes(b"{'loss': 1.0}\n{'loss': 2.0}\n{'loss': 3.0}\n" + BAR_20.encode() + b"\n")
    source = LineSource(log, HfStdoutFormat())
    assert source.read_events() == []
    assert source.malformed.counts == {"no-step": 3}


@pytest.mark.parametrize(
    ("dict_text", "step", "metrics"),
    [
        (
            "{'eval_loss': '0.578', 'global_step/max_steps': '100/1200', 'elapsed_time': '2s'}",
            100,
            {"eval_loss": 0.578},
        ),
        ("{'step': 7, 'eval_loss': 0.5}", 7, {"eval_loss": 0.5}),
        ("{'global_step': '9', 'eval_loss': 0.5}", 9, {"eval_loss": 0.5}),
    ],
)
def test_a_step_in_the_dict_wins_over_the_bar_and_needs_no_wait(
    dict_text: str, step: int, metrics: dict[str, float]
) -> None:
    fmt = HfStdoutFormat()
    assert fmt.parse(f"{BAR_20}{CLEAR}{dict_text}".encode()) == LogEvent(step, metrics)
    assert fmt.parse(BAR_25.encode()) is None


@pytest.mark.parametrize(
    "line",
    [
        "[INFO:swift] model_info: ModelInfo(rope_scaling={'rope_theta': 10000.0})",
        "accelerator_config={'dispatch_batches': False},",
        "{'dispatch_batches': False, 'name': 'x'}",  # a dict with no number in it
        "{}",
        '  "rope_parameters": {',
        "\r 12%|█▎        | 25/200 [00:00<00:01, 112.83it/s][transformers] a warning after the bar",
    ],
)
def test_lines_with_nothing_to_judge(line: str) -> None:
    fmt = HfStdoutFormat()
    assert fmt.parse(line.encode()) is None
    assert fmt.parse(BAR_20.encode()) is None  # nothing was left waiting


@pytest.mark.parametrize(
    ("text", "kind"), [("{1, 2}", "dict"), ("{'loss': tensor(0.5)}", "dict"), ("{'a': }", "dict")]
)
def test_unreadable_dicts_are_counted(text: str, kind: str) -> None:
    with pytest.raises(MalformedLine) as caught:
        HfStdoutFormat().parse(text.encode())
    assert caught.value.kind == kind


def test_invalid_utf8_does_not_hide_a_dict() -> None:
    fmt = HfStdoutFormat()
    assert fmt.parse(b"warning: caf\xe9\r{'eval_loss': '1.5'}") is None
    assert fmt.parse(BAR_20.encode()) == LogEvent(20, {"eval_loss": 1.5})


def test_two_events_completed_on_one_line_are_both_returned() -> None:
    fmt = HfStdoutFormat()
    fmt.parse(b"{'loss': 1.0}")
    # The bar completes the waiting dict, and this line's own dict carries its step.
    line = f"{BAR_20}{CLEAR}{{'step': 21, 'eval_loss': 0.5}}".encode()
    assert fmt.parse(line) == LogEvent(20, {"loss": 1.0})
    assert fmt.parse(b"") == LogEvent(21, {"eval_loss": 0.5})
    assert fmt.parse(b"") is None


# -- trainer_state.json ------------------------------------------------------------------------


def write_in_place(path: Path, data: bytes) -> None:
    """Like the Trainer: truncate and write the same file (same inode)."""
    with path.open("r+b" if path.exists() else "wb") as out:
        out.truncate(0)
        out.write(data)


def test_state_rewritten_at_each_save_returns_each_entry_once(tmp_path: Path) -> None:
    state = tmp_path / "trainer_state.json"
    source = HfStateSource(state)
    assert (source.name, source.watch_path, source.watch_children) == ("hf-state", state, False)
    assert source.read_events() == [] and source.cursor() is None  # not written yet

    write_in_place(state, (HF / "checkpoint-100" / "trainer_state.json").read_bytes())
    inode = state.stat().st_ino
    first = source.read_events()
    assert len(first) == 25 and first[-1].step == 100
    assert source.cursor() == {"kind": "hf-state", "step": 100}
    assert source.read_events() == []  # unchanged

    write_in_place(state, (HF / "checkpoint-200" / "trainer_state.json").read_bytes())
    assert state.stat().st_ino == inode
    second = source.read_events()
    assert len(second) == 25 and min(e.step for e in second) == 105
    evals = [(e.step, e.metrics["eval_loss"]) for e in first + second if "eval_loss" in e.metrics]
    assert [step for step, _ in evals] == [step for step, _ in HF_README_EVALS]
    for (_, loss), (_, readme) in zip(evals, HF_README_EVALS, strict=True):
        assert loss == pytest.approx(readme, abs=5e-5)
    assert evals[-1][1] == 1.7705039978027344  # exact, as README.txt gives it
    assert second[-1].metrics == {
        "epoch": 1.5625,
        "eval_loss": 1.7705039978027344,
        "eval_runtime": 0.0179,
        "eval_samples_per_second": 14321.331,
        "eval_steps_per_second": 223.771,
    }
    assert source.malformed.counts == {}


def test_ms_swift_trainer_state_evals() -> None:
    source = HfStateSource(MS_SWIFT / "runA_checkpoint-1200_trainer_state.json")
    evals = [e for e in source.read_events() if "eval_loss" in e.metrics]
    assert [e.step for e in evals] == list(range(50, 1201, 50))
    best = min(evals, key=lambda e: e.metrics["eval_loss"])
    assert best.step == 1200 and best.metrics["eval_loss"] == pytest.approx(0.19957939, abs=1e-8)


def test_half_written_state_is_counted_then_read_when_finished(tmp_path: Path) -> None:
    state = tmp_path / "trainer_state.json"
    data = (HF / "checkpoint-100" / "trainer_state.json").read_bytes()
    source = HfStateSource(state)
    write_in_place(state, b"")  # truncated, not written yet: nothing, and nothing wrong
    assert source.read_events() == [] and source.malformed.counts == {}
    write_in_place(state, data[: len(data) // 2])
    assert source.read_events() == []
    assert source.malformed.counts == {"json": 1}
    assert source.read_events() == [] and source.malformed.counts == {"json": 1}  # not re-counted
    write_in_place(state, data)
    assert len(source.read_events()) == 25


@pytest.mark.parametrize(
    "content", [b"[1, 2]", b'{"global_step": 5}', b'{"log_history": {"step": 5}}', b"\xff{}", b"[" * 100000]
)
def test_not_a_trainer_state(tmp_path: Path, content: bytes) -> None:
    state = tmp_path / "trainer_state.json"
    state.write_bytes(content)
    source = HfStateSource(state)
    assert source.read_events() == []
    assert source.malformed.counts == {"json": 1}


def test_summary_entry_and_entries_without_step(tmp_path: Path) -> None:
    state = tmp_path / "trainer_state.json"
    log_history = [
        {"loss": 2.0, "step": 10},
        {"eval_loss": 1.5, "step": 10},
        {"note": "no step"},
        {"step": "x", "loss": 9.0},
        "not an entry",
        {"train_runtime": 1.574, "train_loss": 2.253, "total_flos": 7824998400.0, "step": 20},
    ]
    state.write_text(json.dumps({"global_step": 20, "log_history": log_history}))
    assert HfStateSource(state).read_events() == [
        LogEvent(10, {"loss": 2.0}),
        LogEvent(10, {"eval_loss": 1.5}),
        LogEvent(20, {"train_runtime": 1.574, "train_loss": 2.253, "total_flos": 7824998400.0}),
    ]


@pytest.mark.parametrize(
    ("cursor", "first_step"),
    [
        ({"kind": "hf-state", "step": 60}, 65),
        ({"kind": "line", "inode": 1, "offset": 0, "head": ""}, 5),  # another source's cursor
        ({"kind": "hf-state", "step": -1}, 5),
        (None, 5),
    ],
)
def test_resume_from_cursor(cursor: dict[str, object] | None, first_step: int) -> None:
    source = HfStateSource(HF / "checkpoint-100" / "trainer_state.json", cursor)
    assert source.read_events()[0].step == first_step
    assert source.cursor() == {"kind": "hf-state", "step": 100}


def test_resumed_cursor_is_kept_until_something_newer() -> None:
    source = HfStateSource(HF / "checkpoint-100" / "trainer_state.json", {"kind": "hf-state", "step": 100})
    assert source.read_events() == []
    assert source.cursor() == {"kind": "hf-state", "step": 100}
    source.close()


def test_replaced_by_rename_is_read_again(tmp_path: Path) -> None:
    state = tmp_path / "trainer_state.json"
    state.write_bytes((HF / "checkpoint-100" / "trainer_state.json").read_bytes())
    source = HfStateSource(state)
    assert len(source.read_events()) == 25
    new = tmp_path / "new.json"
    new.write_bytes((HF / "checkpoint-200" / "trainer_state.json").read_bytes())
    os.replace(new, state)
    assert [e.step for e in source.read_events()][:2] == [105, 110]
