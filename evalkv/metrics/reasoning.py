"""The math reasoning tasks' metric: math-verify's answer extraction and equivalence (huggingface/Math-Verify,
`parse` + `verify`: LaTeX / plain expressions to SymPy, numeric and symbolic equality, sets, intervals).

A record is correct when the answer math-verify extracts from its output verifies against the gold answer. What is
parsed: the text after the last `</think>` when the output has one (the answer after the thought, as lighteval's
`remove_reasoning_tags` scores thinking models), else the whole output. Extraction as math-verify's README advises
when the prompt asks for a `\\boxed{}` answer: `LatexExtractionConfig(boxed_match_priority=0)` then
`ExprExtractionConfig()`; the gold answer is parsed as `\\boxed{answer}` with the default configs. The task score
(pass@1) is the mean correctness over the samples x 100 (with k samples of every problem this is DeepSeek-R1's pass@1
averaged over k); the `reasoning` breakdown adds maj@k (the majority answer of each problem's samples, grouped by
math-verify equivalence, is correct), pass@k (some sample is correct), the mean new tokens and the share of samples
that finished (stopped on a stop token rather than at max_new_tokens), in percent.

math-verify bounds each parse and comparison with a 5-second `signal.alarm`, which only the main thread may set; in
any other thread evalkv calls it with the timeout off (math-verify's advice for threaded use), so scoring works there
too, without that bound. A parse or comparison that times out (or fails) counts as no answer / not equal, as in
math-verify; its warnings, which print the whole output, are silenced (the `math_verify` logger at ERROR).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import defaultdict
from importlib.metadata import version

from evalkv.metrics.registry import TaskMetric, percent, register_metric

REASONING_TASKS = ("gsm8k", "math500", "aime24", "aime25")
# The `reasoning` breakdown's keys, in the order tables show them.
REASONING_KEYS = ("pass@1", "maj@k", "pass@k", "new_tokens", "finished", "k", "problems")
THINK_END = "</think>"
_TIMEOUT_S = 5
# A timed-out parse counts as no answer; math-verify's warning about it would print the whole (32K-token) output.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def answer_text(output: str) -> str:
    """The part of an output that holds its answer: after the last `</think>`, or all of it."""
    return output.rpartition(THINK_END)[2] if THINK_END in output else output


def _timeout() -> int | None:
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=8192)
def parsed_answer(output: str) -> tuple:
    """math-verify's extraction of an output's answer (empty when it finds none)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    targets = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return tuple(parse(answer_text(output), targets, parsing_timeout=_timeout()))


@functools.lru_cache(maxsize=8192)
def parsed_gold(answer: str) -> tuple:
    from math_verify import parse

    return tuple(parse(f"\\boxed{{{answer}}}", parsing_timeout=_timeout()))


def equivalent(gold: tuple, answer: tuple) -> bool:
    """math-verify's `verify(gold, answer)` (asymmetric: `gold` guides the comparison)."""
    from math_verify import verify

    return bool(gold) and bool(answer) and verify(list(gold), list(answer), timeout_seconds=_timeout())


def is_correct(output: str, answers: list[str]) -> bool:
    return any(equivalent(parsed_gold(str(answer)), parsed_answer(output)) for answer in answers)


def majority_answer(outputs: list[str]) -> tuple:
    """The answer most of the outputs give, grouped by equivalence to each group's first answer (ties: the group
    formed first); outputs without an extractable answer do not vote. Empty when none has an answer."""
    groups: list[tuple[tuple, int]] = []
    for output in outputs:
        answer = parsed_answer(output)
        if not answer:
            continue
        for index, (first, count) in enumerate(groups):
            if equivalent(first, answer):
                groups[index] = (first, count + 1)
                break
        else:
            groups.append((answer, 1))
    return max(groups, key=lambda group: group[1])[0] if groups else ()


def problem_of(record: dict) -> str:
    """The problem a record samples (`problem`; for records written elsewhere, the id without its `-s{j}`)."""
    if "problem" in record:
        return str(record["problem"])
    head, separator, tail = str(record.get("id", "")).rpartition("-s")
    return head if separator and tail.isdigit() else str(record.get("id", id(record)))


def _score(record: dict) -> float:
    return float(is_correct(record["pred"], record["answers"]))


def reasoning_breakdown(records: list[dict], scores: list[float]) -> dict:
    by_problem: dict[str, list[int]] = defaultdict(list)
    for position, record in enumerate(records):
        by_problem[problem_of(record)].append(position)
    majority, any_correct = [], []
    for positions in by_problem.values():
        answers = records[positions[0]]["answers"]
        voted = majority_answer([records[p]["pred"] for p in positions])
        majority.append(float(any(equivalent(parsed_gold(str(answer)), voted) for answer in answers)))
        any_correct.append(max(scores[p] for p in positions))
    tokens = [record["new_tokens"] for record in records if isinstance(record.get("new_tokens"), (int, float))]
    finished = [float(record["finished"]) for record in records if isinstance(record.get("finished"), bool)]
    return {"reasoning": {
        "pass@1": percent(scores),
        "maj@k": percent(majority),
        "pass@k": percent(any_correct),
        "new_tokens": round(sum(tokens) / len(tokens), 1) if tokens else None,
        "finished": percent(finished) if finished else None,
        "k": max(len(positions) for positions in by_problem.values()),
        "problems": len(by_problem),
    }}


_METRIC = TaskMetric(f"pass@1 (math-verify {version('math-verify')})", _score, reasoning_breakdown)
for _task in REASONING_TASKS:
    register_metric(_task, _METRIC)
