"""Passkey metric: the first integer in the output equals the key (Landmark Attention's `run_test.py`)."""

from __future__ import annotations

import re

from evalkv.metrics.registry import TaskMetric, mean_by, register_metric


def passkey_correct(prediction: str, answer: str) -> float:
    found = re.search(r"\d+", prediction)
    return float(found is not None and int(found.group()) == int(answer))


def _score(record: dict) -> float:
    return passkey_correct(record["pred"], record["answers"][0])


def _breakdown(records: list[dict], scores: list[float]) -> dict:
    return {
        "by_context_length": mean_by(records, scores, "context_length"),
        "by_depth": mean_by(records, scores, "depth"),
    }


register_metric("passkey", TaskMetric("passkey_accuracy", _score, _breakdown))
