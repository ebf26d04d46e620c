"""``ckptd plot``: the terminal picture of real fixture logs against golden text, the markers'
columns, the PNG's size, and the command's JSON and exit codes.

The goldens live in tests/fixtures/plot/. After a deliberate change to the drawing, regenerate
them with ``CKPTD_REGEN_GOLDENS=1 .venv/bin/python -m pytest tests/test_plot.py`` and read the
diff by eye before keeping it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ckptd import plot
from ckptd.store import Store

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "plot"
WIDTH = 80
REGEN = os.environ.get("CKPTD_REGEN_GOLDENS") == "1"


def _commit(store: Store, step: int, tags: list[str], metrics: dict[str, float]) -> None:
    with store.writing(step) as pending:
        pending.add_file("weights.bin", b"w" * 16)
        store.commit(pending, {"tags": tags, "metrics": metrics, "reason": "test"})


def _swift_run(tmp_path: Path) -> Path:
    """ms-swift's logging.jsonl; best eval at 600, saves every 200, kept: best, last 2, a manual."""
    run = tmp_path / "swift"
    run.mkdir()
    shutil.copy(FIXTURES / "ms-swift" / "runC_oodval_logging.jsonl", run / "logging.jsonl")
    (run / "ckptd.toml").write_text('[run]\nmetric = "eval_loss"\nevery_steps = 200\n')
    store = Store(run / "checkpoints")
    _commit(store, 600, ["best:eval_loss", "periodic"], {"eval_loss": 0.8652485})
    _commit(store, 950, ["manual"], {"eval_loss": 0.93663037})
    _commit(store, 1000, ["periodic"], {"eval_loss": 1.0022223})
    _commit(store, 1200, ["periodic"], {"eval_loss": 0.97229719})
    return run


def _lightning_run(tmp_path: Path) -> Path:
    """Lightning's metrics.csv, two criteria; the best (step 299) is no multiple of the 100 saves."""
    run = tmp_path / "lightning"
    shutil.copytree(FIXTURES / "lightning" / "lightning_logs", run / "lightning_logs")
    (run / "ckptd.toml").write_text(
        '[run]\nlog = "lightning_logs"\nmetric = "val_loss"\nbest = ["val_acc:max"]\nevery_steps = 100\n'
    )
    store = Store(run / "checkpoints")
    _commit(store, 100, ["periodic"], {})
    _commit(store, 200, ["periodic"], {})
    _commit(store, 299, ["best:val_loss", "best:val_acc"], {"val_loss": 0.6223934, "val_acc": 0.84765625})
    return run


def _check_golden(name: str, lines: list[str]) -> None:
    path = GOLDEN / name
    text = "\n".join(lines) + "\n"
    if REGEN:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{name} changed; see the module docstring"


def test_swift_plot_matches_golden(tmp_path: Path) -> None:
    run = _swift_run(tmp_path)
    data = plot.load_plot(run, Store(run / "checkpoints"))
    assert data.source == "log" and data.log_format == "jsonl" and data.every_steps == 200
    (panel,) = data.panels
    lines = plot.render_text(panel, WIDTH)
    assert all(len(line) <= WIDTH for line in lines)
    _check_golden("swift_runC_eval_loss.txt", lines)


def test_lightning_plot_has_one_panel_per_criterion_and_matches_golden(tmp_path: Path) -> None:
    run = _lightning_run(tmp_path)
    data = plot.load_plot(run, Store(run / "checkpoints"))
    assert [(p.metric, p.mode) for p in data.panels] == [("val_loss", "min"), ("val_acc", "max")]
    for panel in data.panels:
        lines = plot.render_text(panel, WIDTH)
        assert all(len(line) <= WIDTH for line in lines)
        _check_golden(f"lightning_{panel.metric}.txt", lines)
    assert [p.metric for p in plot.load_plot(run, Store(run / "checkpoints"), metric="val_acc").panels] == [
        "val_acc"
    ]


@pytest.mark.parametrize("maker", [_swift_run, _lightning_run])
def test_best_markers_sit_in_the_best_steps_column(tmp_path: Path, maker: object) -> None:
    run = maker(tmp_path)  # type: ignore[operator]
    panel = plot.load_plot(run, Store(run / "checkpoints")).panels[0]
    lines = plot.render_text(panel, WIDTH)
    origin = next(line.index("└") for line in lines if "└" in line) + 1
    cols = WIDTH - origin
    steps = panel.steps()
    best_step = panel.best_eval[0]  # type: ignore[index]
    expected = origin + round((best_step - min(steps)) / (max(steps) - min(steps)) * (2 * cols - 1)) // 2
    (star,) = [line.index(plot.BEST_EVAL) for line in lines[1 : 1 + plot.PLOT_ROWS] if plot.BEST_EVAL in line]
    kept = next(line for line in lines if line.lstrip().startswith("kept"))
    assert star == expected
    assert kept.index(plot.KEPT_BEST) == expected  # the best checkpoint is the best eval's step


