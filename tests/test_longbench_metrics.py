"""LongBench's metrics on hand-worked examples, quirks included (specs/benchmarks.md §A.5-A.6)."""

from __future__ import annotations

import difflib

import pytest

from evalkv.errors import EvalkvError
from evalkv.metrics import score_records
from evalkv.metrics.longbench import (
    classification_score,
    code_sim_score,
    count_score,
    fuzz_ratio,
    length_buckets,
    longbench_group,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_score,
    rouge_zh_score,
    sample_score,
    task_percent,
)

TREC_CLASSES = ["Other location", "location", "Other", "City", "Individual"]


def rouge_f(llcs: int, reference_words: int, prediction_words: int) -> float:
    """rouge 1.0.1's ROUGE-L F from its counts: R = llcs/m, P = llcs/n, F = 2PR / (P + R + 1e-8)."""
    recall, precision = llcs / reference_words, llcs / prediction_words
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def test_qa_f1_normalises_case_punctuation_and_articles():
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]: P = 1, R = 2/3, F1 = 0.8
    assert qa_f1_score("The cat sat.", "a cat sat down") == pytest.approx(0.8)


def test_qa_f1_counts_repeated_tokens_as_a_multiset():
    # common = min(2, 3) y's = 2; P = 2/3, R = 2/4; F1 = 4/7
    assert qa_f1_score("x y y", "y y y z") == pytest.approx(4 / 7)


def test_qa_f1_without_overlap_is_the_int_zero():
    score = qa_f1_score("Paris", "London")
    assert score == 0 and type(score) is int


def test_qa_f1_drops_ascii_punctuation_only():
    assert qa_f1_score("“Paris”", "Paris") == 0  # curly quotes are not in string.punctuation
    assert qa_f1_score("fifty five", "fifty-five") == 0  # the hyphen vanishes: "fiftyfive"
    assert qa_f1_score("fiftyfive", "fifty-five") == 1.0


def test_qa_f1_zh_cuts_with_jieba_and_drops_punctuation_tokens():
    assert qa_f1_zh_score("厦门大学。", "厦门大学") == 1.0
    # jieba: [2012, 年, ，, 增长, 了, 25.89%] -> [2012, 年, 增长, 了, 2589] vs [2012, 年, 增长, 105]:
    # 3 common, P = 3/5, R = 3/4, F1 = 2/3
    assert qa_f1_zh_score("2012年，增长了25.89%", "2012年增长10.5%") == pytest.approx(2 / 3)


def test_rouge_l_is_summary_level_over_word_sets():
    # one sentence each; LCS(ref [a, c, d], hyp [a, b, c]) = [a, c]: 2 of 3 unique words each way
    assert rouge_score("a b c", "a c d") == rouge_f(2, 3, 3)
    # repeated words count once (sets): m = n = 2, llcs = 2
    assert rouge_score("a a a b", "a b") == rouge_f(2, 2, 2)
    # "." splits sentences; the union of per-sentence LCSs covers both words in any order
    assert rouge_score("b a", "a. b") == rouge_f(2, 2, 2)
    assert rouge_score("b a", "a b") == rouge_f(1, 2, 2)


def test_rouge_is_case_sensitive_and_zero_when_it_raises():
    assert rouge_score("Cat", "cat") == 0.0
    assert rouge_score("", "a b") == 0.0  # rouge raises ValueError on an empty hypothesis
    assert rouge_score("...", "a b") == 0.0  # only empty "sentences"


def test_rouge_reproduces_the_reference_recursion_overflow():
    # hyp = n x "b", ref "b a": the LCS reconstruction recurses n + 2 times; eval.py's stack holds 991 (990 for zh)
    assert rouge_score(" ".join(["b"] * 989), "b a") == rouge_f(1, 2, 1)
    assert rouge_score(" ".join(["b"] * 990), "b a") == 0.0
    assert rouge_zh_score(" ".join(["b"] * 988), "b a") == rouge_f(1, 2, 1)
    assert rouge_zh_score(" ".join(["b"] * 989), "b a") == 0.0


def test_rouge_zh_joins_jieba_words():
    # 我们 / 今天 / 开会 vs 我们 / 明天 / 开会: LCS [我们, 开会] of 3 words each
    assert rouge_zh_score("我们今天开会", "我们明天开会") == rouge_f(2, 3, 3)


def test_classification_substring_matches_share_the_credit():
    assert classification_score("City", "City", TREC_CLASSES) == 1.0
    assert classification_score("City or Individual", "City", TREC_CLASSES) == 0.5
    assert classification_score("Individual", "City", TREC_CLASSES) == 0.0
    assert classification_score("city", "City", TREC_CLASSES) == 0.0  # case-sensitive


def test_classification_keeps_the_reference_list_mutation():
    # matches [Other location, location, Other]; removing "location" while iterating skips "Other", which should
    # have been removed too (it is a substring of the answer): 1/2 instead of 1
    assert classification_score("Other location", "Other location", TREC_CLASSES) == 0.5


def test_classification_needs_all_classes():
    with pytest.raises(EvalkvError, match="all_classes"):
        classification_score("City", "City", None)


