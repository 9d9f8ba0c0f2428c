"""The shared scoring and selection blocks against brute force (docs/methods.md#shared-invariants)."""

from __future__ import annotations

import pytest
import torch

from evalkv.kv import attention
from evalkv.kv.attention import attend, attention_column_sums, pool_scores, reduce_query_heads, window_attention
from evalkv.kv.select import keep_best_and_tail, keep_sink_and_recent, top_k_positions


def _eager_probs(query, keys, scaling):
    """Full causal attention matrix, queries aligned to the last keys."""
    groups = query.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)
    q_len, kv_len = query.shape[-2], keys.shape[-2]
    logits = (query @ keys.transpose(-1, -2)).double() * scaling
    mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)


@pytest.fixture
def qkv():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 40, 8, generator=generator)
    keys = torch.randn(2, 2, 40, 8, generator=generator)
    values = torch.randn(2, 2, 40, 8, generator=generator)
    positions = torch.arange(40).expand(2, 2, 40)
    return query, keys, values, positions


def test_column_sums_equal_eager_column_sums(qkv, monkeypatch):
    query, keys, _, positions = qkv
    monkeypatch.setattr(attention, "_BLOCK_ELEMENTS", 64)  # force many blocks
    sums = attention_column_sums(query, torch.arange(40).expand(2, 40), keys, positions, 0.35)
    torch.testing.assert_close(sums.double(), _eager_probs(query, keys, 0.35).sum(dim=-2), atol=1e-5, rtol=0)


def test_column_sums_over_an_evicted_cache_mask_by_true_position(monkeypatch):
    """A chunk of queries over a cache whose heads kept different earlier positions: keys after a query's true
    position are masked, whatever the block a row lands in (the skipped upper triangle must hold only zeros)."""
    generator = torch.Generator().manual_seed(1)
    kept = [torch.sort(torch.randperm(50, generator=generator)[:20]).values for _ in range(2)]
    key_positions = torch.stack([torch.cat([k, torch.arange(50, 62)]) for k in kept])[None].expand(2, 2, 32)
    query = torch.randn(2, 4, 12, 8, generator=generator)
    keys = torch.randn(2, 2, 32, 8, generator=generator)
    query_positions = torch.arange(50, 62).expand(2, 12)
    monkeypatch.setattr(attention, "_BLOCK_ELEMENTS", 64)
    sums = attention_column_sums(query, query_positions, keys, key_positions, 0.35)
    logits = (query @ keys.repeat_interleave(2, dim=1).transpose(-1, -2)).double() * 0.35
    future = key_positions.repeat_interleave(2, dim=1)[:, :, None, :] > query_positions[:, None, :, None]
    expected = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1).sum(dim=-2)
    torch.testing.assert_close(sums.double(), expected, atol=1e-5, rtol=0)


def test_window_attention_equals_eager_rows(qkv):
    query, keys, _, positions = qkv
    window = window_attention(query[:, :, -6:], torch.arange(34, 40).expand(2, 6), keys, positions, 0.35)
    torch.testing.assert_close(window.double(), _eager_probs(query, keys, 0.35)[:, :, -6:], atol=1e-6, rtol=0)


def test_window_attention_over_an_evicted_gqa_cache_masks_each_kv_heads_positions():
    """Rows of the query heads of one KV head are scored against that head's own kept positions (the grouped product
    reads each KV head once; here each KV head and batch row kept different earlier positions)."""
    generator = torch.Generator().manual_seed(2)
    kept = torch.stack([torch.stack([torch.cat([torch.sort(torch.randperm(40, generator=generator)[:14]).values,
                                                torch.arange(40, 46)]) for _ in range(2)]) for _ in range(2)])
    query = torch.randn(2, 6, 4, 8, generator=generator)  # 3 query heads per KV head
    keys = torch.randn(2, 2, 20, 8, generator=generator)
    query_positions = torch.tensor([[42, 43, 44, 45], [30, 43, 44, 45]])  # row 0 of batch 1 predates some keys
    probs = window_attention(query, query_positions, keys, kept, 0.35)
    logits = (query @ keys.repeat_interleave(3, dim=1).transpose(-1, -2)).double() * 0.35
    future = kept.repeat_interleave(3, dim=1)[:, :, None, :] > query_positions[:, None, :, None]
    expected = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
    torch.testing.assert_close(probs.double(), expected, atol=1e-6, rtol=0)
    assert probs[1, :, 0][kept.repeat_interleave(3, dim=1)[1] > 30].abs().max() == 0


