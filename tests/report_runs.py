"""Run directories made without running a model: a composed config.yaml, run.json and scores.json (tests of the
tables, plots and report page)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from evalkv.config import compose_run, options
from evalkv.methods import build_method
from evalkv.run.pred import run_labels
from evalkv.tasks import build_task


def make_run(folder: Path, overrides: list[str], scores: dict | None, status: str = "finished") -> Path:
    """A run of the tiny model with these evalkv pred overrides; scores.json holds `scores` (none when None). Its
    run.json holds the status and the labels evalkv pred writes."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = compose_run(["model=random-tiny-llama", *overrides])
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    labels = run_labels(cfg, build_method(cfg.method.name, options(cfg.method)), build_task(cfg.task.name,
                                                                                          options(cfg.task)))
    (folder / "run.json").write_text(json.dumps({"status": status, "labels": labels}))
    if scores is not None:
        (folder / "scores.json").write_text(json.dumps(scores))
    return folder


def longbench(method: str, tasks: list[str], scores: dict[str, float], *extra: str, **kwargs) -> tuple:
    """Arguments of `make_run` for a LongBench run of these tasks."""
    budget = [] if method == "full" else ["budget=128"]
    overrides = [f"method={method}", *budget, "task=longbench", f"task.tasks=[{','.join(tasks)}]", *extra]
    return overrides, {"task_scores": scores}