def test_retrieval_and_count_share_credit_among_all_numbers():
    assert retrieval_score("Paragraph 19, or 19, or 3", "Paragraph 19") == pytest.approx(2 / 3)
    assert retrieval_score("no idea", "Paragraph 19") == 0.0
    assert retrieval_zh_score("答案是：段落27", "段落27") == 1.0
    assert retrieval_zh_score("段落2", "段落27") == 0.0
    assert count_score("46", "46") == 1.0
    assert count_score("46 of 50 paragraphs", "46") == 0.5
    assert count_score("046", "46") == 0.0  # strings compared, not numbers
    with pytest.raises(EvalkvError, match="Paragraph"):
        retrieval_score("3", "the third")


def test_code_sim_takes_the_first_line_without_comment_marks():
    assert code_sim_score("```python\nreturn x\n```", "return x") == 1.0
    assert code_sim_score("\n\nreturn x", "return x") == 1.0
    # an empty line qualifies: the prediction becomes "" and scores 0
    assert code_sim_score("x = 1  # set\n\nreturn x", "return x") == 0.0
    assert code_sim_score("// c\nreturn y", "return x") == 0.88  # difflib ratio 14/16: 87.5 rounds to even, 88


def test_fuzz_ratio_rounds_to_an_integer_percent_like_fuzzywuzzy():
    assert fuzz_ratio("axxxxxxx", "ayyyyyyy") == 12  # 100 * 2/16 = 12.5 rounds to even
    assert fuzz_ratio("", "") == 100 and fuzz_ratio("", "x") == 0
    fuzz = pytest.importorskip("fuzzywuzzy.fuzz")
    if fuzz.SequenceMatcher is not difflib.SequenceMatcher:
        pytest.skip("fuzzywuzzy uses python-Levenshtein here; LongBench's numbers are defined with difflib")
    pairs = [("axxxxxxx", "ayyyyyyy"), ("", ""), ("", "x"), ("def f(x):", "def g(y):"), ("return a + b", "return a+b"),
             ("    if e.text == language:", "   if e.text == lang:"), ("abc", "abc")]
    assert [fuzz_ratio(a, b) for a, b in pairs] == [fuzz.ratio(a, b) for a, b in pairs]


@pytest.mark.parametrize("task,prediction,expected", [
    ("triviaqa", "Alice\nSmith", 2 / 3),  # first line only: [alice] vs [alice, smith]
    ("triviaqa_e", "\n\nAlice\nSmith", 2 / 3),  # leading newlines go first; LongBench-E follows its base task
    ("hotpotqa", "Alice\nSmith", 1.0),  # no first-line rule: whitespace collapses
])
def test_first_line_rule_applies_to_trec_triviaqa_samsum_lsht_only(task, prediction, expected):
    assert sample_score(task, prediction, ["Alice Smith"], None) == pytest.approx(expected)


def test_sample_score_is_the_best_answer():
    assert sample_score("triviaqa", "fifty-five", ["55", "fifty-five"], None) == 1.0
    assert sample_score("trec", "\nCity\nType: Individual", ["City"], TREC_CLASSES) == 1.0
    assert sample_score("hotpotqa", "anything", [], None) == 0.0


def test_task_score_is_a_percentage_rounded_to_two_decimals():
    assert task_percent([1.0, 0.0, 0.0]) == 33.33
    assert task_percent([0.8, 0, 0.5]) == 43.33


def test_length_buckets_follow_longbench_e():
    records = [{"length": n} for n in (100, 3999, 4000, 8000)]
    assert length_buckets(records, [1.0, 0.0, 1.0, 0.5]) == {"by_length": {"0-4k": 50.0, "4-8k": 100.0, "8k+": 50.0}}
    assert length_buckets(records[:1], [1.0]) == {"by_length": {"0-4k": 100.0, "4-8k": None, "8k+": None}}
    assert length_buckets([{"length": None}], [1.0]) == {}


def test_category_averages_and_the_overall_average():
    scores = {"hotpotqa": 40.0, "musique": 20.0, "qasper": 30.0, "lcc": 55.55, "hotpotqa_e": 10.0}
    groups = {"longbench": longbench_group(scores, e_variant=False), "longbench_e": longbench_group(scores, True)}
    assert groups["longbench"] == {"tasks": 4, "average": 36.39, "category_average": 38.52, "categories": {
        "Single-Doc QA": 30.0, "Multi-Doc QA": 30.0, "Code": 55.55}}
    assert groups["longbench_e"]["categories"] == {"Multi-Doc QA": 10.0}
    assert longbench_group({"passkey": 100.0}, e_variant=False) is None


def test_score_records_extends_the_scores_contract():
    records = [
        {"task": "hotpotqa", "pred": "Alice Smith", "answers": ["Alice Smith"], "length": 5000},
        {"task": "hotpotqa", "pred": "Bob", "answers": ["Alice Smith"], "length": 9000},
        {"task": "passage_count", "pred": "4", "answers": ["4"], "length": 100},
    ]
    scores = score_records(records)
    assert scores["task_scores"] == {"hotpotqa": 50.0, "passage_count": 100.0} and scores["average"] == 75.0
    assert scores["metric"] == {"hotpotqa": "qa_f1_score", "passage_count": "count_score"}
    assert scores["breakdown"]["hotpotqa"]["by_length"] == {"0-4k": None, "4-8k": 100.0, "8k+": 0.0}
    assert scores["groups"]["longbench"]["categories"] == {"Multi-Doc QA": 50.0, "Synthetic": 100.0}
