"""`evalkv plot needle`: the needle-in-a-haystack heatmap of one or more runs.

Rows are depths (percent), columns context lengths (tokens), cells the mean needle recall (0-1) of the run's
records, drawn as KVCache-Factory's `visualize.py` draws them: the 3-colour map #F0496E -> #EBB839 -> #0CD79F,
vmin 0, vmax 1, grey dashed cell borders, "Token Limit" and "Depth Percent" axes. Several runs stack vertically.
The file's suffix picks PNG or PDF.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from evalkv.errors import EvalkvError
from evalkv.metrics.needle import needle_grid, needle_recall
from evalkv.records import PREDICTIONS, read_records
from evalkv.report.figure import check_output

COLOURS = ["#F0496E", "#EBB839", "#0CD79F"]
DPI = 100
ROW_HEIGHT = 8.0  # inches per run


def _records(path: Path) -> list[dict]:
    file = path / PREDICTIONS if path.is_dir() else path
    if not file.is_file():
        raise EvalkvError(f"{path} is not a run directory or predictions file (no {PREDICTIONS})")
    records = [record for record in read_records(file) if record.get("task") == "needle"]
    if not records:
        raise EvalkvError(f"{file} holds no needle records (run evalkv pred task=needle first)")
    return records


def figure_size(n_lengths: int, n_runs: int) -> tuple[float, float]:
    """visualize.py uses (38, 8) for 71 lengths; narrower grids get narrower figures."""
    return min(38.0, max(8.0, 0.5 * n_lengths + 3.0)), ROW_HEIGHT * n_runs


def plot_needle(paths: list[str], output: str, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    check_output(output)
    runs = [(Path(p), _records(Path(p))) for p in paths]
    grids = [needle_grid(records, [needle_recall(r["pred"], r["answers"][0]) for r in records]) for _, records in runs]
    n_lengths = max(len({length for row in grid.values() for length in row}) for grid in grids)
    cmap = LinearSegmentedColormap.from_list("custom_cmap", COLOURS)
    fig, axes = plt.subplots(len(runs), 1, figsize=figure_size(n_lengths, len(runs)), dpi=DPI, squeeze=False)
    for axis, (path, _), grid in zip(axes[:, 0], runs, grids):
        depths = sorted(grid, key=float)
        lengths = sorted({length for row in grid.values() for length in row}, key=int)
        values = [[grid[depth].get(length, float("nan")) for length in lengths] for depth in depths]
        image = axis.pcolormesh(values, cmap=cmap, vmin=0, vmax=1, edgecolors="grey", linewidth=0.5,
                                linestyle="--")
        axis.invert_yaxis()
        axis.set_xticks([i + 0.5 for i in range(len(lengths))], lengths, rotation=45, fontsize=10)
        axis.set_yticks([i + 0.5 for i in range(len(depths))], depths, fontsize=10)
        axis.set_xlabel("Token Limit", fontsize=14)
        axis.set_ylabel("Depth Percent", fontsize=14)
        mean = sum(v for row in values for v in row if v == v) / max(1, sum(v == v for row in values for v in row))
        label = f"{path.parent.name}/{path.name}" if path.is_dir() else path.stem
        heading = textwrap.fill(f"{title or 'Needle In A Haystack'}: {label}", width=int(6 * fig.get_figwidth()))
        axis.set_title(f"{heading}\noverall score {mean:.3f}", fontsize=13)
        fig.colorbar(image, ax=axis, label="Score")
    fig.tight_layout()
    target = check_output(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=DPI, format=target.suffix.lower().lstrip("."))
    plt.close(fig)
    return target
