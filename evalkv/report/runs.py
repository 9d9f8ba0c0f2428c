"""Finding the runs under some paths and reading what the tables and plots need from each run's own files.

A run directory holds `predictions.jsonl` or `scores.json` (or, when it stopped before its first sample, only
`config.yaml` and `run.json`). Its scores are computed from its predictions (the source of truth) by the metrics,
or read from `scores.json` when it has no predictions file; a run without records has no scores, which tables show
as missing. Its labels (model, method and the options that differ from its defaults, budget, the cache's
quantisation, query-aware or not, the tasks and context lengths it was asked for) are run.json's `labels`, which
`evalkv pred` writes; runs made before it wrote them get the same labels from config.yaml and run.json read as plain
data (`derived_labels`).
No method or task is built here, so a run made last month stays readable after a method's validation changes.
A kvpress evaluation folder (metrics.json + config.yaml, report/kvpress.py) reads as a run too, labelled `kvpress:`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from evalkv.errors import EvalkvError
from evalkv.metrics import score_records
from evalkv.records import CONFIG, NO_BUDGET, PREDICTIONS, RUN_INFO, SCORES, compress_of, read_json, read_records
from evalkv.report.kvpress import KVPRESS_FULL, is_kvpress_run, read_kvpress_run
from evalkv.tasks.longbench.task import expand_tasks

FULL = "full"
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
    query_aware: bool = True  # False when the run compressed the context without the question (compress=context)
    expected_tasks: list[str] = field(default_factory=list)  # the tasks its config asks for
    context_lengths: list[int] = field(default_factory=list)  # the context lengths it asks for (passkey, RULER)
    task: str = ""  # the task and its options, as run.json names it (`passkey-lengths=4096`)
    status: str = "finished"  # run.json's status: running (or killed), interrupted, failed, finished
    info: dict = field(default_factory=dict)  # run.json's content
    source: str = "evalkv"  # or "kvpress": a kvpress evaluation folder (report/kvpress.py)
    notes: list[str] = field(default_factory=list)  # what a reader should know about its scores

    def view(self, name: str) -> dict[str, float]:
        """Columns of one view: `scores` (task -> score), `timing`, `runs`, or a breakdown key."""
        if name == "scores":
            return {**{task: float("nan") for task in self.expected_tasks}, **self.task_scores}
        if name == "runs":
            cells = run_cells(self.info)
            if cells and math.isnan(cells["samples"]):  # run.json has no count yet: count the records
                cells["samples"] = float(sum(self.scores.get("n", {}).values()))
            return cells
        source = self.scores.get("timing", {}) if name == "timing" else {
            task: views.get(name, {}) for task, views in self.scores.get("breakdown", {}).items()
        }
        return {f"{task}/{key}": value for task, values in source.items() for key, value in values.items()}


def is_full_cache(method: str) -> bool:
    """evalkv's full cache or kvpress's no_press: the reference every curve is drawn against."""
    return method in (FULL, KVPRESS_FULL)


def run_cells(info: dict) -> dict[str, float]:
    """The `runs` view of one run.json: its samples, the `evalkv pred` invocations that wrote them, and their wall time.

    `interrupted` counts the invocations that did not finish: stopped by a signal, failed, killed, or still going (one
    recorded without a status ended `finished` if it recorded an end). A killed one records no wall time, so `wall_s`
    sums the recorded ones only and is a lower bound while a killed invocation is counted; `s_per_sample` divides it
    by the samples the timed invocations wrote. `processes`: the most data-parallel processes one invocation used."""
    if not info:
        return {}
    invocations = info.get("invocations", [])
    timed = [entry for entry in invocations if entry.get("wall_s") is not None]
    wall = sum(entry["wall_s"] for entry in timed)
    written = sum(entry.get("new_samples", 0) for entry in timed)
    unfinished = [entry for entry in invocations
                  if entry.get("status", "finished" if entry.get("wall_s") is not None else "") != "finished"]
    return {
        "samples": float(info.get("samples", float("nan"))),
        "invocations": float(len(invocations)),
        "interrupted": float(len(unfinished)),
        "processes": float(max((entry.get("processes", 1) for entry in invocations), default=1)),
        "wall_s": round(wall, 2),
        "s_per_sample": round(wall / written, 3) if written else float("nan"),
    }


def is_run(folder: Path) -> bool:
    """Records or scores, or the config and run.json `evalkv pred` writes before its first record; or a kvpress
    evaluation folder."""
    return is_kvpress_run(folder) or any((folder / name).exists() for name in (PREDICTIONS, SCORES)) or (
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


def _read_config(path: Path) -> dict:
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict) or not isinstance(config.get("method"), dict) or not isinstance(
            config.get("task"), dict):
        raise EvalkvError(f"{path}: not an evalkv run config (no method and task sections)")
    return config


def derived_labels(config: dict, info: dict) -> dict:
    """The labels `evalkv pred` writes into run.json, derived for a run made before it did: from config.yaml and
    run.json's `method` (the run's method label: `snapkv_128-window_size=8`, `streaming_llm_r0.5`, `full`,
    `snapkv_128+kivi2`), whose prefix up to the budget is the method's own label, then its non-default options, then
    after `+` the cache's quantisation."""
    method, task = config["method"], config["task"]
    name = str(method["name"])
    label, cache = str(info.get("method") or name), str((config.get("cache") or {}).get("quant", "none"))
    if cache != "none" and "+" in label:  # the last `+` (method names may hold one: kvcV+tova)
        label, _, cache = label.rpartition("+")
    budget, ratio = method.get("budget"), method.get("compression_ratio")
    candidates = [(f"{name}_{budget}", str(budget))] if budget is not None else []
    if ratio is not None:
        candidates.append((f"{name}_r{ratio:g}", f"r{ratio:g}"))
    prefix, shown = next(((prefix, shown) for prefix, shown in candidates
                          if label == prefix or label.startswith(f"{prefix}-")), (name, NO_BUDGET))
    if "method" not in info and candidates:  # no label to read: the config's budget as given
        prefix, shown = name, candidates[0][1]
    tasks = task.get("tasks")
    if task.get("name") == "longbench":  # LongBench's groups (all, en, zh, all_e) stand for their tasks
        tasks = expand_tasks([str(name) for name in tasks or []])
    lengths = task.get("lengths")
    return {
        "model": str(config.get("model", {}).get("name", "?")),
        "method": name,
        "method_variant": label.removeprefix(prefix).removeprefix("-"),
        "budget": shown,
        "cache": cache,
        "query": "agnostic" if compress_of(config) == "context" else "aware",
        "expected_tasks": [str(name) for name in tasks or [task.get("name")]],
        "context_lengths": [int(length) for length in lengths] if lengths else None,
    }


