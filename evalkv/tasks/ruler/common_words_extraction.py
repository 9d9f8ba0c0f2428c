"""RULER's common words extraction generator (`scripts/data/synthetic/common_words_extraction.py`): task `cwe`.

A numbered list in which 10 words appear `freq_cw` times and the others `freq_ucw` times (6 and 1 below 4096
tokens), after one solved few-shot example; the answer is the 10 common words. Words are wonderwords' nouns,
adjectives and verbs (8,166 with wonderwords 3.0.1). Random draws follow the script call for call.

Deviation: when a list needs more distinct words than wonderwords has, RULER draws them from its
`json/english_words.json` (a Git-LFS file, not distributed with RULER's code). evalkv reads that file from
`cwe_words_path` when given; without it, sizes that need more words count as too long, so the list holds at most
8,166 distinct words and the prompt can fall short of the target at long lengths; such samples differ from RULER's
and say so (`vocabulary_capped`).
"""

from __future__ import annotations

import random
import sys

from evalkv.tasks.ruler.common import Generated, Setting, largest_fitting, measured, render, sized_rows
from evalkv.tasks.ruler.constants import TEMPLATES
from evalkv.tasks.ruler.words import common_words


def numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


class CommonWords:
    def __init__(self, setting: Setting, extra_words: list[str] | None):
        self.setting = setting
        self.freq_cw, self.freq_ucw, self.num_cw = (setting.args[k] for k in ("freq_cw", "freq_ucw", "num_cw"))
        self.num_fewshot = setting.args.get("num_fewshot", 1)
        self.words = list(common_words(setting.seed))
        self.extra_words = extra_words
        self.random = random.Random(setting.seed)

    def fits_vocabulary(self, num_words: int) -> bool:
        return num_words <= len(self.words) or self.extra_words is not None

    def example(self, num_words: int, common_repeats: int, uncommon_repeats: int) -> tuple[str, list[str]]:
        population = self.words if num_words <= len(self.words) else self.extra_words
        chosen = self.random.sample(population, num_words)
        common, uncommon = chosen[:self.num_cw], chosen[self.num_cw:]
        word_list = common * int(common_repeats) + uncommon * int(uncommon_repeats)
        random.Random(self.setting.seed).shuffle(word_list)
        return numbered(word_list), common

    def build(self, num_words: int) -> Generated:
        short = self.setting.max_seq_length < 4096
        shots = [self.example(20, 3, 1) if short else self.example(40, 10, 3) for _ in range(self.num_fewshot)]
        context, answer = self.example(num_words, *((6, 1) if short else (self.freq_cw, self.freq_ucw)))
        entry = TEMPLATES["common_words_extraction"]
        solved = ["".join(render(self.setting, entry["template"], entry["answer_prefix"], num_cw=self.num_cw,
                                 context=shot_context, query="")[:2]) + " " + numbered(shot_answer)
                  for shot_context, shot_answer in shots]
        text, prefix, question = render(self.setting, entry["template"], entry["answer_prefix"], num_cw=self.num_cw,
                                        context=context, query="")
        return Generated("\n".join(solved) + "\n" + text, prefix, answer, question=question)


def generate(setting: Setting, task: str, extra_words: list[str] | None = None) -> list[dict]:
    generator = CommonWords(setting, extra_words)
    incremental = 10
    tokens_per_word = setting.count(generator.build(4096).prompt) / 4096
    upper = int(setting.max_seq_length // tokens_per_word) * 2
    capped = False

    def total_tokens(num_words: int) -> int:
        nonlocal capped
        if not generator.fits_vocabulary(num_words):
            capped = True  # RULER would draw from english_words.json here
            return sys.maxsize
        return measured(setting, generator.build(num_words))[1]

    size = largest_fitting(total_tokens, setting.max_seq_length, incremental, max(upper, incremental * 2),
                           incremental)
    if capped:
        print(f"ruler {task} at {setting.max_seq_length} tokens: more distinct words needed than wonderwords has "
              f"({len(generator.words)}); set task.cwe_words_path to RULER's json/english_words.json to match RULER",
              file=sys.stderr)
    rows = sized_rows(setting, task, generator.build, size, incremental)
    for row in rows:
        row["vocabulary_capped"] = capped
    return rows
