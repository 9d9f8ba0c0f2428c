"""Which metric scores which benchmark task, and how a run's records become `scores.json`.

A record's `task` field (the benchmark's own task name) picks its metric. Task scores are the mean per-sample score
x 100 rounded to 2 decimals (the LongBench and RULER scripts' scale), or the metric's own `aggregate` where the
reference computes it in another order (perplexity: from the records); the average is the unweighted mean of the
task scores, perplexities (listed under `lower_is_better`) left out. Benchmark-level summaries (RULER's per-length
averages, LongBench's categories) go under `groups`. `sample_scores` keeps each task's per-sample scores in record
order with their sample ids, so intervals and paired tests (metrics/uncertainty.py) can be recomputed from
scores.json alone.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from evalkv.errors import EvalkvError

SampleScore = Callable[[dict], float]  # a record -> score in [0, 1]
Breakdown = Callable[[list[dict], list[float]], dict]  # records, their scores -> extra views (per length, ...)
Aggregate = Callable[[list[float]], float]  # per-sample scores -> the task score (0-100)
GroupSummary = Callable[[dict[str, float], dict[str, dict]], "dict | None"]  # task scores, breakdowns
SCORE_DECIMALS = 6  # per-sample scores as scores.json keeps them


@dataclass(frozen=True)
class TaskMetric:
    metric: str
    score: SampleScore
    breakdown: Breakdown | None = None
    aggregate: Aggregate | None = None  # default: `percent`
    # The task score from the records themselves, where it is not a function of per-sample scores (perplexity
    # weighs each text by its scored tokens); replaces `aggregate`.
    aggregate_records: Callable[[list[dict]], float] | None = None
    lower_is_better: bool = False  # perplexity: tables leave it out of averages over tasks


METRICS: dict[str, TaskMetric] = {}
GROUPS: dict[str, GroupSummary] = {}


def register_metric(task: str, metric: TaskMetric) -> None:
    METRICS[task] = metric


def register_group(name: str, summary: GroupSummary) -> None:
    """A benchmark-level summary of several tasks' scores, written to scores.json `groups[name]` when not None."""
    GROUPS[name] = summary


def metric_for(task: str) -> TaskMetric:
    if task not in METRICS:
        raise EvalkvError(f"no metric for task {task!r}; known tasks: {', '.join(sorted(METRICS))}")
    return METRICS[task]


def percent(values: list[float]) -> float:
    return round(100 * sum(values) / len(values), 2) if values else float("nan")


def _group_key(value) -> tuple:
    return (0, float(value), "") if isinstance(value, (int, float)) else (1, 0.0, str(value))


def mean_by(records: list[dict], scores: list[float], key: str, aggregate: Aggregate = percent) -> dict[str, float]:
    """Scores grouped by a record field, as percentages, numeric keys in numeric order (`50.0` shows as `50`)."""
    groups: dict = defaultdict(list)
    for record, score in zip(records, scores):
        groups[record.get(key)].append(score)
    return {f"{k:g}" if isinstance(k, float) else str(k): aggregate(groups[k]) for k in sorted(groups, key=_group_key)}


def check_record(record: dict, number: int) -> None:
    for required in ("task", "pred", "answers"):
        if required not in record:
            raise EvalkvError(f"record {number} has no {required!r} field (a record needs task, pred and answers)")
    if not isinstance(record["answers"], list):
        raise EvalkvError(f"record {number}: 'answers' must be a list of strings")


def score_records(records: list[dict]) -> dict:
    """The scores.json content for a run's records."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for number, record in enumerate(records, start=1):
        check_record(record, number)
        by_task[record["task"]].append(record)
    task_scores, counts, metrics, breakdowns, samples = {}, {}, {}, {}, {}
    for task in sorted(by_task):
        metric = metric_for(task)
        rows = by_task[task]
        scores = [float(metric.score(record)) for record in rows]
        task_scores[task] = (metric.aggregate_records(rows) if metric.aggregate_records
                             else (metric.aggregate or percent)(scores))
        counts[task] = len(rows)
        samples[task] = {"ids": sample_ids(rows), "scores": compact(scores)}
        metrics[task] = metric.metric
        if metric.breakdown is not None:
            breakdowns[task] = metric.breakdown(rows, scores)
    # perplexities are not averaged with accuracies: the average is over the other tasks (None without any)
    lower = sorted(task for task in task_scores if metric_for(task).lower_is_better)
    averaged = [value for task, value in task_scores.items() if task not in lower]
    average = round(sum(averaged) / len(averaged), 2) if averaged else None
    timing = {task: values for task, rows in sorted(by_task.items()) if (values := _mean_fields(rows))}
    result = {"task_scores": task_scores, "n": counts, "average": average, "metric": metrics, "breakdown": breakdowns,
              "timing": timing, "sample_scores": samples}
    if lower:
        result["lower_is_better"] = lower
    groups = {name: view for name, summary in GROUPS.items() if (view := summary(task_scores, breakdowns))}
    if groups:
        result["groups"] = groups
    return result


def sample_ids(records: list[dict]) -> list[str]:
    """Each record's id; records without one are named by their position among the task's records (`#0`, `#1`,
    ...), so predictions files from other harnesses pair by order."""
    return [str(record["id"]) if record.get("id") is not None else f"#{position}"
            for position, record in enumerate(records)]


def compact(scores: list[float]) -> list[float | int]:
    """Per-sample scores as scores.json keeps them: SCORE_DECIMALS decimals, whole numbers as integers."""
    rounded = [round(float(score), SCORE_DECIMALS) for score in scores]
    return [int(value) if value.is_integer() else value for value in rounded]


TIMING_FIELDS = ("prompt_tokens", "new_tokens", "kept_tokens", "prefill_s", "decode_s")


def _mean_fields(records: list[dict]) -> dict[str, float]:
    """Means of the cost fields evalkv records (absent from predictions written elsewhere)."""
    means = {}
    for field in TIMING_FIELDS:
        values = [record[field] for record in records if isinstance(record.get(field), (int, float))]
        if values:
            means[field] = round(sum(values) / len(values), 4)
    return means
