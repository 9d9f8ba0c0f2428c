"""LongBench v2's answer extraction and accuracy, as THUDM/LongBench@2e00731 `pred.py` (`extract_answer`) and
`result.py` compute them (docs/benchmarks.md#longbench_v2-metrics).

A response (the record's `pred`, stripped) loses every `*`; its answer is the letter of the first match of
`The correct answer is \\(([A-D])\\)`, else of `The correct answer is ([A-D])`, else none (case-sensitive, so "The
correct answer is Both" answers B, as the reference's does). A question scores 1 when that letter is the gold one
(`answers[0]`). result.py's columns, each `round(100 * correct / n, 1)`: Overall, Easy / Hard (difficulty "easy",
else hard), Short / Medium / Long (length "short", "medium", else long); with its `compensated = True`, a response
without a letter counts 0.25 (a guess among four). evalkv reports both: the task score is Overall, `breakdown` holds
`by_difficulty`, `by_length`, `by_domain` and `compensated` (the six columns compensated). Deviation: a bucket without
questions is null (result.py divides by zero).
"""

from __future__ import annotations

import re

from evalkv.metrics.registry import TaskMetric, mean_by, register_metric
from evalkv.tasks.longbench_v2 import TASK_NAMES

ANSWER_PATTERNS = (re.compile(r"The correct answer is \(([A-D])\)"), re.compile(r"The correct answer is ([A-D])"))
DIFFICULTIES = ("easy", "hard")  # result.py: "easy", anything else is hard
LENGTHS = ("short", "medium", "long")  # result.py: "short", "medium", anything else is long
GUESS = 0.25  # result.py's compensated score of a response without an answer letter


def extract_answer(response: str) -> str | None:
    """pred.py's `extract_answer`: the answer letter of a response, or None."""
    response = response.replace("*", "")
    for pattern in ANSWER_PATTERNS:
        found = pattern.search(response)
        if found:
            return found.group(1)
    return None


def record_answer(record: dict) -> str | None:
    return extract_answer(record["pred"].strip())


def judge(record: dict) -> float:
    return float(record_answer(record) == record["answers"][0])


def accuracy(values: list[float]) -> float | None:
    """result.py's `round(100 * correct / n, 1)`; None for no questions."""
    return round(100 * sum(values) / len(values), 1) if values else None


def _buckets(records: list[dict], values: list[float], key: str, names: tuple[str, ...]) -> dict[str, float | None]:
    """Accuracy per value of `key` as result.py splits it: each of `names` but the last, and the last for the rest."""
    groups: dict[str, list[float]] = {name: [] for name in names}
    for record, value in zip(records, values):
        groups[record[key] if record[key] in names[:-1] else names[-1]].append(value)
    return {name: accuracy(group) for name, group in groups.items()}


def breakdown(records: list[dict], scores: list[float]) -> dict:
    """result.py's columns by difficulty and length, plain and compensated, and accuracy per domain; a view whose
    field some record lacks (predictions written elsewhere) is left out."""
    compensated = [GUESS if record_answer(record) is None else score for record, score in zip(records, scores)]
    views: dict = {}
    columns = {"overall": accuracy(compensated)}
    for key, view, names in (("difficulty", "by_difficulty", DIFFICULTIES), ("length", "by_length", LENGTHS)):
        if all(key in record for record in records):
            views[view] = _buckets(records, scores, key, names)
            columns.update(_buckets(records, compensated, key, names))
    if all("domain" in record for record in records):
        views["by_domain"] = mean_by(records, scores, "domain", accuracy)
    views["compensated"] = columns
    return views


for _task in TASK_NAMES.values():
    register_metric(_task, TaskMetric("longbench_v2_accuracy", judge, breakdown, accuracy))
