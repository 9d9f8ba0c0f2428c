"""Degenerate limits (docs/methods.md#shared-invariants): a budget that covers everything changes nothing."""

from __future__ import annotations

import pytest
from conftest import prompt_ids, tiny_model
from method_cases import CASES, method_name

from evalkv.kv.engine import Engine
from evalkv.methods import build_method

NEW_TOKENS = 8


def _covering_options(case: str, prompt_length: int) -> dict:
    """The case's options with a budget of the prompt length (prompt-only methods) or of prompt + generated tokens
    (methods that hold the cache to the budget while decoding)."""
    options = dict(CASES[case])
    method = build_method(method_name(case), options)
    budget = prompt_length + (NEW_TOKENS if method.acts_while_decoding else 0)
    if "uniform_stride" in options:
        options.update(sink=budget, recent=0)
    elif method_name(case) == "duo_attention":  # no budget: streaming heads keep sink + recent
        options.update(recent_size=budget)
    elif "budget" in options:
        options["budget"] = budget
    return options


@pytest.mark.parametrize("case", sorted(CASES))
def test_budget_covering_the_prompt_generates_what_full_generates(architecture, case, tokenizer):
    model = tiny_model(architecture)
    ids = prompt_ids(tokenizer)
    full = Engine(model, build_method("full", {})).generate(ids, NEW_TOKENS)
    method = build_method(method_name(case), _covering_options(case, len(ids)))
    generation = Engine(model, method, tokenizer=tokenizer).generate(ids, NEW_TOKENS)
    assert generation.token_ids == full.token_ids
    assert generation.kept_tokens == full.kept_tokens == len(ids)


def test_snapkv_window_covering_the_prompt_is_a_no_op(tokenizer):
    model = tiny_model("tiny-llama")
    ids = prompt_ids(tokenizer, repeats=2)
    method = build_method("snapkv", {"budget": len(ids), "window_size": len(ids)})
    generation = Engine(model, method).generate(ids, 4, keep_session=True)
    assert generation.session.cache.lengths() == [len(ids) + 3] * model.config.num_hidden_layers
