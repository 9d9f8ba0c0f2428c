"""`evalkv plot curves`: score versus budget, one panel per task (and one for the average), one line per method.

The data is `evalkv table`'s scores view. Absolute budgets run along a log2 axis (tokens kept per head per layer);
compression ratios (`compression_ratio=`, budget labels `r0.5`) along a linear axis from 0 to 1, as kvpress's
leaderboard plots them. Runs of both kinds give one row of panels per kind (per model), each panel titled with its
axis. The full cache (and kvpress's no_press) is a dashed horizontal line in every panel. Every line is named at its
right end in its own colour (no legend to look up), and a method keeps its colour in every panel. A missing score is
a gap in its line, never a 0. Given `bands` (the scores' 95% interval ends, report/intervals.py), each line is drawn in
a shaded band of its colour and the full cache's line in a shaded strip.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from evalkv.errors import EvalkvError
from evalkv.report.columns import category
from evalkv.report.figure import pyplot, save_figure
from evalkv.report.runs import NO_BUDGET, is_full_cache

PANEL_COLUMNS = 4
LABEL_GAP = 0.06  # smallest distance between two line names, as a share of the panel's height


def panel_columns(frame: pd.DataFrame, tasks: list[str] | None = None) -> list[str]:
    """The tasks asked for (default: every task column) followed by `average` (category columns are left out)."""
    available = [c for c in frame.columns if c != "average" and c not in _categories(frame)]
    if tasks:
        unknown = [task for task in tasks if task not in frame.columns]
        if unknown:
            raise EvalkvError(f"no column {', '.join(unknown)} in the table; columns: {', '.join(frame.columns)}")
        return list(tasks)
    return [*available, "average"] if len(available) > 1 else available


def _categories(frame: pd.DataFrame) -> set[str]:
    return {name for column in frame.columns if (name := category(column)) is not None}


def _series_name(key: tuple, names: list[str]) -> str:
    labels = dict(zip(names, key))
    agnostic = " (query-agnostic)" if labels.get("query") == "agnostic" else ""
    return labels["method"] + agnostic


BUDGET, RATIO = "budget", "compression ratio"
AXIS_LABELS = {BUDGET: "budget (KV entries kept per head per layer)",
               RATIO: "compression ratio (share of the prompt evicted)"}


def axis_kind(budget: str) -> str:
    """The x axis a budget label belongs on: `r0.5` is a compression ratio, `128` an absolute budget."""
    return RATIO if budget.startswith("r") else BUDGET


def _kinds(frame: pd.DataFrame) -> list[str]:
    """The axes the table's budgeted rows need: absolute budgets first, then compression ratios."""
    present = {axis_kind(budget) for budget in frame.index.get_level_values("budget") if budget != NO_BUDGET}
    return [kind for kind in (BUDGET, RATIO) if kind in present]


def label_positions(values: list[float], low: float, high: float) -> list[float]:
    """Line names at their lines' last values, pushed apart so that none overlaps the next."""
    gap = LABEL_GAP * max(high - low, 1e-9)
    order = sorted(range(len(values)), key=lambda i: values[i])
    placed = list(values)
    for previous, current in zip(order, order[1:]):
        placed[current] = max(placed[current], placed[previous] + gap)
    return placed


