"""Run directories made without running a model: a composed config.yaml, run.json and scores.json (tests of the
tables, plots and report page)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from evalkv.config import compose_run


def make_run(folder: Path, overrides: list[str], scores: dict | None, status: str = "finished") -> Path:
    """A run of the tiny model with these evalkv pred overrides; scores.json holds `scores` (none when None)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = compose_run(["model=random-tiny-llama", *overrides])
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (folder / "run.json").write_text(json.dumps({"status": status}))
    if scores is not None:
        (folder / "scores.json").write_text(json.dumps(scores))
    return folder


def longbench(method: str, tasks: list[str], scores: dict[str, float], *extra: str, **kwargs) -> tuple:
    """Arguments of `make_run` for a LongBench run of these tasks."""
    budget = [] if method == "full" else ["budget=128"]
    overrides = [f"method={method}", *budget, "task=longbench", f"task.tasks=[{','.join(tasks)}]", *extra]
    return overrides, {"task_scores": scores}
