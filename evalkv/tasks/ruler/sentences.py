"""Sentence splitting for RULER's essay haystack.

RULER splits the essay text with `nltk.sent_tokenize` (the pre-trained English Punkt model, a pickle). evalkv does not
unpickle third-party files, so it splits with the rule Punkt applies to ordinary text: a sentence ends at `.`, `?` or
`!` (plus any closing quotes or brackets) followed by whitespace, unless the word before a period is an abbreviation
(a known one, a single letter such as an initial, or a word with inner periods such as `e.g.`) or an ellipsis.

Deviation: Punkt's learned abbreviation list and orthographic heuristics decide some edge cases differently, so a
needle can land one sentence away from where RULER would put it. The haystack text itself is unchanged: sentences
are whitespace-separated pieces of the (whitespace-normalised) text, so joining them with spaces gives it back.
"""

from __future__ import annotations

import re

# Common English abbreviations that end with a period but rarely end a sentence (lower case, without the period).
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc inc ltd corp approx dept gov sen sgt capt "
    "lt cmdr mt ft ave blvd jan feb mar apr jun jul aug sep sept oct nov dec".split()
)

_CLOSING = "\"'”’)]}"
_BOUNDARY = re.compile(r"""(?<=[.?!])["'”’)\]}]*(?=\s+\S)""")


def _ends_sentence(text: str, end: int) -> bool:
    word = text[max(0, end - 80):end].rsplit(None, 1)[-1].rstrip(_CLOSING)
    if not word.endswith("."):
        return True  # ? or !
    if word.endswith(".."):
        return False  # ellipsis
    stem = word[:-1].lstrip("\"'“‘([{")
    if not stem:
        return False
    return not (stem.lower() in ABBREVIATIONS or (len(stem) == 1 and stem.isalpha()) or "." in stem)


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, stripped: joined by spaces they give `text` with each whitespace run as one space."""
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(text):
        if _ends_sentence(text, match.end()):
            sentences.append(text[start:match.end()].strip())
            start = match.end()
    last = text[start:].strip()
    if last:
        sentences.append(last)
    return [sentence for sentence in sentences if sentence]
