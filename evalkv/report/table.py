"""`evalkv table`: every run under some paths in one table, rows model / method / budget, columns tasks + averages.

Rows are (model, method, budget), plus `query` (aware / agnostic) when some run compressed the context without the
question (`compress=context`). In the scores view, columns are the tasks grouped by benchmark category,
each category followed by its average, then `average` over every task but perplexities (report/columns.py). A run
that has no score for a task it was asked for (or that another row has) leaves the cell empty (shown as `-`), never
0, and every average over a missing cell is missing too.

Other views of the same runs: `timing` (mean prompt tokens, new tokens, kept tokens, prefill and decode seconds per
sample), `runs` (samples, the `evalkv pred` invocations that wrote them, interrupted ones, processes, their recorded
wall time in total and per sample: report/runs.py `run_cells`), any breakdown a metric writes (e.g.
`by_context_length`, `by_depth`, LongBench-E's `by_length`, perplexity's `nll_by_position` and `ppl_by_position`):
columns `task/key`, and the benchmark views `ruler` (per context length, the mean over RULER's tasks, and their
average as RULER reports it) and `longbench_e` (per length bucket 0-4k / 4-8k / 8k+, the mean over LongBench-E's tasks).
`reasoning` is the math tasks' breakdown (metrics/reasoning.py) in its own column order: per task pass@1, maj@k,
pass@k, mean new tokens, the share of finished samples, k and the number of problems.
`deltas=True` shows every row but the full cache's as its difference from the full-cache row of the same model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from evalkv.errors import EvalkvError
from evalkv.metrics.reasoning import REASONING_KEYS
from evalkv.report.columns import with_categories
from evalkv.report.runs import FULL, NO_BUDGET, RUN_COLUMNS, RunScores, load_runs, unfinished
from evalkv.tasks.longbench.spec import is_e_task
from evalkv.tasks.ruler.constants import RULER_TASKS

FORMATS = ("md", "csv", "latex", "json")
# counts, shown without decimals: the `runs` view's, the `reasoning` view's `task/k`, `task/problems`, and the
# `longgenbench` view's `task/questions`, `task/answered`, `task/correct`
COUNT_COLUMNS = ("samples", "invocations", "interrupted", "processes", "k", "problems", "questions", "answered",
                 "correct")
VIEWS = ("scores, timing, runs, ruler, longbench_e, leaderboard, reasoning, or a breakdown such as by_depth, "
         "by_context_length, by_length, nll_by_position")


@dataclass(frozen=True)
class BenchmarkView:
    """A view that averages one breakdown of a benchmark's tasks per key (context length, length bucket)."""

    benchmark: str
    breakdown: str
    belongs: Callable[[str], bool]  # is this task one of the benchmark's
    expected_keys: Callable[[RunScores], list[str]]  # the keys a run was asked for (scored or not)


BENCHMARK_VIEWS = {
    "ruler": BenchmarkView("RULER", "by_context_length", lambda task: task in RULER_TASKS,
                           lambda run: [str(length) for length in run.context_lengths]),
    "longbench_e": BenchmarkView("LongBench-E", "by_length", is_e_task, lambda run: []),
}


def _budget_order(budget: str) -> float:
    if budget == NO_BUDGET:
        return -1.0
    return float(budget.removeprefix("r"))


def _row_key(run: RunScores, view: str) -> tuple[str, ...]:
    """model, method, budget, query; the runs view adds the task (each run is its own row there)."""
    key = (run.model, run.method, run.budget, "aware" if run.query_aware else "agnostic")
    return (*key, run.task) if view == "runs" else key


def row_of(run: RunScores, names: list[str]) -> tuple:
    """The row of a table with these index names that a run's scores fill."""
    return tuple(dict(zip(("model", "method", "budget", "query"), _row_key(run, "scores")))[name] for name in names)


def _row_order(keys) -> list[tuple]:
    return sorted(keys, key=lambda key: (key[0], key[1] != FULL, key[1], key[3] != "aware", _budget_order(key[2]),
                                         *key[4:]))