def plot_curves(frame: pd.DataFrame, output: str | Path, tasks: list[str] | None = None,
                title: str | None = None, bands: tuple[pd.DataFrame, pd.DataFrame] | None = None) -> Path:
    """Draw the table's score-versus-budget curves into a PNG or PDF file: per model, a row of panels (wrapped at
    PANEL_COLUMNS) for absolute budgets and one for compression ratios, whichever its runs have. `bands`: the lower
    and upper ends of each score's interval (frames shaped as `frame`, NaN where there is none)."""
    plt = pyplot()
    names = list(frame.index.names)
    kinds = _kinds(frame)
    if not kinds:
        raise EvalkvError("no run has a budget: curves need runs of a budgeted method (e.g. method=snapkv "
                          "budget=128,256,512 with --multirun, or scripts/sweep_budgets.sh)")
    columns = panel_columns(frame, tasks)
    models = list(dict.fromkeys(frame.index.get_level_values("model")))
    groups = [(model, kind) for model in models for kind in _kinds(frame.xs(model, level="model"))]
    series = list(dict.fromkeys(_series_name(key, names) for key in frame.index))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(series)}
    rows_per_group = math.ceil(len(columns) / PANEL_COLUMNS)
    width = min(len(columns), PANEL_COLUMNS)
    labels = 0.075 * max(map(len, series))  # inches the end-of-line names take right of each panel (9 pt)
    figure, axes = plt.subplots(rows_per_group * len(groups), width, figsize=((4.6 + labels) * width,
                                                                              3.4 * rows_per_group * len(groups)),
                                squeeze=False)
    for axis in axes.flat:
        axis.set_visible(False)
    for number, (model, kind) in enumerate(groups):
        rows = _panel_rows(frame, model, kind)
        for position, column in enumerate(columns):
            axis = axes[number * rows_per_group + position // PANEL_COLUMNS, position % PANEL_COLUMNS]
            axis.set_visible(True)
            if bands is not None:
                _draw_bands(axis, *(_panel_rows(band, model, kind)[column] for band in bands), names, colours)
            _draw_panel(axis, rows[column], names, colours, kind)
            heading = f"{model}: {column}" if len(models) > 1 else column
            axis.set_title(heading + (f" (by {kind})" if len(kinds) > 1 else ""), fontsize=11)
            axis.set_xlabel(AXIS_LABELS[kind], fontsize=9)
            axis.set_ylabel("score", fontsize=9)
    figure.suptitle(title or f"Score versus {' and '.join(kinds)} ({', '.join(models)})", fontsize=13)
    figure.tight_layout()
    return save_figure(figure, output)


def _panel_rows(frame: pd.DataFrame, model: str, kind: str) -> pd.DataFrame:
    """The model's rows drawn on an axis of this kind: its budgets of that kind and its full-cache rows."""
    rows = frame.xs(model, level="model", drop_level=False)
    return rows[[budget == NO_BUDGET or axis_kind(budget) == kind for budget in rows.index.get_level_values("budget")]]


def series_points(column: pd.Series, names: list[str]) -> tuple[dict[str, list[tuple[float, float]]], dict[str, float]]:
    """One table column as the panel's lines: name -> (budget, score) points in budget order (NaN where a score is
    missing), and the full-cache rows' scores (drawn as horizontal lines)."""
    lines: dict[str, list[tuple[float, float]]] = {}
    full: dict[str, float] = {}
    for key, value in column.items():
        labels = dict(zip(names, key))
        name = _series_name(key, names)
        if labels["budget"] == NO_BUDGET:
            if is_full_cache(labels["method"]) and not math.isnan(value):
                full[name] = float(value)
            continue
        lines.setdefault(name, []).append((float(labels["budget"].removeprefix("r")), float(value)))
    return {name: sorted(points) for name, points in lines.items()}, full


def _draw_panel(axis, column: pd.Series, names: list[str], colours: dict, kind: str) -> None:
    lines, full = series_points(column, names)
    ends: list[tuple[float, str]] = []
    for name, points in lines.items():
        axis.plot([x for x, _ in points], [y for _, y in points], marker="o", color=colours[name], linewidth=1.8)
        finite = [y for _, y in points if not math.isnan(y)]
        if finite:
            ends.append((finite[-1], name))
    for name, value in full.items():
        axis.axhline(value, color=colours[name], linestyle="--", linewidth=1.2)
        ends.append((value, name))
    budgets = sorted({x for points in lines.values() for x, _ in points})
    if kind == BUDGET:
        axis.set_xscale("log", base=2)
    else:
        budgets = sorted({0.0, 1.0, *budgets})  # the axis's ends: nothing evicted, everything evicted
        axis.set_xlim(0.0, 1.0)
    axis.set_xticks(budgets, [f"{b:g}" for b in budgets])
    axis.grid(True, alpha=0.3)
    low, high = axis.get_ylim()
    for y, (_, name) in zip(label_positions([v for v, _ in ends], low, high), ends):
        axis.annotate(name, xy=(1.02, y), xycoords=("axes fraction", "data"), color=colours[name],
                      fontsize=9, va="center", annotation_clip=False)


def _draw_bands(axis, low: pd.Series, high: pd.Series, names: list[str], colours: dict) -> None:
    """Each line's interval as a shaded band (gaps where a point has none), the full cache's as a horizontal strip."""
    lows, full_lows = series_points(low, names)
    highs, full_highs = series_points(high, names)
    for name, points in lows.items():
        axis.fill_between([x for x, _ in points], [y for _, y in points], [y for _, y in highs[name]],
                          color=colours[name], alpha=0.15, linewidth=0)
    for name, value in full_lows.items():
        axis.axhspan(value, full_highs[name], color=colours[name], alpha=0.08, linewidth=0)
