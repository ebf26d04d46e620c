"""``ckptd plot``: the watched metric over steps, with what was kept and what saving alone would keep.

Two halves. ``load_plot`` gathers (I/O): the log the daemon follows, found and read as
``ckptd run`` would (status.json's log and format, else the run's ``ckptd.toml`` and
``CKPTD_*`` settings, else auto-detection; the formats of ``ckptd.logs``), or the retained
checkpoints' manifests when the log is gone; the store's records and their tags; the capture
schedule (``every_steps``) from status.json, control.json or the settings. The rest is pure:
``render_text`` turns one ``Panel`` into lines of braille and box characters, ``to_json``
into a document for scripts, and ``write_png`` draws the panels with matplotlib (an optional
extra, imported lazily with the Agg backend).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ckptd import settings
from ckptd.errors import CkptdError
from ckptd.protocol import STATUS_MAX_BYTES, RunPaths, read_small_json, read_status
from ckptd.records import CheckpointRecord, Criterion, LogEvent, Mode
from ckptd.store import Store

Kind = Literal["best", "periodic", "kept"]
PLOT_ROWS = 10
MIN_WIDTH = 30
_MAX_READS = 1_000_000  # stretches of a log read; a guard, never reached by a real log
PNG_HINT = "--png needs matplotlib: pip install 'ckptd[plot]'"

# Marker glyphs and their ANSI colours (used only on a terminal).
BEST_EVAL, KEPT_BEST, KEPT_PERIODIC, KEPT_OTHER, WOULD_SAVE = "★", "◆", "●", "○", "┆"
_COLOURS = {BEST_EVAL: "1;33", KEPT_BEST: "1;32", KEPT_PERIODIC: "34", KEPT_OTHER: "36", WOULD_SAVE: "2"}
_GLYPH = {"best": KEPT_BEST, "periodic": KEPT_PERIODIC, "kept": KEPT_OTHER}
_PRIORITY = {"best": 0, "periodic": 1, "kept": 2}


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
    series: tuple[tuple[int, float], ...]
    checkpoints: tuple[Checkpoint, ...] = ()
    every_steps: int | None = None

    @property
    def best_eval(self) -> tuple[int, float] | None:
        """The best (step, value) of the series; the earliest on a tie, as the daemon judges."""
        if not self.series:
            return None
        pick = min if self.mode == "min" else max
        return pick(self.series, key=lambda point: point[1])

    def would_save(self) -> list[int]:
        """Steps within the plotted range where a save every ``every_steps`` alone would land."""
        steps = self.steps()
        if not self.every_steps or not steps:
            return []
        first = -(-max(min(steps), 1) // self.every_steps) * self.every_steps
        return list(range(first, max(steps) + 1, self.every_steps))

    def steps(self) -> list[int]:
        return [s for s, _ in self.series] + [c.step for c in self.checkpoints]


@dataclass(frozen=True)
class PlotData:
    """Everything ``ckptd plot`` shows of one run."""

    run_dir: Path
    source: str  # "log" or "manifests"
    log: str | None
    log_format: str | None
    every_steps: int | None
    panels: tuple[Panel, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return not any(p.series or p.checkpoints for p in self.panels)


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
    """Read what ``ckptd plot`` shows. ``metric``: ``M[:MODE]``, one panel; else one per criterion."""
    paths = RunPaths(run_dir)
    status = read_status(paths)
    own = _run_settings(run_dir)
    records = store.list()
    criteria = _criteria(metric, status, _state(paths), own, store, records)
    every = save_steps or _every_steps(status, paths) or own.every_steps
    log, log_format = _log_of(status, own, run_dir)
    events, log_format, notes = _read_log(log, log_format, [c.metric for c in criteria], own)
    source = "log"
    if not any(c.metric in e.metrics for e in events for c in criteria):
        source, events = "manifests", [LogEvent(r.step, r.metrics) for r in records]
        notes.append(f"no {', '.join(c.metric for c in criteria)} in {log}: the series is the manifests'")
    panels = tuple(_panel(c, events, records, every) for c in criteria)
    return PlotData(run_dir, source, str(log), log_format, every, panels, tuple(notes))


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
            raise CkptdError(f"--metric: {exc}") from exc
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
    """The series and markers, for scripts."""
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
        "series": [[s, v] for s, v in panel.series],
        "best_eval": None if best is None else {"step": best[0], "value": best[1]},
        "checkpoints": [
            {"name": c.name, "step": c.step, "value": c.value, "kind": c.kind, "tags": list(c.tags)}
            for c in panel.checkpoints
        ],
        "would_save": panel.would_save(),
    }


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
        """Dots from the top: the highest value on row 0."""
        share = (self.hi - value) / (self.hi - self.lo)
        return min(max(round(share * (4 * self.rows - 1)), 0), 4 * self.rows - 1)


def render_text(panel: Panel, width: int, *, colour: bool = False, rows: int = PLOT_ROWS) -> list[str]:
    """One panel as lines no wider than ``width``: a title, the curve in braille with the best
    eval starred, an x axis, a lane of would-be periodic saves, a lane of retained checkpoints,
    the step labels and a legend."""
    if width < MIN_WIDTH:
        raise ValueError(f"width must be at least {MIN_WIDTH} columns, not {width}")
    labels = _y_labels(panel)
    margin = max(len(label) for label in labels) + 1
    axes = _axes(panel, width - margin - 1, rows)
    paint = _painter(colour)
    grid = _braille(panel.series, axes)
    best = panel.best_eval
    if best is not None:
        grid[axes.dot_y(best[1]) // 4][axes.column(best[0])] = paint(BEST_EVAL)
    lines = [_title(panel)]
    lines += _with_labels(grid, labels, margin)
    lines.append(" " * margin + "└" + "─" * axes.cols)
    lines += _lanes(panel, axes, margin, paint)
    lines.append(" " * (margin + 1) + _step_labels(axes))
    lines += _legend(panel, width, paint)
    return lines


def _axes(panel: Panel, cols: int, rows: int) -> _Axes:
    steps = panel.steps() or [0]
    values = [v for _, v in panel.series] or [c.value for c in panel.checkpoints if c.value is not None]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi == lo:
        lo, hi = lo - (abs(lo) or 1.0) / 2, hi + (abs(hi) or 1.0) / 2
    return _Axes(min(steps), max(steps), lo, hi, cols, rows)


def _y_labels(panel: Panel) -> list[str]:
    """Top, middle and bottom values of the y axis."""
    axes = _axes(panel, 1, PLOT_ROWS)
    return [f"{v:.4g}" for v in (axes.hi, (axes.hi + axes.lo) / 2, axes.lo)]


def _braille(series: Sequence[tuple[int, float]], axes: _Axes) -> list[list[str]]:
    """The series as a line of braille dots (2 x 4 per cell), consecutive points joined."""
    dots = [[0] * axes.cols for _ in range(axes.rows)]
    points = [(axes.dot_x(s), axes.dot_y(v)) for s, v in series]
    for (x0, y0), (x1, y1) in zip(points, points[1:] or points, strict=False):
        for x, y in _segment(x0, y0, x1, y1):
            dots[y // 4][x // 2] |= _DOT_BITS[y % 4][x % 2]
    return [[chr(0x2800 + bits) if bits else " " for bits in row] for row in dots]


_DOT_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))


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
    saves = panel.would_save()
    if saves:
        lane = [" "] * axes.cols
        for step in saves:
            lane[axes.column(step)] = paint(WOULD_SAVE)
        lanes.append(_lane("saves", lane, margin))
    kept = [" "] * axes.cols
    for c in sorted(panel.checkpoints, key=lambda c: _PRIORITY[c.kind], reverse=True):
        kept[axes.column(c.step)] = paint(_GLYPH[c.kind])
    lanes.append(_lane("kept", kept if panel.checkpoints else list("(none)"), margin))
    return lanes


def _lane(name: str, cells: list[str], margin: int) -> str:
    return (name.rjust(margin - 1)[: margin - 1] + "  " + "".join(cells)).rstrip()


def _step_labels(axes: _Axes) -> str:
    """First, middle and last step under their columns."""
    line = [" "] * (axes.cols + 12)
    middle = (axes.lo_step + axes.hi_step) // 2
    for step, align in ((axes.lo_step, "left"), (middle, "mid"), (axes.hi_step, "right")):
        text = str(step)
        col = axes.column(step)
        start = col if align == "left" else col - len(text) // 2 if align == "mid" else col - len(text) + 1
        start = min(max(start, 0), axes.cols - len(text))
        if all(c == " " for c in line[max(start - 1, 0) : start + len(text) + 1]):
            line[start : start + len(text)] = text
    return ("".join(line[: axes.cols])).rstrip()


def _title(panel: Panel) -> str:
    best = panel.best_eval
    where = f"; best {best[1]:.6g} at step {best[0]}" if best else ""
    return f"{panel.metric} ({panel.mode}), {len(panel.series)} evals{where}"


def _legend(panel: Panel, width: int, paint: Any) -> list[str]:
    items = [f"{paint(BEST_EVAL)} best eval", f"{paint(KEPT_BEST)} kept best"]
    items += [f"{paint(KEPT_PERIODIC)} kept periodic", f"{paint(KEPT_OTHER)} kept other"]
    if panel.every_steps:
        items.append(f"{paint(WOULD_SAVE)} a save every {panel.every_steps} steps")
    lines = _wrap(items, width)
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
    return text if len(text) <= width else text[: width - 1] + "…"


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
    """Every panel, a blank line between; what was read first."""
    where = data.log if data.source == "log" else "the checkpoints' manifests"
    fmt = f" ({data.log_format})" if data.source == "log" else ""
    lines = [_fit(f"{data.run_dir}: read {where}{fmt}", width)]
    for note in data.notes:
        lines.append(_fit(f"note: {note}", width))
    for panel in data.panels:
        lines += ["", *render_text(panel, width, colour=colour)]
    return lines


# -- PNG ----------------------------------------------------------------------------------------


def write_png(data: PlotData, path: Path, size: tuple[int, int], dpi: int = 100) -> None:
    """The panels stacked in one image of exactly ``size`` pixels (width, height).
    Raises ``ModuleNotFoundError`` without matplotlib (``PNG_HINT`` says what to install)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = data.panels or (Panel("?", "min", ()),)
    fig, axes = plt.subplots(len(panels), 1, figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, squeeze=False)
    try:
        for ax, panel in zip(axes[:, 0], panels, strict=True):
            _draw_panel(ax, panel)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def _draw_panel(ax: Any, panel: Panel) -> None:
    if panel.series:
        ax.plot([s for s, _ in panel.series], [v for _, v in panel.series], color="tab:gray", lw=1.2)
    for step in panel.would_save():
        ax.axvline(step, color="tab:gray", alpha=0.15, lw=0.8)
    styles = {"best": ("D", "tab:green"), "periodic": ("o", "tab:blue"), "kept": ("o", "tab:cyan")}
    for kind, (shape, colour) in styles.items():
        marked = [c for c in panel.checkpoints if c.kind == kind and c.value is not None]
        if marked:
            ax.scatter(
                [c.step for c in marked],
                [c.value for c in marked],
                marker=shape,
                color=colour,
                label=f"kept {kind}",
                zorder=3,
            )
    best = panel.best_eval
    if best is not None:
        ax.scatter(
            [best[0]],
            [best[1]],
            marker="*",
            s=160,
            color="gold",
            edgecolor="black",
            label=f"best eval (step {best[0]})",
            zorder=4,
        )
    ax.set_xlabel("step")
    ax.set_ylabel(panel.metric)
    ax.set_title(
        f"{panel.metric} ({panel.mode})" + (f", saves every {panel.every_steps}" if panel.every_steps else "")
    )
    ax.legend(loc="best", fontsize="small")