def _frame(rows: dict[tuple, dict[str, float]], view: str) -> pd.DataFrame:
    order = _row_order(rows)
    names = ["model", "method", "budget", "query", "task"][: len(order[0])]
    frame = pd.DataFrame([rows[key] for key in order], index=pd.MultiIndex.from_tuples(order, names=names),
                         dtype=float)
    return frame.droplevel("query") if all(key[3] == "aware" for key in order) else frame


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _cells(runs: list[RunScores], view: str) -> dict[tuple, dict[str, float]]:
    """One dict of cells per row; runs of the same row fill different cells (a missing cell never hides a value)."""
    cells: dict[tuple, dict[str, float]] = {}
    for run in runs:
        row = cells.setdefault(_row_key(run, view), {})
        for column, value in run.view(view).items():
            if not _missing(row.get(column)) and not _missing(value):
                raise EvalkvError(
                    f"two runs give {run.model} / {run.method} / budget {run.budget} a value for {column}; "
                    f"pass them to separate tables (one is {run.path})"
                )
            if _missing(row.get(column)):
                row[column] = float("nan") if value is None else value
    return cells


def build_table(runs: list[RunScores], view: str = "scores") -> pd.DataFrame:
    """Rows (model, method, budget[, query]), columns as the module docstring describes for each view."""
    if view in BENCHMARK_VIEWS:
        return _benchmark_view(runs, BENCHMARK_VIEWS[view], view)
    cells = _cells(runs, view)
    if not cells:
        raise EvalkvError("no runs found (a run directory holds predictions.jsonl or scores.json)")
    if not any(cells.values()):
        raise EvalkvError(f"no run has a {view!r} view (views: {VIEWS})")
    frame = _frame(cells, view)
    if view == "scores":
        return with_categories(frame)
    if view == "runs":
        return frame.reindex(list(RUN_COLUMNS), axis=1)
    if view == "reasoning":
        return frame.reindex(sorted(frame.columns, key=_reasoning_order), axis=1)
    return frame.reindex(sorted(frame.columns, key=_column_order), axis=1)


def _benchmark_view(runs: list[RunScores], spec: BenchmarkView, view: str) -> pd.DataFrame:
    """Per breakdown key (context length, length bucket), the mean over the benchmark's tasks of each row: the tasks
    its runs were asked for and those they scored. A key that one of them has no score for (a partial run) is
    missing, never a mean over fewer tasks. Rows without any of the benchmark's tasks are left out."""
    def tasks_of(run: RunScores) -> list[str]:
        scored = sorted({column.partition("/")[0] for column in run.view(spec.breakdown)})
        return [task for task in dict.fromkeys([*run.expected_tasks, *scored]) if spec.belongs(task)]

    relevant = [run for run in runs if tasks_of(run)]
    if not relevant:
        raise EvalkvError(f"no run has {spec.benchmark} tasks, so there is no {view} view (it averages the "
                          f"{spec.breakdown} breakdown of {spec.benchmark}'s tasks; views: {VIEWS})")
    cells = _cells(relevant, spec.breakdown)
    tasks: dict[tuple, dict[str, None]] = {}
    keys: dict[str, None] = {}
    for run in relevant:
        tasks.setdefault(_row_key(run, view), {}).update(dict.fromkeys(tasks_of(run)))
        keys.update(dict.fromkeys(spec.expected_keys(run)))
    for row in cells.values():
        keys.update(dict.fromkeys(column.partition("/")[2] for column in row if spec.belongs(column.partition("/")[0])))
    if not keys:
        raise EvalkvError(f"no {spec.benchmark} run has records yet, so the {view} view is empty")
    columns = sorted(keys, key=lambda key: _column_order(f"/{key}"))
    rows = {row: {key: _mean([cells[row].get(f"{task}/{key}") for task in tasks[row]]) for key in columns}
            for row in tasks}
    result = _frame(rows, view)
    if view == "ruler":
        result["average"] = result[columns].mean(axis=1, skipna=False).round(2)
    return result


def _mean(values: list) -> float:
    """Their mean to 2 decimals, missing when any is."""
    if not values or any(_missing(value) for value in values):
        return float("nan")
    return round(sum(values) / len(values), 2)


def _reasoning_order(column: str) -> tuple:
    task, _, key = column.partition("/")
    return (task, REASONING_KEYS.index(key) if key in REASONING_KEYS else len(REASONING_KEYS), key)


def _column_order(column: str) -> tuple:
    """Tasks alphabetically; within a task, numeric keys (lengths, depths) in numeric order."""
    task, _, key = column.partition("/")
    try:
        return (task, 0, float(key), "")
    except ValueError:
        return (task, 1, 0.0, key)


def full_rows(index: pd.MultiIndex) -> list[int | None]:
    """For every row, the position of the full-cache row it is compared with: the full-cache row of the same model
    (and the same query mode when there is one); None for the full rows themselves and for rows of a model without
    a full-cache row."""
    methods = index.get_level_values("method")
    models = index.get_level_values("model")
    queries = index.get_level_values("query") if "query" in index.names else None
    found: list[int | None] = []
    for position in range(len(index)):
        candidates = [i for i in range(len(index)) if methods[i] == FULL and models[i] == models[position]]
        if queries is not None:
            candidates = [i for i in candidates if queries[i] == queries[position]] or candidates
        found.append(candidates[0] if candidates and methods[position] != FULL else None)
    return found


