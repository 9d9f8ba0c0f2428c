"""Expected Attention (kvpress ExpectedAttentionPress): closed-form attention of Gaussian future queries, from the
statistics of the pre-RoPE queries rotated by the mean RoPE of the next positions."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import prompt_ids, tiny_model
from single_layer import GEOMETRY, SCALING, SingleLayer

from evalkv.errors import EvalkvError
from evalkv.kv.engine import Engine
from evalkv.kv.view import AttentionView, Phase, SampleState
from evalkv.methods import build_method

DIM = GEOMETRY.head_dim
INV_FREQ = 1.0 / 10000 ** (torch.arange(0, DIM, 2, dtype=torch.float64) / DIM)


def rope_table(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Llama RoPE table for head_dim 8 (the model's `rotary` contract: positions [B, m] -> cos, sin [B, m, d])."""
    angles = positions[..., None].double() * INV_FREQ
    both = torch.cat([angles, angles], dim=-1)
    return both.cos().float(), both.sin().float()


def rotation(position: int) -> torch.Tensor:
    """RoPE at one position as an explicit matrix: dimension i and i + d/2 rotate by the angle position * freq_i."""
    matrix = torch.zeros(DIM, DIM, dtype=torch.float64)
    for i, freq in enumerate(INV_FREQ.tolist()):
        cos, sin = math.cos(position * freq), math.sin(position * freq)
        half = i + DIM // 2
        matrix[i, i], matrix[i, half], matrix[half, half], matrix[half, i] = cos, -sin, cos, sin
    return matrix


def rotated(queries: torch.Tensor, first_position: int) -> torch.Tensor:
    """Queries `[1, H, q, d]` before RoPE -> after RoPE at positions first_position.. (what the model caches)."""
    return torch.stack([queries[:, :, i].double() @ rotation(first_position + i).T
                        for i in range(queries.shape[2])], dim=2).float()


