"""The `longbench_v2` task: LongBench v2's 503 multiple-choice questions with the reference's prompts, middle
truncation and two-step chain of thought (docs/benchmarks.md#longbench_v2).

Reference: THUDM/LongBench at 2e00731 (the repository root is LongBench v2): `pred.py` (`query_llm`, `get_pred`),
`prompts/0shot.txt`, `0shot_cot.txt`, `0shot_cot_ans.txt`, `0shot_no_context.txt` (the templates below, pinned by
sha256 in the tests), `config/model2maxlen.json` (120000 for the 128K-context models). pred.py per question:
1. the template with `$DOC$`, `$Q$`, `$C_A$` ... `$C_D$` replaced in that order by the stripped fields;
2. `tokenizer.encode(prompt)` (special tokens included); when longer than the model's max length, the ids
   `ids[:max_len//2] + ids[-max_len//2:]` are decoded together with `skip_special_tokens=True`;
3. the prompt as one user message of an OpenAI-style chat request (the server applies the model's chat template);
   128 new tokens, or 1024 for the chain of thought;
4. chain of thought: the stripped reasoning fills `$COT$` of `0shot_cot_ans.txt` (which omits the document), and
   that prompt goes through steps 2-3 with 128 new tokens; its output is the response.
The response's answer letter is extracted and scored by evalkv/metrics/longbench_v2.py.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

from evalkv.errors import EvalkvError
from evalkv.tasks.base import Sample, Task
from evalkv.tasks.longbench.data import download_hub_file
from evalkv.tasks.longbench.prompt import Prompt, uses_chat
from evalkv.tasks.longbench.task import sample_ids
from evalkv.tasks.registry import register_task

NAME = "longbench_v2"
HUB_REPOS = ("zai-org/LongBench-v2", "THUDM/LongBench-v2")  # the organisation was renamed; either serves data.json
DATA_FILE = "data.json"
ROW_COUNT = 503
FIELDS = ("_id", "domain", "sub_domain", "difficulty", "length", "question", "choice_A", "choice_B", "choice_C",
          "choice_D", "answer", "context")
_QUESTION = (
    "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\n"
)
_FORMAT = 'Format your response as follows: "The correct answer is (insert answer here)".'
_DOCUMENT = "\n\n<text>\n$DOC$\n</text>\n\n"
TEMPLATES = {  # the prompts/ files, verbatim (no final newline)
    "0shot": "Please read the following text and answer the question below." + _DOCUMENT + _QUESTION + _FORMAT,
    "cot": "Please read the following text and answer the questions below." + _DOCUMENT + _QUESTION
    + "Let’s think step by step:",
    "cot_answer": "Please read the following text and answer the questions below.\n\nThe text is too long and omitted "
    "here.\n\n" + _QUESTION + "Let’s think step by step: $COT$\n\nBased on the above, what is the single, most likely "
    "answer choice? " + _FORMAT,
    "no_context": _QUESTION + "What is the single, most likely answer choice? " + _FORMAT,
}
PROMPTS = ("0shot", "cot", "no_context")  # task.prompt: pred.py's default, --cot, --no_context
# The records' task per prompt: each its own column, as the reference's results files and the leaderboard's
# "w/ CoT" columns keep them apart.
TASK_NAMES = {"0shot": NAME, "cot": f"{NAME}_cot", "no_context": f"{NAME}_no_context"}
MAX_NEW_TOKENS = {"0shot": 128, "cot": 1024, "cot_answer": 128, "no_context": 128}
DOCUMENT = "$DOC$"


def fill(template: str, row: dict, reasoning: str | None = None) -> str:
    """pred.py's replacements, in its order: `$DOC$`, `$Q$`, `$C_A$` ... `$C_D$` (each field stripped), `$COT$`.
    Each runs over the text the earlier ones made, so a marker inside an inserted field is replaced too."""
    text = template.replace(DOCUMENT, row["context"].strip()).replace("$Q$", row["question"].strip())
    for letter in "ABCD":
        text = text.replace(f"$C_{letter}$", row[f"choice_{letter}"].strip())
    return text if reasoning is None else text.replace("$COT$", reasoning)


def split_fill(template: str, row: dict) -> tuple[str, str]:
    """`fill(template, row)` cut right after the document (the question part follows), or ("", all) without one.
    Filling the two halves apart gives the same text: the template's characters beside `$DOC$` ("\\n") cannot be part
    of a marker."""
    cut = template.find(DOCUMENT)
    if cut < 0:
        return "", fill(template, row)
    cut += len(DOCUMENT)
    return fill(template[:cut], row), fill(template[cut:], row)


def middle_truncation(model, text: str, max_length: int | None) -> tuple[str, str] | None:
    """pred.py's `query_llm` truncation: (the prompt, the decoded first half alone), or None when `text` fits.

    The ids of `tokenizer.encode(text)` (special tokens included) longer than `max_length` keep
    `ids[:max_length // 2] + ids[-max_length // 2:]`, decoded together with `skip_special_tokens=True`. Python reads
    `-max_length // 2` as `(-max_length) // 2`, so an odd length keeps one more token at the end than at the start.
    LongBench v1's pred.py (evalkv/tasks/longbench/prompt.py) decodes the halves apart and keeps `int(max / 2)` each.
    """
    ids = model.tokenizer(text)["input_ids"]
    if max_length is None or len(ids) <= max_length:
        return None
    head = ids[: max_length // 2]
    return model.decode(head + ids[-max_length // 2 :]), model.decode(head)


def build_prompt(model, context_part: str, question_part: str, chat: bool, query_agnostic: bool,
                 max_length: int | None) -> Prompt:
    """Token ids of the prompt `context_part + question_part`, truncated as pred.py does, chat-wrapped when `chat`.

    Query-agnostic mode feeds the same ids in two parts cut where the document ends (the instructions and the
    document first, to be compressed; then the question, the choices, the answer cue and the chat template's
    closing). When truncation cuts into the question part itself (a question longer than half the budget), the cut
    is where the kept first half ends.
    """
    text, boundary = context_part + question_part, len(context_part)
    truncation = middle_truncation(model, text, max_length)
    if truncation is not None:
        text, head = truncation
        boundary = (len(text) - len(question_part) if text.endswith(question_part)
                    else len(os.path.commonprefix([text, head])))
    if not query_agnostic:
        return Prompt(model.encode_prompt(text, chat=chat), None, truncation is not None, chat)
    prompt_ids, suffix_ids = model.encode_split(text, boundary, chat=chat)
    return Prompt(prompt_ids, suffix_ids, truncation is not None, chat)


def download_data() -> Path:
    """data.json from the hub (the file `load_dataset` reads); an error that says what to do when offline."""
    return download_hub_file(HUB_REPOS, DATA_FILE, f"pass task.data_path={DATA_FILE}")


@functools.lru_cache(maxsize=1)
def read_rows(path: str) -> tuple[dict, ...]:
    """The questions of a LongBench v2 `data.json` (a JSON list of objects), each checked for the fields that the
    prompts and the metric read."""
    try:
        with open(path, encoding="utf-8") as handle:
            rows = json.load(handle)
    except FileNotFoundError:
        raise EvalkvError(f"task.data_path {path!r} does not exist (LongBench v2's data.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EvalkvError(f"{path} is not a JSON file ({error}); expected LongBench v2's data.json") from None
    if not isinstance(rows, list):
        raise EvalkvError(f"{path} holds a JSON {type(rows).__name__}; LongBench v2's data.json is a list of questions")
    for number, row in enumerate(rows, start=1):
        missing = [key for key in FIELDS if not isinstance(row, dict) or not isinstance(row.get(key), str)]
        if missing:
            raise EvalkvError(f"{path}: question {number} has no text field {', '.join(missing)}; a LongBench v2 "
                              f"question has {', '.join(FIELDS)}")
    return tuple(rows)


@register_task(NAME)
@dataclass
class LongBenchV2(Task):
    """LongBench v2: 503 multiple-choice questions on 8K-2M-word contexts, with the reference's prompts.

    Based on LongBench v2 (Bai et al., arXiv 2412.15204), THUDM/LongBench@2e00731 `pred.py` and `prompts/`
    (docs/benchmarks.md#longbench_v2). Records carry the task (`longbench_v2`, `longbench_v2_cot`,
    `longbench_v2_no_context`), the gold letter as `answers`, the question's `length` bucket (short / medium / long),
    `difficulty`, `domain` and `sub_domain`, and whether the prompt was query-aware, chat-wrapped and truncated.
    Deviations from pred.py: greedy decoding (pred.py samples at temperature 0.1); the model's own chat template
    applied by evalkv (pred.py: the serving engine's); an empty output is recorded and scored as no answer (pred.py
    skips the question, to retry it on its next run); the chain of thought's answer step runs with the full cache.

    data_path: the official `data.json`; null downloads it from the hub (`zai-org/LongBench-v2`).
    prompt: `0shot` (pred.py's default), `cot` (--cot: reasoning with 1024 new tokens, then the answer prompt
        `0shot_cot_ans` with the reasoning and without the document, 128 new tokens, with the full cache) or
        `no_context` (--no_context: the question without the document).
    max_prompt_length: truncate prompts to this many tokens (the reference's model2maxlen: 120000 for 128K-context
        models); null uses `model.max_prompt_length` (LongBench v1's lengths in evalkv's model configs), and a model
        without one is not truncated.
    query_agnostic: compress the instructions and the document alone, then feed the question, the choices and the
        answer cue without eviction (as evalkv's LongBench v1 task does). Same token ids as the default mode.
    chat_template: null = the model's chat template when it has one (pred.py always sends a chat request); true
        insists on one; false never wraps.
    check_row_counts: refuse a data file without the official 503 questions.
    """

    data_path: Optional[str] = None
    prompt: str = "0shot"
    max_prompt_length: Optional[int] = None
    query_agnostic: bool = False
    chat_template: Optional[bool] = None
    check_row_counts: bool = True

    name: ClassVar[str] = NAME
    free_options: ClassVar[tuple[str, ...]] = ("data_path",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt not in PROMPTS:
            raise EvalkvError(f"longbench_v2: unknown prompt {self.prompt!r}; known: {', '.join(PROMPTS)}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise EvalkvError(f"longbench_v2: max_prompt_length must be >= 1 (or null), got {self.max_prompt_length}")
        if self.query_agnostic and self.prompt == "no_context":
            raise EvalkvError("longbench_v2: prompt=no_context has no document to compress apart from the question; "
                              "set query_agnostic=false")

    @property
    def task_name(self) -> str:
        return TASK_NAMES[self.prompt]

    @property
    def task_names(self) -> list[str]:
        return [self.task_name]

    def _rows(self) -> tuple[dict, ...]:
        rows = read_rows(str(self.data_path or download_data()))
        if self.check_row_counts and len(rows) != ROW_COUNT:
            raise EvalkvError(
                f"{self.data_path or DATA_FILE} has {len(rows)} questions; LongBench v2 has {ROW_COUNT}. Use the "
                "official data.json, or set task.check_row_counts=false to run this subset anyway"
            )
        return rows

    def samples(self, model) -> Iterator[Sample]:
        rows = self._rows()
        max_length = self.max_prompt_length if self.max_prompt_length is not None else model.max_prompt_length
        chat = uses_chat(self.task_name, self.chat_template, model)
        for sample_id, row in zip(sample_ids(self.task_name, list(rows)), rows):
            prompt = build_prompt(model, *split_fill(TEMPLATES[self.prompt], row), chat, self.query_agnostic,
                                  max_length)
            yield Sample(
                id=sample_id, task=self.task_name, prompt_ids=prompt.prompt_ids, suffix_ids=prompt.suffix_ids,
                answers=[row["answer"]], max_new_tokens=MAX_NEW_TOKENS[self.prompt], length=row["length"],
                metadata={
                    "difficulty": row["difficulty"], "domain": row["domain"], "sub_domain": row["sub_domain"],
                    "query_aware": prompt.suffix_ids is None, "chat_template": chat, "truncated": prompt.truncated,
                    "max_prompt_length": max_length,
                },
                follow_up=functools.partial(answer_step, model, sample_id, self.task_name, question_fields(row),
                                            chat, max_length) if self.prompt == "cot" else None,
            )

    def size(self) -> int:
        return ROW_COUNT if self.check_row_counts else len(self._rows())


def question_fields(row: dict) -> dict:
    """What the answer step's template reads (not the document, which it omits)."""
    return {"context": "", **{key: row[key] for key in ("question", "choice_A", "choice_B", "choice_C", "choice_D",
                                                        "answer", "length")}}


def answer_step(model, sample_id: str, task: str, row: dict, chat: bool, max_length: int | None,
                output: str) -> Sample | None:
    """The chain of thought's second prompt (pred.py): `0shot_cot_ans` with the stripped reasoning, truncated and
    wrapped as the first, 128 new tokens. None for an empty reasoning (pred.py asks no second question then)."""
    if output == "":
        return None
    reasoning = output.strip()
    prompt = build_prompt(model, fill(TEMPLATES["cot_answer"], row, reasoning), "", chat, False, max_length)
    return Sample(id=sample_id, task=task, prompt_ids=prompt.prompt_ids, answers=[row["answer"]],
                  max_new_tokens=MAX_NEW_TOKENS["cot_answer"], length=row["length"],
                  metadata={"response_cot": reasoning, "answer_truncated": prompt.truncated})
