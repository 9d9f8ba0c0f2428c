"""Needle-in-a-haystack scores (specs/benchmarks.md §C.2).

- needle recall (the task score, and the heatmap's): KVCache-Factory `scripts/scripts_needle/visualize.py`,
  `len(set(response.lower().split()) & set(answer.lower().split())) / len(set(answer.lower().split()))`; the answer
  keeps its final period, so "day" without it does not count. The task score is its mean x 100; `overall_score` is
  the mean on visualize.py's 0-1 scale ("Overall score %.3f").
- ROUGE-1 F x 10 (kv form only): run_needle_in_haystack.py's stored score,
  `RougeScorer(['rouge1', 'rougeL'], use_stemmer=True).score(needle, response)['rouge1'].fmeasure * 10`, 0 for an
  empty response; the response is the output stripped.
"""

from __future__ import annotations

import functools
from collections import defaultdict

from evalkv.metrics.registry import TaskMetric, mean_by, register_metric


def needle_recall(response: str, answer: str) -> float:
    expected = set(answer.lower().split())
    return len(set(response.lower().split()) & expected) / len(expected)


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge1_x10(needle: str, response: str) -> float:
    response = response.strip()
    return _rouge_scorer().score(needle, response)["rouge1"].fmeasure * 10 if response else 0.0


def needle_grid(records: list[dict], scores: list[float]) -> dict[str, dict[str, float]]:
    """Mean recall per (depth, context length) on the 0-1 scale: rows depth, columns length."""
    cells: dict = defaultdict(list)
    for record, score in zip(records, scores):
        cells[(float(record.get("depth", 0)), int(record.get("context_length", 0)))].append(score)
    grid: dict[str, dict[str, float]] = {}
    for depth, length in sorted(cells):
        values = cells[(depth, length)]
        grid.setdefault(f"{depth:g}", {})[str(length)] = sum(values) / len(values)
    return grid


def _breakdown(records: list[dict], scores: list[float]) -> dict:
    views = {
        "overall_score": round(sum(scores) / len(scores), 3),
        "by_context_length": mean_by(records, scores, "context_length"),
        "by_depth": mean_by(records, scores, "depth"),
        "grid": needle_grid(records, scores),
    }
    kv = [record for record in records if record.get("form") == "kv" and record.get("needle")]
    if kv:
        views["rouge1_x10"] = round(sum(rouge1_x10(r["needle"], r["pred"]) for r in kv) / len(kv), 3)
    return views


register_metric("needle", TaskMetric(
    "needle_recall", lambda record: needle_recall(record["pred"], record["answers"][0]), _breakdown))
