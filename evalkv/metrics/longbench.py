"""LongBench's nine metrics and its scorer, with the reference's exact semantics (quirks included).

Based on THUDM/LongBench `LongBench/metrics.py` and `LongBench/eval.py` (specs/benchmarks.md §A.5-A.6), with the
libraries the reference uses: `rouge==1.0.1` (pltrdy; `Rouge().get_scores`), `jieba==0.42.1`. Scoring, as eval.py:
trec, triviaqa, samsum and lsht keep the first line of the prediction after leading newlines; a sample scores the
best metric value over its answers; a task scores `round(100 * total / n, 2)` with the total summed in order;
LongBench-E buckets by the record's `length` (< 4000, < 8000, else) score `round(100 * np.mean(bucket), 2)`.

Quirks kept on purpose: classification removes items from the list it iterates (an item after a removed one escapes
removal); code similarity takes the first line without "`", "#" or "//" even when it is empty (score 0); F1 with no
overlap returns the int 0; ROUGE of an empty prediction, or one that makes `rouge`'s recursive LCS reconstruction
overflow Python's stack, is 0.0; the fuzzy ratio is fuzzywuzzy 0.18.0's `fuzz.ratio` on difflib, rounded to an int.

Deviations: (1) the ratio is computed here with difflib, as fuzzywuzzy 0.18.0 does without python-Levenshtein (the
reference's requirements), so an installed python-Levenshtein cannot change the numbers. (2) The reference's
ROUGE falls to 0.0 when a sentence pair needs more LCS-reconstruction calls than the interpreter's stack has room
for under eval.py; evalkv predicts that cut-off from the pair instead of depending on its own call stack: at most
991 calls for rouge_score and 990 for rouge_zh_score (one more frame), measured for eval.py on CPython 3.11-3.13
with the default recursion limit 1000 (3.8-3.10 allow one call fewer). (3) An empty LongBench-E bucket is null
(eval.py: NaN, which is not JSON). (4) Inputs the reference would crash on (a retrieval answer without a paragraph
number, trec or lsht without all_classes) are errors that say so.
"""

from __future__ import annotations

import difflib
import re
import string
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np

from evalkv.errors import EvalkvError
from evalkv.metrics.registry import TaskMetric, register_group, register_metric
from evalkv.tasks.longbench.spec import CATEGORIES, E_SUFFIX, E_TASKS, TASKS, base_task, is_e_task

FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})
ROUGE_MAX_CALLS = 991  # LCS-reconstruction calls eval.py's stack holds for rouge_score (see the module docstring)
CHINESE_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_ENGLISH_PUNCTUATION = set(string.punctuation)
_ALL_PUNCTUATION = set(string.punctuation + CHINESE_PUNCTUATION)


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, replace the words a/an/the by a space, collapse whitespace."""
    text = "".join(char for char in text.lower() if char not in _ENGLISH_PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lower-case, drop ASCII and Chinese punctuation, remove all whitespace."""
    return "".join("".join(char for char in text.lower() if char not in _ALL_PUNCTUATION).split())


def f1_score(prediction_tokens: list[str], answer_tokens: list[str]) -> float:
    """Multiset-overlap F1; the int 0 when nothing overlaps (as the reference returns)."""
    same = sum((Counter(prediction_tokens) & Counter(answer_tokens)).values())
    if same == 0:
        return 0
    precision, recall = 1.0 * same / len(prediction_tokens), 1.0 * same / len(answer_tokens)
    return (2 * precision * recall) / (precision + recall)


def _jieba_words(text: str) -> list[str]:
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    return list(jieba.cut(text, cut_all=False))


def qa_f1_score(prediction: str, answer: str, all_classes=None) -> float:
    return f1_score(normalize_answer(prediction).split(), normalize_answer(answer).split())


def qa_f1_zh_score(prediction: str, answer: str, all_classes=None) -> float:
    def tokens(text: str) -> list[str]:
        return [word for word in map(normalize_zh_answer, _jieba_words(text)) if word]

    return f1_score(tokens(prediction), tokens(answer))


