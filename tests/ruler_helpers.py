"""Shared helpers of the RULER tests: a word-level token counter (about as many tokens per word as real
tokenizers, unlike the byte tokenizer) and a chat-like frame."""

from __future__ import annotations

import re

from conftest import SHARED_DATA

from evalkv.tasks.ruler.common import Frame, Setting
from evalkv.tasks.ruler.constants import RULER_TASKS

ESSAYS = SHARED_DATA / "ruler" / "PaulGrahamEssays.json"
FRAME = Frame("<|user|>\n", "<|end|>\n<|assistant|>\n")
_TOKEN = re.compile(r"\w+|[^\w\s]")


def count_words(text: str) -> int:
    return len(_TOKEN.findall(text))


def setting(task: str, length: int, num_samples: int = 4, seed: int = 42) -> Setting:
    spec = RULER_TASKS[task]
    return Setting(length, spec.tokens_to_generate, num_samples, seed, FRAME, count_words, dict(spec.args))
