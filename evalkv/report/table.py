"""`evalkv table`: every run under some paths in one table, rows model / method / budget, columns tasks + average.

A run's scores come from its scores.json, or are computed from its predictions when that file is missing or older
than the predictions. A run that has no score for a task leaves the cell empty (shown as `-`), never 0.
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
    scores_path, predictions = run / SCORES, run / PREDICTIONS
    stale = predictions.exists() and (
        not scores_path.exists() or scores_path.stat().st_mtime < predictions.stat().st_mtime
    )
    scores = score_files([predictions]) if stale else read_json(scores_path)
    model, method, budget = _identity(run)
    return RunScores(run, model, method, budget, dict(scores.get("task_scores", {})))


def _budget_order(budget: str) -> float:
    if budget == "-":
        return -1.0
    return float(budget.removeprefix("r"))


def build_table(runs: list[RunScores]) -> pd.DataFrame:
    """Rows (model, method, budget), one column per task, then `average` over the row's tasks."""
    cells: dict[tuple[str, str, str], dict[str, float]] = {}
    for run in runs:
        row = cells.setdefault((run.model, run.method, run.budget), {})
        for task, value in run.task_scores.items():
            if task in row:
                raise EvalkvError(
                    f"two runs give {run.model} / {run.method} / budget {run.budget} a score for {task}; "
                    f"pass them to separate tables (one is {run.path})"
                )
            row[task] = value
    if not cells:
        raise EvalkvError("no runs found (a run directory holds predictions.jsonl or scores.json)")
    order = sorted(cells, key=lambda key: (key[0], key[1] != "full", key[1], _budget_order(key[2])))
    frame = pd.DataFrame([cells[key] for key in order],
                         index=pd.MultiIndex.from_tuples(order, names=["model", "method", "budget"]))
    frame = frame.reindex(sorted(frame.columns), axis=1)
    frame["average"] = frame.mean(axis=1, skipna=False).round(2)
    return frame


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
        values = ["-" if isinstance(v, float) and math.isnan(v) else f"{v:.2f}" for v in row]
        lines.append("| " + " | ".join([*key, *values]) + " |")
    return "\n".join(lines) + "\n"


def table(paths: list[str], fmt: str = "md") -> str:
    return render(build_table([load_run(run) for run in find_runs(paths)]), fmt)