def against_full(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Every row but the full cache's minus its full-cache row (`full_rows`); the full rows keep their values. Rows
    of a model without a full-cache row become missing; their models are returned so the caller can say so."""
    methods = frame.index.get_level_values("method")
    result = frame.copy()
    lacking: list[str] = []
    for position, base in enumerate(full_rows(frame.index)):
        if methods[position] == FULL:
            continue
        if base is None:
            lacking.append(frame.index.get_level_values("model")[position])
            result.iloc[position] = float("nan")
            continue
        result.iloc[position] = (frame.iloc[position] - frame.iloc[base]).round(2)
    return result, sorted(set(lacking))


def render(frame: pd.DataFrame, fmt: str, deltas: bool = False) -> str:
    """The table as Markdown (`-` for missing cells; with deltas, signed numbers outside the full rows), CSV
    (empty cells), LaTeX or JSON (null)."""
    if fmt not in FORMATS:
        raise EvalkvError(f"unknown table format {fmt!r}; known: {', '.join(FORMATS)}")
    if fmt == "csv":
        return frame.to_csv(na_rep="")
    if fmt == "json":
        return frame.reset_index().to_json(orient="records", indent=2)
    if fmt == "latex":
        return frame.to_latex(na_rep="-", float_format="%.2f")
    return markdown(formatted(frame, deltas))


def markdown(cells: pd.DataFrame) -> str:
    """Cells already as text (rows labelled by the index) as a Markdown table."""
    cells = cells.reset_index()
    lines = ["| " + " | ".join(map(str, cells.columns)) + " |", "|" + "|".join("---" for _ in cells.columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def formatted(frame: pd.DataFrame, deltas: bool = False) -> pd.DataFrame:
    """The cells as the Markdown table and the report page show them: `-` when missing, 2 decimals (4 for small
    costs; none for the runs view's counts), and with deltas a sign on every row but the full cache's."""
    cells = frame.astype(object).copy()
    for position, key in enumerate(frame.index):
        sign = "+" if deltas and dict(zip(frame.index.names, key))["method"] != FULL else ""
        row = frame.iloc[position]
        cells.iloc[position] = [_cell(value, column, sign) for column, value in zip(frame.columns, row)]
    return cells


def _cell(value: float, column, sign: str) -> str:
    if _missing(value):
        return "-"
    if str(column).rpartition("/")[2] in COUNT_COLUMNS and not sign:
        return f"{value:.0f}"
    return f"{value:{sign}.{_decimals(value)}f}"


def _decimals(value: float) -> int:
    """Scores keep 2 decimals; small costs (seconds) keep 4 so they do not print as 0.00."""
    return 2 if abs(value) >= 1 or round(value, 2) == value else 4


def notes(runs: list[RunScores], models_without_full: list[str] = ()) -> list[str]:
    """What a reader of the table should know that the cells cannot say: unfinished runs, deltas with no base."""
    lines = [f"{run.path}: unfinished run (run.json status {run.status!r}"
             + (f": {run.info['error']}" if run.info.get("error") else "") + "); "
             + ("its scores cover the samples it has" if run.scores.get("n") else "it has no records yet")
             for run in unfinished(runs)]
    lines += [f"{model}: no full-cache run, so its deltas are missing (run evalkv pred model=... method=full)"
              for model in models_without_full]
    return lines


def table(paths: list[str], fmt: str = "md", view: str = "scores", deltas: bool = False,
          warnings: list[str] | None = None) -> str:
    """The rendered table of every run under the paths; `warnings` (when given) receives `notes` and the runs that
    could not be read (without it, an unreadable run is an error)."""
    return render(table_of_runs(paths, view, deltas, warnings)[1], fmt, deltas)


def table_of_runs(paths: list[str], view: str = "scores", deltas: bool = False,
                  warnings: list[str] | None = None) -> tuple[list[RunScores], pd.DataFrame]:
    """The runs under the paths and their table (with deltas, the differences from the full cache); `warnings` as
    `table`'s."""
    runs = load_runs(paths, warnings)
    frame = build_table(runs, view)
    lacking: list[str] = []
    if deltas:
        frame, lacking = against_full(frame)
    if warnings is not None:
        warnings.extend(notes(runs, lacking))
    return runs, frame
