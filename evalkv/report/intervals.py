"""Intervals and paired tests on the scores table: `evalkv table --intervals`, the curves' bands, the report page.

The statistics are metrics/uncertainty.py's, on each run's per-sample scores (scores.json `sample_scores`, or its
predictions scored again): `interval_bounds` gives every cell of the scores view its 95% bootstrap interval (a
category's and the average's stratified by task); `paired_bounds` gives every row but the full cache's the paired
comparison with its full-cache row (the one `--delta` subtracts) on the samples both have, matched by sample id: the
interval of the difference, the sign-flip p-value and the minimum detectable difference. A cell without per-sample
scores (a scores.json written before evalkv kept them) has no interval and is named in the notes.

Text cells read `45.20 [41.10, 49.30]`; a difference whose p < 0.05 is marked `*` (`-3.20 [-5.10, -1.30] *`).
CSV and JSON put `COLUMN_low`, `COLUMN_high` (and, for differences, `COLUMN_p`, `COLUMN_mdd`) beside each column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from evalkv.errors import EvalkvError
from evalkv.metrics.uncertainty import ALPHA, PairedRow, Resampling, RowReplicates, Samples, task_samples
from evalkv.report.columns import averaged_tasks
from evalkv.report.runs import FULL, RunScores
from evalkv.report.table import FORMATS, formatted, full_rows, markdown, row_of, table_of_runs


@dataclass
class Bounds:
    """Per cell of a scores table: the interval's ends; for differences from the full cache also the p-value and
    the minimum detectable difference (NaN where there is none); what a reader should know about them."""

    low: pd.DataFrame
    high: pd.DataFrame
    p: pd.DataFrame | None = None
    mdd: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


def _empty(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(float("nan"), index=frame.index, columns=frame.columns)


def row_samples(runs: list[RunScores], index: pd.MultiIndex) -> dict[tuple, dict[str, Samples]]:
    """Each row's per-sample scores per task (runs of the same row fill different tasks)."""
    rows: dict[tuple, dict[str, Samples]] = {}
    for run in runs:
        rows.setdefault(row_of(run, list(index.names)), {}).update(task_samples(run.scores))
    return rows


def _lacking_notes(runs: list[RunScores]) -> list[str]:
    notes = []
    for run in runs:
        lacking = sorted(set(run.task_scores) - set(task_samples(run.scores)))
        if lacking:
            notes.append(f"{run.path}: no per-sample scores for {', '.join(lacking)}, so no interval there (its "
                         "scores.json was written before evalkv kept them: evalkv score the run's predictions again)")
    return notes


def interval_bounds(runs: list[RunScores], frame: pd.DataFrame, resampling: Resampling) -> Bounds:
    """Every scored cell's 95% interval (averages stratified by task)."""
    bounds = Bounds(_empty(frame), _empty(frame), notes=_lacking_notes(runs))
    samples = row_samples(runs, frame.index)
    for position in range(len(frame)):
        _fill_intervals(bounds, frame, position, samples.get(frame.index[position], {}), resampling)
    return bounds


def _fill_intervals(bounds: Bounds, frame: pd.DataFrame, position: int, samples: dict[str, Samples],
                    resampling: Resampling) -> None:
    replicates = RowReplicates({task: found.scores for task, found in samples.items()}, resampling)
    for number, tasks in _members(frame):
        if not math.isnan(frame.iat[position, number]) and (interval := replicates.interval(tasks)) is not None:
            bounds.low.iat[position, number], bounds.high.iat[position, number] = interval


def _members(frame: pd.DataFrame) -> list[tuple[int, list[str]]]:
    """Each column's position and the tasks it averages."""
    columns = list(frame.columns)
    return [(columns.index(column), tasks) for column, tasks in averaged_tasks(columns).items()]


