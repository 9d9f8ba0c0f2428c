"""RULER's metrics on hand-worked examples (scripts/eval/evaluate.py, scripts/eval/synthetic/constants.py)."""

from __future__ import annotations

import pytest

from evalkv.metrics import score_records
from evalkv.metrics.ruler import postprocess_pred, ruler_suite, string_match_all, string_match_part


def test_postprocessing_strips_and_turns_control_characters_into_newlines():
    assert postprocess_pred("  \x00abc\tdef\x1f \n") == "abc\ndef"


def test_string_match_all_is_the_fraction_of_references_found_case_insensitively():
    predictions = ["The numbers are 123 and 456.", "ABC-DEF", "nothing"]
    references = [["123", "456", "789", "000"], ["abc-def"], ["x"]]
    # (2/4 + 1 + 0) / 3 * 100 = 50.0
    assert string_match_all(predictions, references) == 50.0


def test_string_match_part_counts_a_sample_when_any_reference_is_found():
    assert string_match_part(["It is Paris, France", "no idea", "LONDON"],
                             [["Paris", "Lyon"], ["Rome"], ["london", "uk"]]) == 66.67


def test_rounding_follows_ruler_order_of_operations():
    # sum / n * 100 rounds 0.5 + 0.5 + 1/3 ... exactly as RULER; 1/3 of 3 samples -> 33.33
    assert string_match_all(["a", "", ""], [["a"], ["b"], ["c"]]) == 33.33
    assert string_match_all(["x y"], [["x", "y", "z"]]) == 66.67


@pytest.mark.parametrize("task,metric", [("niah_single_1", "string_match_all"), ("vt", "string_match_all"),
                                         ("cwe", "string_match_all"), ("fwe", "string_match_all"),
                                         ("qa_1", "string_match_part"), ("qa_2", "string_match_part")])
def test_each_task_uses_its_ruler_metric(task, metric):
    answers = ["alpha", "gamma"]
    records = [{"task": task, "pred": " Ans: Alpha and beta\x01", "answers": answers, "context_length": 4096},
               {"task": task, "pred": "gamma", "answers": answers, "context_length": 8192}]
    scores = score_records(records)
    assert scores["metric"][task] == metric
    expected = 50.0 if metric == "string_match_all" else 100.0  # all: (1/2 + 1/2) / 2; part: (1 + 1) / 2
    assert scores["task_scores"][task] == expected
    per_length = scores["breakdown"][task]["by_context_length"]
    assert per_length == ({"4096": 50.0, "8192": 50.0} if metric == "string_match_all" else
                          {"4096": 100.0, "8192": 100.0})


def test_suite_averages_tasks_per_length_then_lengths():
    task_scores = {"niah_single_1": 90.0, "vt": 60.0, "passkey": 10.0}
    breakdowns = {"niah_single_1": {"by_context_length": {"4096": 100.0, "8192": 80.0}},
                  "vt": {"by_context_length": {"4096": 70.0, "8192": 50.0}}}
    suite = ruler_suite(task_scores, breakdowns)
    assert suite["by_context_length"] == {"4096": 85.0, "8192": 65.0} and suite["average"] == 75.0
    assert suite["tasks"] == ["niah_single_1", "vt"]
    assert ruler_suite({"passkey": 10.0}, {}) is None


def test_scores_without_ruler_tasks_have_no_ruler_group():
    assert "groups" not in score_records([{"task": "passkey", "pred": "1", "answers": ["1"]}])
