"""ChunkKV (kvpress ChunkKVPress over SnapKVPress) and the chunk_length regime of every scorer: whole chunks of
consecutive tokens, one set for the layer."""

from __future__ import annotations

import pytest
import torch
from single_layer import SCALING, SingleLayer

from evalkv.errors import EvalkvError
from evalkv.methods import build_method


def snapkv_pool_then_reduce(query: torch.Tensor, keys: torch.Tensor, window: int, kernel: int) -> torch.Tensor:
    """kvpress SnapKVPress's scores in fp64, one row: the last `window` queries' causal attention averaged over the
    rows, average-pooled per query head (zeros padded and counted), averaged over each KV head's query heads:
    `[H_kv, n - window]`."""
    groups = query.shape[1] // keys.shape[1]
    keys = keys[0].double().repeat_interleave(groups, dim=0)
    n = keys.shape[1]
    logits = query[0, :, -window:].double() @ keys.transpose(-1, -2) * SCALING
    causal = torch.arange(n)[None, :] <= torch.arange(n - window, n)[:, None]
    means = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1).mean(dim=-2)[:, : n - window]
    padded = torch.nn.functional.pad(means, (kernel // 2, kernel // 2))
    pooled = padded.unfold(-1, kernel, 1).mean(dim=-1)
    return pooled.reshape(-1, groups, n - window).mean(dim=1)


def brute_force_chunks(token_scores: torch.Tensor, chunk: int, keep: int) -> list[int]:
    """Whole chunks by mean score (summed over heads) until `keep` tokens, the overflowing chunk's best tokens."""
    summed = token_scores.sum(dim=0)
    chunks = [list(range(start, min(start + chunk, len(summed)))) for start in range(0, len(summed), chunk)]
    order = sorted(range(len(chunks)), key=lambda c: (-float(summed[chunks[c]].mean()), c))
    kept: list[int] = []
    for c in order:
        room = keep - len(kept)
        if room <= 0:
            break
        best = sorted(chunks[c], key=lambda j: (-float(summed[j]), j))
        kept += best[:room]
    return sorted(kept)


def test_chunkkv_keeps_whole_chunks_by_mean_snapkv_score_and_the_window():
    n, budget, window, chunk = 50, 22, 4, 3
    method = build_method("chunkkv", {"budget": budget, "window_size": window, "chunk_length": chunk})
    layer = SingleLayer(method, prompt_length=n, seed=8)
    prompt = layer.prompt()
    scores = snapkv_pool_then_reduce(prompt.query, prompt.appended_keys, window, 5)
    kept = brute_force_chunks(scores, chunk, budget - window) + list(range(n - window, n))
    assert layer.cache.positions[0].tolist() == [kept, kept]  # one set for the layer
    starts = {j // chunk for j in kept[: budget - window]}
    assert len(starts) == -(-(budget - window) // chunk)  # 6 chunks: 5 whole, 1 filled with its best tokens


def test_chunk_length_chunks_any_scorer():
    """Knorm's scores (lowest key norms) chunked: the chunks with the lowest mean norm summed over the KV heads."""
    n, budget = 30, 9
    layer = SingleLayer(build_method("knorm", {"budget": budget, "chunk_length": 4}), prompt_length=n, seed=3)
    prompt = layer.prompt()
    kept = brute_force_chunks(-prompt.appended_keys[0].double().norm(dim=-1), 4, budget)
    assert layer.cache.positions[0].tolist() == [kept, kept]
    plain = SingleLayer(build_method("knorm", {"budget": budget}), prompt_length=n, seed=3)
    plain.prompt()
    assert plain.cache.positions[0].tolist() != [kept, kept]


def test_chunk_length_refuses_what_selects_per_head():
    with pytest.raises(EvalkvError, match="chunk_length"):
        build_method("chunkkv", {"budget": 64, "head_budgets": "adaptive"})
    with pytest.raises(EvalkvError, match="chunk_length"):
        build_method("snapkv", {"budget": 64, "chunk_length": 10, "critical": True})
    with pytest.raises(EvalkvError, match="chunk_length"):
        build_method("snapkv", {"budget": 64, "chunk_length": 0})
