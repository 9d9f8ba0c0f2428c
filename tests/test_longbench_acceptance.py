"""Acceptance: MiniLongBench's 237 real predictions scored by `evalkv score` equal, per task, what LongBench's official
`eval.py` prints for them; an independent scorer written here from the reference's semantics agrees.

OFFICIAL was produced by THUDM/LongBench `LongBench/eval.py` (metrics.py as of commit f6227eb) on CPython 3.11.7
with rouge 1.0.1, jieba 0.42.1, fuzzywuzzy 0.18.0 without python-Levenshtein, numpy 2.4, from
`pred/<model>/<task>.jsonl` files holding each entry's `prediction` as `pred`, its gold answers and all_classes.
"""

from __future__ import annotations

import difflib
import json
import re
import string
from collections import Counter

import pytest
from conftest import SHARED_DATA

from evalkv.cli import main

MINI = SHARED_DATA / "minilongbench"
pytestmark = pytest.mark.skipif(not MINI.is_dir(), reason=f"MiniLongBench is not at {MINI} (set EVALKV_SHARED_DATA)")

OFFICIAL = {
    "narrativeqa": 3.33, "qasper": 11.36, "multifieldqa_en": 23.33, "multifieldqa_zh": 12.01, "hotpotqa": 7.44,
    "2wikimqa": 7.99, "musique": 14.67, "dureader": 10.7, "gov_report": 20.6, "qmsum": 18.0, "multi_news": 32.59,
    "vcsum": 8.13, "trec": 37.5, "triviaqa": 83.93, "samsum": 27.15, "lsht": 25.0, "passage_count": 0.0,
    "passage_retrieval_en": 6.67, "passage_retrieval_zh": 7.22, "lcc": 69.58, "repobench-p": 42.43,
}
COUNTS = {"2wikimqa": 13, "dureader": 6, "gov_report": 12, "hotpotqa": 13, "lcc": 26, "lsht": 8, "multi_news": 11,
          "multifieldqa_en": 7, "multifieldqa_zh": 15, "musique": 7, "narrativeqa": 6, "passage_count": 4,
          "passage_retrieval_en": 15, "passage_retrieval_zh": 15, "qasper": 9, "qmsum": 6, "repobench-p": 23,
          "samsum": 15, "trec": 8, "triviaqa": 12, "vcsum": 6}


# An independent scorer, written from specs/benchmarks.md §A.5-A.6 (it shares no code with evalkv.metrics).

def _f1(pred: list[str], gold: list[str]) -> float:
    overlap = sum((Counter(pred) & Counter(gold)).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def _english_tokens(text: str) -> list[str]:
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def _chinese_tokens(text: str) -> list[str]:
    import jieba

    punctuation = set(string.punctuation) | set("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀"
                                               "｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")
    words = ("".join("".join(c for c in w.lower() if c not in punctuation).split()) for w in jieba.cut(text))
    return [w for w in words if w]


def _lcs_words(reference: list[str], hypothesis: list[str]) -> set[str]:
    """The reference words of the LCS that pltrdy/rouge reconstructs (match: diagonal; else up if strictly larger)."""
    table = [[0] * (len(hypothesis) + 1) for _ in range(len(reference) + 1)]
    for i, word in enumerate(reference, start=1):
        for j, other in enumerate(hypothesis, start=1):
            table[i][j] = table[i - 1][j - 1] + 1 if word == other else max(table[i - 1][j], table[i][j - 1])
    words, i, j = set(), len(reference), len(hypothesis)
    while i and j:
        if reference[i - 1] == hypothesis[j - 1]:
            words.add(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def _rouge_l(hypothesis: str, reference: str) -> float:
    def sentences(text):
        return [" ".join(p.split()).split(" ") for p in text.split(".") if p]

    hyp, ref = sentences(hypothesis), sentences(reference)
    if not hyp or not ref:
        return 0.0
    union = set().union(*(_lcs_words(r, h) for r in ref for h in hyp))
    recall, precision = len(union) / len({w for s in ref for w in s}), len(union) / len({w for s in hyp for w in s})
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def _ratio(a: str, b: str) -> float:
    if a == b:
        return 1.0
    return 0.0 if not a or not b else int(round(100 * difflib.SequenceMatcher(None, a, b).ratio())) / 100


def _numbers(pred: str, wanted: str) -> float:
    found = re.findall(r"\d+", pred)
    return sum(n == wanted for n in found) / len(found) if found else 0.0


def _classify(pred: str, gold: str, classes: list[str]) -> float:
    kept, index = [c for c in classes if c in pred], 0
    while index < len(kept):  # the reference's remove-while-iterating, spelled out
        if kept[index] in gold and kept[index] != gold:
            del kept[index]
        index += 1
    return 1 / len(kept) if gold in kept else 0.0


def _code(pred: str, gold: str) -> float:
    lines = pred.lstrip("\n").split("\n")
    return _ratio(next((x for x in lines if not any(m in x for m in ("`", "#", "//"))), ""), gold)


def _metric(task: str, pred: str, gold: str, classes) -> float:
    if task in ("multifieldqa_zh",):
        return _f1(_chinese_tokens(pred), _chinese_tokens(gold))
    if task in ("dureader", "vcsum"):
        import jieba

        return _rouge_l(" ".join(jieba.cut(pred)), " ".join(jieba.cut(gold)))
    if task in ("gov_report", "qmsum", "multi_news", "samsum"):
        return _rouge_l(pred, gold)
    if task in ("trec", "lsht"):
        return _classify(pred, gold, classes)
    if task == "passage_retrieval_en":
        return _numbers(pred, re.findall(r"Paragraph (\d+)", gold)[0])
    if task == "passage_retrieval_zh":
        return _numbers(pred, re.findall(r"段落(\d+)", gold)[0])
    if task == "passage_count":
        return _numbers(pred, gold)
    if task in ("lcc", "repobench-p"):
        return _code(pred, gold)
    return _f1(_english_tokens(pred), _english_tokens(gold))


def independent_scores(records: list[dict]) -> dict[str, float]:
    totals: dict[str, list[float]] = {}
    for record in records:
        task, pred = record["task"], record["pred"]
        if task in ("trec", "triviaqa", "samsum", "lsht"):
            pred = pred.lstrip("\n").split("\n")[0]
        best = max([_metric(task, pred, gold, record["all_classes"]) for gold in record["answers"]], default=0.0)
        totals.setdefault(task, []).append(best)
    scores = {}
    for task, values in totals.items():
        total = 0.0
        for value in values:  # eval.py adds in order (sum() compensates on Python 3.12+)
            total += value
        scores[task] = round(100 * total / len(values), 2)
    return scores


@pytest.mark.heavy
def test_minilongbench_scores_equal_the_official_eval(tmp_path, capsys):
    predictions = tmp_path / "predictions.jsonl"
    assert main(["data", "minilongbench-to-jsonl", str(MINI), str(predictions)]) == 0
    records = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 237 and Counter(r["task"] for r in records) == COUNTS

    assert main(["score", str(predictions)]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["task_scores"] == OFFICIAL
    assert scores["n"] == COUNTS
    assert scores["average"] == round(sum(OFFICIAL.values()) / 21, 2)
    assert independent_scores(records) == OFFICIAL
    table = capsys.readouterr().out
    assert "repobench-p           code_sim_score         23  42.43" in table
