"""`evalkv plot position`: mean NLL (or PPL) versus position in the text, one panel per perplexity task, one line per
method and budget.

The data is `evalkv table --view nll_by_position` (or `ppl_by_position`): each run's mean NLL per position bucket,
keyed by the bucket's first position (evalkv/metrics/perplexity.py). The full cache is dashed; every line is named at
its right end in its own colour. A bucket a run did not reach is a gap, never a 0.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from evalkv.report.curves import PANEL_COLUMNS, label_positions
from evalkv.report.figure import pyplot, save_figure
from evalkv.report.runs import FULL, NO_BUDGET

VIEWS = {"nll_by_position": "mean NLL (nats per token)", "ppl_by_position": "perplexity"}


def _line_name(key: tuple, names: list[str]) -> str:
    labels = dict(zip(names, key))
    return labels["method"] if labels["budget"] == NO_BUDGET else f"{labels['method']} {labels['budget']}"


def plot_positions(frame: pd.DataFrame, output: str | Path, view: str = "nll_by_position",
                   title: str | None = None) -> Path:
    """Draw the table's `view` (columns `task/bucket start`) as one line per row over the bucket starts."""
    plt = pyplot()
    names = list(frame.index.names)
    tasks = list(dict.fromkeys(column.partition("/")[0] for column in frame.columns))
    models = list(dict.fromkeys(frame.index.get_level_values("model")))
    panels = [(model, task) for model in models for task in tasks]
    lines = list(dict.fromkeys(_line_name(key, names) for key in frame.index))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(lines)}
    rows, width = math.ceil(len(panels) / PANEL_COLUMNS), min(len(panels), PANEL_COLUMNS)
    figure, axes = plt.subplots(rows, width, figsize=(5.2 * width, 3.6 * rows), squeeze=False)
    for axis, (model, task) in zip(axes.flat, panels):
        columns = [column for column in frame.columns if column.partition("/")[0] == task]
        starts = [float(column.partition("/")[2]) for column in columns]
        ends: list[tuple[float, str]] = []
        for key, values in frame.xs(model, level="model", drop_level=False)[columns].iterrows():
            name = _line_name(key, names)
            full = dict(zip(names, key))["method"] == FULL
            axis.plot(starts, list(values), marker="o", markersize=3, color=colours[name], linewidth=1.6,
                      linestyle="--" if full else "-")
            finite = [value for value in values if not math.isnan(value)]
            if finite:
                ends.append((finite[-1], name))
        axis.grid(True, alpha=0.3)
        low, high = axis.get_ylim()
        for y, (_, name) in zip(label_positions([value for value, _ in ends], low, high), ends):
            axis.annotate(name, xy=(1.02, y), xycoords=("axes fraction", "data"), color=colours[name], fontsize=9,
                          va="center", annotation_clip=False)
        axis.set_title(f"{model}: {task}" if len(models) > 1 else task, fontsize=11)
        axis.set_xlabel("position in the text (first token of the bucket)", fontsize=9)
        axis.set_ylabel(VIEWS[view], fontsize=9)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    label = VIEWS[view]
    figure.suptitle(title or f"{label[0].upper()}{label[1:]} versus position ({', '.join(models)})", fontsize=13)
    figure.tight_layout()
    return save_figure(figure, output)
