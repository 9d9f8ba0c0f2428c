"""Which benchmark category a task column belongs to, and the order of the scores table's columns.

LongBench tasks group into its six categories (`Single-Doc QA`, ..., `Code`; LongBench-E's `{task}_e` columns into
`Single-Doc QA (E)`, ...), RULER's tasks into `RULER`; other tasks (passkey, needle, perplexity) stand alone. Each
category's tasks come in the benchmark's own order and are followed by the category's average column; the overall
average leaves perplexities out (their metric says lower is better).
"""

from __future__ import annotations

import pandas as pd

from evalkv.metrics import METRICS
from evalkv.tasks.longbench.spec import CATEGORIES, TASKS, base_task, is_e_task
from evalkv.tasks.ruler.constants import RULER_TASKS

RULER = "RULER"
E_MARK = " (E)"


def category(task: str) -> str | None:
    """The category column a task's score is averaged into, or None for a task outside any benchmark."""
    if task in RULER_TASKS:
        return RULER
    base = base_task(task)
    for name, members in CATEGORIES.items():
        if base in members:
            return name + (E_MARK if is_e_task(task) else "")
    return None


def _category_rank(name: str) -> int:
    names = [*CATEGORIES, *(c + E_MARK for c in CATEGORIES), RULER]
    return names.index(name)


def _task_rank(task: str) -> int:
    return list(RULER_TASKS).index(task) if task in RULER_TASKS else TASKS.index(base_task(task))


def averaged(task: str) -> bool:
    """Whether `average` takes this task: every task but perplexities (lower is better, on another scale)."""
    metric = METRICS.get(task)
    return metric is None or not metric.lower_is_better


def with_categories(frame: pd.DataFrame) -> pd.DataFrame:
    """Task columns grouped by category, each category followed by its average (missing when one of its tasks is
    missing in that row), then the tasks outside any benchmark alphabetically, then `average` over every task but
    perplexities (missing when no task is left)."""
    tasks = list(frame.columns)
    grouped: dict[str, list[str]] = {}
    for task in tasks:
        if (name := category(task)) is not None:
            grouped.setdefault(name, []).append(task)
    columns: dict[str, pd.Series] = {}
    for name in sorted(grouped, key=_category_rank):
        members = sorted(grouped[name], key=_task_rank)
        columns.update({task: frame[task] for task in members})
        columns[name] = frame[members].mean(axis=1, skipna=False).round(2)
    columns.update({task: frame[task] for task in sorted(t for t in tasks if category(t) is None)})
    taken = [task for task in tasks if averaged(task)]
    columns["average"] = frame[taken].mean(axis=1, skipna=False).round(2) if taken else float("nan")
    return pd.DataFrame(columns, index=frame.index)


def averaged_tasks(columns) -> dict[str, list[str]]:
    """For each column of a scores table, the task columns whose mean it is (as `with_categories` computes it): a
    task itself, a category its tasks, `average` every task but perplexities."""
    categories = {name for column in columns if (name := category(column)) is not None}
    tasks = [column for column in columns if column not in categories and column != "average"]
    members = {task: [task] for task in tasks}
    for task in tasks:
        if (name := category(task)) is not None and name in columns:
            members.setdefault(name, []).append(task)
    if "average" in columns:
        members["average"] = [task for task in tasks if averaged(task)]
    return members
