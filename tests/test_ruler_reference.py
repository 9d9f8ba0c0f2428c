"""evalkv's RULER rows equal RULER's own (NVIDIA/RULER prepare.py at c3f5e3b): the essay haystack is split by NLTK's
Punkt as niah.py splits it, and pinned digests of essay-task rows that RULER's scripts produced."""

from __future__ import annotations

import nltk
import pytest
from ruler_helpers import ESSAYS, needs_essays, needs_punkt

from evalkv.models.presets import byte_tokenizer
from evalkv.tasks import build_task
from evalkv.tasks.ruler import rows_digest
from evalkv.tasks.ruler.common import Frame, Setting
from evalkv.tasks.ruler.constants import RULER_TASKS
from evalkv.tasks.ruler.niah import NeedleHaystack
from evalkv.tasks.ruler.sentences import split_sentences

# Punkt splits where a rule "period + space" would not (`way.[2]The`) and keeps abbreviations and initials whole.
TRICKY = ("It goes a long way.[2]The next one starts here. Mr. Smith met Dr. Jones at 5 p.m. on Jan. 3. "
          "J. R. R. Tolkien wrote a lot. \"Really?\" she asked. e.g. this one. The end")


@needs_punkt
def test_haystack_sentences_are_nltk_punkt():
    assert split_sentences(TRICKY) == nltk.sent_tokenize(TRICKY)
    assert "It goes a long way." in split_sentences(TRICKY)
    assert any(sentence.startswith("[2]The next one") for sentence in split_sentences(TRICKY))


@needs_punkt
def test_the_essay_haystack_joins_punkt_sentences_with_spaces_around_the_needle():
    """niah.py: `" ".join(sent_tokenize(text.strip()))` pieces with the needle between them: `way.[2]The` comes back
    as two sentences joined by a space, as RULER's haystack has it."""
    spec = RULER_TASKS["niah_single_2"]
    setting = Setting(4096, 128, 1, 42, Frame(), len, dict(spec.args))
    context = NeedleHaystack(setting, TRICKY.split(" "))._essay(len(TRICKY.split(" ")), ["NEEDLE."])
    assert context.replace("NEEDLE. ", "").replace(" NEEDLE.", "") == " ".join(nltk.sent_tokenize(TRICKY))
    assert " [2]The next one" in context and "way.[2]The" not in context


# sha256 of (input, outputs, length, answer_prefix) per row (`rows_digest`), 4096 tokens, 2 samples, seed 42, base
# template, evalkv's byte tokenizer saved with save_pretrained. Made by RULER's own prepare.py (c3f5e3b, unchanged)
# through scripts/ruler_reference_check.py --tokenizer <that folder> --lengths 4096 --num-samples 2, which found
# evalkv's rows byte-identical (docs/results.md).
REFERENCE_DIGESTS = {
    "niah_single_2": "9f3cde2d007b64e1eb15c03c9843edb0a84be42a38e445012d35c8df1d06e169",
    "niah_multivalue": "104218c84f8819c03ca79e33ed4f77b17459f40823ac47b8fe7e14e08ef1334f",
}


@needs_essays
def test_essay_task_rows_equal_rulers_prepare_py(tmp_path):
    task = build_task("ruler", {"tasks": list(REFERENCE_DIGESTS), "lengths": [4096], "num_samples": 2,
                                "chat_template": False, "essay_path": str(ESSAYS), "cache_dir": str(tmp_path)})
    digests = {name: rows_digest(rows) for name, _, rows in task.generated(byte_tokenizer())}
    assert digests == REFERENCE_DIGESTS


@pytest.mark.parametrize("task", ["niah_single_1", "niah_multikey_2"])
def test_line_haystack_tasks_do_not_need_punkt(tmp_path, monkeypatch, task):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no-nltk-data")])
    rows = next(build_task("ruler", {"tasks": [task], "lengths": [1024], "num_samples": 1, "chat_template": False,
                                     "cache_dir": str(tmp_path)}).generated(byte_tokenizer()))[2]
    assert len(rows) == 1
