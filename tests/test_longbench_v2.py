"""LongBench v2's prompts as pred.py (THUDM/LongBench@2e00731) builds them: the templates, the replacement order,
middle truncation, the query-agnostic split, the chain of thought's answer step, and the data file."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from conftest import tiny_loaded
from longbench_v2_fixtures import question, small_data, write_data
from test_longbench_prompts import bos_model, raw

from evalkv.errors import EvalkvError
from evalkv.tasks import build_task
from evalkv.tasks import longbench_v2 as v2
from evalkv.tasks.longbench.prompt import middle_truncation as v1_truncation

# sha256 of THUDM/LongBench@2e00731 prompts/0shot.txt, 0shot_cot.txt, 0shot_cot_ans.txt, 0shot_no_context.txt.
REFERENCE_SHA256 = {
    "0shot": "68a162252bc9ff71d5d7abca3d69bb31aac3c35f832d657a2866f2018b8a6950",
    "cot": "6cc33d92fd8f611662b756c1f10f302c541ca005b58c46d5f3188ac3a939bfe8",
    "cot_answer": "85ec59df4ac0e27aabbc619a7ca5cf3ae1787dd5a76cf51a18944eb52c91955f",
    "no_context": "125fb44183af01ffc623df19392b80a287db62af3e2a2805e5b2ff9c7b2bee30",
}


def v2_task(path, **options):
    return build_task("longbench_v2", {"data_path": str(path), "check_row_counts": False, **options})


def test_templates_are_the_reference_files_byte_for_byte():
    assert {name: hashlib.sha256(text.encode()).hexdigest() for name, text in v2.TEMPLATES.items()} == REFERENCE_SHA256


def test_fill_strips_the_fields_and_replaces_in_the_reference_order():
    row = question(0, context="  see $Q$ and $C_A$  ", question=" Which? $COT$")
    text = v2.fill(v2.TEMPLATES["0shot"], row)
    assert "<text>\nsee Which? $COT$ and Alice Smith\n</text>" in text  # markers inside the document are replaced too
    assert "(A) Alice Smith\n(B) Bob Jones\n" in text and "$" not in text.replace("$COT$", "")
    answer = v2.fill(v2.TEMPLATES["cot_answer"], row, "because")
    assert "this question: Which? because\n" in answer and "step by step: because\n\nBased on" in answer


@pytest.mark.parametrize("prompt", ["0shot", "cot"])
def test_split_fill_cuts_after_the_document(prompt):
    row = question(1, context="doc $Q$ text")
    context_part, question_part = v2.split_fill(v2.TEMPLATES[prompt], row)
    assert context_part + question_part == v2.fill(v2.TEMPLATES[prompt], row)
    assert context_part.endswith("<text>\ndoc Who wrote book 1? text") and question_part.startswith("\n</text>\n\n")
    assert v2.split_fill(v2.TEMPLATES["no_context"], row) == ("", v2.fill(v2.TEMPLATES["no_context"], row))


def test_truncation_keeps_half_and_the_rounded_up_half_decoded_together():
    model = bos_model()
    text = "".join(chr(ord("a") + i % 26) for i in range(100))
    # ids = [BOS] + 100 bytes; 41 keeps ids[:20] (BOS + 19) and ids[-21:], the BOS dropped by the decoding
    assert v2.middle_truncation(model, text, 41) == (text[:19] + text[-21:], text[:19])
    assert v2.middle_truncation(model, text, 40)[0] == text[:19] + text[-20:]
    assert v2.middle_truncation(model, text, 101) is None and v2.middle_truncation(model, text, None) is None
    # one decoding of the kept ids: a character whose bytes the cut separates comes back whole
    plain = tiny_loaded()
    accents = "x" + "é" * 50  # 101 bytes: the first 20 end inside an "é", the last 21 begin inside one
    assert v2.middle_truncation(plain, accents, 41)[0] == "x" + "é" * 20
    assert "".join(v1_truncation(plain, accents, 41)) == "x" + "é" * 9 + "\ufffd" + "é" * 10  # v1: apart, 20 + 20


def test_truncation_happens_before_the_chat_template():
    model = bos_model()
    prompt = v2.build_prompt(model, "x" * 100, "Q?", True, False, 40)
    assert prompt.chat and prompt.truncated and prompt.suffix_ids is None
    assert raw(model, prompt.prompt_ids) == "<|user|>\n" + "x" * 19 + "x" * 18 + "Q?" + "<|end|>\n<|assistant|>\n"


@pytest.mark.parametrize("chat", [False, True])
def test_query_agnostic_feeds_the_same_ids_split_where_the_document_ends(chat):
    model = bos_model()
    context_part, question_part = v2.split_fill(v2.TEMPLATES["0shot"], question(2))
    whole = v2.build_prompt(model, context_part, question_part, chat, False, None)
    split = v2.build_prompt(model, context_part, question_part, chat, True, None)
    assert split.prompt_ids + split.suffix_ids == whole.prompt_ids
    opening, closing = ("<|user|>\n", "<|end|>\n<|assistant|>\n") if chat else ("<|bos|>", "")
    assert raw(model, split.prompt_ids) == opening + context_part
    assert raw(model, split.suffix_ids) == question_part + closing


def test_query_agnostic_with_truncation():
    model = bos_model()
    kept = v2.build_prompt(model, "c" * 100, "\nQuestion?", False, True, 40)
    assert raw(model, kept.prompt_ids) == "<|bos|>" + "c" * 29 and raw(model, kept.suffix_ids) == "\nQuestion?"
    # a question longer than half the budget: the cut is where the kept first half ends
    cut = v2.build_prompt(model, "c" * 100, "q" * 50, False, True, 40)
    assert raw(model, cut.prompt_ids) == "<|bos|>" + "c" * 19 and raw(model, cut.suffix_ids) == "q" * 20


def test_samples_carry_the_question_metadata(tmp_path):
    model = tiny_loaded()
    task = v2_task(small_data(tmp_path))
    samples = list(task.samples(model))
    assert task.size() == len(samples) == 4 and task.task_names == ["longbench_v2"]
    first = samples[0]
    row = question(0)
    assert first.id == f"longbench_v2/{row['_id']}" and first.task == "longbench_v2"
    assert first.answers == ["A"] and first.length == "short" and first.max_new_tokens == 128
    assert first.metadata == {"difficulty": "easy", "domain": "Single-Document QA", "sub_domain": "Academic",
                              "query_aware": True, "chat_template": True, "truncated": False,
                              "max_prompt_length": None}
    assert raw(model, first.prompt_ids) == model.chat_text(v2.fill(v2.TEMPLATES["0shot"], row))
    assert first.suffix_ids is None and first.follow_up is None
    assert [s.metadata["difficulty"] for s in samples] == ["easy", "hard", "easy", "hard"]
    assert [s.length for s in samples] == ["short", "medium", "long", "short"]


def test_no_context_prompt_and_unwrapped_prompts(tmp_path):
    model = tiny_loaded()
    (sample, *_) = v2_task(small_data(tmp_path), prompt="no_context", chat_template=False).samples(model)
    assert sample.task == "longbench_v2_no_context" and not sample.metadata["chat_template"]
    assert raw(model, sample.prompt_ids) == v2.fill(v2.TEMPLATES["no_context"], question(0))


def test_max_prompt_length_is_the_tasks_or_else_the_models(tmp_path):
    data = small_data(tmp_path)
    model = dataclasses.replace(tiny_loaded(), max_prompt_length=60)
    (by_model, *_) = v2_task(data).samples(model)
    (by_task, *_) = v2_task(data, max_prompt_length=80).samples(model)
    assert by_model.metadata["max_prompt_length"] == 60 and by_model.metadata["truncated"]
    assert by_task.metadata["max_prompt_length"] == 80
    wrapper = len(model.encode_prompt("", chat=True))
    assert len(by_model.prompt_ids) == 60 + wrapper and len(by_task.prompt_ids) == 80 + wrapper


def test_chain_of_thought_asks_for_the_answer_with_the_reasoning_and_without_the_document(tmp_path):
    model = tiny_loaded()
    task = v2_task(small_data(tmp_path), prompt="cot", query_agnostic=True)
    (sample, *_) = task.samples(model)
    row = question(0)
    assert sample.task == "longbench_v2_cot" and sample.max_new_tokens == 1024
    assert raw(model, sample.prompt_ids + sample.suffix_ids) == model.chat_text(v2.fill(v2.TEMPLATES["cot"], row))
    answer = sample.follow_up("  The author is Alice.\n")
    assert answer.max_new_tokens == 128 and answer.suffix_ids is None and answer.answers == ["A"]
    assert raw(model, answer.prompt_ids) == model.chat_text(v2.fill(v2.TEMPLATES["cot_answer"], row,
                                                                    "The author is Alice."))
    assert "Book 0 was written" not in raw(model, answer.prompt_ids)
    assert answer.metadata == {"response_cot": "The author is Alice.", "answer_truncated": False}
    assert sample.follow_up("") is None  # pred.py asks no second question after an empty output


def test_data_file_problems_are_clear_errors(tmp_path):
    model = tiny_loaded()
    with pytest.raises(EvalkvError, match="does not exist"):
        list(v2_task(tmp_path / "absent.json").samples(model))
    (tmp_path / "dict.json").write_text(json.dumps({"data": []}))
    with pytest.raises(EvalkvError, match="holds a JSON dict; LongBench v2's data.json is a list"):
        list(v2_task(tmp_path / "dict.json").samples(model))
    broken = question(0)
    del broken["choice_C"]
    with pytest.raises(EvalkvError, match="question 2 has no text field choice_C"):
        list(v2_task(write_data(tmp_path / "broken.json", [question(1), broken])).samples(model))
    checked = build_task("longbench_v2", {"data_path": str(small_data(tmp_path))})
    assert checked.size() == 503
    with pytest.raises(EvalkvError, match="has 4 questions; LongBench v2 has 503.*check_row_counts=false"):
        next(checked.samples(model))


def test_bad_options_are_refused():
    with pytest.raises(EvalkvError, match="unknown prompt 'cott'; known: 0shot, cot, no_context"):
        build_task("longbench_v2", {"prompt": "cott"})
    with pytest.raises(EvalkvError, match="no document to compress"):
        build_task("longbench_v2", {"prompt": "no_context", "query_agnostic": True})
    with pytest.raises(EvalkvError, match="max_prompt_length must be >= 1"):
        build_task("longbench_v2", {"max_prompt_length": 0})


def test_offline_hub_says_where_to_get_the_file(monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(EvalkvError, match="data.json .*zai-org/LongBench-v2: OSError: no network; THUDM.*data_path="):
        v2.download_data()
