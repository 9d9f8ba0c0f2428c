"""RULER's word lists, read from the `wonderwords` package's assets exactly as RULER reads them.

niah draws keys from `sorted(set(f"{adj}-{noun}"))` (6.2M strings with wonderwords 3.0.1). Building and sorting that
list takes about 20 s, so `AdjectiveNouns` serves the same sorted sequence by index: adjectives whose `adj + "-"` is
not a prefix of another's form contiguous blocks of sorted nouns; the few that are (`x` and `x-rated`) are merged and
sorted explicitly. `tests/test_ruler_words.py` checks it against the full list.
"""

from __future__ import annotations

import bisect
import functools
import random
from collections.abc import Sequence


def wonderwords_list(name: str) -> list[str]:
    """A wonderwords asset (`nounlist.txt`, `adjectivelist.txt`, `verblist.txt`) as RULER loads it."""
    from wonderwords.random_word import _get_words_from_text_file

    return _get_words_from_text_file(name)


class AdjectiveNouns(Sequence):
    """`sorted(set(f"{adj}-{noun}" for adj in adjectives for noun in nouns))`, indexable without building it."""

    def __init__(self, adjectives: list[str], nouns: list[str]):
        self._nouns = sorted(set(nouns))
        keys = sorted(f"{adjective}-" for adjective in set(adjectives))
        groups: list[list[str]] = []
        for key in keys:  # keys that extend an earlier key sort right after it and interleave with it
            if groups and key.startswith(groups[-1][0]):
                groups[-1].append(key)
            else:
                groups.append([key])
        self._blocks: list[tuple[str, list[str] | None]] = []  # (key, None) = key + every noun in noun order
        self._starts: list[int] = []
        total = 0
        for group in groups:
            block = (group[0], None) if len(group) == 1 else (
                "", sorted({key + noun for key in group for noun in self._nouns}))
            self._starts.append(total)
            self._blocks.append(block)
            total += len(self._nouns) if block[1] is None else len(block[1])
        self._length = total

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(index)
        block = bisect.bisect_right(self._starts, index) - 1
        key, explicit = self._blocks[block]
        offset = index - self._starts[block]
        return key + self._nouns[offset] if explicit is None else explicit[offset]


@functools.cache
def niah_words() -> AdjectiveNouns:
    """niah.py: `words = sorted(list(set(f"{adj}-{noun}" ...)))` over wonderwords' adjectives x nouns."""
    return AdjectiveNouns(wonderwords_list("adjectivelist.txt"), wonderwords_list("nounlist.txt"))


@functools.cache
def common_words(seed: int) -> tuple[str, ...]:
    """common_words_extraction.py: nouns + adjectives + verbs, `sorted(set(...))`, shuffled by `Random(seed)`."""
    words = sorted(set(wonderwords_list("nounlist.txt") + wonderwords_list("adjectivelist.txt")
                       + wonderwords_list("verblist.txt")))
    random.Random(seed).shuffle(words)
    return tuple(words)
