"""Sampled decoding (issue 20): transformers' warper semantics, one generator per row, so that batched, static-buffer
and one-at-a-time decoding draw identical tokens, and a seed reproduces a generation."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny_model
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from evalkv.kv.engine import Engine, Request
from evalkv.kv.sampling import Sampling, filtered_logits, sample_token
from evalkv.methods import build_method

NEW_TOKENS = 12


def _prompts(tokenizer) -> list[list[int]]:
    base = prompt_ids(tokenizer)
    return [base, base[7:], prompt_ids(tokenizer, repeats=13)[3:]]


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.6, 0, 0.95), (1.0, 5, 1.0), (0.7, 20, 0.5), (1.3, 0, 0.3)])
def test_filters_equal_transformers_warpers_in_generates_order(temperature, top_k, top_p):
    logits = torch.randn(3, 257, generator=torch.Generator().manual_seed(1)) * 4
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    ours = torch.stack([filtered_logits(row, sampling) for row in logits])
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    assert torch.allclose(ours[~torch.isinf(ours)], expected[~torch.isinf(expected)])
    assert torch.isinf(ours).any() == (top_k > 0 or top_p < 1)  # the filters removed something


def test_top_p_keeps_the_smallest_set_reaching_p_and_draws_in_proportion():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    sampling = Sampling(top_p=0.8, seed=3)
    assert torch.isinf(filtered_logits(logits, sampling)).tolist() == [False, False, True, True]
    assert not torch.isinf(filtered_logits(logits, Sampling(top_p=0.81))[2])  # 0.5 + 0.3 < 0.81: the third stays
    assert torch.isinf(filtered_logits(logits, Sampling(top_p=1e-6))).tolist() == [False, True, True, True]
    generator = sampling.generator(torch.device("cpu"))
    draws = torch.cat([sample_token(logits, sampling, generator) for _ in range(2000)])
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.04


@pytest.mark.parametrize("options", [{"temperature": 1.0, "top_k": 1}, {"temperature": 1e-4}])
def test_top_k_one_and_a_vanishing_temperature_decode_greedily(options, tokenizer):
    engine = Engine(tiny_model(), build_method("h2o", {"budget": 64}))
    ids = prompt_ids(tokenizer)
    greedy = engine.generate(ids, NEW_TOKENS).token_ids
    sampled = engine.generate(ids, NEW_TOKENS, sampling=Sampling(seed=5, **options)).token_ids
    assert sampled == greedy
    assert engine.generate(ids, NEW_TOKENS, sampling=Sampling(seed=5)).token_ids != greedy  # temperature 1 samples


def test_the_same_seed_gives_the_same_tokens_and_another_seed_others(tokenizer):
    ids = prompt_ids(tokenizer)
    first = Engine(tiny_model(), build_method("snapkv", {"budget": 64})).generate(ids, NEW_TOKENS,
                                                                                 sampling=Sampling(seed=11))
    again = Engine(tiny_model(), build_method("snapkv", {"budget": 64})).generate(ids, NEW_TOKENS,
                                                                                 sampling=Sampling(seed=11))
    other = Engine(tiny_model(), build_method("snapkv", {"budget": 64})).generate(ids, NEW_TOKENS,
                                                                                 sampling=Sampling(seed=12))
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids


@pytest.mark.parametrize("method", ["snapkv", "h2o", "streaming_llm"])
def test_sampled_batch_generates_what_each_sample_generates_alone(method, tokenizer):
    """Rows with their own seeds (one of them greedy) and their own stop: each matches its lone run."""
    engine = Engine(tiny_model("tiny-qwen2"), build_method(method, {"budget": 64}), decode_graphs="off")
    prompts = _prompts(tokenizer)
    samplings = [Sampling(0.8, 0, 0.95, seed=1), Sampling(1.0, 10, 1.0, seed=2), None, Sampling(0.6, 0, 0.9, seed=4)]
    requests = [Request(ids, NEW_TOKENS, sampling=sampling) for ids, sampling in zip([*prompts, prompts[0]], samplings)]
    free = engine.generate(prompts[1], NEW_TOKENS, sampling=samplings[1])
    requests[1] = Request(prompts[1], NEW_TOKENS, stop_token_ids=[free.token_ids[4]], sampling=samplings[1])
    alone = [engine.generate(r.prompt_ids, r.max_new_tokens, r.stop_token_ids, sampling=r.sampling) for r in requests]
    together = engine.generate_batch(requests)
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert len(together[1].token_ids) <= 5 < len(together[0].token_ids)  # the stopped row left the batch early
    assert together[0].token_ids != together[3].token_ids  # same prompt, other seed
    assert all(g.decode_batch == 4 for g in together)


def test_static_buffers_draw_what_ordinary_decoding_draws(tokenizer):
    """decode_graphs="eager" (the buffers a CUDA graph replays) with sampling rows that stop at different steps."""
    method = build_method("snapkv", {"budget": 64})
    prompts = _prompts(tokenizer)
    ordinary = Engine(tiny_model(), method, decode_graphs="off")
    free = ordinary.generate(prompts[2], NEW_TOKENS, sampling=Sampling(seed=9))
    requests = [Request(prompts[0], NEW_TOKENS, sampling=Sampling(0.7, 0, 0.95, seed=8)),
                Request(prompts[1], 5, sampling=Sampling(seed=1)),
                Request(prompts[2], NEW_TOKENS, stop_token_ids=[free.token_ids[3]], sampling=Sampling(seed=9))]
    static = Engine(tiny_model(), method, decode_graphs="eager").generate_batch(requests)
    assert all(g.decode_static for g in static)
    assert [g.token_ids for g in static] == [g.token_ids for g in ordinary.generate_batch(requests)]
    assert [len(g.token_ids) for g in static] == [NEW_TOKENS, 5, 4]


@pytest.mark.parametrize("options, message", [({"temperature": 0.0}, "temperature"), ({"top_k": -1}, "top_k"),
                                              ({"top_p": 0.0}, "top_p"), ({"seed": -1}, "seed")])
def test_bad_sampling_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["snapkv", "h2o", "kvcV"])
def test_cuda_graphs_and_batches_draw_what_one_eager_sample_draws(method, tokenizer):
    """On the GPU (fp32): CUDA-graph decoding (snapkv's static buffers, h2o's slot cache) or batched eager decoding
    (obcache's kvcV, which has no slot form) of sampling rows with CUDA generators gives each row the tokens it draws
    alone with graphs off."""
    from evalkv.models.presets import build_random_model

    model = build_random_model("tiny-llama", torch.float32, torch.device("cuda"), seed=0)
    prompts = _prompts(tokenizer)
    requests = [Request(ids, 40, sampling=Sampling(0.7, 0, 0.95, seed=index)) for index, ids in enumerate(prompts)]
    graphs = Engine(model, build_method(method, {"budget": 64}), decode_graphs="auto").generate_batch(requests)
    eager = Engine(model, build_method(method, {"budget": 64}), decode_graphs="off")
    alone = [eager.generate(r.prompt_ids, r.max_new_tokens, sampling=r.sampling) for r in requests]
    assert [g.token_ids for g in graphs] == [g.token_ids for g in alone]
    assert all(g.decode_graph for g in graphs) == (method != "kvcV")
