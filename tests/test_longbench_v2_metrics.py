"""LongBench v2's scoring: pred.py's `extract_answer` and result.py's columns (THUDM/LongBench@2e00731), checked on
responses whose answer letter is stated by hand and against result.py's arithmetic re-done here."""

from __future__ import annotations

import pytest

from evalkv.metrics import score_records
from evalkv.metrics.longbench_v2 import extract_answer

# (response, the letter pred.py's extract_answer finds in it)
RESPONSES = [
    ("The correct answer is (B)", "B"),
    ("**The correct answer is (C)**", "C"),  # every * removed first
    ("The correct answer is *(A)*.", "A"),
    ("Reasoning... The correct answer is D.", "D"),  # the second pattern: no parentheses
    ("The correct answer is Both of them", "B"),  # the second pattern's quirk: the first capital of a word
    ("The correct answer is (A). Earlier I thought The correct answer is (B)", "A"),  # the first match
    ("The correct answer is C, not (B). The correct answer is (B)", "B"),  # the parenthesised pattern goes first
    ("the correct answer is (A)", None),  # case-sensitive
    ("The correct answer is (E)", None),
    ("The correct answer is (a)", None),
    ("The correct answer is: (A)", None),
    ("The correct answer is (insert answer here)", None),
    ("", None),
]


@pytest.mark.parametrize(("response", "letter"), RESPONSES)
def test_extract_answer_is_the_references(response, letter):
    assert extract_answer(response) == letter


def records() -> list[dict]:
    """Predictions over every difficulty x length, right, wrong and without a letter, in two domains."""
    rows = []
    for index, (response, letter) in enumerate(RESPONSES * 2):
        gold = "ABCD"[index % 4]
        rows.append({
            "id": f"q{index}", "task": "longbench_v2", "pred": f"  {response}\n", "answers": [gold],
            "difficulty": ("easy", "hard", "hard")[index % 3], "length": ("short", "medium", "long", "long")[index % 4],
            "domain": ("Code", "QA")[index % 2], "letter": letter,
        })
    return rows


def result_py(rows: list[dict], compensated: bool) -> list[float]:
    """result.py's line for one results file, re-done: [Overall, Easy, Hard, Short, Medium, Long]."""
    counts = dict.fromkeys(("easy", "hard", "short", "medium", "long"), 0)
    correct = dict.fromkeys(counts, 0.0)
    for row in rows:
        judge = row["letter"] == row["answers"][0]
        value = 0.25 if compensated and row["letter"] is None else int(judge)
        difficulty = "easy" if row["difficulty"] == "easy" else "hard"
        length = row["length"] if row["length"] in ("short", "medium") else "long"
        for key in (difficulty, length):
            counts[key] += 1
            correct[key] += value
    overall = round(100 * (correct["easy"] + correct["hard"]) / len(rows), 1)
    return [overall, *(round(100 * correct[key] / counts[key], 1) for key in counts)]


def columns(scores: dict, view: dict | None = None) -> list[float]:
    breakdown = scores["breakdown"]["longbench_v2"]
    if view is None:
        return [scores["task_scores"]["longbench_v2"], *breakdown["by_difficulty"].values(),
                *breakdown["by_length"].values()]
    return list(view.values())


def test_scores_are_result_pys_columns():
    rows = records()
    scores = score_records(rows)
    assert scores["metric"]["longbench_v2"] == "longbench_v2_accuracy" and scores["n"]["longbench_v2"] == 26
    assert columns(scores) == result_py(rows, compensated=False)
    breakdown = scores["breakdown"]["longbench_v2"]
    assert list(breakdown["by_difficulty"]) == ["easy", "hard"]
    assert list(breakdown["by_length"]) == ["short", "medium", "long"]
    assert list(breakdown["compensated"]) == ["overall", "easy", "hard", "short", "medium", "long"]
    assert columns(scores, breakdown["compensated"]) == result_py(rows, compensated=True)
    assert columns(scores) != result_py(rows, compensated=True)  # the fixture tells the two apart


def test_a_small_case_by_hand():
    rows = [
        {"task": "longbench_v2_cot", "pred": "The correct answer is (A)", "answers": ["A"], "difficulty": "easy",
         "length": "short", "domain": "QA"},
        {"task": "longbench_v2_cot", "pred": "The correct answer is (B)", "answers": ["A"], "difficulty": "hard",
         "length": "short", "domain": "QA"},
        {"task": "longbench_v2_cot", "pred": "I cannot tell.", "answers": ["C"], "difficulty": "hard",
         "length": "long", "domain": "Code"},
    ]
    scores = score_records(rows)
    breakdown = scores["breakdown"]["longbench_v2_cot"]
    assert scores["task_scores"] == {"longbench_v2_cot": 33.3}  # round(100 / 3, 1)
    assert breakdown["by_difficulty"] == {"easy": 100.0, "hard": 0.0}
    assert breakdown["by_length"] == {"short": 50.0, "medium": None, "long": 0.0}  # result.py: ZeroDivisionError
    assert breakdown["by_domain"] == {"Code": 0.0, "QA": 50.0}
    assert breakdown["compensated"] == {"overall": 41.7, "easy": 100.0, "hard": 12.5, "short": 50.0, "medium": None,
                                        "long": 25.0}


def test_predictions_without_the_question_fields_still_score():
    rows = [{"task": "longbench_v2", "pred": "The correct answer is (D)", "answers": ["D"]}]
    scores = score_records(rows)
    assert scores["task_scores"] == {"longbench_v2": 100.0}
    assert scores["breakdown"]["longbench_v2"] == {"compensated": {"overall": 100.0}}
