"""LongBench prompts as pred.py builds them: templates, middle truncation, chat rule, samsum's stop, query-agnostic
split (specs/benchmarks.md §A.2-A.4)."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import re

import pytest
from conftest import SHARED_DATA, tiny_loaded, tiny_model
from longbench_fixtures import row, small_longbench
from tokenizers.processors import TemplateProcessing

from evalkv.errors import EvalkvError
from evalkv.kv.engine import Engine
from evalkv.methods import build_method
from evalkv.models.presets import byte_tokenizer
from evalkv.tasks import build_task
from evalkv.tasks.longbench.prompt import build_prompt, middle_truncation
from evalkv.tasks.longbench.spec import ENGLISH_TASKS, MAX_NEW_TOKENS, NO_CHAT_TASKS, PROMPTS, TASKS
from evalkv.tasks.longbench.task import split_template

SPEC = SHARED_DATA.parent / "specs" / "benchmarks.md"


def bos_model(max_prompt_length: int | None = None):
    """The tiny model with a byte tokenizer that adds a BOS, like Llama's."""
    tokenizer = byte_tokenizer()
    bos = tokenizer.convert_tokens_to_ids("<|bos|>")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<|bos|> $A",
                                                                    special_tokens=[("<|bos|>", bos)])
    return dataclasses.replace(tiny_loaded(), tokenizer=tokenizer, max_prompt_length=max_prompt_length)


def raw(model, ids) -> str:
    return model.tokenizer.decode(ids, skip_special_tokens=False)


def test_templates_are_pinned():
    assert list(PROMPTS) == list(TASKS) and set(MAX_NEW_TOKENS) == set(TASKS)
    assert PROMPTS["narrativeqa"].count("asconcisely") == 2  # upstream typo, kept
    assert "{context}\n\n Answer the question based on the above article" in PROMPTS["qasper"]
    assert all(template.count("{context}") == 1 for template in PROMPTS.values())
    digest = hashlib.sha256(json.dumps(PROMPTS, ensure_ascii=False).encode()).hexdigest()
    assert digest == "de17cee99e50f5814bb60e88f9617f1ae5552a237c65ef67637871ba5e727edd"


@pytest.mark.skipif(not SPEC.is_file(), reason=f"{SPEC} (the project's reference spec) is not here")
def test_templates_equal_the_spec_verbatim():
    block = re.search(r"```python\nDATASET2PROMPT = (\{.*?\n\})\n```", SPEC.read_text(encoding="utf-8"), re.S)
    assert ast.literal_eval(block.group(1)) == PROMPTS


def test_max_new_tokens_and_the_english_tasks():
    assert MAX_NEW_TOKENS["gov_report"] == 512 and MAX_NEW_TOKENS["hotpotqa"] == 32
    assert MAX_NEW_TOKENS["samsum"] == 128 and MAX_NEW_TOKENS["lcc"] == 64
    assert len(ENGLISH_TASKS) == 16 and "multifieldqa_zh" not in ENGLISH_TASKS


def test_split_template_fills_the_template():
    example = row("qasper", 0, context="ARTICLE {with braces}", question="What?")
    context_part, question_part = split_template("qasper_e", example)
    assert context_part + question_part == PROMPTS["qasper"].format(**example)
    assert context_part.endswith("ARTICLE {with braces}") and question_part.startswith("\n\n Answer the question")


def test_prompt_is_the_template_with_the_tokenizers_special_tokens():
    model = bos_model()
    example = row("hotpotqa", 1)
    prompt = build_prompt(model, "hotpotqa", *split_template("hotpotqa", example), False, False)
    assert prompt.prompt_ids == model.tokenizer(PROMPTS["hotpotqa"].format(**example))["input_ids"]
    assert raw(model, prompt.prompt_ids) == "<|bos|>" + PROMPTS["hotpotqa"].format(**example)
    assert prompt.suffix_ids is None and not prompt.truncated and not prompt.chat


def test_middle_truncation_keeps_the_first_and_last_half_of_the_token_ids():
    model = bos_model(max_prompt_length=41)
    text = "".join(chr(ord("a") + i % 26) for i in range(100))
    # ids = [BOS] + 100 bytes; half = 20: BOS + text[:19] and text[-20:], BOS dropped when decoding
    assert middle_truncation(model, text, 41) == (text[:19], text[-20:])
    assert middle_truncation(model, text, 101) is None  # 101 ids fit 101
    assert middle_truncation(model, text, None) is None
    prompt = build_prompt(model, "lcc", text, "", None, False)
    assert prompt.truncated and prompt.prompt_ids == model.tokenizer(text[:19] + text[-20:])["input_ids"]


