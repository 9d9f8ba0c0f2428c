"""RULER's question answering generator (`scripts/data/synthetic/qa.py`): qa_1 (SQuAD v2 dev) and qa_2 (HotpotQA
dev, distractor setting).

A question's gold documents plus distractors (SQuAD: the other paragraphs of its article first), shuffled, as
`Document {i}:\\n{document}` blocks; sample i asks question i of the data set's (answerable) questions, in file
order. The number of documents is RULER's binary search at question 0. Random draws follow the script call for call.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from evalkv.errors import EvalkvError
from evalkv.tasks.ruler.common import Generated, Setting, as_row, fit_sample, measured, render, search_size
from evalkv.tasks.ruler.constants import TEMPLATES

DOCUMENT_PROMPT = "Document {i}:\n{document}"
SOURCES = {
    "squad": "SQuAD v2 dev (dev-v2.0.json, RULER's json/squad.json)",
    "hotpotqa": "HotpotQA dev distractor (hotpot_dev_distractor_v1.json, RULER's json/hotpotqa.json)",
}


def read_squad(data: dict) -> tuple[list[dict], list[str]]:
    """qa.py `read_squad`: unique paragraphs (sorted) and the answerable questions in file order."""
    docs = sorted({paragraph["context"] for article in data["data"] for paragraph in article["paragraphs"]})
    doc_index = {doc: i for i, doc in enumerate(docs)}
    questions = []
    for article in data["data"]:
        article_docs = [doc_index[paragraph["context"]] for paragraph in article["paragraphs"]]
        for paragraph in article["paragraphs"]:
            own = doc_index[paragraph["context"]]
            for qa in paragraph["qas"]:
                if not qa["is_impossible"]:
                    questions.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                      "context": [own], "more_context": [i for i in article_docs if i != own]})
    return questions, docs


def read_hotpotqa(data: list) -> tuple[list[dict], list[str]]:
    """qa.py `read_hotpotqa`: documents `title\\nsentences` (sorted, unique), every question in file order."""
    def document(title: str, sentences: list[str]) -> str:
        return f"{title}\n{''.join(sentences)}"

    docs = sorted({document(title, sentences) for item in data for title, sentences in item["context"]})
    doc_index = {doc: i for i, doc in enumerate(docs)}
    questions = [{"query": item["question"], "outputs": [item["answer"]],
                  "context": [doc_index[document(t, s)] for t, s in item["context"]]} for item in data]
    return questions, docs


def load_dataset(dataset: str, path: str | None) -> tuple[list[dict], list[str]]:
    if not path:
        raise EvalkvError(f"ruler {'qa_1' if dataset == 'squad' else 'qa_2'} reads {SOURCES[dataset]}: set "
                          f"task.{dataset}_path=FILE (or leave the qa tasks out of task.tasks)")
    file = Path(path).expanduser()
    if not file.is_file():
        raise EvalkvError(f"{SOURCES[dataset]} not found at {str(file)!r}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        return read_squad(data) if dataset == "squad" else read_hotpotqa(data)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise EvalkvError(f"{file}: not the {SOURCES[dataset]} format ({type(error).__name__}: {error})") from None


class QuestionAnswering:
    def __init__(self, setting: Setting, questions: list[dict], docs: list[str]):
        self.setting, self.questions, self.docs = setting, questions, docs
        self.random = random.Random(setting.seed)

    def build(self, index: int, num_docs: int) -> Generated:
        question = self.questions[index]
        gold, more = question["context"], question.get("more_context", [])
        if num_docs < len(self.docs):
            if num_docs - len(gold) > len(more):
                others = [i for i in range(len(self.docs)) if i not in gold + more]
                chosen = gold + more + self.random.sample(others, max(0, num_docs - len(gold) - len(more)))
            else:
                chosen = gold + self.random.sample(more, num_docs - len(gold))
            documents = [self.docs[i] for i in chosen]
        else:
            documents = (self.docs * ((num_docs + len(self.docs) - 1) // len(self.docs)))[:num_docs]
        random.Random(self.setting.seed).shuffle(documents)
        context = "\n\n".join(DOCUMENT_PROMPT.format(i=i + 1, document=d) for i, d in enumerate(documents))
        entry = TEMPLATES["qa"]
        text, prefix, asked = render(self.setting, entry["template"], entry["answer_prefix"], context=context,
                                     query=question["query"])
        return Generated(text, prefix, list(question["outputs"]), {"question_index": index}, asked)


def generate(setting: Setting, task: str, questions: list[dict], docs: list[str]) -> list[dict]:
    if setting.num_samples > len(questions):
        raise EvalkvError(f"ruler {task}: {setting.num_samples} samples asked, the data set has {len(questions)} "
                          "questions; lower task.num_samples")
    generator = QuestionAnswering(setting, questions, docs)
    incremental = 10
    tokens_per_doc = setting.count(generator.build(0, incremental).prompt) / incremental
    upper = int((setting.max_seq_length / tokens_per_doc) * 3)
    size = search_size(setting, lambda num_docs: generator.build(0, num_docs), incremental, upper)
    rows = []
    for index in range(setting.num_samples):  # pre_samples is 0: RULER's data are not split into chunks here
        sample, length, used = fit_sample(lambda n, i=index: measured(setting, generator.build(i, n)), size,
                                          incremental, setting.max_seq_length, task)
        rows.append(as_row(index, sample, length, used))
    return rows
