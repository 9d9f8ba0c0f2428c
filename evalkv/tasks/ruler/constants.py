"""RULER's benchmark definitions: the 13 tasks, their templates, answer prefixes and tokens to generate.

Templates and answer prefixes are verbatim from NVIDIA/RULER `scripts/data/synthetic/constants.py`; the task table
is `scripts/synthetic.yaml` (specs/benchmarks.md §B.1-B.2). They are benchmark definitions, not code: do not edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# scripts/data/synthetic/constants.py, verbatim.
TEMPLATES: dict[str, dict[str, Any]] = {
    "niah": {
        "tokens_to_generate": 128,
        "template": "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned in the provided text?",  # noqa: E501
        "answer_prefix": " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    },
    "variable_tracking": {
        "tokens_to_generate": 30,
        "template": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",  # noqa: E501
        "answer_prefix": " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the value {query}, they are: ",  # noqa: E501
    },
    "common_words_extraction": {
        "tokens_to_generate": 120,
        "template": "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",  # noqa: E501
        "answer_prefix": " Answer: The top 10 words that appear most often in the list are:",
    },
    "freq_words_extraction": {
        "tokens_to_generate": 50,
        "template": "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?",  # noqa: E501
        "answer_prefix": " Answer: According to the coded text above, the three most frequently appeared words are:",
    },
    "qa": {
        "tokens_to_generate": 32,
        "template": "Answer the question based on the given documents. Only give me the answer and do not output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",  # noqa: E501
        "answer_prefix": " Answer:",
    },
}


@dataclass(frozen=True)
class RulerTask:
    """One row of scripts/synthetic.yaml: a task name, its generator family and that generator's arguments."""

    name: str
    family: str  # niah | variable_tracking | common_words_extraction | freq_words_extraction | qa
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_to_generate(self) -> int:
        return TEMPLATES[self.family]["tokens_to_generate"]

    @property
    def metric(self) -> str:
        """scripts/eval/synthetic/constants.py: qa scores string_match_part, every other family string_match_all."""
        return "string_match_part" if self.family == "qa" else "string_match_all"


def _niah(name: str, haystack: str, key: str = "words", value: str = "numbers", k: int = 1, v: int = 1,
          q: int = 1) -> RulerTask:
    return RulerTask(name, "niah", {"type_haystack": haystack, "type_needle_k": key, "type_needle_v": value,
                                    "num_needle_k": k, "num_needle_v": v, "num_needle_q": q})


# scripts/synthetic.yaml (NVIDIA/RULER HEAD c3f5e3b).
RULER_TASKS: dict[str, RulerTask] = {task.name: task for task in (
    _niah("niah_single_1", "noise"),
    _niah("niah_single_2", "essay"),
    _niah("niah_single_3", "essay", value="uuids"),
    _niah("niah_multikey_1", "essay", k=4),
    _niah("niah_multikey_2", "needle"),
    _niah("niah_multikey_3", "needle", key="uuids", value="uuids"),
    _niah("niah_multivalue", "essay", v=4),
    _niah("niah_multiquery", "essay", q=4),
    RulerTask("vt", "variable_tracking", {"type_haystack": "noise", "num_chains": 1, "num_hops": 4}),
    RulerTask("cwe", "common_words_extraction", {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}),
    RulerTask("fwe", "freq_words_extraction", {"alpha": 2.0}),
    RulerTask("qa_1", "qa", {"dataset": "squad"}),
    RulerTask("qa_2", "qa", {"dataset": "hotpotqa"}),
)}

QA_TASKS = ("qa_1", "qa_2")
# The 11 tasks that need no QA data set (the set KV-cache papers report, e.g. KVCache-Factory's run_ruler.py).
SYNTHETIC_TASKS = tuple(name for name in RULER_TASKS if name not in QA_TASKS)
ESSAY_TASKS = tuple(name for name, task in RULER_TASKS.items() if task.args.get("type_haystack") == "essay")
# scripts/run.sh: MAX_SEQ_LENGTH in (131072 65536 32768 16384 8192 4096); config_tasks.sh: NUM_SAMPLES=500, seed 42.
RULER_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
RULER_NUM_SAMPLES = 500
RULER_SEED = 42
