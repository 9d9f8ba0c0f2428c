"""Several questions about one context: the context is compressed once, and each question is answered from its own
copy of the compressed cache, exactly as if it had been asked alone."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny_model
from method_cases import CASES, method_name

from evalkv.kv.engine import Engine, Request
from evalkv.methods import build_method

QUESTIONS = ("Who jumps over the dog?", "What colour is the fox? Answer:", "Repeat the sentence.")


@pytest.mark.parametrize("case", ["full", "snapkv", "h2o", "segment_two_stage", "kmeans-centroid-decode", "adakv",
                                  "snapkv-decoding"])
def test_questions_about_one_context_equal_asking_each_alone(case, tokenizer):
    engine = Engine(tiny_model("tiny-llama"), build_method(method_name(case), dict(CASES[case])), tokenizer=tokenizer)
    context, other = prompt_ids(tokenizer), prompt_ids(tokenizer, 11)
    questions = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in QUESTIONS]
    requests = [Request(context, 8, suffix_ids=question) for question in questions]
    requests.insert(2, Request(other, 8, suffix_ids=questions[0]))
    alone = [engine.generate(r.prompt_ids, 8, suffix_ids=r.suffix_ids) for r in requests]
    shared = engine.generate_batch(requests)
    assert [g.token_ids for g in shared] == [g.token_ids for g in alone]
    assert [(g.kept_tokens, g.final_kept_tokens, g.final_kv_bytes) for g in shared] == [
        (g.kept_tokens, g.final_kept_tokens, g.final_kv_bytes) for g in alone]
    assert [g.context_reused for g in shared] == [False, True, False, True]
    assert not any(g.context_reused for g in alone)


def test_a_fork_shares_no_memory_with_its_context(tokenizer):
    engine = Engine(tiny_model("tiny-llama"), build_method("h2o", {"budget": 32}))
    session = engine.generate(prompt_ids(tokenizer), 1, keep_session=True).session
    forked = session.fork()
    layer, copy = session.cache.layers[0], forked.cache.layers[0]
    for name in ("keys", "values", "positions"):
        assert torch.equal(getattr(layer, name), getattr(copy, name))
        assert getattr(layer, name).data_ptr() != getattr(copy, name).data_ptr()
    copy.extras["h2o_accumulated_attention"].zero_()
    assert layer.extras["h2o_accumulated_attention"].abs().sum() > 0
