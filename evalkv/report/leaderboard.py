"""`evalkv table --view leaderboard`: the runs in the columns of NVIDIA kvpress's leaderboard.

The leaderboard (huggingface.co/spaces/nvidia/kvpress-leaderboard, `src/settings.py` LB_DEFAULT_COLUMNS) shows
`dataset, data_dir, model, method, compression_ratio, score`, one row per kvpress evaluation folder: RULER at
`data_dir` 4096, scored by the mean of its tasks' string_match, as kvpress's README reports it. Here a row of the
scores table becomes:

- RULER: one row per context length, `data_dir` the length, `score` the mean over the row's RULER tasks at that
  length (the `ruler` view's cell; missing when one of its tasks has no score).
- LongBench tasks: one row per task, `dataset` `longbench` (`longbench-e` for `_e` tasks), `data_dir` the task, as
  kvpress runs each LongBench task; any other task (passkey, needle): `dataset` the task, `data_dir` empty.
- `compression_ratio`: the run's (`r0.5` -> 0.5); the full cache and kvpress's no_press 0.0. Runs with an absolute
  budget have no place in these columns and are left out (a note says so).
- `method`: the table's method, with `_query_aware` appended when the method compressed the question with the
  context (the leaderboard's names: `snapkv_query_aware`), as evalkv does unless the run compressed the context alone.
"""

from __future__ import annotations

import pandas as pd

from evalkv.errors import EvalkvError
from evalkv.report.curves import RATIO, axis_kind
from evalkv.report.runs import FULL, NO_BUDGET, RunScores, is_full_cache, load_runs
from evalkv.report.table import build_table, render
from evalkv.tasks.longbench.spec import CATEGORIES, base_task, is_e_task
from evalkv.tasks.ruler.constants import RULER_TASKS

COLUMNS = ("dataset", "data_dir", "model", "method", "compression_ratio", "score")
QUERY_AWARE = "_query_aware"


def _by_labels(frame: pd.DataFrame) -> dict[tuple, pd.Series]:
    """Each row under (model, method, budget, query): a view without a query level holds query-aware rows only."""
    names = list(frame.index.names)
    return {(labels["model"], labels["method"], labels["budget"], labels.get("query", "aware")): frame.loc[key]
            for key in frame.index if (labels := dict(zip(names, key)))}


def _dataset(task: str) -> tuple[str, str]:
    if base_task(task) in {member for members in CATEGORIES.values() for member in members}:
        return ("longbench-e" if is_e_task(task) else "longbench"), base_task(task)
    return task, ""


def leaderboard_frame(runs: list[RunScores]) -> tuple[pd.DataFrame, list[str]]:
    """The leaderboard's rows (index: its first five columns; column: score) and notes for the reader."""
    scores = _by_labels(build_table(runs))
    asked: dict[tuple, set[str]] = {}  # the tasks each row's runs were asked for or scored
    for run in runs:
        key = (run.model, run.method, run.budget, "aware" if run.query_aware else "agnostic")
        asked.setdefault(key, set()).update(run.expected_tasks, run.task_scores)
    has_ruler = any(task in RULER_TASKS for tasks in asked.values() for task in tasks)
    ruler = _by_labels(build_table(runs, "ruler")) if has_ruler else {}
    rows: dict[tuple, float] = {}
    left_out: list[str] = []
    ruler_tasks: dict[tuple, list[str]] = {}  # each RULER task set -> the rows that average it
    for (model, method, budget, query), row in scores.items():
        if budget != NO_BUDGET and axis_kind(budget) != RATIO:
            left_out.append(f"{model} {method} {budget}")
            continue
        ratio = 0.0 if budget == NO_BUDGET else float(budget.removeprefix("r"))
        name = method + (QUERY_AWARE if query == "aware" and not is_full_cache(method) else "")
        for length, value in ruler.get((model, method, budget, query), pd.Series(dtype=float)).items():
            if length != "average":
                rows[("ruler", str(length), model, name, ratio)] = value
        tasks = asked.get((model, method, budget, query), set())
        for task in sorted(tasks - set(RULER_TASKS)):
            rows[(*_dataset(task), model, name, ratio)] = row.get(task, float("nan"))
        if ruler_set := tuple(sorted(tasks & set(RULER_TASKS))):
            ruler_tasks.setdefault(ruler_set, []).append(f"{model} {name} {ratio:g}")
    if not rows:
        raise EvalkvError("no run has a compression ratio or the full cache, so the leaderboard view is empty (run "
                          "evalkv pred compression_ratio=0.5 ..., or scripts/leaderboard.sh)")
    order = sorted(rows, key=lambda key: (key[0], _numeric(key[1]), key[2], key[3] != FULL,
                                          not is_full_cache(key[3]), key[3], key[4]))
    frame = pd.DataFrame({"score": [rows[key] for key in order]},
                         index=pd.MultiIndex.from_tuples(order, names=list(COLUMNS[:-1])), dtype=float)
    notes = [f"left out of the leaderboard view (an absolute budget, not a compression ratio): {', '.join(left_out)}"
             ] if left_out else []
    if len(ruler_tasks) > 1:
        union = set().union(*ruler_tasks)
        notes.append("the RULER scores average different task sets: " + "; ".join(
            f"{len(tasks)} tasks{_without(union - set(tasks))} for {', '.join(names)}"
            for tasks, names in ruler_tasks.items()))
    return frame, notes


def _without(tasks: set[str]) -> str:
    return f" (without {', '.join(sorted(tasks))})" if tasks else ""


def _numeric(text: str) -> tuple:
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def leaderboard(paths: list[str], fmt: str = "md", warnings: list[str] | None = None) -> str:
    """The rendered leaderboard view of every run under the paths; notes go to `warnings` when given."""
    frame, notes = leaderboard_frame(load_runs(paths, warnings))
    if warnings is not None:
        warnings.extend(notes)
    if fmt in ("md", "latex"):  # these join the row labels as text
        frame = frame.rename(index=lambda label: str(label) if isinstance(label, float) else label)
    return render(frame, fmt)