def load_run(run: Path) -> RunScores:
    if is_kvpress_run(run):
        labels, scores, notes = read_kvpress_run(run)
        return _labelled(run, labels, scores, {}, "finished", source="kvpress", notes=notes)
    predictions = run / PREDICTIONS
    if predictions.exists():
        records = read_records(predictions)
        scores = score_records(records) if records else {}
    elif (run / SCORES).exists():
        scores = read_json(run / SCORES)
    else:
        scores = {}
    info = read_json(run / RUN_INFO) if (run / RUN_INFO).exists() else {}
    status = str(info.get("status", "unknown"))
    labels = info.get("labels")
    if labels is None and (run / CONFIG).exists():
        labels = derived_labels(_read_config(run / CONFIG), info)
    if labels is None:
        return RunScores(run, "?", run.name, NO_BUDGET, dict(scores.get("task_scores", {})), scores, status=status,
                         info=info)
    return _labelled(run, labels, scores, info, status)


def _labelled(run: Path, labels: dict, scores: dict, info: dict, status: str, **more) -> RunScores:
    variant = labels.get("method_variant")
    cache = labels.get("cache") or "none"  # runs made before quantised caches existed held the model's dtype
    method = labels["method"] + (f"-{variant}" if variant else "") + (f"+{cache}" if cache != "none" else "")
    return RunScores(
        run, str(labels["model"]), method, str(labels["budget"]),
        dict(scores.get("task_scores", {})), scores, query_aware=labels.get("query") != "agnostic",
        expected_tasks=list(labels.get("expected_tasks") or []), context_lengths=list(labels.get("context_lengths")
                                                                                      or []),
        task=str(labels.get("task", info.get("task", ""))), status=status, info=info, **more,
    )


def load_runs(paths: list[str], warnings: list[str] | None = None) -> list[RunScores]:
    """Every run under the paths. A run that cannot be read (corrupt JSON or records, an unreadable config) is
    skipped and named in `warnings`; without a `warnings` list it is an error."""
    runs, skipped = [], []
    for folder in find_runs(paths):
        try:
            runs.append(load_run(folder))
        except (EvalkvError, OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as error:
            skipped.append(f"{folder}: skipped, cannot be read: {error}")
    if skipped and (warnings is None or not runs):
        raise EvalkvError("; ".join(skipped))
    if warnings is not None:
        warnings.extend([*skipped, *(note for run in runs for note in run.notes)])
    if not runs:
        raise EvalkvError(f"no runs under {', '.join(paths)} (a run directory holds predictions.jsonl or "
                          "scores.json; make one with evalkv pred)")
    return runs


def unfinished(runs: list[RunScores]) -> list[RunScores]:
    """Runs whose run.json does not say finished (stopped, failing, or still going): their scores are partial."""
    return [run for run in runs if (run.path / RUN_INFO).exists() and run.status != "finished"]
