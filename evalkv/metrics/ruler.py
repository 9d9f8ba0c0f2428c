"""RULER's metrics, as NVIDIA/RULER `scripts/eval/evaluate.py` and `scripts/eval/synthetic/constants.py` compute them.

A prediction is post-processed (`strip`, control characters to newlines, `strip`); a reference counts when its
lower-cased text occurs in the lower-cased prediction. `string_match_all` (niah, vt, cwe, fwe) scores the fraction
of references found; `string_match_part` (qa) scores 1 if any is found. A task's score is
`round(sum(scores) / n * 100, 2)` in that order, per length as RULER reports it and over every length pooled.
The RULER group view gives, per length, the mean of the task scores at that length, and their mean over lengths
(the README's "Avg."), each rounded to 2 decimals.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from evalkv.metrics.registry import TaskMetric, mean_by, register_group, register_metric
from evalkv.tasks.ruler.constants import RULER_TASKS

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_pred(prediction: str) -> str:
    """evaluate.py `postprocess_pred`."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def match_all(prediction: str, references: list[str]) -> float:
    """One sample of `string_match_all`: the fraction of references contained in the prediction."""
    return sum(1.0 if r.lower() in prediction.lower() else 0.0 for r in references) / len(references)


def match_part(prediction: str, references: list[str]) -> float:
    """One sample of `string_match_part`: 1 if any reference is contained in the prediction."""
    return max(1.0 if r.lower() in prediction.lower() else 0.0 for r in references)


def ruler_score(sample_scores: list[float]) -> float:
    """RULER's task score from per-sample scores: `round(sum(...) / len(...) * 100, 2)`."""
    return round(sum(sample_scores) / len(sample_scores) * 100, 2)


def string_match_all(predictions: list[str], references: list[list[str]]) -> float:
    return ruler_score([match_all(p, r) for p, r in zip(predictions, references)])


def string_match_part(predictions: list[str], references: list[list[str]]) -> float:
    return ruler_score([match_part(p, r) for p, r in zip(predictions, references)])


def _by_context_length(records: list[dict], scores: list[float]) -> dict:
    return {"by_context_length": mean_by(records, scores, "context_length", ruler_score)}


def _metric(sample: Callable[[str, list[str]], float], name: str) -> TaskMetric:
    return TaskMetric(name, lambda record: sample(postprocess_pred(record["pred"]), record["answers"]),
                      _by_context_length, ruler_score)


def ruler_suite(task_scores: dict[str, float], breakdowns: dict[str, dict]) -> dict | None:
    tasks = [task for task in task_scores if task in RULER_TASKS]
    if not tasks:
        return None
    per_length: dict[str, list[float]] = {}
    for task in tasks:
        for length, score in breakdowns.get(task, {}).get("by_context_length", {}).items():
            per_length.setdefault(length, []).append(score)
    by_length = {length: round(sum(values) / len(values), 2) for length, values in per_length.items()}
    return {
        "tasks": tasks,
        "by_context_length": by_length,
        "tasks_by_context_length": {length: len(values) for length, values in per_length.items()},
        "average": round(sum(by_length.values()) / len(by_length), 2) if by_length else None,
    }


for _name, _task in RULER_TASKS.items():
    register_metric(_name, _metric(match_part if _task.metric == "string_match_part" else match_all, _task.metric))
register_group("ruler", ruler_suite)
