"""RULER's frequent words extraction generator (`scripts/data/synthetic/freq_words_extraction.py`): task `fwe`.

Coded words (random lowercase strings) drawn from a Zipf distribution: the word of rank k appears
`int(num_words * k**-alpha / zeta(alpha))` times, the top-ranked one is the noise token `...`; the answer is the next
three. The number of words is found once by stepping `max_len // 32` words up from `max_len // 6` (RULER's linear
search, `max_len` = length - tokens to generate), then every sample draws a fresh vocabulary and steps down until it
fits. Random draws follow the script call for call.
"""

from __future__ import annotations

import random
import string

import numpy as np
from scipy.special import zeta

from evalkv.errors import EvalkvError
from evalkv.tasks.ruler.common import Generated, Setting, as_row, measured, render
from evalkv.tasks.ruler.constants import TEMPLATES


class FrequentWords:
    def __init__(self, setting: Setting):
        self.setting = setting
        self.alpha = float(setting.args["alpha"])
        self.word_length = setting.args.get("coded_wordlen", 6)
        self.max_len = setting.max_seq_length - setting.tokens_to_generate
        vocab_size = setting.args.get("vocab_size", -1)
        self.vocab_size = self.max_len // 50 if vocab_size == -1 else vocab_size
        self.step = self.max_len // 32
        self.random = random.Random(setting.seed)

    def vocabulary(self) -> list[str]:
        def word() -> str:
            return "".join(self.random.choices(string.ascii_lowercase, k=self.word_length))

        vocab = [word() for _ in range(self.vocab_size)]
        while len(set(vocab)) < self.vocab_size:
            vocab.append(word())
        vocab = sorted(set(vocab))
        random.Random(self.setting.seed).shuffle(vocab)
        vocab[0] = "..."  # the top-ranked word is noise
        return vocab

    def text(self, vocab: list[str], num_words: int) -> Generated:
        ranks = np.arange(1, len(vocab) + 1)
        counts = (num_words * (ranks ** -self.alpha) / zeta(self.alpha)).astype(int)
        words = [word for word, count in zip(vocab, counts) for _ in range(count)]
        random.Random(self.setting.seed).shuffle(words)
        entry = TEMPLATES["freq_words_extraction"]
        text, prefix, question = render(self.setting, entry["template"], entry["answer_prefix"],
                                        context=" ".join(words), query="")
        return Generated(text, prefix, vocab[1:4], {"num_words": num_words}, question)

    def tokens(self, sample: Generated) -> int:
        return self.setting.count(sample.prompt)

    def sample(self, num_words: int = -1) -> Generated:
        """freq_words_extraction.py `generate_input_output`: a fresh vocabulary, then the word count search."""
        vocab = self.vocabulary()
        if num_words > 0:
            sample = self.text(vocab, num_words)
            while self.tokens(sample) > self.max_len:
                num_words -= self.step
                if num_words <= 0:
                    raise EvalkvError(f"ruler fwe: length {self.setting.max_seq_length} is too short for the task")
                sample = self.text(vocab, num_words)
        else:
            num_words = self.max_len // self.word_length
            while self.tokens(self.text(vocab, num_words)) < self.max_len:
                num_words += self.step
            num_words -= self.step
        return self.text(vocab, num_words)


def generate(setting: Setting, task: str) -> list[dict]:
    generator = FrequentWords(setting)
    if generator.step < 1:
        raise EvalkvError(f"ruler fwe: length {setting.max_seq_length} is too short for the task")
    num_words = generator.sample().metadata["num_words"]
    rows = []
    for index in range(setting.num_samples):
        sample, length = measured(setting, generator.sample(num_words))
        rows.append(as_row(index, sample, length, sample.metadata.pop("num_words")))
    return rows
