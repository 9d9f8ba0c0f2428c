"""CateKV (docs/methods.md#catekv): chunk geometry, per-head-type selection, headmask construction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import prompt_ids, tiny_model
from method_cases import MIXED_HEADMASK

from evalkv.cli import main
from evalkv.errors import EvalkvError
from evalkv.kv.engine import Engine
from evalkv.methods import build_method
from evalkv.methods.catekv import ChunkGeometry, read_headmask
from evalkv.run.headmask import head_consistency, linear_quantile, static_headmask

ADAPTIVE = str(Path(__file__).parent / "data" / "headmask_adaptive.csv")
OPTIONS = {"budget": 96, "init_tokens": 16, "recent_tokens": 32, "last_q": 16}


def test_chunk_geometry_matches_the_reference():
    geometry = ChunkGeometry(length=1000, chunk_size=8, init_tokens=64, recent_tokens=256)
    assert geometry.chunks == 1000 // 8 - 4 and geometry.chunk_end == 968  # 32..39 tokens left after the chunks
    assert (geometry.middle_start, geometry.middle_end, geometry.middle_chunks) == (64, 712, 81)


def _run(options: dict, tokenizer, new_tokens: int = 3):
    ids = prompt_ids(tokenizer)
    generation = Engine(tiny_model("tiny-qwen2"), build_method("catekv", options)).generate(
        ids, new_tokens, keep_session=True)
    return len(ids), generation.session.cache.layers


def test_consistent_heads_keep_the_budget_and_adaptive_heads_everything(tokenizer):
    n, layers = _run({**OPTIONS, "headmask_path": MIXED_HEADMASK}, tokenizer, new_tokens=1)
    geometry = ChunkGeometry(n, 8, 16, 32)
    mask = read_headmask(Path(MIXED_HEADMASK))
    for layer, adaptive in zip(layers, mask):
        for head, is_adaptive in zip(layer.heads, adaptive):
            kept = head.positions.flatten().tolist()
            assert kept[:16] == list(range(16)) and kept[-(n - geometry.middle_end):] == list(
                range(geometry.middle_end, n))
            expected = n if is_adaptive else 96 - 48 + 16 + (n - geometry.middle_end)
            assert len(kept) == expected


def test_all_adaptive_headmask_is_the_full_cache(tokenizer):
    ids = prompt_ids(tokenizer)
    model = tiny_model("tiny-qwen2")
    full = Engine(model, build_method("full", {})).generate(ids, 6)
    catekv = Engine(model, build_method("catekv", {**OPTIONS, "headmask_path": ADAPTIVE})).generate(ids, 6)
    assert catekv.token_ids == full.token_ids and catekv.kept_tokens == len(ids)


def test_chunk_selection_equals_brute_force():
    from evalkv.kv.cache import LayerCache
    from evalkv.kv.view import AttentionView, ModelGeometry, Phase, SampleState

    generator = torch.Generator().manual_seed(1)
    n, c = 300, 8
    layer = LayerCache()
    keys = torch.randn(1, 2, n, 8, generator=generator)
    layer.append(keys, torch.randn(1, 2, n, 8, generator=generator), torch.arange(n)[None])
    query = torch.randn(1, 4, n, 8, generator=generator) * 2
    sample = SampleState(torch.zeros(1, n, dtype=torch.long), n, phase=Phase.PREFILL)
    view = AttentionView(0, ModelGeometry(1, 4, 2, 8), sample, query, torch.arange(n)[None], 8 ** -0.5, layer, {})
    method = build_method("catekv", {**OPTIONS, "headmask_path": MIXED_HEADMASK})
    method._headmask = torch.tensor([[False, False]])
    kept = method.compress_prompt(view)
    geometry = ChunkGeometry(n, c, 16, 32)
    for kv_head in range(2):
        q = query[0, 2 * kv_head : 2 * kv_head + 2, -16:].double()
        k = keys[0, kv_head, geometry.middle_start : geometry.middle_end].double()
        attention = torch.softmax(q @ k.T * 8 ** -0.5, dim=-1).mean(dim=0)  # [16, n_mid]
        chunks = attention.shape[-1] // c
        scores = attention[:, : chunks * c].reshape(16, chunks, c).amax(-1).sum(0)
        best = sorted(scores.argsort(descending=True)[: (96 - 48) // c].tolist())
        middle = kept[kv_head][(kept[kv_head] >= 16) & (kept[kv_head] < geometry.middle_end)]
        assert sorted(set(((middle - 16) // c).tolist())) == best


def test_headmask_errors():
    with pytest.raises(EvalkvError, match="needs method.headmask_path"):
        build_method("catekv", OPTIONS).headmask(2, 2)
    with pytest.raises(EvalkvError, match=r"headmask is \(2, 2\)"):
        build_method("catekv", {**OPTIONS, "headmask_path": ADAPTIVE}).headmask(24, 2)
    with pytest.raises(EvalkvError, match="budget must leave room"):
        build_method("catekv", {"budget": 320})


def test_linear_quantile_equals_torch_quantile():
    values = torch.randn(50, 37, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.002, 0.5, 0.998, 1.0):
        torch.testing.assert_close(linear_quantile(values, q), torch.quantile(values.flatten(), q))


def test_head_consistency_hand_worked():
    # 2 queries x 4 chunks of 2 tokens. Both queries peak in chunk 0: counts [2, 0, 0, 0] -> mean 0.5, std 1.
    attention = torch.tensor([[0.9, 0.0, 0.01, 0.02, 0.03, 0.0, 0.0, 0.04],
                              [0.8, 0.1, 0.0, 0.0, 0.05, 0.05, 0.0, 0.0]])
    assert head_consistency(attention, 2, top_fraction=0.95, top_threshold=0.5) == pytest.approx(2.0)
    # each query peaks in its own chunk: counts [1, 1, 0, 0] -> mean 0.5, std 0.577
    spread = torch.tensor([[0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert head_consistency(spread, 2, top_fraction=0.95, top_threshold=0.5) == pytest.approx(
        torch.tensor([1.0, 1.0, 0.0, 0.0]).std().item() / 0.5)


def test_static_headmask_marks_the_most_often_low_cv_heads():
    low = torch.tensor([[0.1, 5.0], [4.0, 6.0]])
    other = torch.tensor([[0.2, 5.0], [0.3, 6.0]])
    mask = static_headmask([low, low, other], ratio=0.25)  # 1 head of 4: (0, 0) is lowest in every sample
    assert mask.tolist() == [[True, False], [False, False]]
    # one sample, ratio 0.5: 2 heads selected once, the 2nd largest count is 1 -> exactly those 2
    assert static_headmask([low], ratio=0.5).tolist() == [[True, False], [True, False]]
    # one sample, ratio 0.3 wants 2 heads but 1 falls under the quantile: the reference's 2nd largest count is 0,
    # which would make all heads adaptive; a head never selected stays consistent
    single = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert static_headmask([single], ratio=0.3).tolist() == [[True, False], [False, False]]


def test_headmask_command_writes_a_layers_by_heads_csv(tmp_path, capsys):
    out = tmp_path / "mask.csv"
    assert main(["headmask", "model=random-tiny-llama", "model.device=cpu", "task=passkey",
                 "task.lengths=[1200]", "--samples", "2", "-o", str(out)]) == 0
    mask = read_headmask(out)
    details = json.loads((tmp_path / "mask.csv.json").read_text())
    matrices = [torch.tensor(m) for m in details["cv_per_sample"]]
    assert mask.shape == (2, 2) and len(matrices) == 2
    frequency = sum((m <= torch.quantile(m.flatten(), 0.4)).float() for m in matrices)
    cutoff = max(float(frequency.flatten().sort(descending=True).values[1]), 1.0)  # the ceil(0.4 * 4) = 2nd largest
    assert mask.tolist() == (frequency >= cutoff).tolist()
    assert f"{int(mask.sum())} of 4 heads adaptive" in capsys.readouterr().out
