"""KeyDiff (kvpress KeyDiffPress): keep the keys least similar to the mean key direction; block-wise with
prefill_chunk (the paper's setting)."""

from __future__ import annotations

import torch
from single_layer import GEOMETRY, SingleLayer

from evalkv.kv.view import Phase
from evalkv.methods import build_method


def brute_force_keep(keys: torch.Tensor, budget: int) -> torch.Tensor:
    """The paper's rule in fp64 for one row, keys `[H_kv, m, d]`: per head, the anchor is the mean unit key and the
    `budget` keys of lowest cosine similarity to it stay. Returns ascending indices `[H_kv, budget]`."""
    keys = keys.double()
    unit = keys / keys.norm(dim=-1, keepdim=True)
    anchor = unit.mean(dim=1, keepdim=True)
    similarity = (unit * anchor).sum(-1) / anchor.norm(dim=-1)
    return similarity.argsort(dim=-1, stable=True)[:, :budget].sort(dim=-1).values


def test_keeps_the_keys_least_similar_to_the_anchor():
    layer = SingleLayer(build_method("keydiff", {"budget": 10}), prompt_length=30, seed=4)
    prompt = layer.prompt()
    expected = brute_force_keep(prompt.appended_keys[0], 10)
    assert torch.equal(layer.cache.positions[0], expected)
    assert not torch.equal(expected[0], expected[1])
    layer.decode()
    assert layer.cache.length == 11  # prompt only: generated tokens are appended


def test_an_outlier_key_survives_a_crowd_of_similar_keys():
    """Twenty keys along one direction and one orthogonal key: with a budget of 5 the orthogonal key is kept."""
    generator = torch.Generator().manual_seed(0)
    keys = torch.zeros(1, 2, 21, 8)
    keys[..., :20, 0] = 1.0
    keys[..., :20, 1:] = 0.05 * torch.randn(1, 2, 20, 7, generator=generator)
    keys[..., 20, 3] = 1.0
    layer = SingleLayer(build_method("keydiff", {"budget": 5}), prompt_length=21)
    layer.forward(keys, torch.randn(1, 2, 21, 8), torch.randn(1, 4, 21, 8), Phase.PREFILL)
    assert (layer.cache.positions[0] == 20).any(dim=-1).all()


def test_block_wise_prefill_cuts_after_each_block_with_the_anchor_of_the_kept_set_and_the_block():
    """prefill_chunk=10 on a 40-token prompt with a budget of 8: after each block the cache (the kept entries plus
    the block) is cut to the 8 keys least similar to its own anchor."""
    budget = 8
    layer = SingleLayer(build_method("keydiff", {"budget": budget, "prefill_chunk": 10}), prompt_length=40,
                        geometry=GEOMETRY, seed=6)
    held_keys = torch.empty(2, 0, 8)
    held_positions = torch.empty(2, 0, dtype=torch.long)
    every_key = []
    for block in range(4):
        forward = layer.random(10, Phase.PREFILL)
        held_keys = torch.cat([held_keys, forward.appended_keys[0, :, -10:]], dim=1)
        held_positions = torch.cat([held_positions, torch.arange(10 * block, 10 * block + 10).expand(2, 10)], dim=1)
        if held_keys.shape[1] > budget:
            keep = brute_force_keep(held_keys, budget)
            held_keys, held_positions = held_keys.gather(1, keep[..., None].expand(-1, -1, 8)), held_positions.gather(
                1, keep)
        assert torch.equal(layer.cache.positions[0], held_positions), block
        every_key.append(forward.appended_keys[0, :, -10:])
    assert not torch.equal(held_positions, brute_force_keep(torch.cat(every_key, dim=1), budget))  # blocks matter
