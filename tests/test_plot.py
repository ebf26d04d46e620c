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


# -- what a hostile run directory cannot do -------------------------------------------------------

_EVIL = "ev\x1b]0;pwned\x07al\x1b[2J\nFORGED line"


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``ckptd plot`` in this process (faster than a subprocess): status, stdout, stderr."""
    from ckptd import cli

    status = cli.main(["plot", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def _jsonl_run(run: Path, metric: str, points: list[tuple[int, float]], every: int = 200) -> Path:
    run.mkdir(parents=True)
    with (run / "logging.jsonl").open("w") as log:
        for step, value in points:
            log.write(json.dumps({"step": step, metric: value}) + "\n")
    (run / "ckptd.toml").write_text(f"[run]\nmetric = {json.dumps(metric)}\nevery_steps = {every}\n")
    return run


def _assert_clean(text: str) -> None:
    assert "\x1b" not in text and "\x07" not in text
    assert not any(line.startswith("FORGED") for line in text.splitlines())


def test_escapes_in_names_and_paths_never_reach_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _jsonl_run(tmp_path / "run\x1b[31m", _EVIL, [(10, 1.0), (20, 0.5), (30, 0.7)])
    _commit(Store(run / "checkpoints"), 20, ["best:" + _EVIL, "\x1b[5mtag"], {_EVIL: 0.5})
    status, out, err = _main(capsys, str(run), "--width", "60")
    assert status == 0, err
    _assert_clean(out + err)
    assert "ev\\x1b]0;pwned\\x07al\\x1b[2J\\x0aFORGED line" in out.replace("\n", "")
    assert all(len(line) <= 60 for line in out.splitlines())
    # status.json's criteria, a missing --metric and a gone log: the messages are escaped too
    (run / ".ckptd").mkdir()
    (run / ".ckptd" / "status.json").write_text(json.dumps({"criteria": [{"metric": "s\x1b[1m\nFORGED"}]}))
    (run / "logging.jsonl").unlink()
    status, out, err = _main(capsys, str(run), "--width", "60")
    _assert_clean(out + err)
    status, out, err = _main(capsys, str(run), "--metric", "m\x1b[2J\nFORGED")
    assert status == 1
    _assert_clean(out + err)


def test_criteria_from_manifests_are_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    store = Store(run / "checkpoints")
    with store.writing(5) as pending:
        pending.add_file("w.bin", b"w")
        store.commit(pending, {"tags": [], "metrics": {_EVIL: 1.0}, "criteria": {_EVIL: "min"}})
    status, out, err = _main(capsys, str(run), "--width", "50")
    assert status == 0, err
    _assert_clean(out + err)


def test_png_text_is_printable_and_never_mathtext(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (ckptd[plot]) is not installed")
    assert plot._plain_text("a$b$\x1b") == r"a\$b\$\x1b"
    for metric in (r"loss$\frac{$", "$x^2$", "a$b"):  # a bad formula raised, a good one drew maths
        panel = plot.Panel(metric, "min", ((1, 1.0), (2, 0.5)))
        data = plot.PlotData(tmp_path, "log", "log", "jsonl", None, (panel,))
        plot.write_png(data, tmp_path / "m.png", (300, 200))


def test_a_bogus_huge_step_costs_no_list_of_saves(tmp_path: Path) -> None:
    panel = plot.Panel("eval_loss", "min", ((10, 1.0), (10**18, 0.5)), every_steps=200)
    assert panel.save_count() == (10**18 - 200) // 200 + 1
    assert panel.would_save()[:2] == [200, 400] and len(panel.would_save()) == plot.MAX_LISTED_SAVES
    lane = next(line for line in plot.render_text(panel, WIDTH) if line.lstrip().startswith("saves"))
    assert lane.count(plot.WOULD_SAVE) == WIDTH - lane.index(plot.WOULD_SAVE)  # every column
    document = plot.to_json(plot.PlotData(tmp_path, "log", "x", "jsonl", 200, (panel,)))
    (shown,) = document["panels"]
    assert shown["save_steps"] == 200 and shown["would_save_count"] == panel.save_count()
    assert len(shown["would_save"]) == plot.MAX_LISTED_SAVES


def test_save_columns_match_placing_every_save(tmp_path: Path) -> None:
    import random

    chance = random.Random(7)
    for _ in range(300):
        lo = chance.randint(-50, 500)
        hi = lo + chance.randint(0, 5000)
        every = chance.randint(1, 700)
        panel = plot.Panel("m", "min", ((lo, 1.0), (hi, 2.0)), every_steps=every)
        axes = plot._axes(panel, chance.randint(3, 60), plot.PLOT_ROWS)
        first = -(-max(lo, 1) // every) * every
        expected = {axes.column(step) for step in range(first, hi + 1, every)}
        assert plot._save_columns(panel, axes) == expected
        assert panel.save_count() == len(range(first, hi + 1, every))


def test_a_long_series_is_thinned_to_its_columns_and_keeps_its_spikes() -> None:
    series = tuple(
        (step, 1.0 + (step % 7) / 100 + (50.0 if step == 123_457 else 0.0)) for step in range(1, 200_001)
    )
    panel = plot.Panel("eval_loss", "min", series)
    axes = plot._axes(panel, 60, plot.PLOT_ROWS)
    thin = plot._thin(series, axes.dot_x)
    assert len(thin) <= 4 * 2 * axes.cols
    assert (123_457, series[123_456][1]) in thin and thin[0] == series[0] and thin[-1] == series[-1]
    lines = plot.render_text(panel, WIDTH)
    origin = next(line.index("└") for line in lines if "└" in line) + 1
    spike = round((123_457 - 1) / (200_000 - 1) * (2 * (WIDTH - origin) - 1)) // 2
    assert lines[1][origin + spike] != " "  # the top row: only the spike reaches it


def test_thinning_draws_what_every_point_would() -> None:
    import random

    chance = random.Random(3)
    for _ in range(50):
        steps = sorted(chance.sample(range(1, 5000), chance.randint(1, 400)))
        series = tuple((s, chance.gauss(0, 1)) for s in steps)
        axes = plot._axes(plot.Panel("m", "min", series), chance.randint(5, 40), plot.PLOT_ROWS)
        dots = [[0] * axes.cols for _ in range(axes.rows)]
        points = [(axes.dot_x(s), axes.dot_y(v)) for s, v in series]
        for (x0, y0), (x1, y1) in zip(points, points[1:] or points, strict=False):
            for x, y in plot._segment(x0, y0, x1, y1):
                dots[y // 4][x // 2] |= plot._DOT_BITS[y % 4][x % 2]
        every_point = [[chr(0x2800 + bits) if bits else " " for bits in row] for row in dots]
        assert plot._braille(series, axes) == every_point


def test_panels_are_capped_and_the_rest_named_in_a_note(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / ".ckptd").mkdir(parents=True)
    criteria = [{"metric": f"m{i}", "mode": "min"} for i in range(2000)]
    (run / ".ckptd" / "status.json").write_text(json.dumps({"criteria": criteria}))
    with (run / "logging.jsonl").open("w") as log:
        log.write(json.dumps({"step": 1, **{f"m{i}": 1.0 for i in range(2000)}}) + "\n")
    data = plot.load_plot(run, Store(run / "checkpoints"))
    assert [p.metric for p in data.panels] == [f"m{i}" for i in range(plot.MAX_PANELS)]
    (note,) = [n for n in data.notes if "left out" in n]
    assert "2000 criteria" in note and f"{2000 - plot.MAX_PANELS} left out" in note and "more" in note
    assert len(note) < 400
    assert [p.metric for p in plot.load_plot(run, Store(run / "checkpoints"), metric="m1999").panels] == [
        "m1999"
    ]


@pytest.mark.parametrize("values", [(1e308, -1e308), (1.7e308, 1.7e308), (-1.7e308, 5.0), (0.0, 5e-324)])
def test_values_near_the_float_limits_draw(tmp_path: Path, values: tuple[float, float]) -> None:
    panel = plot.Panel("m", "min", ((1, values[0]), (2, values[1]), (3, 0.0)))
    lines = plot.render_text(panel, WIDTH)
    assert not any("nan" in line or "inf" in line for line in lines)
    if values == (1e308, -1e308):
        assert [line.split("┤")[0].strip() for line in lines if "┤" in line] == ["1e+308", "0", "-1e+308"]
    if _has_matplotlib():
        plot.write_png(
            plot.PlotData(tmp_path, "log", "x", "jsonl", None, (panel,)), tmp_path / "v.png", (300, 200)
        )


def _shim(tmp_path: Path, error: str) -> dict[str, str]:
    """An environment whose ``import matplotlib`` raises ``error``, as a broken install would."""
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(f"raise {error}('libfreetype.so.6: cannot open shared object file')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("error", ["ImportError", "ModuleNotFoundError"])
def test_broken_matplotlib_is_exit_2_with_the_hint(tmp_path: Path, error: str) -> None:
    run = _swift_run(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "ckptd", "plot", str(run), "--png", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        timeout=60,
        env=_shim(tmp_path, error),
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'ckptd[plot]'" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("size", ["1²x400", "100x200\n", "100x", "x100", "99x100", "100x10001", "١٠٠x200"])
def test_png_size_is_strict(tmp_path: Path, capsys: pytest.CaptureFixture[str], size: str) -> None:
    run = _swift_run(tmp_path)
    status, _, err = _main(capsys, str(run), "--png", str(tmp_path / "p.png"), "--png-size", size)
    assert status == 2 and "--png-size" in err
    assert not (tmp_path / "p.png").exists()


def test_png_size_takes_either_x() -> None:
    from ckptd import cli

    assert cli._png_size("100X200") == (100, 200) and cli._png_size("300x400") == (300, 400)


def test_non_finite_values_are_strings_in_json_and_not_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _swift_run(tmp_path)
    (run / "logging.jsonl").unlink()
    _commit(Store(run / "checkpoints"), 1300, ["periodic"], {"eval_loss": float("nan")})
    _commit(Store(run / "checkpoints"), 1400, ["periodic"], {"eval_loss": float("-inf")})
    status, out, err = _main(capsys, str(run), "--json")
    assert status == 0, err
    document = json.loads(out, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
    values = {c["step"]: c["value"] for c in document["panels"][0]["checkpoints"]}
    assert values[1300] == "nan" and values[1400] == "-inf"
    lone = plot.Panel("m", "min", (), (plot.Checkpoint("c", 5, float("nan"), "kept"),))
    assert json.loads(
        json.dumps(plot.to_json(plot.PlotData(tmp_path, "x", None, None, None, (lone,))), allow_nan=False)
    )
    assert not any("nan" in line for line in plot.render_text(lone, WIDTH))
    status, out, _ = _main(capsys, str(run), "--width", "80")
    assert status == 0 and "nan" not in out and "inf" not in out


def test_json_ignores_width_and_a_narrow_terminal_is_clamped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _swift_run(tmp_path)
    monkeypatch.setenv("COLUMNS", "10")
    assert _main(capsys, str(run), "--json")[0] == 0
    assert _main(capsys, str(run), "--json", "--width", "5")[0] == 0
    status, out, _ = _main(capsys, str(run))
    assert status == 0 and max(len(line) for line in out.splitlines()) == plot.MIN_WIDTH
    status, _, err = _main(capsys, str(run), "--width", "10")
    assert status == 2 and "--width" in err
    assert _main(capsys, str(run), "--width", "0")[0] == 2  # 0 is no "not given"


def test_a_metric_with_no_value_anywhere_is_exit_1_naming_those_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _swift_run(tmp_path)
    status, out, err = _main(capsys, str(run), "--metric", "nosuch")
    assert status == 1 and out == ""
    assert "no value of nosuch" in err and "eval_loss" in err and "grad_norm" in err


def test_nothing_to_plot_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _main(capsys, str(tmp_path), "--width", "80")
    assert status == 1 and "nothing to plot" in err and "logging.jsonl does not exist" in err


def test_notes_wrap_instead_of_being_cut(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 70) / ("e" * 70)
    deep.mkdir(parents=True)
    _commit(Store(deep / "checkpoints"), 5, [], {"eval_loss": 1.0})
    lines = plot.render_all(plot.load_plot(deep, Store(deep / "checkpoints")), 40)
    assert all(len(line) <= 40 for line in lines) and not any("…" in line for line in lines)
    # Wherever the wrap falls (the path's length depends on the temp dir), the words are all there.
    assert "logging.jsonldoesnotexist" in "".join(line.strip() for line in lines).replace(" ", "")


def test_png_replaces_a_link_and_never_writes_through_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (ckptd[plot]) is not installed")
    run = _swift_run(tmp_path)
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "plot.png"
    link.symlink_to(target)
    status, _, err = _main(capsys, str(run), "--png", str(link), "--png-size", "200x100")
    assert status == 0, err
    assert target.read_text() == "keep me" and not link.is_symlink()
    assert link.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    assert _main(capsys, str(run), "--png", str(tmp_path / "UPPER.PNG"), "--png-size", "200x100")[0] == 0


@pytest.mark.parametrize(
    "argv", [["--png", ""], ["--png", "out.jpg"], ["--png", "out"], ["--png", "nodir/x.png"]]
)
def test_bad_png_names_are_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    run = _swift_run(tmp_path)
    status, _, err = _main(capsys, str(run), *[a if a in ("", "--png") else str(tmp_path / a) for a in argv])
    assert status == 2 and "--png" in err


def test_an_empty_run_dir_argument_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _main(capsys, "")
    assert status == 2 and "RUN_DIR" in err


def test_one_eval_and_lines_that_fit(tmp_path: Path) -> None:
    panel = plot.Panel("x" * 100, "min", ((600, 1.0),), every_steps=10**40)
    lines = plot.render_text(panel, plot.MIN_WIDTH)
    assert all(len(line) <= plot.MIN_WIDTH for line in lines)
    assert "(min), 1 eval;" in lines[1]
    coloured = plot.render_text(panel, plot.MIN_WIDTH, colour=True)
    assert all(plot._visible(line) <= plot.MIN_WIDTH for line in coloured)


def test_png_legend_names_each_kind_once() -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (ckptd[plot]) is not installed")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    kinds: tuple[plot.Kind, ...] = ("best", "periodic", "kept")
    marks = tuple(plot.Checkpoint(k, step, 1.0, k) for step, k in enumerate(kinds, 1))
    fig, ax = plt.subplots()
    try:
        plot._draw_panel(ax, plot.Panel("m", "min", ((1, 1.0), (3, 2.0)), marks), 300)
        labels = [text.get_text() for text in ax.get_legend().get_texts()]
    finally:
        plt.close(fig)
    assert labels[:3] == ["kept best", "kept periodic", "kept other"]
