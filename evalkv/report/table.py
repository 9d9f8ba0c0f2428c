"""`evalkv table`: every run under some paths in one table, rows model / method / budget, columns tasks + average.

A run's scores are computed from its predictions (the source of truth), or read from its scores.json when it has
no predictions file. A run that has no score for a task leaves the cell empty (shown as `-`), never 0.
Other views of the same runs: `timing` (mean prompt tokens, new tokens, kept tokens, prefill and decode seconds per
sample) and any breakdown a metric writes (e.g. `by_context_length`, `by_depth` for passkey): columns `task/key`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from evalkv.config import options
from evalkv.errors import EvalkvError
from evalkv.methods import build_method
from evalkv.run.pred import method_label
from evalkv.run.records import CONFIG, PREDICTIONS, SCORES, read_json
from evalkv.run.score import score_files

FORMATS = ("md", "csv", "latex", "json")


@dataclass
class RunScores:
    path: Path
    model: str
    method: str  # name plus non-default options, e.g. "snapkv" or "snapkv-window_size=8"
    budget: str  # "128", "r0.5", or "-" for the full cache
    task_scores: dict[str, float]
    scores: dict  # the whole scores.json content

    def view(self, name: str) -> dict[str, float]:
        """Columns of one view: `scores` (task -> score), `timing`, or a breakdown key."""
        if name == "scores":
            return self.task_scores
        source = self.scores.get("timing", {}) if name == "timing" else {
            task: views.get(name, {}) for task, views in self.scores.get("breakdown", {}).items()
        }
        return {f"{task}/{key}": value for task, values in source.items() for key, value in values.items()}


def find_runs(paths: list[str]) -> list[Path]:
    runs: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise EvalkvError(f"{path} does not exist")
        candidates = [path] if path.is_file() else [path, *path.rglob("*")]
        for candidate in candidates:
            folder = candidate if candidate.is_dir() else candidate.parent
            if (folder / PREDICTIONS).exists() or (folder / SCORES).exists():
                runs.add(folder)
    return sorted(runs)


def _identity(run: Path) -> tuple[str, str, str]:
    if not (run / CONFIG).exists():
        return "?", run.name, "-"
    cfg = OmegaConf.load(run / CONFIG)
    method = build_method(cfg.method.name, options(cfg.method))
    variant = method_label(method).removeprefix(method.describe())
    if not method.requires_budget():
        budget = "-"
    elif method.budget is not None:
        budget = str(method.budget)
    else:
        budget = f"r{method.compression_ratio:g}"
    return str(cfg.model.name), method.name + variant, budget


def load_run(run: Path) -> RunScores:
    predictions = run / PREDICTIONS
    scores = score_files([predictions]) if predictions.exists() else read_json(run / SCORES)
    model, method, budget = _identity(run)
    return RunScores(run, model, method, budget, dict(scores.get("task_scores", {})), scores)


def _budget_order(budget: str) -> float:
    if budget == "-":
        return -1.0
    return float(budget.removeprefix("r"))


def build_table(runs: list[RunScores], view: str = "scores") -> pd.DataFrame:
    """Rows (model, method, budget), one column per task (or per view entry); the scores view adds `average`."""
    cells: dict[tuple[str, str, str], dict[str, float]] = {}
    for run in runs:
        row = cells.setdefault((run.model, run.method, run.budget), {})
        for column, value in run.view(view).items():
            if column in row:
                raise EvalkvError(
                    f"two runs give {run.model} / {run.method} / budget {run.budget} a value for {column}; "
                    f"pass them to separate tables (one is {run.path})"
                )
            row[column] = value
    if not cells:
        raise EvalkvError("no runs found (a run directory holds predictions.jsonl or scores.json)")
    if not any(cells.values()):
        raise EvalkvError(f"no run has a {view!r} view (views: scores, timing, or a breakdown such as by_depth)")
    order = sorted(cells, key=lambda key: (key[0], key[1] != "full", key[1], _budget_order(key[2])))
    frame = pd.DataFrame([cells[key] for key in order],
                         index=pd.MultiIndex.from_tuples(order, names=["model", "method", "budget"]))
    frame = frame.reindex(sorted(frame.columns, key=_column_order), axis=1)
    if view == "scores":
        frame["average"] = frame.mean(axis=1, skipna=False).round(2)
    return frame


def _column_order(column: str) -> tuple:
    """Tasks alphabetically; within a task, numeric keys (lengths, depths) in numeric order."""
    task, _, key = column.partition("/")
    try:
        return (task, 0, float(key), "")
    except ValueError:
        return (task, 1, 0.0, key)


def render(frame: pd.DataFrame, fmt: str) -> str:
    if fmt not in FORMATS:
        raise EvalkvError(f"unknown table format {fmt!r}; known: {', '.join(FORMATS)}")
    if fmt == "csv":
        return frame.to_csv(na_rep="")
    if fmt == "json":
        return frame.reset_index().to_json(orient="records", indent=2)
    if fmt == "latex":
        return frame.to_latex(na_rep="-", float_format="%.2f")
    header = [*frame.index.names, *frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for key, row in frame.iterrows():
        values = ["-" if isinstance(v, float) and math.isnan(v) else f"{v:.{_decimals(v)}f}" for v in row]
        lines.append("| " + " | ".join([*key, *values]) + " |")
    return "\n".join(lines) + "\n"


def _decimals(value: float) -> int:
    """Scores keep 2 decimals; small costs (seconds) keep 4 so they do not print as 0.00."""
    return 2 if abs(value) >= 1 or value == 0 else 4


def table(paths: list[str], fmt: str = "md", view: str = "scores") -> str:
    return render(build_table([load_run(run) for run in find_runs(paths)], view), fmt)