def test_manifests_stand_in_when_the_log_is_gone(tmp_path: Path) -> None:
    run = _swift_run(tmp_path)
    (run / "logging.jsonl").unlink()
    data = plot.load_plot(run, Store(run / "checkpoints"))
    assert data.source == "manifests"
    assert [s for s, _ in data.panels[0].series] == [600, 950, 1000, 1200]
    assert data.panels[0].best_eval == (600, 0.8652485)


def test_colour_only_when_asked(tmp_path: Path) -> None:
    run = _lightning_run(tmp_path)
    panel = plot.load_plot(run, Store(run / "checkpoints")).panels[0]
    assert "\x1b[" not in "".join(plot.render_text(panel, WIDTH))
    assert "\x1b[1;33m★" in "".join(plot.render_text(panel, WIDTH, colour=True))


def test_png_has_the_size_asked(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (ckptd[plot]) is not installed")
    run = _lightning_run(tmp_path)
    out = tmp_path / "plot.png"
    plot.write_png(plot.load_plot(run, Store(run / "checkpoints")), out, (640, 480))
    head = out.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    assert struct.unpack(">II", head[16:24]) == (640, 480)


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptd", "plot", *argv], capture_output=True, text=True, timeout=60
    )


def test_cli_json_shape(tmp_path: Path) -> None:
    run = _swift_run(tmp_path)
    done = _cli(str(run), "--json", "--save-steps", "300")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["source"] == "log" and document["every_steps"] == 300
    (panel,) = document["panels"]
    assert panel["metric"] == "eval_loss" and panel["mode"] == "min"
    assert panel["series"][0] == [50, 2.16536617] and len(panel["series"]) == 24
    assert panel["best_eval"] == {"step": 600, "value": 0.8652485}
    assert [(c["step"], c["kind"]) for c in panel["checkpoints"]] == [
        (600, "best"),
        (950, "kept"),
        (1000, "periodic"),
        (1200, "periodic"),
    ]
    assert panel["would_save"] == [300, 600, 900, 1200]


def test_cli_terminal_text_and_png(tmp_path: Path) -> None:
    run = _lightning_run(tmp_path)
    png = tmp_path / "out.png"
    args = [str(run), "--width", "72", "--metric", "val_loss"]
    has_mpl = _has_matplotlib()
    done = _cli(*args, *(["--png", str(png), "--png-size", "300x200"] if has_mpl else []))
    assert done.returncode == 0, done.stderr
    assert "\x1b[" not in done.stdout  # not a terminal: no colour
    assert "val_loss (min)" in done.stdout and "step 299 is no multiple of 100" in done.stdout
    assert all(len(line) <= 72 for line in done.stdout.splitlines()[1:])
    if has_mpl:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def test_cli_empty_run_dir_is_nothing_to_plot(tmp_path: Path) -> None:
    done = _cli(str(tmp_path), "--width", "80")
    assert done.returncode == 1
    assert "nothing to plot" in done.stderr
    assert _cli(str(tmp_path / "missing")).returncode == 2


@pytest.mark.skipif(_has_matplotlib(), reason="matplotlib is installed: --png cannot fail for its absence")
def test_cli_png_without_matplotlib_exits_2(tmp_path: Path) -> None:
    run = _swift_run(tmp_path)
    done = _cli(str(run), "--png", str(tmp_path / "x.png"))
    assert done.returncode == 2 and "pip install 'ckptd[plot]'" in done.stderr


def test_every_steps_and_log_from_status_json(tmp_path: Path) -> None:
    """What the daemon recorded wins: its log, the format it detected, its schedule, its criteria."""
    run = tmp_path / "run"
    run.mkdir()
    log = tmp_path / "elsewhere.jsonl"
    shutil.copy(FIXTURES / "ms-swift" / "runC_oodval_logging.jsonl", log)
    (run / ".ckptd").mkdir()
    status = {
        "log": str(log),
        "log_format": "jsonl",
        "criteria": [{"metric": "eval_loss", "mode": "min", "keep": 1}],
        "policy": {"keep_last": 2, "keep_every": None, "every_steps": 250},
    }
    (run / ".ckptd" / "status.json").write_text(json.dumps(status))
    data = plot.load_plot(run, Store(run / "checkpoints"))
    assert data.log == str(log) and data.every_steps == 250
    assert data.panels[0].would_save() == [250, 500, 750, 1000]
