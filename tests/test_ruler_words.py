"""RULER's word lists."""

from __future__ import annotations

import random

from evalkv.tasks.ruler.words import AdjectiveNouns, common_words, niah_words, wonderwords_list


def test_adjective_noun_sequence_equals_the_sorted_set_ruler_builds():
    adjectives, nouns = wonderwords_list("adjectivelist.txt"), wonderwords_list("nounlist.txt")
    # Every adjective whose "adj-" prefixes another's, their neighbours in sorted order, and a random sample.
    keys = sorted(f"{a}-" for a in set(adjectives))
    tricky = {k for i, k in enumerate(keys) for other in keys[i + 1:i + 6] if other.startswith(k)}
    chosen = {k[:-1] for k in tricky} | {o[:-1] for k in tricky for o in keys if o.startswith(k)}
    chosen |= set(random.Random(0).sample(sorted(set(adjectives)), 20)) | {"ad hoc", "ad", "x-rated", "x"}
    subset = [a for a in adjectives if a in chosen] + ["x", "ad"]
    nouns = [n for n in nouns if "-" in n or " " in n] + random.Random(1).sample(nouns, 1500)
    expected = sorted(set(f"{adj}-{noun}" for adj in subset for noun in nouns))
    assert list(AdjectiveNouns(subset, nouns)) == expected
    assert len(niah_words()) == 6171620  # len(sorted(set(...))) over wonderwords 3.0.1's full lists


def test_common_words_are_the_three_lists_sorted_then_shuffled_with_the_seed():
    words = common_words(42)
    everything = sorted(set(wonderwords_list("nounlist.txt") + wonderwords_list("adjectivelist.txt")
                            + wonderwords_list("verblist.txt")))
    random.Random(42).shuffle(everything)
    assert list(words) == everything and len(words) == 8166  # wonderwords 3.0.1

