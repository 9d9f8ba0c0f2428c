"""What every RULER generator shares: the prompt frame (chat wrapper + answer prefix), token counting, and RULER's
procedure for sizing a haystack to a target length (specs/benchmarks.md §B.3 "Common")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from evalkv.errors import EvalkvError

_SENTINEL = "\x1fEVALKV-USER-TURN\x1f"
# RULER retries a sample that does not fit forever once the haystack is at its smallest; evalkv gives up here.
MAX_ATTEMPTS_AT_SMALLEST = 1000


@dataclass(frozen=True)
class Frame:
    """The chat wrapper around one user turn, split at the user's text. Empty: RULER's `base` template."""

    prefix: str = ""
    suffix: str = ""

    def wrap(self, text: str) -> str:
        return self.prefix + text + self.suffix


def chat_frame(tokenizer, name: str) -> Frame:
    """The tokenizer's chat template around a user turn, with the generation prompt (RULER's `model_template_type`
    for chat models: `<chat prefix>{task_template}<chat suffix>`)."""
    if not getattr(tokenizer, "chat_template", None):
        raise EvalkvError(f"model {name} has no chat template; set task.chat_template=false (RULER's base template)")
    wrapped = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
    )
    if wrapped.count(_SENTINEL) != 1:
        raise EvalkvError(f"model {name}: its chat template does not keep the user's text verbatim; "
                          "set task.chat_template=false")
    prefix, suffix = wrapped.split(_SENTINEL)
    return Frame(prefix, suffix)


@dataclass
class Setting:
    """One (task, length) generation: RULER's command-line arguments to a generator script."""

    max_seq_length: int
    tokens_to_generate: int
    num_samples: int
    seed: int
    frame: Frame
    count: Callable[[str], int]  # tokens of a text as RULER counts them (`tokenizer.tokenize(text)`, no specials)
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Generated:
    """One sample: RULER's `input` (the wrapped task text), `answer_prefix` and `outputs`, plus metadata, and the
    question: the end of `input` after the context (compress=context feeds it, with the answer prefix, after the
    context was compressed)."""

    input: str
    answer_prefix: str
    outputs: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)
    question: str = ""

    @property
    def prompt(self) -> str:
        """What the model reads: RULER's `input + answer_prefix` (the prefix follows the chat wrapper)."""
        return self.input + self.answer_prefix


def render(setting: Setting, template: str, answer_prefix: str, **fields) -> tuple[str, str, str]:
    """(wrapped task text, answer prefix, question), filled with `fields` (RULER formats the whole
    `model_template.format(task_template=...) + answer_prefix` string at once: the same text). The question is the
    wrapped text's end after `{context}` (`ask`)."""
    question, prefix = ask(setting, template, answer_prefix, **fields)
    return setting.frame.wrap(template.format(**fields)), prefix, question


def ask(setting: Setting, template: str, answer_prefix: str, **fields) -> tuple[str, str]:
    """(question, answer prefix): the template after `{context}` with the chat wrapper's closing, and the answer
    prefix, filled with `fields` (RULER's task templates end with their question, after the haystack)."""
    return template.partition("{context}")[2].format(**fields) + setting.frame.suffix, answer_prefix.format(**fields)


def measured(setting: Setting, sample: Generated) -> tuple[Generated, int]:
    """A sample and its length as RULER records it: prompt tokens + tokens to generate."""
    return sample, setting.count(sample.prompt) + setting.tokens_to_generate


def search_size(setting: Setting, build: Callable[[int], Generated], incremental: int, upper: int,
                extra_tokens: int = 0) -> int:
    """RULER's haystack size: the largest size whose sample (+ `extra_tokens`) fits the length, else `incremental`."""
    return largest_fitting(lambda size: measured(setting, build(size))[1] + extra_tokens, setting.max_seq_length,
                           incremental, max(upper, incremental * 2), incremental)


def sized_rows(setting: Setting, task: str, build: Callable[[int], Generated], size: int,
               incremental: int) -> list[dict]:
    """`num_samples` rows built at `size`, each shrunk by `incremental` until it fits (RULER's sample loop)."""
    rows = []
    for index in range(setting.num_samples):
        sample, length, used = fit_sample(lambda n: measured(setting, build(n)), size, incremental,
                                          setting.max_seq_length, task)
        rows.append(as_row(index, sample, length, used))
    return rows


def as_row(index: int, sample: Generated, length: int, haystack_size: int) -> dict:
    """RULER's output row (`index`, `input`, `outputs`, `length`, `answer_prefix`) plus evalkv's `question` and
    metadata."""
    return {"index": index, "input": sample.input, "answer_prefix": sample.answer_prefix, "outputs": sample.outputs,
            "length": length, "question": sample.question, "haystack_size": haystack_size, **sample.metadata}


def largest_fitting(total_tokens: Callable[[int], int], budget: int, lower: int, upper: int, fallback: int) -> int:
    """RULER's binary search: the largest size in [lower, upper] with `total_tokens(size) <= budget`, else fallback.

    Every probe builds a sample and so draws from the generator's random state, as RULER's probes do.
    """
    best = None
    while lower <= upper:
        middle = (lower + upper) // 2
        if total_tokens(middle) <= budget:
            best, lower = middle, middle + 1
        else:
            upper = middle - 1
    return best if best is not None else fallback


def fit_sample(make: Callable[[int], tuple[Generated, int]], size: int, incremental: int, budget: int,
               task: str) -> tuple[Generated, int, int]:
    """RULER's per-sample loop: build at `size`; while the sample's length exceeds the budget, rebuild with
    `incremental` less haystack (at the smallest size it rebuilds as is). Returns (sample, length, size used)."""
    attempts = 0
    while True:
        sample, length = make(size)
        if length <= budget:
            return sample, length, size
        if size > incremental:
            size -= incremental
        else:
            attempts += 1
            if attempts >= MAX_ATTEMPTS_AT_SMALLEST:
                raise EvalkvError(f"ruler {task}: even the smallest haystack gives {length} tokens, over the "
                                  f"target {budget}; choose a longer length")
