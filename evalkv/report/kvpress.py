"""Reading NVIDIA kvpress's evaluation folders as data, so that a kvpress result and an evalkv result of the same
setting land in one table (no kvpress import).

kvpress's `evaluation/evaluate.py` (kvpress 0.5.5 on PyPI, the same code as NVIDIA/kvpress@8bb29b9 up to a
`trust_remote_code` option) writes one folder per run, `<dataset>__<data_dir>__<model, / as -->__<press_name>__<ratio
as %.2f>[__fraction<f>][__max_context<n>][__query_aware]...` (`EvaluationConfig.get_results_dir`), holding:

- `predictions.csv`: the data set's columns except `context`, plus `predicted_answer` and `compression_ratio`, in no
  fixed order (`list(set(columns) - {"context"})`). For RULER: `task`, `question`, `answer_prefix`,
  `max_new_tokens` and `answer`, a list column that pandas writes as numpy prints an array (`['a' 'b']`, the
  elements' reprs, wrapped at 75 characters).
- `metrics.json`: the data set's scorer output. RULER (`benchmarks/ruler/calculate_metrics.py`):
  `{task: {"string_match": score}}`, 0-100 to 2 decimals, `string_match_part` for qa_*, `string_match_all` for the
  rest. LongBench (`benchmarks/longbench/calculate_metrics.py`): one number, the score of the task named by
  `data_dir`.
- `config.yaml`: `EvaluationConfig`'s fields (`dataset`, `data_dir`, `model`, `press_name`, `compression_ratio`, or
  `threshold` / `head_compression_ratio` in its place, `query_aware`, `fraction`, `press_init_command`, ...),
  written last.

A folder becomes a row labelled `kvpress:<press_name>` at budget `r<compression_ratio>` (`no_press`, kvpress's full
cache, has no budget); `query_aware: false`, kvpress's default, is a query-agnostic row. Its scores are kvpress's
own (metrics.json). RULER predictions are also scored by evalkv's RULER metric, and a task where the two disagree is
named: kvpress's scorer deletes control characters from a prediction where RULER's evaluate.py turns them into
newlines, so a reference split by one counts for kvpress only.
"""

from __future__ import annotations

import ast
import functools
import io
import tokenize
from pathlib import Path

import pandas as pd
import yaml

from evalkv.errors import EvalkvError
from evalkv.metrics import score_records
from evalkv.paths import configs_dir
from evalkv.records import NO_BUDGET, read_json
from evalkv.tasks.ruler.constants import RULER_TASKS

KVPRESS_PREDICTIONS = "predictions.csv"
KVPRESS_METRICS = "metrics.json"
KVPRESS_CONFIG = "config.yaml"
PREFIX = "kvpress:"
NO_PRESS = "no_press"
KVPRESS_FULL = PREFIX + NO_PRESS  # kvpress's full cache, as its row is labelled
DATASETS = ("ruler", "longbench")  # the data sets whose metrics.json this module reads
# The hub renamed Meta's Llama 3.1 repositories (`Meta-Llama-3.1-8B-Instruct` -> `Llama-3.1-8B-Instruct`) and
# redirects the old ids; kvpress's default model is the old one.
RENAMED = {"meta-llama/meta-llama-3.1-": "meta-llama/llama-3.1-"}


def is_kvpress_run(folder: Path) -> bool:
    """A finished kvpress evaluation folder: its metrics.json and config.yaml (evalkv writes neither metrics.json)."""
    return (folder / KVPRESS_METRICS).is_file() and (folder / KVPRESS_CONFIG).is_file()


def read_kvpress_run(folder: Path) -> tuple[dict, dict, list[str]]:
    """The run's labels (as evalkv pred writes them into run.json), its scores (scores.json's shape) and notes."""
    config = yaml.safe_load((folder / KVPRESS_CONFIG).read_text(encoding="utf-8"))
    if not isinstance(config, dict) or "press_name" not in config or "dataset" not in config:
        raise EvalkvError(f"{folder}: has {KVPRESS_METRICS} and {KVPRESS_CONFIG} but the config has no press_name "
                          "and dataset, so it is neither an evalkv run nor a kvpress evaluation folder")
    dataset, data_dir = str(config["dataset"]), str(config.get("data_dir") or "")
    if dataset not in DATASETS:
        raise EvalkvError(f"{folder}: kvpress data set {dataset!r} is not read by evalkv (it reads "
                          f"{', '.join(DATASETS)}: their metrics.json has one score per task)")
    task_scores = _task_scores(read_json(folder / KVPRESS_METRICS), dataset, data_dir, folder)
    predictions = _predictions(folder / KVPRESS_PREDICTIONS)
    lengths = [int(data_dir)] if dataset == "ruler" and data_dir.isdigit() else []
    scores = {
        "task_scores": task_scores,
        "n": {task: int(n) for task, n in predictions["task"].value_counts().sort_index().items()}
        if predictions is not None else {},
        "average": round(sum(task_scores.values()) / len(task_scores), 2),
        "metric": {task: "kvpress " + ("string_match" if dataset == "ruler" else "score") for task in task_scores},
        "breakdown": {task: {"by_context_length": {str(lengths[0]): score}} for task, score in task_scores.items()}
        if lengths else {},
    }
    labels = {
        "model": kvpress_model_name(str(config["model"])),
        "method": PREFIX + str(config["press_name"]),
        "method_variant": "",
        "budget": _budget(config, folder),
        "query": "aware" if config.get("query_aware") else "agnostic",
        "expected_tasks": sorted(task_scores),
        "context_lengths": lengths,
        "task": f"kvpress-{dataset}-{data_dir}" + (f"-fraction={float(config['fraction']):g}"
                                                   if float(config.get("fraction", 1.0)) < 1.0 else ""),
    }
    notes = _disagreements(folder, task_scores, predictions, lengths) if dataset == "ruler" else []
    return labels, scores, notes


