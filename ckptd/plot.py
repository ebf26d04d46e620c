"""``ckptd plot``: the watched metric over steps, with what was kept and what saving alone would keep.

Two halves. ``load_plot`` gathers (I/O): the log the daemon follows, found and read as
``ckptd run`` would (status.json's log and format, else the run's ``ckptd.toml`` and
``CKPTD_*`` settings, else auto-detection; the formats of ``ckptd.logs``), or the retained
checkpoints' manifests when the log is gone; the store's records and their tags; the capture
schedule (``every_steps``) from status.json, control.json or the settings. The rest is pure:
``render_text`` turns one ``Panel`` into lines of braille and box characters, ``to_json``
into a document for scripts, and ``write_png`` draws the panels with matplotlib (an optional
extra, imported lazily with the Agg backend).

The inputs are untrusted and may be huge, so the drawing is bounded by what is drawn, not by
what was read: ``PlotData`` keeps names and paths as found, and every one shown on a terminal
or in the PNG goes through ``ckptd.text.printable`` (an escape sequence in a metric name must
not reach the terminal); a series is thinned to its dot (or pixel) columns before drawing;
the saves "every S steps" are counted and placed by arithmetic, never listed in full (one
bogus step of 1e18 would make billions); at most ``MAX_PANELS`` criteria are drawn; value
scales are computed with halves so that values near ±1e308 cannot overflow.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import math
import os
import tempfile
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal

from ckptd import settings
from ckptd.errors import CkptdError, ConfigError
from ckptd.protocol import STATUS_MAX_BYTES, RunPaths, read_small_json, read_status
from ckptd.records import CheckpointRecord, Criterion, LogEvent, Mode
from ckptd.store import Store
from ckptd.text import printable

Kind = Literal["best", "periodic", "kept"]
PLOT_ROWS = 10
MIN_WIDTH = 30
MAX_WIDTH = 1000  # columns; wider would only build huge lines of blanks
MAX_PANELS = 12  # criteria drawn without --metric: thousands hung matplotlib and flood a terminal
MAX_LISTED_SAVES = 1000  # would-be save steps listed in JSON and drawn as lines in the PNG
_MAX_NAMED = 20  # metric names a note or message lists before "and N more"
_PNG_TEXT = 80  # characters of a metric name in the PNG's title and axis label
_PNG_BIG = 1e100  # beyond this the PNG's values are scaled: matplotlib's tick arithmetic overflows
_LANE_NAME = len("saves")  # the y-label margin holds at least the lanes' names
_MAX_READS = 1_000_000  # stretches of a log read; a guard, never reached by a real log
PNG_HINT = "--png needs matplotlib: pip install 'ckptd[plot]'"

# Marker glyphs and their ANSI colours (used only on a terminal).
BEST_EVAL, KEPT_BEST, KEPT_PERIODIC, KEPT_OTHER, WOULD_SAVE = "★", "◆", "●", "○", "┆"
_COLOURS = {BEST_EVAL: "1;33", KEPT_BEST: "1;32", KEPT_PERIODIC: "34", KEPT_OTHER: "36", WOULD_SAVE: "2"}
_GLYPH = {"best": KEPT_BEST, "periodic": KEPT_PERIODIC, "kept": KEPT_OTHER}
_PRIORITY = {"best": 0, "periodic": 1, "kept": 2}
_KIND_LABEL = {"best": "kept best", "periodic": "kept periodic", "kept": "kept other"}

Point = tuple[int, float]


@dataclass(frozen=True)
class Checkpoint:
    """A retained checkpoint as a marker: its step, the panel metric's value, what it was kept for."""

    name: str
    step: int
    value: float | None
    kind: Kind
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Panel:
    """One criterion: its series (step, value), sorted by step, and the markers on it."""

    metric: str
    mode: Mode
    series: tuple[Point, ...]
    checkpoints: tuple[Checkpoint, ...] = ()
    every_steps: int | None = None

    @functools.cached_property
    def best_eval(self) -> Point | None:
        """The best (step, value) of the series; the earliest on a tie, as the daemon judges.
        Cached: a long series is scanned once, not once per use."""
        finite = _finite_series(self.series)
        if not finite:
            return None
        pick = min if self.mode == "min" else max
        return pick(finite, key=itemgetter(1))

    @property
    def has_value(self) -> bool:
        """Whether the metric has a finite value anywhere: in the series or a checkpoint's metrics."""
        return bool(self.best_eval) or any(_finite(c.value) for c in self.checkpoints)

    def step_span(self) -> tuple[int, int] | None:
        """The first and last step plotted (series and checkpoints), or None when there is none."""
        ends = [self.series[0][0], self.series[-1][0]] if self.series else []
        ends += [c.step for c in self.checkpoints]
        return (min(ends), max(ends)) if ends else None

    def saves(self) -> tuple[int, int, int] | None:
        """Where a save every ``every_steps`` alone would land within the plotted steps, as
        (first step, every, count): arithmetic, so a bogus step of 1e18 costs nothing."""
        span = self.step_span()
        if not self.every_steps or span is None:
            return None
        every = self.every_steps
        first = -(-max(span[0], 1) // every) * every
        count = (span[1] - first) // every + 1
        return (first, every, count) if count > 0 else None

    def save_count(self) -> int:
        """How many saves every ``every_steps`` alone would make within the plotted steps."""
        saves = self.saves()
        return saves[2] if saves else 0

    def would_save(self, limit: int = MAX_LISTED_SAVES) -> list[int]:
        """The first ``limit`` steps where a save every ``every_steps`` alone would land."""
        saves = self.saves()
        if saves is None:
            return []
        first, every, count = saves
        return [first + index * every for index in range(min(count, limit))]

    def steps(self) -> list[int]:
        return [s for s, _ in self.series] + [c.step for c in self.checkpoints]


@dataclass(frozen=True)
class PlotData:
    """Everything ``ckptd plot`` shows of one run. Names, paths and notes are kept as found
    (JSON escapes them itself); whatever shows them on a terminal passes them through ``printable``."""

    run_dir: Path
    source: str  # "log" or "manifests"
    log: str | None
    log_format: str | None
    every_steps: int | None
    panels: tuple[Panel, ...] = ()
    notes: tuple[str, ...] = field(default=())
    missing: str | None = None  # why the panel --metric asked for is empty, naming the metrics there are

    @property
    def empty(self) -> bool:
        return not any(p.series or p.checkpoints for p in self.panels)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _names(names: Sequence[str]) -> str:
    """A bounded list of names: a log may hold thousands."""
    shown = ", ".join(names[:_MAX_NAMED])
    return shown + (f" and {len(names) - _MAX_NAMED} more" if len(names) > _MAX_NAMED else "")


# -- the command line's checks --------------------------------------------------------------------


def text_width(given: int | None, terminal: int) -> int:
    """Columns to draw in: ``--width`` as given (else a ``ConfigError``), or the terminal's,
    clamped to what the picture needs rather than refused: the user did not ask for it."""
    if given is None:
        return min(max(terminal, MIN_WIDTH), MAX_WIDTH)
    if not MIN_WIDTH <= given <= MAX_WIDTH:
        raise ConfigError(f"--width must be {MIN_WIDTH} to {MAX_WIDTH}, not {given}")
    return given


def png_path(text: str) -> Path:
    """``--png FILE`` checked before anything is read: a ``.png`` name in an existing folder."""
    path = Path(text)
    if not text:
        raise ConfigError("--png needs a file name, not ''")
    if path.suffix.lower() != ".png":
        raise ConfigError(f"--png {printable(text)}: the file name must end in .png")
    if path.is_dir():
        raise ConfigError(f"--png {printable(text)} is a directory")
    if not path.parent.is_dir():
        raise ConfigError(f"--png {printable(text)}: folder {printable(path.parent)} does not exist")
    return path


def empty_message(data: PlotData, run_dir: object) -> list[str]:
    """What ``ckptd plot`` says on stderr when there is nothing to draw, with the notes saying why."""
    head = data.missing or f"nothing to plot in {run_dir}: no eval in the log, no checkpoint"
    return [f"ckptd: {printable(head)}", *(f"ckptd: note: {printable(note)}" for note in data.notes)]


# -- gathering ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """What the run's own settings say (ckptd.toml, CKPTD_* variables), as ``ckptd run`` merges them."""

    log: Path
    log_format: str
    step_key: str | None
    regex: str | None
    every_steps: int | None
    criteria: tuple[Criterion, ...]  # empty unless a metric was named


def _run_settings(run_dir: Path) -> _Settings:
    own = settings.run_file_of(run_dir)
    options = settings.merged(own.run if own else {}, settings.environment_layer())
    config = settings.run_config(run_dir, options)
    named = options.get("metric") is not None or bool(options.get("best"))
    criteria = tuple(c for c, _ in config.best) if named else ()
    return _Settings(
        config.log, config.log_format, config.step_key, config.regex, config.every_steps, criteria
    )


def load_plot(
    run_dir: Path, store: Store, *, metric: str | None = None, save_steps: int | None = None
) -> PlotData:
    """Read what ``ckptd plot`` shows. ``metric``: ``M[:MODE]``, one panel; else one per
    criterion, the first ``MAX_PANELS`` of them (a note says how many were left out)."""
    paths = RunPaths(run_dir)
    status = read_status(paths)
    own = _run_settings(run_dir)
    records = store.list()
    criteria = _criteria(metric, status, _state(paths), own, store, records)
    notes = _left_out(criteria)
    criteria = criteria[:MAX_PANELS]
    every = save_steps or _every_steps(status, paths) or own.every_steps
    log, log_format = _log_of(status, own, run_dir)
    events, log_format, read_notes = _read_log(log, log_format, [c.metric for c in criteria], own)
    notes += read_notes
    source = "log"
    if not any(c.metric in e.metrics for e in events for c in criteria):
        source, events = "manifests", [LogEvent(r.step, r.metrics) for r in records]
        notes.append(f"no {_names([c.metric for c in criteria])} in {log}: the series is the manifests'")
    panels = tuple(_panel(c, events, records, every) for c in criteria)
    missing = None
    if metric and not panels[0].has_value:
        missing = _missing(panels[0].metric, log, log_format, own, records)
    return PlotData(run_dir, source, str(log), log_format, every, panels, tuple(notes), missing)


def _left_out(criteria: Sequence[Criterion]) -> list[str]:
    if len(criteria) <= MAX_PANELS:
        return []
    rest = [c.metric for c in criteria[MAX_PANELS:]]
    return [
        f"{len(criteria)} criteria: drawing the first {MAX_PANELS}, {len(rest)} left out "
        f"({_names(rest)}); --metric draws any one"
    ]


def _missing(
    metric: str, log: Path, log_format: str, own: _Settings, records: Sequence[CheckpointRecord]
) -> str:
    """Why ``--metric`` found nothing, and what it could have asked for: the log is read again
    for every metric (the first read kept only lines naming the one asked for)."""
    known = {name for record in records for name in record.metrics}
    events, _, _ = _read_log(log, log_format, (), own)
    known.update(name for event in events for name in event.metrics)
    there = f"metrics there: {_names(sorted(known))}" if known else "no metric there at all"
    return f"no value of {metric} in {log} nor in any checkpoint's manifest; {there}"


def _criteria(
    spec: str | None,
    status: Mapping[str, Any],
    state: Mapping[str, Any],
    own: _Settings,
    store: Store,
    records: list[CheckpointRecord],
) -> list[Criterion]:
    """``--metric``, else the daemon's criteria (status, state), the settings', the manifests'."""
    recorded = _recorded_modes(status, state) or {c.metric: c.mode for c in own.criteria}
    recorded = recorded or _manifest_modes(store, records)
    if spec:
        try:
            given = Criterion.parse(spec)
        except ValueError as exc:
            raise CkptdError(f"--metric: {printable(exc)}") from exc
        typed = spec.partition(":")[2].strip()
        return [Criterion(given.metric, given.mode if typed else recorded.get(given.metric, given.mode))]
    return [Criterion(m, mode) for m, mode in (recorded or {"eval_loss": "min"}).items()]


def _recorded_modes(status: Mapping[str, Any], state: Mapping[str, Any]) -> dict[str, Mode]:
    modes: dict[str, Mode] = {}
    listed = status.get("criteria")
    for entry in listed if isinstance(listed, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("metric"), str):
            modes.setdefault(entry["metric"], _mode(entry.get("mode"), entry["metric"]))
    saved = state.get("criteria")
    for spec in saved if not modes and isinstance(saved, list) else []:
        metric, _, mode = str(spec).partition(":")
        if metric:
            modes.setdefault(metric, _mode(mode, metric))
    return modes


def _manifest_modes(store: Store, records: list[CheckpointRecord]) -> dict[str, Mode]:
    for record in sorted(records, key=lambda r: r.created, reverse=True):
        try:
            raw = store.manifest(record.name).get("criteria")
        except (OSError, ValueError):
            continue
        if isinstance(raw, dict) and raw:
            return {str(m): _mode(v, str(m)) for m, v in raw.items()}
    return {}


def _mode(value: object, metric: str) -> Mode:
    return "min" if value == "min" else "max" if value == "max" else Criterion.default_mode(metric)


def _state(paths: RunPaths) -> dict[str, Any]:
    try:  # bounded, never through a link: the run dir is the trainer's, not ours to trust
        data = read_small_json(paths.state, STATUS_MAX_BYTES)
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _every_steps(status: Mapping[str, Any], paths: RunPaths) -> int | None:
    policy = status.get("policy")
    every = policy.get("every_steps") if isinstance(policy, dict) else None
    if every is None:
        try:
            control = read_small_json(paths.control, STATUS_MAX_BYTES)
            every = control.get("every_steps") if isinstance(control, dict) else None
        except (OSError, ValueError, RecursionError):
            every = None
    return every if isinstance(every, int) and not isinstance(every, bool) and every > 0 else None


def _log_of(status: Mapping[str, Any], own: _Settings, run_dir: Path) -> tuple[Path, str]:
    """The log status.json names (and the format the daemon detected), else the settings' log."""
    logged, detected = status.get("log"), status.get("log_format")
    if isinstance(logged, str) and Path(logged).exists():
        fmt = detected if isinstance(detected, str) and detected in settings.FORMATS else "auto"
        return Path(logged), fmt if own.regex is None or fmt == "regex" else "auto"
    return own.log, own.log_format


def _read_log(
    log: Path, log_format: str, metrics: Sequence[str], own: _Settings
) -> tuple[list[LogEvent], str, list[str]]:
    """Every event of the log, read to its end once, with the daemon's own sources; the format
    they read it in."""
    from ckptd.logs.detect import open_source

    if not log.exists():
        return [], log_format, [f"{log} does not exist"]
    try:
        source = open_source(log, log_format, watched=metrics, step_key=own.step_key, regex=own.regex)
    except (CkptdError, ImportError) as exc:
        return [], log_format, [f"cannot read {log}: {exc}"]
    events: list[LogEvent] = []
    try:
        for _ in range(_MAX_READS):
            if source.history_done:
                break
            events += source.read_history()
        for _ in range(_MAX_READS):
            events += source.read_events()
            if not source.behind:
                break
    finally:
        source.close()
    return events, source.name, []


def _panel(
    criterion: Criterion, events: Iterable[LogEvent], records: list[CheckpointRecord], every: int | None
) -> Panel:
    by_step: dict[int, float] = {}
    for event in events:
        value = event.metrics.get(criterion.metric)
        if value is not None and math.isfinite(value):
            by_step[event.step] = value  # a resumed run's later line wins
    series = tuple(sorted(by_step.items()))
    checkpoints = tuple(_checkpoint(r, criterion.metric, by_step) for r in records)
    return Panel(criterion.metric, criterion.mode, series, checkpoints, every)


def _checkpoint(record: CheckpointRecord, metric: str, by_step: Mapping[int, float]) -> Checkpoint:
    kind: Kind = "kept"
    if f"best:{metric}" in record.tags:
        kind = "best"
    elif "periodic" in record.tags:
        kind = "periodic"
    value = record.metrics.get(metric, by_step.get(record.requested_step or record.step))
    return Checkpoint(record.name, record.step, value, kind, tuple(record.tags))


# -- JSON --------------------------------------------------------------------------------------


def to_json(data: PlotData) -> dict[str, Any]:
    """The series and markers, for scripts. Non-finite values are the strings "nan", "inf" and
    "-inf" (as in ``ckptd ls --json``): JSON has no NaN. Per panel, ``save_steps`` is the
    schedule, ``would_save`` the first ``MAX_LISTED_SAVES`` steps it would save at within the
    plotted range and ``would_save_count`` how many there are in all."""
    return {
        "run_dir": str(data.run_dir),
        "source": data.source,
        "log": data.log,
        "log_format": data.log_format,
        "every_steps": data.every_steps,
        "notes": list(data.notes),
        "panels": [_panel_json(p) for p in data.panels],
    }


def _panel_json(panel: Panel) -> dict[str, Any]:
    best = panel.best_eval
    return {
        "metric": panel.metric,
        "mode": panel.mode,
        "series": [[s, _json_number(v)] for s, v in panel.series],
        "best_eval": None if best is None else {"step": best[0], "value": best[1]},
        "checkpoints": [
            {
                "name": c.name,
                "step": c.step,
                "value": None if c.value is None else _json_number(c.value),
                "kind": c.kind,
                "tags": list(c.tags),
            }
            for c in panel.checkpoints
        ],
        "save_steps": panel.every_steps,
        "would_save": panel.would_save(),
        "would_save_count": panel.save_count(),
    }


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else repr(value)


# -- the terminal --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Axes:
    """Where a step and a value land: columns of ``cols`` cells, rows of ``rows`` cells."""

    lo_step: int
    hi_step: int
    lo: float
    hi: float
    cols: int
    rows: int

    def dot_x(self, step: int) -> int:
        span = max(self.hi_step - self.lo_step, 1)
        return round((step - self.lo_step) / span * (2 * self.cols - 1))

    def column(self, step: int) -> int:
        return self.dot_x(step) // 2

    def dot_y(self, value: float) -> int:
        """Dots from the top: the highest value on row 0. In halves, as ``hi - lo`` overflows
        for values near ±1e308; halving is exact, so the dots are those of the plain formula."""
        share = (self.hi / 2 - value / 2) / (self.hi / 2 - self.lo / 2)
        return min(max(round(share * (4 * self.rows - 1)), 0), 4 * self.rows - 1)


def render_text(panel: Panel, width: int, *, colour: bool = False, rows: int = PLOT_ROWS) -> list[str]:
    """One panel as lines no wider than ``width``: a title, the curve in braille with the best
    eval starred, an x axis, a lane of would-be periodic saves, a lane of retained checkpoints,
    the step labels and a legend."""
    if width < MIN_WIDTH:
        raise ValueError(f"width must be at least {MIN_WIDTH} columns, not {width}")
    scale = _axes(panel, 1, rows)
    labels = _y_labels(panel, scale)
    margin = max(_LANE_NAME, *(len(label) for label in labels)) + 1
    axes = replace(scale, cols=width - margin - 1)
    paint = _painter(colour)
    grid = _braille(panel.series, axes)
    best = panel.best_eval
    if best is not None:
        grid[axes.dot_y(best[1]) // 4][axes.column(best[0])] = paint(BEST_EVAL)
    lines = _title(panel, width)
    lines += _with_labels(grid, labels, margin)
    lines.append(" " * margin + "└" + "─" * axes.cols)
    lines += _lanes(panel, axes, margin, paint)
    lines.append(" " * (margin + 1) + _step_labels(axes))
    lines += _legend(panel, width, paint)
    return lines


def _axes(panel: Panel, cols: int, rows: int) -> _Axes:
    lo_step, hi_step = panel.step_span() or (0, 0)
    lo, hi = _value_range(panel) or (0.0, 1.0)
    return _Axes(lo_step, hi_step, lo, hi, cols, rows)


def _value_range(panel: Panel) -> tuple[float, float] | None:
    """The finite values' range (the series', else the checkpoints'), widened when flat. A nan
    or inf is left out (it would make every label nan): the lanes still show its checkpoint."""
    values = list(map(itemgetter(1), _finite_series(panel.series)))
    values = values or [c.value for c in panel.checkpoints if c.value is not None and math.isfinite(c.value)]
    if not values:
        return None
    lo, hi = min(values), max(values)
    if hi / 2 - lo / 2 <= 0:  # flat, or too close for the halves of dot_y to tell apart
        pad = (abs(lo) or 1.0) / 2
        lo, hi = lo - pad, hi + pad
        if hi / 2 - lo / 2 <= 0:  # subnormal values: their half is no gap
            lo, hi = lo - 0.5, hi + 0.5
    return max(lo, -_FLOAT_MAX), min(hi, _FLOAT_MAX)  # a widened 1.7e308 would be inf


_FLOAT_MAX = 1.7976931348623157e308


def _y_labels(panel: Panel, axes: _Axes) -> list[str]:
    """Top, middle and bottom values of the y axis; blank when there is no value to scale by."""
    if not panel.has_value:
        return ["", "", ""]
    return [f"{v:.4g}" for v in (axes.hi, axes.hi / 2 + axes.lo / 2, axes.lo)]


def _braille(series: Sequence[Point], axes: _Axes) -> list[list[str]]:
    """The series as a line of braille dots (2 x 4 per cell), consecutive points joined."""
    dots = [[0] * axes.cols for _ in range(axes.rows)]
    points = [(axes.dot_x(s), axes.dot_y(v)) for s, v in _thin(series, axes.dot_x)]
    for (x0, y0), (x1, y1) in zip(points, points[1:] or points, strict=False):
        for x, y in _segment(x0, y0, x1, y1):
            dots[y // 4][x // 2] |= _DOT_BITS[y % 4][x % 2]
    return [[chr(0x2800 + bits) if bits else " " for bits in row] for row in dots]


_DOT_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))


def _thin(series: Sequence[Point], key: Callable[[int], int]) -> list[Point]:
    """At most four points per ``key`` of the step (a dot or pixel column, never decreasing
    with the step): the first, lowest, highest and last, in their order. Joined, they draw
    exactly what all the points would (within a column the line runs from the lowest to the
    highest either way, and enters and leaves at the same points), so a spike stays and 4M evals
    cost a bisection per column and C-speed min/max, not 4M segments drawn in Python."""
    points = _finite_series(series)
    values = list(map(itemgetter(1), points))
    out: list[Point] = []
    start = 0
    while start < len(points):
        column = key(points[start][0])
        end = bisect.bisect_right(points, column, lo=start, key=lambda point: key(point[0]))
        lowest = values.index(min(values[start:end]), start, end)
        highest = values.index(max(values[start:end]), start, end)
        out += [points[i] for i in sorted({start, lowest, highest, end - 1})]
        start = end
    return out


def _finite_series(series: Sequence[Point]) -> Sequence[Point]:
    """The points with a finite value: the series itself, checked at C speed, unless some is
    not (``load_plot`` leaves none, a caller's own ``Panel`` might): they have no place on an axis."""
    if all(map(math.isfinite, map(itemgetter(1), series))):
        return series
    return [point for point in series if math.isfinite(point[1])]


def _segment(x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, int]]:
    n = max(abs(x1 - x0), abs(y1 - y0), 1)
    return [(round(x0 + (x1 - x0) * i / n), round(y0 + (y1 - y0) * i / n)) for i in range(n + 1)]


