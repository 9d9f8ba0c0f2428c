"""CriticalKV (kvpress CriticalKVPress / CriticalAdaKVPress) as the `critical` regime of every scorer: a first stage
by the scorer's own scores, the rest by the scores times the L1 norm of W_o,h v.

The single-layer tests give the views a tiny model's o_proj weights themselves; the engine passes the model's own
(AttentionView.output_projection), checked end to end against the masked full cache.
"""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny_model
from single_layer import SingleLayer, window_scores
from test_equivalence import _assert_equal_logits

from evalkv.errors import EvalkvError
from evalkv.kv.engine import Engine
from evalkv.kv.reference import masked_reference_logits
from evalkv.kv.view import ModelGeometry
from evalkv.methods import build_method
from evalkv.methods.budgets import adaptive_head_budgets
from evalkv.methods.criticalkv import output_value_norms

TINY = ModelGeometry(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16)  # the tiny models' attention


@pytest.fixture
def o_proj():
    return tiny_model("tiny-llama").model.layers[0].self_attn.o_proj


def head_norms(values: torch.Tensor, o_proj) -> torch.Tensor:
    """`||o_proj(v placed in head h's slot)||_1` per query head and entry, fp64 `[H, m]` for values `[H_kv, m, d]`:
    what one value alone would add to the residual stream through head h (o_proj has no bias)."""
    weight = o_proj.weight.detach().double()
    norms = []
    for head in range(TINY.num_heads):
        slot = torch.zeros(values.shape[1], TINY.num_heads * TINY.head_dim, dtype=torch.float64)
        slot[:, head * TINY.head_dim : (head + 1) * TINY.head_dim] = values[head // 2].double()
        norms.append((slot @ weight.T).abs().sum(dim=-1))
    return torch.stack(norms)


def snapkv_scores(query: torch.Tensor, keys: torch.Tensor, window: int) -> torch.Tensor:
    """SnapKV's scores (no pooling) in fp64 on kvpress `SnapKVPress`'s scale, which `critical_epsilon` is added on:
    the last `window` queries' causal attention averaged over the rows and over each KV head's query heads, for the
    entries before the window: `[H_kv, n - window]`."""
    return window_scores(query, keys, window, TINY.head_dim**-0.5)[:, : keys.shape[2] - window] / window


def two_stage(scores: torch.Tensor, norms: torch.Tensor, budget: int, window: int, first_share=0.5, epsilon=1e-4):
    """One head's kept candidates, written out: the first `int(share * (budget + window)) - window` by score, the
    rest of `budget` by (score + epsilon) * norm among the others."""
    first = max(0, int(first_share * (budget + window)) - window)
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
    kept = order[:first]
    rest = sorted((j for j in range(len(scores)) if j not in kept),
                  key=lambda j: (-float((scores[j] + epsilon) * norms[j]), j))
    return sorted(kept + rest[: budget - first])


def test_output_norms_are_the_l1_norms_of_each_value_through_its_head(o_proj):
    values = torch.randn(1, 2, 9, TINY.head_dim, generator=torch.Generator().manual_seed(0))
    norms = output_value_norms(values, o_proj.weight.detach(), TINY.num_heads)
    torch.testing.assert_close(norms[0].double(), head_norms(values[0], o_proj), rtol=1e-5, atol=1e-6)
    expanded = values.repeat_interleave(2, dim=1)  # a query-head cache: head h reads its own copy
    torch.testing.assert_close(output_value_norms(expanded, o_proj.weight.detach(), TINY.num_heads), norms)


@pytest.mark.parametrize("epsilon", [1e-4, 0.05])
def test_critical_snapkv_selects_in_two_stages(o_proj, epsilon):
    """kvpress's default epsilon, and one large enough that the scores' scale decides: kvpress adds it to the window's
    mean attention, not to its sum over the rows (SnapKV's reference: the same ranking without CriticalKV)."""
    n, budget, window = 40, 20, 4
    options = {"budget": budget, "window_size": window, "kernel_size": 1}
    layer = SingleLayer(build_method("snapkv", {**options, "critical": True, "critical_epsilon": epsilon}), n,
                        geometry=TINY, seed=3, output_projections=[o_proj.weight.detach()])
    prompt = layer.prompt()
    scores = snapkv_scores(prompt.query, prompt.appended_keys, window)
    norms = head_norms(prompt.appended_values[0, :, : n - window], o_proj).reshape(2, 2, -1).mean(dim=1)
    expected = [two_stage(scores[h], norms[h], budget - window, window, epsilon=epsilon) + list(range(n - window, n))
                for h in (0, 1)]
    assert layer.cache.positions[0].tolist() == expected
    plain = SingleLayer(build_method("snapkv", options), n, geometry=TINY, seed=3)
    plain.prompt()
    assert plain.cache.positions[0].tolist() != expected
    if epsilon > 1e-3:
        on_sums = [two_stage(scores[h] * window, norms[h], budget - window, window, epsilon=epsilon) for h in (0, 1)]
        assert [head[: budget - window] for head in expected] != on_sums


def test_critical_adakv_splits_each_heads_adaptive_budget(o_proj):
    n, budget, window = 40, 20, 4
    method = build_method("adakv", {"budget": budget, "window_size": window, "kernel_size": 1, "critical": True,
                                    "critical_first_stage": 0.3})
    layer = SingleLayer(method, n, geometry=TINY, seed=5, output_projections=[o_proj.weight.detach()])
    prompt = layer.prompt()
    scores = snapkv_scores(prompt.query, prompt.appended_keys, window)
    norms = head_norms(prompt.appended_values[0, :, : n - window], o_proj).reshape(2, 2, -1).mean(dim=1)
    budgets = adaptive_head_budgets(scores.float(), budget - window, 0.2, False)
    assert budgets[0] != budgets[1]
    for head, head_budget in enumerate(budgets):
        expected = two_stage(scores[head], norms[head], head_budget, window, 0.3) + list(range(n - window, n))
        assert layer.cache.heads[head].positions[0, 0].tolist() == expected


def test_without_output_projections_critical_stops_with_a_message():
    layer = SingleLayer(build_method("snapkv", {"budget": 20, "window_size": 4, "critical": True}), 40, geometry=TINY)
    with pytest.raises(EvalkvError, match="output projection"):
        layer.prompt()


def test_critical_runs_through_the_engine_and_equals_the_masked_full_cache(tokenizer):
    model = tiny_model("tiny-llama")
    options = {"budget": 64, "window_size": 8}
    critical = Engine(model, build_method("snapkv", {**options, "critical": True}))
    generation = critical.generate(prompt_ids(tokenizer), 8, trace=True, keep_session=True)
    forwards = [ids for ids, _, _ in generation.forwards]
    positions = [pos for _, pos, _ in generation.forwards]
    _assert_equal_logits(generation, masked_reference_logits(model, forwards, positions, generation.trace))
    plain = Engine(model, build_method("snapkv", options)).generate(prompt_ids(tokenizer), 8, keep_session=True)
    kept = [layer.positions.tolist() for layer in generation.session.cache.layers]
    assert kept != [layer.positions.tolist() for layer in plain.session.cache.layers]