@pytest.mark.parametrize("q_len", [1, 7, 40])
def test_attend_backends_agree_with_bottom_right_causality(qkv, q_len):
    query, keys, values, _ = qkv
    expected = _eager_probs(query[:, :, -q_len:], keys, 0.35).float() @ values.repeat_interleave(2, dim=1)
    for backend in ("sdpa", "eager"):
        out = attend(query[:, :, -q_len:], keys, values, 0.35, backend)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def _fused_stand_in(query, keys, values, scaling):
    """What a fused kernel with log-sum-exps returns, from the math: the causal output and natural log-sum-exps."""
    groups = query.shape[1] // keys.shape[1]
    logits = (query.float() @ keys.repeat_interleave(groups, dim=1).float().transpose(-1, -2)) * scaling
    n = query.shape[-2]
    logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    output = torch.softmax(logits, dim=-1) @ values.repeat_interleave(groups, dim=1).float()
    return output.to(query.dtype), torch.logsumexp(logits, dim=-1)


def test_cudnn_gives_the_prompts_log_sum_exps_only_where_it_agrees_with_flash_attention(monkeypatch):
    """The choice between cuDNN's and flash attention's kernels for a prompt's log-sum-exps (`_cudnn_serves`), on
    the CPU with stand-ins for both kernels: cuDNN is taken where its probe agrees with flash attention's output and
    log-sum-exps, and refused where it raises, returns base-2 log-sum-exps, statistics of another shape or another
    output, or where SDPA's cuDNN backend is switched off; the verdict is kept per device, dtype and head geometry."""
    monkeypatch.setattr(attention, "_flash_with_lse", _fused_stand_in)
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    query, keys = torch.zeros(1, 4, 3, 8), torch.zeros(1, 2, 3, 8)

    def raises(*args):
        raise RuntimeError("cuDNN Frontend error: no valid execution plans")

    def base_2(*args):
        output, lse = _fused_stand_in(*args)
        return output, lse * attention.LOG2E

    def transposed(*args):
        output, lse = _fused_stand_in(*args)
        return output, lse.transpose(1, 2)

    def other_output(*args):
        output, lse = _fused_stand_in(*args)
        return output + 0.1, lse

    for cudnn, serves in ((_fused_stand_in, True), (raises, False), (base_2, False), (transposed, False),
                          (other_output, False)):
        monkeypatch.setattr(attention, "_kernel_verdicts", {})
        monkeypatch.setattr(attention, "_cudnn_with_lse", cudnn)
        assert attention._cudnn_serves(query, keys) is serves, cudnn.__name__
    monkeypatch.setattr(attention, "_kernel_verdicts", {})
    monkeypatch.setattr(attention, "_cudnn_with_lse", _fused_stand_in)
    assert attention._cudnn_serves(query, keys)
    monkeypatch.setattr(attention, "_cudnn_with_lse", raises)
    assert attention._cudnn_serves(query, keys)  # kept for this geometry, no second probe
    assert not attention._cudnn_serves(torch.zeros(1, 8, 3, 8), keys)  # another geometry is probed anew
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False)
    assert not attention._cudnn_serves(query, keys)


def test_max_pooling_spreads_a_spike_to_its_neighbours():
    scores = torch.zeros(1, 1, 20)
    scores[..., 10] = 1.0
    pooled = pool_scores(scores, 7, "max")
    assert pooled[0, 0].nonzero().flatten().tolist() == list(range(7, 14))


def test_avg_pooling_counts_zero_padding():
    pooled = pool_scores(torch.ones(1, 1, 10), 5, "avg")
    assert pooled[0, 0, 0].item() == pytest.approx(3 / 5) and pooled[0, 0, 5].item() == pytest.approx(1.0)


def test_gqa_reduction():
    scores = torch.arange(8.0).reshape(1, 4, 2)
    assert reduce_query_heads(scores, 2, "mean").tolist() == [[[1.0, 2.0], [5.0, 6.0]]]
    assert reduce_query_heads(scores, 2, "max").tolist() == [[[2.0, 3.0], [6.0, 7.0]]]


def test_top_k_ties_prefer_earlier_positions_and_come_back_sorted():
    scores = torch.tensor([[[1.0, 3.0, 3.0, 2.0, 3.0, 0.5]]])
    assert top_k_positions(scores, 2).tolist() == [[[1, 2]]]
    assert top_k_positions(scores, 4).tolist() == [[[1, 2, 3, 4]]]


def test_keep_best_and_tail_and_sink_recent():
    scores = torch.tensor([[[5.0, 1.0, 4.0, 2.0]]])
    assert keep_best_and_tail(scores, 2, 7).tolist() == [[[0, 2, 4, 5, 6]]]
    assert keep_sink_and_recent(10, 2, 3, torch.device("cpu")).tolist() == [[[0, 1, 7, 8, 9]]]