def brute_force_scores(rows, keys, values, future: range, n_sink: int, covariance=True, vnorm=True) -> torch.Tensor:
    """The paper's score written out in fp64: rows `[1, H, r, d]` before RoPE, keys/values `[1, H_kv, m, d]`;
    `[H_kv, m]` with +inf on the sinks."""
    rows, keys, values = rows[0].double(), keys[0].double(), values[0].double()
    mean_rotation = sum(rotation(t) for t in future) / len(future)
    groups = rows.shape[0] // keys.shape[0]
    per_head = []
    for head in range(rows.shape[0]):
        mu = rows[head].mean(dim=0)
        centred = rows[head] - mu
        sigma = centred.T @ centred / rows.shape[1]
        mu, sigma = mean_rotation @ mu, mean_rotation @ sigma @ mean_rotation.T
        k = keys[head // groups, n_sink:]
        logits = SCALING * k @ mu + (SCALING**2 / 2 * ((k @ sigma) * k).sum(-1) if covariance else 0)
        per_head.append(torch.softmax(logits, dim=-1))
    scores = torch.stack(per_head).reshape(keys.shape[0], groups, -1).mean(dim=1)
    if vnorm:
        scores = scores * values[:, n_sink:].norm(dim=-1)
    return torch.cat([torch.full((keys.shape[0], n_sink), math.inf, dtype=torch.float64), scores], dim=-1)


def _view(keys, values, query, n: int) -> AttentionView:
    from evalkv.kv.cache import LayerCache

    cache = LayerCache()
    cache.append(keys, values, torch.arange(n)[None, :])
    sample = SampleState(input_ids=torch.zeros(1, n, dtype=torch.long), prompt_length=n)
    return AttentionView(0, GEOMETRY, sample, query, torch.arange(n)[None, :], SCALING, cache, {}, rotary=rope_table)


def test_scores_equal_the_closed_form_written_out():
    n, generator = 40, torch.Generator().manual_seed(3)
    keys, values = torch.randn(1, 2, n, DIM, generator=generator), torch.randn(1, 2, n, DIM, generator=generator)
    before_rope = torch.randn(1, 4, n, DIM, generator=generator) + torch.linspace(-1, 2, DIM)  # a non-zero mean
    method = build_method("expected_attention", {"budget": 12, "n_future_positions": 24})
    scores = method.score(_view(keys, values, rotated(before_rope, 0), n), n)
    expected = brute_force_scores(before_rope[:, :, 4:], keys, values, range(n, n + 24), n_sink=4)
    torch.testing.assert_close(scores[0].double(), expected, rtol=1e-4, atol=1e-7)
    no_extras = build_method("expected_attention", {"budget": 12, "n_future_positions": 24, "use_covariance": False,
                                                    "use_vnorm": False, "n_sink": 0})
    expected = brute_force_scores(before_rope, keys, values, range(n, n + 24), 0, covariance=False, vnorm=False)
    torch.testing.assert_close(no_extras.score(_view(keys, values, rotated(before_rope, 0), n), n)[0].double(),
                               expected, rtol=1e-4, atol=1e-7)


def test_the_closed_form_is_the_mean_of_exp_attention_over_gaussian_queries():
    """E[exp(s q . k)] for q ~ N(mu, Sigma) is exp(s k . mu + s^2/2 k^T Sigma k): the formula the scores rest on,
    checked by sampling (200,000 queries)."""
    generator = torch.Generator().manual_seed(0)
    mu, factor = torch.randn(DIM, generator=generator, dtype=torch.float64), torch.randn(
        DIM, DIM, generator=generator, dtype=torch.float64) * 0.5
    sigma = factor @ factor.T
    keys = torch.randn(5, DIM, generator=generator, dtype=torch.float64)
    samples = mu + torch.randn(200_000, DIM, generator=generator, dtype=torch.float64) @ factor.T
    sampled = torch.exp(SCALING * samples @ keys.T).mean(dim=0)
    closed = torch.exp(SCALING * keys @ mu + SCALING**2 / 2 * ((keys @ sigma) * keys).sum(-1))
    torch.testing.assert_close(sampled, closed, rtol=0.02, atol=0)


def test_prompt_keeps_the_sinks_and_the_best_expected_attention():
    n, budget = 40, 12
    layer = SingleLayer(build_method("expected_attention", {"budget": budget, "n_future_positions": 16}), n, seed=1)
    layer.session.rotary = rope_table
    generator = torch.Generator().manual_seed(5)
    keys, values = torch.randn(1, 2, n, DIM, generator=generator), torch.randn(1, 2, n, DIM, generator=generator)
    before_rope = torch.randn(1, 4, n, DIM, generator=generator) * 2
    layer.forward(keys, values, rotated(before_rope, 0), Phase.PREFILL)
    scores = brute_force_scores(before_rope[:, :, 4:], keys, values, range(n, n + 16), n_sink=4)
    expected = scores.argsort(dim=-1, descending=True, stable=True)[:, :budget].sort(dim=-1).values
    assert torch.equal(layer.cache.positions[0], expected)
    assert layer.cache.positions[0, :, :4].tolist() == [[0, 1, 2, 3]] * 2  # the sinks
    assert not torch.equal(expected[0], expected[1])


def test_decoding_cuts_score_with_the_buffered_queries_and_the_next_positions():
    """Every 4 forwards the cache is cut back to the budget, the statistics taken from the queries since the last cut
    (at most decode_buffer) and rotated to the positions after the newest."""
    budget, n = 12, 10
    method = build_method("expected_attention", {"budget": budget, "n_future_positions": 8, "decode_interval": 4,
                                                 "decode_buffer": 3})
    layer = SingleLayer(method, n, seed=2)
    layer.session.rotary = rope_table
    layer.prompt()  # shorter than the budget: kept whole
    generator = torch.Generator().manual_seed(7)
    queries = []
    for step in range(1, 5):
        keys, values = torch.randn(1, 2, 1, DIM, generator=generator), torch.randn(1, 2, 1, DIM, generator=generator)
        queries.append(torch.randn(1, 4, 1, DIM, generator=generator) * 2)
        forward = layer.forward(keys, values, rotated(queries[-1], n + step - 1), Phase.DECODE)
    rows = torch.cat(queries[-3:], dim=2)
    scores = brute_force_scores(rows, forward.appended_keys, forward.appended_values, range(n + 4, n + 12), 4)
    expected = scores.argsort(dim=-1, descending=True, stable=True)[:, :budget].sort(dim=-1).values
    assert torch.equal(layer.cache.positions[0], expected)


def test_longrope_refuses_buffered_queries_whose_factor_set_is_unknown(tokenizer):
    """tiny-phi3 switches to its long RoPE factors at position 128: a prompt ending before it and a decoding cut
    after it would undo RoPE on buffered queries that the short factors rotated, which evalkv/kv/adapter.py refuses
    rather than guess; a prompt already past the switch decodes and cuts."""
    model = tiny_model("tiny-phi3")
    method = build_method("expected_attention", {"budget": 48, "decode_interval": 40, "decode_buffer": 64})
    short = prompt_ids(tokenizer, 2)[:100]
    with pytest.warns(RuntimeWarning), pytest.raises(EvalkvError, match="positions below 128"):
        Engine(model, method).generate(short, 45)
    generation = Engine(model, method).generate(prompt_ids(tokenizer, 4), 42, keep_session=True)
    assert generation.session.cache.lengths() == [48 + 1, 48 + 1]