def paired_bounds(runs: list[RunScores], frame: pd.DataFrame, resampling: Resampling) -> Bounds:
    """The full-cache rows' own intervals; every other row's paired comparison with its full-cache row (`frame`'s
    rows and columns: the scores table or its differences from the full cache)."""
    bounds = Bounds(_empty(frame), _empty(frame), _empty(frame), _empty(frame), notes=_lacking_notes(runs))
    samples = row_samples(runs, frame.index)
    methods = frame.index.get_level_values("method")
    for position, base in enumerate(full_rows(frame.index)):
        row = samples.get(frame.index[position], {})
        if methods[position] == FULL:
            _fill_intervals(bounds, frame, position, row, resampling)
        if base is None:
            continue
        full = samples.get(frame.index[base], {})
        paired = PairedRow(row, full, resampling)
        for number, tasks in _members(frame):
            if (comparison := paired.compare(tasks)) is not None:
                for part in ("low", "high", "p", "mdd"):
                    getattr(bounds, part).iat[position, number] = getattr(comparison, part)
        label = " / ".join(map(str, frame.index[position]))
        bounds.notes += [f"{label}: {task} compared with the full cache on the {len(differences)} samples both have "
                         f"({len(row[task].ids)} and {len(full[task].ids)} scored)"
                         for task, differences in paired.differences.items()
                         if len(differences) < max(len(row[task].ids), len(full[task].ids))]
    return bounds


def _with_interval(cell: str, low: float, high: float, p: float, sign: str) -> str:
    if math.isnan(low):
        return cell
    return f"{cell} [{low + 0.0:{sign}.2f}, {high + 0.0:{sign}.2f}]" + (" *" if p < ALPHA else "")  # no -0.00


def interval_cells(frame: pd.DataFrame, bounds: Bounds, deltas: bool = False) -> pd.DataFrame:
    """The cells as `formatted` gives them, each followed by its interval (and `*` when p < 0.05)."""
    cells = formatted(frame, deltas)
    p = bounds.p if bounds.p is not None else _empty(frame)
    methods = frame.index.get_level_values("method")
    for position in range(len(frame)):
        sign = "+" if deltas and methods[position] != FULL else ""
        cells.iloc[position] = [_with_interval(cells.iat[position, i], bounds.low.iat[position, i],
                                               bounds.high.iat[position, i], p.iat[position, i], sign)
                                for i in range(len(frame.columns))]
    return cells


def interval_columns(frame: pd.DataFrame, bounds: Bounds) -> pd.DataFrame:
    """Numbers for CSV and JSON: each column followed by COLUMN_low, COLUMN_high (COLUMN_p, COLUMN_mdd)."""
    parts = {"low": bounds.low, "high": bounds.high, "p": bounds.p, "mdd": bounds.mdd}
    columns: dict[str, pd.Series] = {}
    for column in frame.columns:
        columns[column] = frame[column]
        columns.update({f"{column}_{name}": part[column] for name, part in parts.items() if part is not None})
    return pd.DataFrame(columns, index=frame.index)


def render_intervals(frame: pd.DataFrame, bounds: Bounds, fmt: str, deltas: bool = False) -> str:
    """`table.render` with the intervals: in the cells (md, latex) or beside them (csv, json)."""
    if fmt not in FORMATS:
        raise EvalkvError(f"unknown table format {fmt!r}; known: {', '.join(FORMATS)}")
    if fmt == "csv":
        return interval_columns(frame, bounds).to_csv(na_rep="")
    if fmt == "json":
        return interval_columns(frame, bounds).reset_index().to_json(orient="records", indent=2)
    cells = interval_cells(frame, bounds, deltas)
    return cells.to_latex() if fmt == "latex" else markdown(cells)


def interval_table(paths: list[str], fmt: str = "md", deltas: bool = False, warnings: list[str] | None = None,
                   resampling: Resampling | None = None) -> str:
    """`table.table`'s scores view with every cell's interval; with deltas, every row but the full cache's as its
    paired comparison with the full cache."""
    runs, frame = table_of_runs(paths, "scores", deltas, warnings)
    bounds = (paired_bounds if deltas else interval_bounds)(runs, frame, resampling or Resampling())
    if warnings is not None:
        warnings.extend(bounds.notes)
    return render_intervals(frame, bounds, fmt, deltas)
