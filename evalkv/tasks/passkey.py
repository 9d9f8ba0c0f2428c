"""Passkey retrieval: a number hidden at a chosen depth in repetitive filler text (specs/benchmarks.md §C.3)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from evalkv.errors import EvalkvError
from evalkv.tasks.base import Sample, Task
from evalkv.tasks.registry import register_task

# Verbatim from epfml/landmark-attention llama/run_test.py.
TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
GARBAGE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
FINAL_QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(n_garbage: int, depth_percent: float, pass_key: int) -> str:
    """The Landmark prompt with `n_garbage` filler characters, `depth_percent` of them before the key line.

    Both filler pieces are prefixes of the same repeated text, as in the reference.
    """
    repeats = n_garbage // len(GARBAGE) + 2
    garbage_inf = " ".join([GARBAGE] * repeats)
    n_prefix = int(n_garbage * depth_percent / 100)
    information_line = f"The pass key is {pass_key}. Remember it. {pass_key} is the pass key."
    prefix, suffix = garbage_inf[:n_prefix], garbage_inf[: n_garbage - n_prefix]
    return "\n".join([TASK_DESCRIPTION, prefix, information_line, suffix, FINAL_QUESTION])


@register_task("passkey")
@dataclass
class Passkey(Task):
    """Passkey retrieval over a grid of prompt lengths (tokens) x depths (percent of the filler before the key).

    Based on Landmark Attention's passkey test (Mohtashami & Jaggi, arXiv 2305.16300) with the depth-controlled
    variant the KV-cache papers use: `n_prefix = int(n_garbage * depth / 100)`; each prompt holds the most filler
    characters whose tokenized prompt fits `length` tokens. Keys are `randint(1, 50000)` from a generator seeded by
    (seed, length, depth, index). Metric: the first integer in the output equals the key. With compress=context the
    question is the last line, "\nWhat is the pass key? The pass key is" (with the chat template's closing).

    lengths: prompt lengths in tokens (chat wrapper included when `chat_template` is on).
    depths: key depths in percent.
    samples_per_cell: samples per (length, depth).
    chat_template: wrap the prompt with the model's chat template (the reference does not).
    """

    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    depths: list[float] = field(default_factory=lambda: [0.0, 25.0, 50.0, 75.0, 100.0])
    samples_per_cell: int = 1
    seed: int = 42
    max_new_tokens: int = 10
    chat_template: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lengths or min(self.lengths) < 64:
            raise EvalkvError(f"passkey: lengths must be token counts >= 64, got {list(self.lengths)}")
        if not self.depths or min(self.depths) < 0 or max(self.depths) > 100:
            raise EvalkvError(f"passkey: depths must be percentages in [0, 100], got {list(self.depths)}")
        if self.samples_per_cell < 1 or self.max_new_tokens < 1:
            raise EvalkvError("passkey: samples_per_cell and max_new_tokens must be >= 1")

    def samples(self, model) -> Iterator[Sample]:
        for length in self.lengths:
            for depth in self.depths:
                for index in range(self.samples_per_cell):
                    key = random.Random(f"passkey-{self.seed}-{length}-{depth:g}-{index}").randint(1, 50000)
                    text = passkey_prompt(self._fit(model, length, depth, key), depth, key)
                    prompt_ids, suffix_ids = model.encode_parts(text, text.rindex("\n" + FINAL_QUESTION),
                                                                chat=self.chat_template, split=self.splits_question)
                    yield Sample(
                        id=f"len{length}_depth{depth:g}_{index}",
                        task="passkey",
                        prompt_ids=prompt_ids,
                        suffix_ids=suffix_ids,
                        answers=[str(key)],
                        max_new_tokens=self.max_new_tokens,
                        length=len(prompt_ids) + len(suffix_ids or []),
                        metadata={"context_length": length, "depth": depth},
                    )

    def size(self) -> int:
        return len(self.lengths) * len(self.depths) * self.samples_per_cell

    def _encode(self, model, n_garbage: int, depth: float, key: int) -> list[int]:
        return model.encode_prompt(passkey_prompt(n_garbage, depth, key), chat=self.chat_template)

    def _fit(self, model, length: int, depth: float, key: int) -> int:
        """The most filler characters whose prompt still fits `length` tokens (binary search)."""
        if len(self._encode(model, 0, depth, key)) > length:
            raise EvalkvError(f"passkey: length {length} is too short for the prompt's fixed text")
        low, high = 0, max(64, length)
        while len(self._encode(model, high, depth, key)) <= length:
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            if len(self._encode(model, middle, depth, key)) <= length:
                low = middle
            else:
                high = middle
        return low
