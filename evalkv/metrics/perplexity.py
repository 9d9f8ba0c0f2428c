"""Perplexity: exp of the mean NLL over every scored token of every text, as StreamingLLM's and LaCache's scripts
compute it over their concatenated NLLs (`torch.exp(torch.stack(nlls).mean())`).

A record (evalkv/run/pred.py `text_record`) holds one text's per-token NLLs (`nll`, from position `first_scored`)
and the task's `bucket_size`. The task score is the PPL over all records, each token weighted equally (2 decimals;
lower is better). The breakdown gives, per position bucket of `bucket_size` scored positions (keyed `0`, `1024`, ...
for buckets of 1024: bucket `0` holds positions 1-1024, the first token being unscored, `1024` positions 1025-2048),
so `num_eval_tokens` a multiple of `bucket_size` fills every bucket, the mean NLL (`nll_by_position`, 4 decimals)
and its PPL (`ppl_by_position`), over every text that reaches the bucket: `evalkv table --view nll_by_position`,
`evalkv plot position`.
"""

from __future__ import annotations

import math
from collections import defaultdict

from evalkv.errors import EvalkvError
from evalkv.metrics.registry import TaskMetric, register_metric

TASKS = ("wikitext2", "pg19", "text")  # the perplexity task's record names (evalkv/tasks/perplexity.py)
DEFAULT_BUCKET = 1024


def _nll(record: dict) -> list[float]:
    values = record.get("nll")
    if not isinstance(values, list) or not values:
        raise EvalkvError(f"perplexity record {record.get('id')!r} has no `nll` list (the per-token NLLs that "
                          "evalkv pred task=perplexity writes)")
    return values


def mean_nll(record: dict) -> float:
    values = _nll(record)
    return sum(values) / len(values)


def perplexity(records: list[dict]) -> float:
    """exp(mean NLL) over every scored token of every record."""
    values = [value for record in records for value in _nll(record)]
    return round(math.exp(sum(values) / len(values)), 2)


def by_position(records: list[dict]) -> dict:
    """Mean NLL and PPL per position bucket, over every record's tokens in it."""
    sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0])
    for record in records:
        size = int(record.get("bucket_size") or DEFAULT_BUCKET)
        first = int(record.get("first_scored", 1))
        for offset, value in enumerate(_nll(record)):
            cell = sums[(first + offset - 1) // size * size]  # position p predicts token p, from p - 1
            cell[0] += value
            cell[1] += 1
    means = {start: total / count for start, (total, count) in sorted(sums.items())}
    return {
        "nll_by_position": {str(start): round(mean, 4) for start, mean in means.items()},
        "ppl_by_position": {str(start): round(math.exp(mean), 2) for start, mean in means.items()},
    }


for _task in TASKS:
    register_metric(_task, TaskMetric("perplexity", mean_nll, lambda records, _scores: by_position(records),
                                      aggregate_records=perplexity, lower_is_better=True))
