"""R-KV: importance (the last queries' attention, max over the GQA group, max-pooled) minus redundancy (softmax of the
mean key similarity with each row's newest near-duplicate left out), cut to the budget every decode_interval steps."""

from __future__ import annotations

import torch
from single_layer import SCALING, SingleLayer

from evalkv.methods import build_method, rkv
from evalkv.methods.rkv import redundancy_scores


def brute_force_redundancy(keys: torch.Tensor, threshold: float) -> torch.Tensor:
    """The reference's `cal_similarity` written out with loops, fp64: keys `[m, d]` -> `[m]`."""
    m = keys.shape[0]
    unit = keys.double() / (keys.double().norm(dim=-1, keepdim=True) + 1e-8)
    similarity = unit @ unit.T
    for i in range(m):
        similarity[i, i] = 0.0
    for i in range(m):
        similar = [j for j in range(m) if similarity[i, j] > threshold]
        similarity[i, similar[-1] if similar else 0] = 0.0
    return torch.softmax(similarity.mean(dim=0), dim=-1)


def brute_force_scores(rows, keys, window: int, mix: float, kernel: int = 7, threshold: float = 0.5):
    """R1KV.update_kv's final score for one KV head, fp64: rows `[G, w, d]` (its query heads), keys `[m, d]`."""
    logits = (rows.double() @ keys.double().T * SCALING).amax(dim=0)[:, :-window]  # max over the group, then rows
    importance = torch.softmax(logits, dim=-1).mean(dim=0)
    pooled = torch.nn.functional.max_pool1d(importance[None, None], kernel, 1, kernel // 2)[0, 0]
    return mix * pooled - (1 - mix) * brute_force_redundancy(keys, threshold)[:-window]


def test_redundancy_leaves_out_each_rows_newest_near_duplicate(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=generator)
    near = base[:3] + 0.1 * torch.randn(3, 8, generator=generator)
    keys = torch.cat([base, near, torch.randn(5, 8, generator=generator)])  # three near-duplicate pairs
    expected = brute_force_redundancy(keys, 0.5)
    torch.testing.assert_close(redundancy_scores(keys[None, None], 0.5)[0, 0].double(), expected, rtol=1e-5, atol=1e-7)
    monkeypatch.setattr(rkv, "_SIMILARITY_BLOCK", 3 * 14)  # rows three at a time: the same sums
    torch.testing.assert_close(redundancy_scores(keys[None, None], 0.5)[0, 0].double(), expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(expected, brute_force_redundancy(keys, 1.0))  # the near-duplicates count


def test_prompt_cut_keeps_the_window_and_the_best_combined_scores():
    n, budget, window = 40, 16, 8
    layer = SingleLayer(build_method("rkv", {"budget": budget}), n, seed=12)
    prompt = layer.prompt()
    kept = []
    for head in range(2):
        scores = brute_force_scores(prompt.query[0, 2 * head : 2 * head + 2, -window:], prompt.appended_keys[0, head],
                                    window, 0.1)
        order = scores.argsort(descending=True, stable=True)[: budget - window].sort().values.tolist()
        kept.append(order + list(range(n - window, n)))
    assert layer.cache.positions[0].tolist() == kept
    only_attention = SingleLayer(build_method("rkv", {"budget": budget, "mix_lambda": 1.0}), n, seed=12)
    only_attention.prompt()
    assert only_attention.cache.positions[0].tolist() != kept  # the redundancy term matters


def test_decoding_cuts_use_the_last_window_queries():
    n, budget, window, interval = 20, 16, 4, 6
    method = build_method("rkv", {"budget": budget, "window_size": window, "decode_interval": interval,
                                  "decode_buffer": window})
    layer = SingleLayer(method, n, seed=13)
    layer.prompt()
    held = layer.cache.positions[0].tolist()
    steps = [layer.decode() for _ in range(interval)]
    rows = torch.cat([step.query for step in steps[-window:]], dim=2)[0]
    for head in range(2):
        positions = held[head] + list(range(n, n + interval))
        scores = brute_force_scores(rows[2 * head : 2 * head + 2], steps[-1].appended_keys[0, head], window, 0.1)
        best = scores.argsort(descending=True, stable=True)[: budget - window].sort().values.tolist()
        assert layer.cache.positions[0, head].tolist() == [positions[i] for i in best] + positions[-window:]


def test_the_cache_holds_its_budget_through_two_thousand_generated_tokens():
    """The reference's setting (budget, window 8, a cut every 128 steps) over 2,000 decode steps: exactly the budget
    after every cut, at most budget + 127 entries, the newest 8 tokens always held."""
    budget, interval = 48, 128
    layer = SingleLayer(build_method("rkv", {"budget": budget}), 100, seed=14)
    layer.prompt()
    assert layer.cache.length == budget
    lengths = []
    for step in range(1, 2001):
        layer.decode()
        lengths.append(layer.cache.length)
        newest = torch.arange(100 + step - 8, 100 + step)
        assert torch.equal(layer.cache.positions[0, :, -8:], newest.expand(2, 8)), step
    assert max(lengths) == budget + interval - 1
    assert [lengths[cut - 1] for cut in range(interval, 2001, interval)] == [budget] * (2000 // interval)
    assert lengths[-1] == budget + 2000 % interval