def _task_scores(metrics, dataset: str, data_dir: str, folder: Path) -> dict[str, float]:
    if dataset == "longbench" and isinstance(metrics, (int, float)):
        return {data_dir: float(metrics)}
    if dataset == "ruler" and isinstance(metrics, dict) and metrics and all(
            isinstance(value, dict) and isinstance(value.get("string_match"), (int, float))
            for value in metrics.values()):
        return {str(task): float(value["string_match"]) for task, value in metrics.items()}
    raise EvalkvError(f"{folder}: {KVPRESS_METRICS} is not kvpress's {dataset} format (RULER: "
                      '{task: {"string_match": score}}; LongBench: one number)')


def _budget(config: dict, folder: Path) -> str:
    """`r<ratio>`: compression_ratio, or DuoAttention's head_compression_ratio, which kvpress's folder name puts in
    its place; no_press has none. A threshold (DMS, KVzap) fixes no ratio, so such a run has no place on the axis."""
    if config["press_name"] == NO_PRESS:
        return NO_BUDGET
    if config.get("threshold") is not None:
        raise EvalkvError(f"{folder}: kvpress run set by threshold={config['threshold']} (DMS / KVzap), which fixes "
                          "no compression ratio; evalkv reads kvpress runs set by compression_ratio")
    ratio = config.get("head_compression_ratio", config.get("compression_ratio"))
    return f"r{float(ratio):g}"


@functools.cache
def _model_names() -> dict[str, str]:
    """evalkv's model configs: hub id (lower case) -> config name."""
    names = {}
    for path in sorted((configs_dir() / "model").glob("*.yaml")):
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if config.get("source") == "hub" and config.get("path"):
            names.setdefault(str(config["path"]).lower(), str(config.get("name", path.stem)))
    return names


def kvpress_model_name(hub_id: str) -> str:
    """The evalkv model config of a kvpress run's hub model (so both land in the same rows), else the hub id."""
    key = hub_id.lower()
    for old, new in RENAMED.items():
        key = key.replace(old, new)
    return _model_names().get(key, hub_id)


def _predictions(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "task" not in frame.columns:
        raise EvalkvError(f"{path}: no task column (kvpress writes one per prediction)")
    return frame


def listed(cell: str) -> list[str]:
    """A list cell of predictions.csv as its strings: numpy's `['a' 'b']` (or a Python list's `['a', 'b']`); a cell
    that is not a bracketed list is one answer."""
    text = cell.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return [cell]
    tokens = tokenize.generate_tokens(io.StringIO(text[1:-1]).readline)
    return [ast.literal_eval(token.string) for token in tokens if token.type == tokenize.STRING]


def _disagreements(folder: Path, task_scores: dict[str, float], predictions: pd.DataFrame | None,
                   lengths: list[int]) -> list[str]:
    """The tasks whose score by evalkv's RULER metric differs from kvpress's metrics.json, as a note."""
    if predictions is None or not {"predicted_answer", "answer"} <= set(predictions.columns):
        return []
    try:
        records = [{"task": row.task, "pred": row.predicted_answer, "answers": listed(row.answer),
                    **({"context_length": lengths[0]} if lengths else {})}
                   for row in predictions.itertuples(index=False) if row.task in RULER_TASKS]
        evalkv_scores = score_records(records)["task_scores"] if records else {}
    except (tokenize.TokenError, SyntaxError, ValueError) as error:
        return [f"{folder}: its predictions could not be rescored by evalkv's RULER metric ({error}); the table "
                "shows kvpress's scores"]
    differing = [f"{task} {score:.2f} (metrics.json {task_scores[task]:.2f})" for task, score in evalkv_scores.items()
                 if task in task_scores and abs(score - task_scores[task]) > 0.005]
    if not differing:
        return []
    return [f"{folder}: evalkv's RULER metric on kvpress's predictions gives {', '.join(differing)}; the table shows "
            "kvpress's scores (one known difference: kvpress's scorer deletes control characters that RULER's turns "
            "into newlines)"]
