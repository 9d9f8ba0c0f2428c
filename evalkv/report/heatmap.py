"""`evalkv plot needle`: the needle-in-a-haystack heatmap of one or more runs.

Rows are depths (percent), columns context lengths (tokens), cells the mean needle recall (0-1) of the run's
records, drawn as KVCache-Factory's `visualize.py` draws them: the 3-colour map #F0496E -> #EBB839 -> #0CD79F,
vmin 0, vmax 1, grey dashed cell borders, "Token Limit" and "Depth Percent" axes. Several runs stack vertically.
The file's suffix picks PNG or PDF. With a `max_width` (the report page's), the figure grows with its lengths up to
that width and takes the height its depths need, so a grid of any size reads at the page's scale.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from evalkv.errors import EvalkvError
from evalkv.metrics.needle import needle_grid, needle_recall
from evalkv.records import PREDICTIONS, read_records
from evalkv.report.figure import DPI, check_output, pyplot, save_figure

COLOURS = ["#F0496E", "#EBB839", "#0CD79F"]
ROW_HEIGHT = 8.0  # inches per run


def _records(path: Path) -> list[dict]:
    file = path / PREDICTIONS if path.is_dir() else path
    if not file.is_file():
        raise EvalkvError(f"{path} is not a run directory or predictions file (no {PREDICTIONS})")
    records = [record for record in read_records(file) if record.get("task") == "needle"]
    if not records:
        raise EvalkvError(f"{file} holds no needle records (run evalkv pred task=needle first)")
    return records


def figure_size(n_lengths: int, n_runs: int, n_depths: int = 0,
                max_width: float | None = None) -> tuple[float, float]:
    """visualize.py uses (38, 8) for 71 lengths; narrower grids get narrower figures. With `max_width`, each run
    gets 0.3 inches per depth plus its title and axis labels."""
    if max_width is not None:
        return min(max_width, max(8.0, 3.0 + 0.6 * n_lengths)), (2.2 + 0.3 * max(n_depths, 3)) * n_runs
    return min(38.0, max(8.0, 0.5 * n_lengths + 3.0)), ROW_HEIGHT * n_runs


def plot_needle(paths: list[str], output: str, title: str | None = None, max_width: float | None = None) -> Path:
    plt = pyplot()
    from matplotlib.colors import LinearSegmentedColormap

    check_output(output)
    runs = [(Path(p), _records(Path(p))) for p in paths]
    grids = [needle_grid(records, [needle_recall(r["pred"], r["answers"][0]) for r in records]) for _, records in runs]
    n_lengths = max(len({length for row in grid.values() for length in row}) for grid in grids)
    n_depths = max(len(grid) for grid in grids)
    cmap = LinearSegmentedColormap.from_list("custom_cmap", COLOURS)
    size = figure_size(n_lengths, len(runs), n_depths, max_width)
    fig, axes = plt.subplots(len(runs), 1, figsize=size, dpi=DPI, squeeze=False)
    tick_size = 10 if max_width is None else max(6.0, min(10.0, 450 / n_lengths))  # 71 lengths must fit the width
    for axis, (path, _), grid in zip(axes[:, 0], runs, grids):
        depths = sorted(grid, key=float)
        lengths = sorted({length for row in grid.values() for length in row}, key=int)
        values = [[grid[depth].get(length, float("nan")) for length in lengths] for depth in depths]
        image = axis.pcolormesh(values, cmap=cmap, vmin=0, vmax=1, edgecolors="grey", linewidth=0.5,
                                linestyle="--")
        axis.invert_yaxis()
        axis.set_xticks([i + 0.5 for i in range(len(lengths))], lengths, rotation=45, fontsize=tick_size)
        axis.set_yticks([i + 0.5 for i in range(len(depths))], depths, fontsize=10)
        axis.set_xlabel("Token Limit", fontsize=14)
        axis.set_ylabel("Depth Percent", fontsize=14)
        mean = sum(v for row in values for v in row if v == v) / max(1, sum(v == v for row in values for v in row))
        label = f"{path.parent.name}/{path.name}" if path.is_dir() else path.stem
        heading = textwrap.fill(f"{title or 'Needle In A Haystack'}: {label}", width=int(6 * fig.get_figwidth()))
        axis.set_title(f"{heading}\noverall score {mean:.3f}", fontsize=13)
        fig.colorbar(image, ax=axis, label="Score")
    fig.tight_layout()
    return save_figure(fig, output, bbox_inches=None)