def _sentences(text: str) -> list[list[str]]:
    """rouge 1.0.1's split: sentences on ".", whitespace collapsed, words on single spaces."""
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if len(piece) > 0]


def _overflows(reference: list[str], hypothesis: list[str], max_calls: int) -> bool:
    """Whether `rouge`'s recursive LCS reconstruction of one sentence pair makes more than `max_calls` calls: one per
    step of its walk from the table's corner (diagonal on a match, else up when the cell above is strictly larger,
    else left) until a row or column 0, that last call included. The walk takes between min(n, m) + 1 and n + m."""
    rows, columns = len(reference), len(hypothesis)
    if rows + columns <= max_calls or min(rows, columns) + 1 > max_calls:
        return rows + columns > max_calls
    table = [[0] * (columns + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        above, current, word = table[i - 1], table[i], reference[i - 1]
        for j in range(1, columns + 1):
            current[j] = above[j - 1] + 1 if word == hypothesis[j - 1] else max(above[j], current[j - 1])
    calls, i, j = 1, rows, columns
    while i > 0 and j > 0:
        if reference[i - 1] == hypothesis[j - 1]:
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
        calls += 1
    return calls > max_calls


@contextmanager
def _stack_room(calls: int):
    """Room for `rouge`'s recursion on top of evalkv's own call stack (deeper than eval.py's)."""
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(previous + calls + 100)
    try:
        yield
    finally:
        sys.setrecursionlimit(previous)


def rouge_score(prediction: str, answer: str, all_classes=None, max_calls: int = ROUGE_MAX_CALLS) -> float:
    """ROUGE-L F of `rouge` 1.0.1 (sets of words, "."-sentences, no lower-casing); 0.0 when it raises."""
    from rouge import Rouge

    hypothesis, reference = _sentences(prediction), _sentences(answer)
    if any(_overflows(ref, hyp, max_calls) for ref in reference for hyp in hypothesis):
        return 0.0  # the reference's RecursionError
    try:
        with _stack_room(max_calls):
            return Rouge().get_scores([prediction], [answer], avg=True)["rouge-l"]["f"]
    except Exception:  # the reference returns 0.0 on any error (empty prediction or answer: ValueError)
        return 0.0


def rouge_zh_score(prediction: str, answer: str, all_classes=None) -> float:
    return rouge_score(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(answer)),
                       max_calls=ROUGE_MAX_CALLS - 1)


def classification_score(prediction: str, answer: str, all_classes=None) -> float:
    if all_classes is None:
        raise EvalkvError("classification needs the record's all_classes (trec, lsht)")
    matches = [name for name in all_classes if name in prediction]
    for name in matches:  # removing while iterating skips the next item, as the reference does
        if name in answer and name != answer:
            matches.remove(name)
    return 1.0 / len(matches) if answer in matches else 0.0


def _number_share(prediction: str, wanted: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return float(numbers.count(wanted) / len(numbers)) if numbers else 0.0


def _paragraph_id(answer: str, pattern: str) -> str:
    found = re.findall(pattern, answer)
    if not found:
        raise EvalkvError(f"retrieval answer {answer!r} does not match {pattern!r}")
    return found[0]


def retrieval_score(prediction: str, answer: str, all_classes=None) -> float:
    return _number_share(prediction, _paragraph_id(answer, r"Paragraph (\d+)"))


def retrieval_zh_score(prediction: str, answer: str, all_classes=None) -> float:
    return _number_share(prediction, _paragraph_id(answer, r"段落(\d+)"))


def count_score(prediction: str, answer: str, all_classes=None) -> float:
    return _number_share(prediction, str(answer))


def fuzz_ratio(first: str, second: str) -> int:
    """fuzzywuzzy 0.18.0 `fuzz.ratio` on difflib: 100 if equal, else 0 if either is empty, else
    `int(round(100 * SequenceMatcher(None, first, second).ratio()))`."""
    if first == second:
        return 100
    if not first or not second:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, first, second).ratio()))


def code_sim_score(prediction: str, answer: str, all_classes=None) -> float:
    lines = prediction.lstrip("\n").split("\n")
    first = next((line for line in lines if "`" not in line and "#" not in line and "//" not in line), "")
    return fuzz_ratio(first, answer) / 100