def _with_labels(grid: list[list[str]], labels: list[str], margin: int) -> list[str]:
    rows = len(grid)
    at = {0: labels[0], rows // 2: labels[1], rows - 1: labels[2]}
    out = []
    for index, row in enumerate(grid):
        label = at.get(index)
        prefix = label.rjust(margin - 1) + " ┤" if label else " " * margin + "│"
        out.append((prefix + "".join(row)).rstrip())
    return out


def _lanes(panel: Panel, axes: _Axes, margin: int, paint: Any) -> list[str]:
    """The would-be periodic saves, then the retained checkpoints, one marker per column."""
    lanes = []
    columns = _save_columns(panel, axes)
    if columns:
        lane = [" "] * axes.cols
        for column in columns:
            lane[column] = paint(WOULD_SAVE)
        lanes.append(_lane("saves", lane, margin))
    kept = [" "] * axes.cols
    for c in sorted(panel.checkpoints, key=lambda c: _PRIORITY[c.kind], reverse=True):
        kept[axes.column(c.step)] = paint(_GLYPH[c.kind])
    lanes.append(_lane("kept", kept if panel.checkpoints else list("(none)"), margin))
    return lanes


def _save_columns(panel: Panel, axes: _Axes) -> set[int]:
    """The columns a would-be save lands in. From each, a bisection finds the first save in a
    later column: O(columns x log saves) however many saves there are, never a list of them."""
    saves = panel.saves()
    if saves is None:
        return set()
    first, every, count = saves

    def column(index: int) -> int:
        return axes.column(first + index * every)

    columns: set[int] = set()
    index = 0
    while index < count:
        here = column(index)
        columns.add(here)
        index = _first_past(column, here, index + 1, count)
    return columns


def _first_past(column: Callable[[int], int], here: int, lo: int, hi: int) -> int:
    """The least ``i`` in [lo, hi) with ``column(i) > here`` (``column`` never decreases), else ``hi``."""
    while lo < hi:
        mid = (lo + hi) // 2
        if column(mid) > here:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _lane(name: str, cells: list[str], margin: int) -> str:
    return (name.rjust(margin - 1)[: margin - 1] + "  " + "".join(cells)).rstrip()


def _step_labels(axes: _Axes) -> str:
    """First, middle and last step under their columns."""
    line = [" "] * (axes.cols + 12)
    middle = (axes.lo_step + axes.hi_step) // 2
    for step, align in ((axes.lo_step, "left"), (middle, "mid"), (axes.hi_step, "right")):
        text = str(step)
        if len(text) > axes.cols:
            continue  # a cut number would be a wrong one
        col = axes.column(step)
        start = col if align == "left" else col - len(text) // 2 if align == "mid" else col - len(text) + 1
        start = min(max(start, 0), axes.cols - len(text))
        if all(c == " " for c in line[max(start - 1, 0) : start + len(text) + 1]):
            line[start : start + len(text)] = text
    return ("".join(line[: axes.cols])).rstrip()


def _title(panel: Panel, width: int) -> list[str]:
    """One line, or more when it does not fit: the name (cut: it may be any length), then the rest."""
    best = panel.best_eval
    where = f"; best {best[1]:.6g} at step {best[0]}" if best else ""
    count = len(panel.series)
    detail = f"({panel.mode}), {count} eval{'' if count == 1 else 's'}{where}"
    name = printable(panel.metric)
    if len(name) + 1 + len(detail) <= width:
        return [f"{name} {detail}"]
    return [_fit(name, width), *_wrapped(detail, width)]


def _legend(panel: Panel, width: int, paint: Any) -> list[str]:
    items = [(BEST_EVAL, "best eval"), (KEPT_BEST, "kept best")]
    items += [(KEPT_PERIODIC, "kept periodic"), (KEPT_OTHER, "kept other")]
    if panel.every_steps:
        items.append((WOULD_SAVE, f"a save every {panel.every_steps} steps"))
    lines = _wrap([f"{paint(glyph)} {_fit(label, width - 2)}" for glyph, label in items], width)
    best = panel.best_eval
    if best is not None and panel.every_steps and best[0] % panel.every_steps:
        lines.append(
            _fit(f"step {best[0]} is no multiple of {panel.every_steps}: saving alone loses it", width)
        )
    return lines


def _wrap(items: list[str], width: int) -> list[str]:
    lines: list[str] = []
    for item in items:
        if lines and _visible(lines[-1]) + 2 + _visible(item) <= width:
            lines[-1] += "  " + item
        else:
            lines.append(item)
    return lines


def _fit(text: str, width: int) -> str:
    """Cut to ``width`` characters, the last an ellipsis (``text`` is already printable)."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _wrapped(text: str, width: int) -> list[str]:
    """``text`` (already printable) on as many lines as it takes, the later ones indented:
    a note is never cut, its end is often what matters (a path, a reason)."""
    return textwrap.wrap(text, width, subsequent_indent="  ", break_on_hyphens=False) or [""]


def _visible(text: str) -> int:
    """Length without ANSI escapes."""
    out, skipping = 0, False
    for char in text:
        if char == "\x1b":
            skipping = True
        elif skipping:
            skipping = char != "m"
        else:
            out += 1
    return out


def _painter(colour: bool) -> Any:
    def paint(glyph: str) -> str:
        return f"\x1b[{_COLOURS[glyph]}m{glyph}\x1b[0m" if colour else glyph

    return paint


def render_all(data: PlotData, width: int, *, colour: bool = False) -> list[str]:
    """Every panel, a blank line between; what was read first, and the notes."""
    where = printable(data.log) if data.source == "log" else "the checkpoints' manifests"
    fmt = f" ({printable(data.log_format)})" if data.source == "log" else ""
    lines = _wrapped(f"{printable(data.run_dir)}: read {where}{fmt}", width)
    for note in data.notes:
        lines += _wrapped(f"note: {printable(note)}", width)
    for panel in data.panels[:MAX_PANELS]:
        lines += ["", *render_text(panel, width, colour=colour)]
    return lines


# -- PNG ----------------------------------------------------------------------------------------


def write_png(data: PlotData, path: Path, size: tuple[int, int], dpi: int = 100) -> None:
    """The panels (at most ``MAX_PANELS``) stacked in one image of exactly ``size`` pixels
    (width, height). Raises ``ImportError`` when matplotlib cannot be imported, missing or
    broken (``PNG_HINT`` says what to install). Written beside ``path`` and renamed over it: a
    reader never sees half an image, and a link at ``path`` is replaced, not written through."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = data.panels[:MAX_PANELS] or (Panel("?", "min", ()),)
    fig, axes = plt.subplots(len(panels), 1, figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, squeeze=False)
    try:
        for ax, panel in zip(axes[:, 0], panels, strict=True):
            _draw_panel(ax, panel, size[0])
        fig.tight_layout()
        _save_atomically(fig, path, dpi)
    finally:
        plt.close(fig)


def _save_atomically(fig: Any, path: Path, dpi: int) -> None:
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".ckptd-plot-", suffix=".png.tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            fig.savefig(out, dpi=dpi, format="png")
        os.chmod(temp, 0o666 & ~_umask())  # as a plain write would make it, not mkstemp's 0600
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _draw_panel(ax: Any, panel: Panel, pixels: int) -> None:
    scale = _png_scale(panel)
    if panel.series:
        thin = _thin(panel.series, _pixel_key(panel, pixels))
        ax.plot([s for s, _ in thin], [v / scale for _, v in thin], color="tab:gray", lw=1.2)
    _draw_saves(ax, panel)
    styles = {"best": ("D", "tab:green"), "periodic": ("o", "tab:blue"), "kept": ("o", "tab:cyan")}
    for kind, (shape, colour) in styles.items():
        marked = [c for c in panel.checkpoints if c.kind == kind and _finite(c.value)]
        if marked:
            ax.scatter(
                [c.step for c in marked],
                [(c.value or 0.0) / scale for c in marked],
                marker=shape,
                color=colour,
                label=_KIND_LABEL[kind],
                zorder=3,
            )
    best = panel.best_eval
    if best is not None:
        ax.scatter(
            [best[0]],
            [best[1] / scale],
            marker="*",
            s=160,
            color="gold",
            edgecolor="black",
            label=f"best eval (step {best[0]})",
            zorder=4,
        )
    _label_panel(ax, panel, scale)


def _label_panel(ax: Any, panel: Panel, scale: float) -> None:
    name = _plain_text(panel.metric)
    ax.set_xlabel("step")
    ax.set_ylabel(name + (f" (×{scale:.0e})" if scale != 1.0 else ""))
    ax.set_title(
        f"{name} ({panel.mode})" + (f", saves every {panel.every_steps}" if panel.every_steps else "")
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")


def _plain_text(text: str) -> str:
    """Untrusted text as matplotlib shows it literally: printable, cut, and each ``$`` escaped,
    since a pair of them starts mathtext (a bad formula raises, a good one renders as maths)."""
    return _fit(printable(text), _PNG_TEXT).replace("$", r"\$")


def _png_scale(panel: Panel) -> float:
    """1, or the power of ten that brings values beyond ±1e100 near 1: matplotlib's tick and
    margin arithmetic overflows near ±1e308 ("arange: cannot compute length")."""
    values = list(map(abs, map(itemgetter(1), _finite_series(panel.series))))
    values += [abs(c.value) for c in panel.checkpoints if c.value is not None and math.isfinite(c.value)]
    biggest = max(values, default=0.0)
    return 10.0 ** math.floor(math.log10(biggest)) if biggest > _PNG_BIG else 1.0


def _pixel_key(panel: Panel, pixels: int) -> Callable[[int], int]:
    """Two buckets per pixel column of the image: finer than matplotlib can draw."""
    lo, hi = panel.step_span() or (0, 0)
    span = max(hi - lo, 1)
    return lambda step: round((step - lo) / span * 2 * pixels)


def _draw_saves(ax: Any, panel: Panel) -> None:
    """A faint line at each would-be save; beyond ``MAX_LISTED_SAVES`` they are denser than the
    pixels, so a band over their range instead (and no list of them all)."""
    saves = panel.saves()
    if saves is None:
        return
    first, every, count = saves
    if count <= MAX_LISTED_SAVES:
        ax.vlines(
            panel.would_save(), 0, 1, transform=ax.get_xaxis_transform(), color="tab:gray", alpha=0.15, lw=0.8
        )
    else:
        ax.axvspan(first, first + (count - 1) * every, color="tab:gray", alpha=0.08, lw=0)