def test_truncation_happens_before_the_chat_template():
    model = bos_model(max_prompt_length=40)
    prompt = build_prompt(model, "hotpotqa", "x" * 100, "Q?", None, False)
    assert prompt.chat and prompt.truncated
    assert raw(model, prompt.prompt_ids) == "<|user|>\n" + "x" * 19 + "x" * 18 + "Q?" + "<|end|>\n<|assistant|>\n"


@pytest.mark.parametrize("task", TASKS)
def test_chat_template_follows_the_reference_skip_list(task):
    model = tiny_loaded()
    prompt = build_prompt(model, task, "context", " question", None, False)
    assert prompt.chat is (task not in NO_CHAT_TASKS)
    assert raw(model, prompt.prompt_ids).startswith("<|user|>") is prompt.chat
    assert not build_prompt(model, task, "context", " question", False, False).chat


def test_chat_template_true_needs_a_template_and_null_falls_back_without_one():
    model = tiny_loaded()
    model = dataclasses.replace(model, tokenizer=byte_tokenizer())
    model.tokenizer.chat_template = None
    assert not build_prompt(model, "hotpotqa", "c", "q", None, False).chat
    with pytest.raises(EvalkvError, match="no chat template"):
        build_prompt(model, "hotpotqa", "c", "q", True, False)


@pytest.mark.parametrize("chat", [False, True])
def test_query_agnostic_feeds_the_same_ids_split_where_the_context_ends(chat):
    model = bos_model()
    context_part, question_part = split_template("hotpotqa", row("hotpotqa", 2))
    whole = build_prompt(model, "hotpotqa", context_part, question_part, chat, False)
    split = build_prompt(model, "hotpotqa", context_part, question_part, chat, True)
    assert split.prompt_ids + split.suffix_ids == whole.prompt_ids
    opening, closing = ("<|user|>\n", "<|end|>\n<|assistant|>\n") if chat else ("<|bos|>", "")
    assert raw(model, split.prompt_ids) == opening + context_part
    assert raw(model, split.suffix_ids) == question_part + closing


def test_query_agnostic_with_truncation():
    model = bos_model(max_prompt_length=40)
    kept = build_prompt(model, "hotpotqa", "c" * 100, "\nQuestion?", False, True)
    assert raw(model, kept.suffix_ids) == "\nQuestion?" and raw(model, kept.prompt_ids) == "<|bos|>" + "c" * 29
    # a question longer than half the budget: the kept tail is the question part
    cut = build_prompt(model, "hotpotqa", "c" * 100, "q" * 50, False, True)
    assert raw(model, cut.prompt_ids) == "<|bos|>" + "c" * 19 and raw(model, cut.suffix_ids) == "q" * 20


def test_samples_carry_the_generation_settings_of_their_task(tmp_path):
    model = tiny_loaded()
    task = build_task("longbench", {"data_dir": str(small_longbench(tmp_path)), "check_row_counts": False,
                                    "tasks": ["hotpotqa", "samsum", "trec", "hotpotqa_e"]})
    samples = list(task.samples(model))
    assert task.size() == len(samples) == 9
    by_task: dict = {}
    for sample in samples:
        by_task.setdefault(sample.task, sample)
    newline = model.tokenizer.encode("\n", add_special_tokens=False)[-1]
    assert by_task["samsum"].stop_token_ids == [newline] and by_task["samsum"].min_new_tokens == 1
    assert by_task["samsum"].max_new_tokens == 128 and not by_task["samsum"].metadata["chat_template"]
    assert by_task["hotpotqa"].stop_token_ids == [] and by_task["hotpotqa"].min_new_tokens == 0
    assert by_task["hotpotqa"].max_new_tokens == 32 and by_task["hotpotqa"].metadata["chat_template"]
    assert by_task["trec"].all_classes == ["City", "Individual", "Other location"]
    assert by_task["hotpotqa_e"].id == "hotpotqa_e/hotpotqa_e-0000" and by_task["hotpotqa_e"].length == 1000
    assert by_task["hotpotqa"].metadata == {"language": "en", "query_aware": True, "chat_template": True,
                                            "truncated": False, "max_prompt_length": None}


def test_min_new_tokens_keeps_stop_tokens_out_of_the_first_choice(tokenizer):
    engine = Engine(tiny_model(), build_method("full", {}))
    ids = tokenizer("Summary: ")["input_ids"]
    first = engine.generate(ids, 1).token_ids[0]
    assert engine.generate(ids, 5, stop_token_ids=[first]).token_ids == [first]
    forced = engine.generate(ids, 5, stop_token_ids=[first], min_new_tokens=1).token_ids
    assert forced[0] != first and len(forced) >= 2
