"""RULER (NVIDIA/RULER, arXiv 2404.06654): 13 synthetic long-context tasks generated with the model's tokenizer."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from evalkv.errors import EvalkvError
from evalkv.paths import cache_dir
from evalkv.tasks.base import Sample, Task
from evalkv.tasks.essays import essays_digest, load_essays
from evalkv.tasks.registry import register_task
from evalkv.tasks.ruler import common_words_extraction, freq_words_extraction, niah, qa, variable_tracking
from evalkv.tasks.ruler.cache import cached_rows, tokenizer_fingerprint
from evalkv.tasks.ruler.common import Frame, Setting, chat_frame
from evalkv.tasks.ruler.constants import (
    ESSAY_TASKS,
    RULER_LENGTHS,
    RULER_NUM_SAMPLES,
    RULER_SEED,
    RULER_TASKS,
    SYNTHETIC_TASKS,
)
from evalkv.tasks.ruler.sentences import punkt_identity

MULTIQUERY = "niah_multiquery"
# Row fields that make the sample rather than being copied into its record.
_ROW_FIELDS = {"index", "input", "answer_prefix", "outputs", "length", "question", "single_queries"}
# The fields of RULER's rows that its prediction and scoring read (the rest is bookkeeping).
REFERENCE_FIELDS = ("input", "outputs", "length", "answer_prefix")


def rows_digest(rows: list[dict]) -> str:
    """sha256 of REFERENCE_FIELDS of every row, one JSON line each: equal digests, byte-identical samples."""
    text = "".join(json.dumps({key: row[key] for key in REFERENCE_FIELDS}, ensure_ascii=False) + "\n" for row in rows)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()


@register_task("ruler")
@dataclass
class Ruler(Task):
    """RULER's synthetic tasks (niah x8, vt, cwe, fwe, qa_1, qa_2), generated locally, scored as RULER scores them.

    Based on RULER (Hsieh et al., arXiv 2404.06654; NVIDIA/RULER scripts/data/synthetic/*.py at c3f5e3b). Each
    (task, length) is generated as RULER's prepare.py does, with the evaluated model's tokenizer: templates and answer
    prefixes verbatim, seed 42, the haystack sized by RULER's binary search so that prompt + tokens to generate fit
    the length, the answer prefix after the chat wrapper, essay sentences split by NLTK's Punkt as niah.py splits
    them. With RULER's base template (`chat_template=false`) the rows equal prepare.py's byte for byte (input,
    outputs, length, answer_prefix; scripts/ruler_reference_check.py). Generated files are cached on disk (cache.py).
    Deviations (details in each generator's docstring): the chat wrapper is the tokenizer's own chat template rather
    than one of RULER's hand-written ones, and niah's single-value re-wording ("are" -> "is", ...) leaves that wrapper
    alone where RULER's would re-word it too (niah.py); cwe needs RULER's english_words.json beyond 8,166 distinct
    words; vt has the noise haystack only.

    tasks: RULER task names; default the 11 that need no QA data set (add qa_1 / qa_2 with squad_path / hotpotqa_path).
    lengths: target lengths in tokens (prompt + tokens to generate), RULER's 4K..128K by default.
    num_samples: samples per task per length (RULER: 500).
    seed: RULER's --random_seed.
    chat_template: wrap with the model's chat template (RULER's model_template_type for chat models); false is
        RULER's `base` template.
    essay_path: RULER's PaulGrahamEssays.json (or a folder of .txt essays), for the five essay-haystack niah tasks.
    squad_path / hotpotqa_path: SQuAD v2 dev / HotpotQA dev distractor JSON files, for qa_1 / qa_2.
    cwe_words_path: RULER's json/english_words.json, used by cwe when it needs more words than wonderwords has.
    cache_dir: where generated data go (default: evalkv's cache, `ruler/`).
    split_queries: niah_multiquery asks one query at a time: each sample becomes one sample per query (ids
        `{task}-{length}-{index}-q{j}`), sharing the context, each with its query's answers; RULER's template and
        answer prefix with that one key as `{query}` (plural wording, as the task's). string_match_all over each
        query alone, averaged over every query of every sample, weighs each query as RULER's per-sample mean does
        (each sample has the same number of queries), so the task score stays comparable.
    compress=context: the question is the template's end after the haystack (with the chat wrapper's closing) and
        the answer prefix; each generator's row says where it begins (`question`).
    """

    tasks: list[str] = field(default_factory=lambda: list(SYNTHETIC_TASKS))
    lengths: list[int] = field(default_factory=lambda: list(RULER_LENGTHS))
    num_samples: int = RULER_NUM_SAMPLES
    seed: int = RULER_SEED
    chat_template: bool = True
    essay_path: Optional[str] = None
    squad_path: Optional[str] = None
    hotpotqa_path: Optional[str] = None
    cwe_words_path: Optional[str] = None
    cache_dir: Optional[str] = None
    split_queries: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [name for name in self.tasks if name not in RULER_TASKS]
        if unknown or not self.tasks:
            raise EvalkvError(f"unknown RULER task {', '.join(map(repr, unknown)) or '(none given)'}; "
                              f"known: {', '.join(RULER_TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise EvalkvError(f"ruler: task.tasks names a task twice: {list(self.tasks)}")
        if not self.lengths or min(self.lengths) < 256:
            raise EvalkvError(f"ruler: lengths must be token counts >= 256, got {list(self.lengths)}")
        if self.num_samples < 1:
            raise EvalkvError(f"ruler: num_samples must be >= 1, got {self.num_samples}")
        if self.split_queries and MULTIQUERY not in self.tasks:
            raise EvalkvError(f"ruler: split_queries splits {MULTIQUERY}'s queries, and task.tasks does not include "
                              f"it ({', '.join(self.tasks)}); add it or leave split_queries out")

    def queries(self, name: str) -> int:
        """Samples per generated row: niah_multiquery's queries with split_queries, else 1."""
        return RULER_TASKS[name].args["num_needle_q"] if self.split_queries and name == MULTIQUERY else 1

    def size(self) -> int:
        return len(self.lengths) * self.num_samples * sum(self.queries(name) for name in self.tasks)

    def samples(self, model) -> Iterator[Sample]:
        for name, length, rows in self.generated(model.tokenizer, model.name):
            for row in rows:
                if self.queries(name) == 1:
                    yield self._sample(name, length, row, model)
                    continue
                for number, query in enumerate(row["single_queries"]):
                    single = {**row, **query, "input": row["input"][: len(row["input"]) - len(row["question"])]
                              + query["question"], "queries": [row["queries"][number]]}
                    yield self._sample(name, length, single, model, f"-q{number}")

    def generated(self, tokenizer, model_name: str | None = None) -> Iterator[tuple[str, int, list[dict]]]:
        """(task, length, rows) for every length and task in run order: RULER's jsonl rows (`input`, `outputs`,
        `length`, `answer_prefix`, plus evalkv's metadata) as `samples` tokenizes them, read from the cache or
        generated. Every data file is checked before the first row is made."""
        data = self._load_data()
        model = model_name or getattr(tokenizer, "name_or_path", "") or "(tokenizer)"
        frame = chat_frame(tokenizer, model) if self.chat_template else Frame()
        identity = {"seed": self.seed, "num_samples": self.num_samples, "tokenizer": tokenizer_fingerprint(tokenizer),
                    "frame": [frame.prefix, frame.suffix]}
        folder = Path(self.cache_dir).expanduser() if self.cache_dir else cache_dir() / "ruler"
        for length in self.lengths:
            for name in self.tasks:
                task = RULER_TASKS[name]
                setting = Setting(length, task.tokens_to_generate, self.num_samples, self.seed, frame,
                                  lambda text: len(tokenizer.tokenize(text)), dict(task.args))
                fields = {**identity, "args": task.args, "data": data["digests"].get(task.family, {})}
                yield name, length, cached_rows(folder, name, length, fields, self.num_samples,
                                                functools.partial(self._generate, name, setting, data))

    def _sample(self, name: str, length: int, row: dict, model, query: str = "") -> Sample:
        """RULER's `input + answer_prefix`, tokenized as RULER does (special tokens only without a chat wrapper);
        with compress=context cut where the row's question begins."""
        text, question = row["input"] + row["answer_prefix"], row.get("question")
        if not question or not row["input"].endswith(question):
            raise EvalkvError(f"ruler {name} at {length}: a generated row has no question at its end; delete "
                              f"evalkv's RULER cache (task.cache_dir, default ~/.cache/evalkv/ruler) and run again")
        context_end = len(row["input"]) - len(question)
        prompt_ids, suffix_ids = model.encode_rendered(lambda marker: text[:context_end] + marker + text[context_end:],
                                                       special_tokens=not self.chat_template,
                                                       split=self.splits_question)
        extra = {key: value for key, value in row.items() if key not in _ROW_FIELDS}
        return Sample(id=f"{name}-{length}-{row['index']}{query}", task=name, prompt_ids=prompt_ids,
                      suffix_ids=suffix_ids, answers=list(row["outputs"]),
                      max_new_tokens=RULER_TASKS[name].tokens_to_generate,
                      length=len(prompt_ids) + len(suffix_ids or []),
                      metadata={"context_length": length, "ruler_length": row["length"], **extra})

    def _generate(self, name: str, setting: Setting, data: dict[str, Any]) -> list[dict]:
        family = RULER_TASKS[name].family
        if family == "niah":
            return niah.generate(setting, name, data.get("essay_words"))
        if family == "variable_tracking":
            return variable_tracking.generate(setting, name)
        if family == "common_words_extraction":
            return common_words_extraction.generate(setting, name, data.get("cwe_words"))
        if family == "freq_words_extraction":
            return freq_words_extraction.generate(setting, name)
        dataset = setting.args["dataset"]
        return qa.generate(setting, name, *data[dataset])

    def _load_data(self) -> dict[str, Any]:
        """Every external file the chosen tasks read, checked before anything is generated."""
        data: dict[str, Any] = {"digests": {}}
        if any(name in ESSAY_TASKS for name in self.tasks):
            if not self.essay_path:
                raise EvalkvError(
                    f"ruler tasks {', '.join(n for n in self.tasks if n in ESSAY_TASKS)} hide needles in Paul Graham "
                    "essays: set task.essay_path to RULER's PaulGrahamEssays.json (`evalkv data ruler` fetches it) "
                    "or a folder of .txt essays, or leave those tasks out of task.tasks")
            data["essay_words"] = re.sub(r"\s+", " ", load_essays(self.essay_path)).split(" ")
            data["digests"]["niah"] = {"essays": essays_digest(self.essay_path), "sentences": punkt_identity()}
        for name, dataset, path in (("qa_1", "squad", self.squad_path), ("qa_2", "hotpotqa", self.hotpotqa_path)):
            if name in self.tasks:
                data[dataset] = qa.load_dataset(dataset, path)
                data["digests"].setdefault("qa", {})[dataset] = _sha256(path)
        if "cwe" in self.tasks and self.cwe_words_path:
            data["cwe_words"] = _english_words(self.cwe_words_path)
            data["digests"]["common_words_extraction"] = {"english_words": _sha256(self.cwe_words_path)}
        return data


def _english_words(path: str) -> list[str]:
    """RULER's json/english_words.json: `list(json.load(f).values())`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise EvalkvError(f"cwe word list {str(file)!r} not found "
                          "(RULER's scripts/data/synthetic/json/english_words.json)")
    try:
        words = list(json.loads(file.read_text(encoding="utf-8")).values())
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        raise EvalkvError(f"{file}: expected RULER's english_words.json, a JSON object of words") from None
    return words
