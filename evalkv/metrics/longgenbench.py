"""LongGenBench GSM8K's metric, as the reference script computes it (Dominic789654/LongGenBench
`longgenbench_GSM8K_openai.py` at commit 9845864: `extract_ans`, `process_question`, `test_answer`,
`parse_pred_ans`).

- Answers out of an output: every `Answer_` is replaced by a newline, and each stretch of text that follows a colon
  at the end of a line (`:\\n`) up to the next blank line (or the end) is one answer, stripped. The i-th such
  stretch answers the prompt's i-th question; the reference writes only as many questions as there are stretches
  (`zip`), so an unanswered question is not counted, and an output with more stretches than questions loses the
  extra ones.
- A question is correct when the last number (`\\d*\\.?\\d+`) of `A_model:Q_{i}\\n{answer}\\n`, commas removed,
  equals the last number of the gold solution (the text after GSM8K's `####`, commas kept). So an answer without a
  number counts as its own index i (0-based), and a gold answer written with a thousands separator (14 of GSM8K's
  1,319, e.g. `5,600`) compares as its last group (`600`): both as in the reference.
- The task score is the reference's `ratio`: correct over counted questions, over all of a run's prompts, x 100.
  What the reference does not print is in the `longgenbench` breakdown: how many questions were asked and answered,
  and `all_questions`, correct over every question asked (an unanswered question counts as wrong), the figure that
  rewards no method for stopping early.

The reference scores through a text file it writes and reads back line by line; an answer holding a line that begins
with `Question:`, `A_model:` or `A_gold:` would be cut there. evalkv scores the answers directly.
"""

from __future__ import annotations

import re

from evalkv.metrics.registry import TaskMetric, percent, register_metric

TASK = "longgenbench_gsm8k"
_NUMBER = re.compile(r"\d*\.?\d+")
_ANSWER = re.compile(r"(?<=:\n)(.*?)(?=\n\n|$)", re.DOTALL)


def answers_of(output: str) -> list[str]:
    """The answers the reference cuts out of an output, in order."""
    return [answer.strip() for answer in _ANSWER.findall("\n".join(output.split("Answer_")))]


def same_answer(index: int, answer: str, solution: str) -> bool:
    """The reference's `test_answer` on what it writes for question `index` (0-based) and its gold solution."""
    predicted = _NUMBER.findall(f"A_model:Q_{index}\n{answer}\n".replace(",", ""))
    gold = _NUMBER.findall(f"A_gold:\n{solution}\n\n")
    return bool(predicted) and bool(gold) and predicted[-1] == gold[-1]


def judged(record: dict) -> tuple[int, int, int]:
    """(questions asked, questions counted, correct) of one prompt's record."""
    solutions = [str(answer) for answer in record["answers"]]
    answers = answers_of(str(record["pred"]))
    counted = min(len(answers), len(solutions))
    correct = sum(same_answer(index, answers[index], solutions[index]) for index in range(counted))
    return len(solutions), counted, correct


def _score(record: dict) -> float:
    """A prompt's share of its questions answered correctly (unanswered ones wrong): the per-sample score kept for
    paired comparisons; the task score is the reference's ratio (`_ratio`)."""
    asked, _, correct = judged(record)
    return correct / asked if asked else 0.0


def _totals(records: list[dict]) -> tuple[int, int, int]:
    """(questions asked, questions counted, correct) over every record."""
    counts = [judged(record) for record in records]
    return tuple(sum(values) for values in zip(*counts)) if counts else (0, 0, 0)


def _ratio_of(counted: int, correct: int) -> float:
    return round(100 * correct / counted, 2) if counted else 0.0


def _ratio(records: list[dict]) -> float:
    _, counted, correct = _totals(records)
    return _ratio_of(counted, correct)


def breakdown(records: list[dict], scores: list[float]) -> dict:
    asked, counted, correct = _totals(records)
    tokens = [record["new_tokens"] for record in records if isinstance(record.get("new_tokens"), (int, float))]
    finished = [float(record["finished"]) for record in records if isinstance(record.get("finished"), bool)]
    return {"longgenbench": {
        "ratio": _ratio_of(counted, correct),
        "all_questions": round(100 * correct / asked, 2) if asked else 0.0,
        "questions": asked,
        "answered": counted,
        "correct": correct,
        "new_tokens": round(sum(tokens) / len(tokens), 1) if tokens else None,
        "finished": percent(finished) if finished else None,
    }}


register_metric(TASK, TaskMetric("LongGenBench ratio (correct / answered questions)", _score, breakdown,
                                 aggregate_records=_ratio))
