"""`evalkv plot curves`: score versus budget, one panel per task (and one for the average), one line per method.

The data is `evalkv table`'s scores view. Budgets run along a log2 axis (tokens kept per head per layer), or a linear
one when every run set a `compression_ratio`; the full cache is a dashed horizontal line. Every line is named at its
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
from evalkv.report.runs import FULL, NO_BUDGET

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


def _budget_axis(budgets: list[str]) -> tuple[str, bool]:
    ratios = {budget.startswith("r") for budget in budgets}
    if len(ratios) > 1:
        raise EvalkvError("the runs mix absolute budgets and compression ratios; plot them separately (pass the "
                          "folders of each kind to separate evalkv plot curves commands)")
    return ("compression ratio (share of the prompt evicted)", False) if ratios == {True} else (
        "budget (KV entries kept per head per layer)", True)


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
    """Draw the table's score-versus-budget curves into a PNG or PDF file; `bands`: the lower and upper ends of each
    score's interval (frames shaped as `frame`, NaN where there is none)."""
    plt = pyplot()
    names = list(frame.index.names)
    budgeted = [key for key in frame.index if dict(zip(names, key))["budget"] != NO_BUDGET]
    if not budgeted:
        raise EvalkvError("no run has a budget: curves need runs of a budgeted method (e.g. method=snapkv "
                          "budget=128,256,512 with --multirun, or scripts/sweep_budgets.sh)")
    x_label, log_axis = _budget_axis([dict(zip(names, key))["budget"] for key in budgeted])
    columns = panel_columns(frame, tasks)
    models = list(dict.fromkeys(frame.index.get_level_values("model")))
    panels = [(model, column) for model in models for column in columns]
    series = list(dict.fromkeys(_series_name(key, names) for key in frame.index))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(series)}
    rows = math.ceil(len(panels) / PANEL_COLUMNS)
    width = min(len(panels), PANEL_COLUMNS)
    figure, axes = plt.subplots(rows, width, figsize=(4.6 * width, 3.4 * rows), squeeze=False)
    for axis, (model, column) in zip(axes.flat, panels):
        if bands is not None:
            _draw_bands(axis, *(b.xs(model, level="model", drop_level=False)[column] for b in bands), names, colours)
        _draw_panel(axis, frame.xs(model, level="model", drop_level=False)[column], names, colours, log_axis)
        axis.set_title(f"{model}: {column}" if len(models) > 1 else column, fontsize=11)
        axis.set_xlabel(x_label, fontsize=9)
        axis.set_ylabel("score", fontsize=9)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(title or f"Score versus budget ({', '.join(models)})", fontsize=13)
    figure.tight_layout()
    return save_figure(figure, output)


def series_points(column: pd.Series, names: list[str]) -> tuple[dict[str, list[tuple[float, float]]], dict[str, float]]:
    """One table column as the panel's lines: name -> (budget, score) points in budget order (NaN where a score is
    missing), and the full-cache rows' scores (drawn as horizontal lines)."""
    lines: dict[str, list[tuple[float, float]]] = {}
    full: dict[str, float] = {}
    for key, value in column.items():
        labels = dict(zip(names, key))
        name = _series_name(key, names)
        if labels["budget"] == NO_BUDGET:
            if labels["method"] == FULL and not math.isnan(value):
                full[name] = float(value)
            continue
        lines.setdefault(name, []).append((float(labels["budget"].removeprefix("r")), float(value)))
    return {name: sorted(points) for name, points in lines.items()}, full


def _draw_panel(axis, column: pd.Series, names: list[str], colours: dict, log_axis: bool) -> None:
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
    if log_axis:
        axis.set_xscale("log", base=2)
        budgets = sorted({x for points in lines.values() for x, _ in points})
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
