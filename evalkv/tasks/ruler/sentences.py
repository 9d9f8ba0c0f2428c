"""Sentences of RULER's essay haystack: NLTK's pre-trained English Punkt model, as RULER's niah.py splits them.

RULER (scripts/data/synthetic/niah.py at c3f5e3b) cuts the essay words to the haystack size, joins them with spaces
and calls `nltk.tokenize.sent_tokenize(text.strip())`; the needles go between those sentences. evalkv calls the same
function, so the sentence boundaries (Punkt's learned abbreviations and orthographic rules included) are RULER's.
NLTK >= 3.9 reads the model from the plain-text `punkt_tab` files (no unpickling); `nltk.download("punkt_tab")`,
`NLTK_DATA` or `evalkv data ruler` provide them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from evalkv.errors import EvalkvError

LANGUAGE = "english"
RESOURCE = f"tokenizers/punkt_tab/{LANGUAGE}/"


def punkt_folder() -> Path:
    """The folder of NLTK's English `punkt_tab` files on NLTK's search path, else an error that says how to get it."""
    import nltk

    try:
        return Path(nltk.data.find(RESOURCE))
    except LookupError:
        raise EvalkvError(
            "RULER's essay-haystack tasks split the essays into sentences with NLTK's English Punkt model, which was "
            "not found on NLTK's data path. Get it with `evalkv data ruler` (or in Python: "
            "nltk.download('punkt_tab')), or point NLTK_DATA at a folder that holds tokenizers/punkt_tab/english/; "
            "or leave the essay tasks out of task.tasks"
        ) from None


def punkt_identity() -> dict[str, str]:
    """What decides the split: NLTK's version and the sha256 of the English Punkt files (names and bytes)."""
    import nltk

    digest = hashlib.sha256()
    for file in sorted(punkt_folder().iterdir()):
        if file.is_file():
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return {"splitter": "nltk.sent_tokenize", "nltk": nltk.__version__, "punkt_tab": digest.hexdigest()}


def split_sentences(text: str) -> list[str]:
    """`nltk.sent_tokenize(text)` with the English Punkt model (call `punkt_folder()` first for evalkv's error)."""
    from nltk.tokenize import sent_tokenize

    return sent_tokenize(text, language=LANGUAGE)
