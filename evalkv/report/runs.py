"""Finding the runs under some paths and reading what the tables and plots need from each.

A run directory holds `predictions.jsonl` or `scores.json` (or, when its first sample failed, only `config.yaml`
and `run.json`). Its scores are computed from its predictions (the source of truth), or read from `scores.json`
when it has no predictions file. Its identity (model, method, budget, query-aware or not) comes from `config.yaml`;
the tasks it was asked for come from there too, so a task a run never scored shows as missing, not as absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from evalkv.config import options
from evalkv.errors import EvalkvError
from evalkv.methods import build_method
from evalkv.records import CONFIG, PREDICTIONS, RUN_INFO, SCORES, read_json
from evalkv.run.pred import method_label
from evalkv.run.score import score_files
from evalkv.tasks import build_task

FULL = "full"
NO_BUDGET = "-"
# The `runs` view's columns, in this order (see `run_cells`).
RUN_COLUMNS = ("samples", "invocations", "interrupted", "processes", "wall_s", "s_per_sample")


@dataclass
class RunScores:
    path: Path
    model: str
    method: str  # name plus non-default options, e.g. "snapkv" or "snapkv-window_size=8"
    budget: str  # "128", "r0.5", or "-" for the full cache
    task_scores: dict[str, float]
    scores: dict  # the whole scores.json content
    query_aware: bool = True  # False when the task compressed the context without the question (query_agnostic)
    expected_tasks: list[str] = field(default_factory=list)  # the tasks its config asks for
    status: str = "finished"  # run.json's status ("running" when it was stopped or is still going)
    info: dict = field(default_factory=dict)  # run.json's content

    def view(self, name: str) -> dict[str, float]:
        """Columns of one view: `scores` (task -> score), `timing`, `runs`, or a breakdown key."""
        if name == "scores":
            return {**{task: float("nan") for task in self.expected_tasks}, **self.task_scores}
        if name == "runs":
            return run_cells(self.info)
        source = self.scores.get("timing", {}) if name == "timing" else {
            task: views.get(name, {}) for task, views in self.scores.get("breakdown", {}).items()
        }
        return {f"{task}/{key}": value for task, values in source.items() for key, value in values.items()}


def run_cells(info: dict) -> dict[str, float]:
    """The `runs` view of one run.json: its samples, the `evalkv pred` invocations that wrote them, and their wall time.

    An invocation that was killed (or is still going) records no wall time: `interrupted` counts those, and `wall_s`
    sums the recorded ones only, so it is a lower bound whenever `interrupted` is not 0; `s_per_sample` divides it by
    the samples the timed invocations wrote. `processes`: the most data-parallel processes one invocation used."""
    if not info:
        return {}
    invocations = info.get("invocations", [])
    timed = [entry for entry in invocations if entry.get("wall_s") is not None]
    wall = sum(entry["wall_s"] for entry in timed)
    written = sum(entry.get("new_samples", 0) for entry in timed)
    return {
        "samples": float(info.get("samples", float("nan"))),
        "invocations": float(len(invocations)),
        "interrupted": float(len(invocations) - len(timed)),
        "processes": float(max((entry.get("processes", 1) for entry in invocations), default=1)),
        "wall_s": round(wall, 2),
        "s_per_sample": round(wall / written, 3) if written else float("nan"),
    }


def is_run(folder: Path) -> bool:
    """Records or scores, or the config and run.json `evalkv pred` writes before its first record."""
    return any((folder / name).exists() for name in (PREDICTIONS, SCORES)) or (
        (folder / CONFIG).exists() and (folder / RUN_INFO).exists())


def find_runs(paths: list[str]) -> list[Path]:
    runs: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise EvalkvError(f"{path} does not exist")
        folders = [path.parent] if path.is_file() else [path, *(p for p in path.rglob("*") if p.is_dir())]
        runs.update(folder for folder in folders if is_run(folder))
    return sorted(runs)


def _budget_label(method) -> str:
    if not method.requires_budget():
        return NO_BUDGET
    if method.budget is not None:
        return str(method.budget)
    return f"r{method.compression_ratio:g}"


def _expected_tasks(task) -> list[str]:
    names = getattr(task, "task_names", None) or getattr(task, "tasks", None) or [task.name]
    return [str(name) for name in names]


def load_run(run: Path) -> RunScores:
    predictions = run / PREDICTIONS
    if predictions.exists():
        scores = score_files([predictions])
    elif (run / SCORES).exists():
        scores = read_json(run / SCORES)
    else:
        scores = {}
    info = read_json(run / RUN_INFO) if (run / RUN_INFO).exists() else {}
    status = str(info.get("status", "unknown"))
    if not (run / CONFIG).exists():
        return RunScores(run, "?", run.name, NO_BUDGET, dict(scores.get("task_scores", {})), scores, status=status,
                         info=info)
    cfg = OmegaConf.load(run / CONFIG)
    method = build_method(cfg.method.name, options(cfg.method))
    variant = method_label(method).removeprefix(method.describe())
    task = build_task(cfg.task.name, options(cfg.task))
    return RunScores(
        run, str(cfg.model.name), method.name + variant, _budget_label(method), dict(scores.get("task_scores", {})),
        scores, query_aware=not getattr(task, "query_agnostic", False), expected_tasks=_expected_tasks(task),
        status=status, info=info,
    )


def load_runs(paths: list[str]) -> list[RunScores]:
    runs = [load_run(run) for run in find_runs(paths)]
    if not runs:
        raise EvalkvError(f"no runs under {', '.join(paths)} (a run directory holds predictions.jsonl or "
                          "scores.json; make one with evalkv pred)")
    return runs


def unfinished(runs: list[RunScores]) -> list[RunScores]:
    """Runs whose run.json does not say finished (stopped, failing, or still going): their scores are partial."""
    return [run for run in runs if (run.path / RUN_INFO).exists() and run.status != "finished"]