METRIC_FUNCTIONS: dict[str, Callable[..., float]] = {
    function.__name__: function
    for function in (qa_f1_score, qa_f1_zh_score, rouge_score, rouge_zh_score, classification_score,
                     retrieval_score, retrieval_zh_score, count_score, code_sim_score)
}
# eval.py's dataset2metric.
TASK_METRIC = {
    "narrativeqa": "qa_f1_score", "qasper": "qa_f1_score", "multifieldqa_en": "qa_f1_score",
    "multifieldqa_zh": "qa_f1_zh_score", "hotpotqa": "qa_f1_score", "2wikimqa": "qa_f1_score",
    "musique": "qa_f1_score", "dureader": "rouge_zh_score", "gov_report": "rouge_score", "qmsum": "rouge_score",
    "multi_news": "rouge_score", "vcsum": "rouge_zh_score", "trec": "classification_score",
    "triviaqa": "qa_f1_score", "samsum": "rouge_score", "lsht": "classification_score",
    "passage_retrieval_en": "retrieval_score", "passage_count": "count_score",
    "passage_retrieval_zh": "retrieval_zh_score", "lcc": "code_sim_score", "repobench-p": "code_sim_score",
}


def sample_score(task: str, prediction: str, answers: list[str], all_classes: list[str] | None) -> float:
    """eval.py's per-sample score: the first-line rule where it applies, then the best value over the answers."""
    task = base_task(task)
    metric = METRIC_FUNCTIONS[TASK_METRIC[task]]
    if task in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    score = 0.0
    for answer in answers:
        score = max(score, metric(prediction, answer, all_classes))
    return score


def task_percent(scores: list[float]) -> float:
    """eval.py's task score: `round(100 * total / n, 2)`, the total summed in order."""
    total = 0.0
    for score in scores:
        total += score
    return round(100 * total / len(scores), 2)


def length_buckets(records: list[dict], scores: list[float]) -> dict:
    """LongBench-E's view (eval.py scorer_e) when every record has its length; empty buckets are null."""
    lengths = [record.get("length") for record in records]
    if not all(isinstance(length, (int, float)) and not isinstance(length, bool) for length in lengths):
        return {}
    buckets: dict[str, list[float]] = {"0-4k": [], "4-8k": [], "8k+": []}
    for length, score in zip(lengths, scores):
        buckets["0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"].append(score)
    return {"by_length": {key: float(round(100 * np.mean(values), 2)) if values else None
                          for key, values in buckets.items()}}


def _summary(task_scores: dict[str, float]) -> dict:
    categories = {}
    for category, members in CATEGORIES.items():
        values = [score for task, score in task_scores.items() if base_task(task) in members]
        if values:
            categories[category] = round(sum(values) / len(values), 2)
    return {
        "tasks": len(task_scores),
        "average": round(sum(task_scores.values()) / len(task_scores), 2),
        "categories": categories,
        "category_average": round(sum(categories.values()) / len(categories), 2),
    }


def longbench_group(task_scores: dict[str, float], e_variant: bool) -> dict | None:
    """LongBench (or LongBench-E): the plain average of its task scores (the KV-cache papers' "Avg." over the 16
    English tasks), the average of each category's task scores (English and Chinese pooled), and the mean of those
    category averages (the LongBench leaderboard's way); None when none of its tasks was scored."""
    present = {t: s for t, s in task_scores.items() if (is_e_task(t) if e_variant else t in TASKS)}
    return _summary(present) if present else None


def _register() -> None:
    for task in (*TASKS, *(f"{task}{E_SUFFIX}" for task in E_TASKS)):
        register_metric(task, TaskMetric(
            metric=TASK_METRIC[base_task(task)],
            score=lambda record, task=task: sample_score(task, record["pred"], record["answers"],
                                                         record.get("all_classes")),
            breakdown=length_buckets,
            aggregate=task_percent,
        ))
    register_group("longbench", lambda scores, breakdowns: longbench_group(scores, e_variant=False))
    register_group("longbench_e", lambda scores, breakdowns: longbench_group(scores, e_variant=True))


_register()
