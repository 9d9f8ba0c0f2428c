"""Shared helpers of the RULER tests: the shared essays and NLTK Punkt data, a word-level token counter (about as
many tokens per word as real tokenizers, unlike the byte tokenizer) and a chat-like frame."""

from __future__ import annotations

import re

import nltk
import pytest
from conftest import SHARED_DATA

from evalkv.tasks.ruler.common import Frame, Setting
from evalkv.tasks.ruler.constants import RULER_TASKS

ESSAYS = SHARED_DATA / "ruler" / "PaulGrahamEssays.json"
NLTK_DATA = SHARED_DATA / "nltk_data"
if str(NLTK_DATA) not in nltk.data.path:  # the essay tasks split sentences with the shared English Punkt files
    nltk.data.path.append(str(NLTK_DATA))
HAS_PUNKT = (NLTK_DATA / "tokenizers" / "punkt_tab" / "english").is_dir()
needs_punkt = pytest.mark.skipif(not HAS_PUNKT, reason=f"NLTK's English Punkt is not in {NLTK_DATA} (../shared/data)")
needs_essays = pytest.mark.skipif(not (ESSAYS.is_file() and HAS_PUNKT),
                                  reason=f"{ESSAYS} or NLTK's Punkt in {NLTK_DATA} is absent (../shared/data)")
FRAME = Frame("<|user|>\n", "<|end|>\n<|assistant|>\n")
_TOKEN = re.compile(r"\w+|[^\w\s]")


def count_words(text: str) -> int:
    return len(_TOKEN.findall(text))


def setting(task: str, length: int, num_samples: int = 4, seed: int = 42) -> Setting:
    spec = RULER_TASKS[task]
    return Setting(length, spec.tokens_to_generate, num_samples, seed, FRAME, count_words, dict(spec.args))


def multiquery_rows(length: int = 1024, num_samples: int = 2) -> list[dict]:
    """niah_multiquery's rows made on a noise haystack (no essays needed): four keys, all four asked about each
    context."""
    from evalkv.tasks.ruler import niah

    spec = setting("niah_single_1", length, num_samples)
    spec.args.update(num_needle_k=4, num_needle_q=4)
    return niah.generate(spec, "niah_multiquery")
