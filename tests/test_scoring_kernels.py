"""The fused Triton scoring kernels (evalkv/kv/scoring_kernels.py) against the block-wise PyTorch path they replace.

Without a GPU the kernels run in Triton's interpreter (`TRITON_INTERPRET=1`) on small shapes; with one, compiled on
CUDA, plus realistic shapes and whole generations with and without the kernels. Skipped where triton is not
installed (`pip install evalkv[triton]`; PyTorch's CUDA wheels ship it).
"""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, triton_kernels
from method_cases import CASES, method_name

from evalkv.kv import attention
from evalkv.kv.attention import attention_column_sums, attention_last_reads, window_attention

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def kernels():
    return triton_kernels("scoring_kernels")


@pytest.fixture
def small(kernels):
    """Tiles of 16 (triton's smallest dot), so that the small shapes below span several tiles with ragged ends."""
    return kernels.Tiles(rows=16, keys=16, key_block=16, row_block=16, num_warps=4, num_stages=1)


def _pytorch_path(monkeypatch):
    monkeypatch.setenv(attention.KERNELS_ENV, "0")


def _prompt(device, generator, length=37, dtype=torch.float32):
    """A prompt's rows over its own keys: 4 query heads over 2 KV heads, positions 0..length-1."""
    query = torch.randn(1, 4, length, 8, generator=generator).to(device, dtype)
    keys = torch.randn(1, 2, length, 8, generator=generator).to(device, dtype)
    positions = torch.arange(length, device=device)
    return query, positions.expand(1, length), keys, positions.expand(1, 2, length)


def _evicted_cache(device, generator):
    """A chunk of 13 queries (positions 50..62) over a GQA cache whose KV heads and batch rows kept different earlier
    positions: 21 kept of the first 50, then the chunk's own keys; 4 query heads over 2 KV heads, batch 2."""
    kept = torch.stack([torch.stack([torch.sort(torch.randperm(50, generator=generator)[:21]).values
                                     for _ in range(2)]) for _ in range(2)])
    key_positions = torch.cat([kept, torch.arange(50, 63).expand(2, 2, 13)], dim=-1)  # [2, 2, 34]
    query = torch.randn(2, 4, 13, 8, generator=generator)
    keys = torch.randn(2, 2, 34, 8, generator=generator)
    query_positions = torch.arange(50, 63).expand(2, 13).clone()
    query_positions[1, 0] = 30  # a row that predates some kept keys: they are masked for it alone
    return [t.to(device) for t in (query, query_positions, keys, key_positions)]


def test_column_sums_equal_the_pytorch_path_on_a_causal_gqa_prompt(kernels, device, small, monkeypatch):
    """37 rows (not a multiple of the tiles), each row's keys split over two programs (partial sums merged)."""
    _pytorch_path(monkeypatch)
    query, query_positions, keys, key_positions = _prompt(device, torch.Generator().manual_seed(0))
    expected = attention_column_sums(query, query_positions, keys, key_positions, 0.35)
    sums = kernels.column_sums(query, query_positions, keys, key_positions, 0.35, tiles=small, key_splits=2)
    torch.testing.assert_close(sums, expected, atol=2e-6, rtol=1e-5)
    assert expected[..., 0].min() > 1  # every row sees the first key: causal sums, not uniform ones


def test_column_sums_over_an_evicted_cache_mask_by_true_position(kernels, device, small, monkeypatch):
    _pytorch_path(monkeypatch)
    query, query_positions, keys, key_positions = _evicted_cache(device, torch.Generator().manual_seed(1))
    expected = attention_column_sums(query, query_positions, keys, key_positions, 0.35)
    sums = kernels.column_sums(query, query_positions, keys, key_positions, 0.35, tiles=small)
    torch.testing.assert_close(sums, expected, atol=2e-6, rtol=1e-5)
    query_positions[1, 0] = 50  # the early row's mask matters
    assert not torch.allclose(attention_column_sums(query, query_positions, keys, key_positions, 0.35), expected)


@pytest.mark.parametrize("heads", [1, 2])
def test_a_row_out_of_order_is_masked_by_its_own_position(kernels, device, small, monkeypatch, heads):
    """The kernels skip the position mask for row tiles that see every key of a key tile, judged by each later
    tile's earliest query: a row at position 3 in the last row tile keeps that tile masked for the later keys."""
    _pytorch_path(monkeypatch)
    query, query_positions, keys, key_positions = _prompt(device, torch.Generator().manual_seed(9))
    query_positions = query_positions.clone()
    query_positions[0, -1] = 3
    expected = attention_column_sums(query, query_positions, keys, key_positions, 0.35)
    sums = kernels.column_sums(query, query_positions, keys, key_positions, 0.35, tiles=small)
    torch.testing.assert_close(sums, expected, atol=2e-6, rtol=1e-5)
    lse, _ = kernels._row_statistics(query, query_positions, keys, key_positions, 0.35, small, False, None)
    reads = kernels.last_reads(query, query_positions, keys, key_positions, 0.35, heads, tiles=small, lse=lse)
    assert torch.equal(reads, attention_last_reads(query, query_positions, keys, key_positions, 0.35, heads))


def test_squared_column_sums_are_obcache_v_scores(kernels, device, small, monkeypatch):
    _pytorch_path(monkeypatch)
    query, query_positions, keys, key_positions = _prompt(device, torch.Generator().manual_seed(2), length=21)
    sums = kernels.column_sums(query, query_positions, keys, key_positions, 0.35, power=2, tiles=small)
    probs = window_attention(query, query_positions, keys, key_positions, 0.35)
    torch.testing.assert_close(sums, probs.square().sum(dim=-2), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(attention_column_sums(query, query_positions, keys, key_positions, 0.35, 2), sums,
                               atol=2e-6, rtol=1e-5)


def test_bf16_inputs_accumulate_in_fp32(kernels, device, small, monkeypatch):
    """The kernel's products are fp32 sums of exact bf16 products, so it matches fp64 arithmetic on the same bf16
    values; the PyTorch path rounds each logit to bf16 before its fp32 softmax, so it agrees to that rounding only."""
    _pytorch_path(monkeypatch)
    query, query_positions, keys, key_positions = _prompt(device, torch.Generator().manual_seed(3), 21, torch.bfloat16)
    sums = kernels.column_sums(query, query_positions, keys, key_positions, 0.35, tiles=small)
    logits = query.double() @ keys.double().repeat_interleave(2, dim=1).transpose(-1, -2) * 0.35
    causal = torch.ones(21, 21, dtype=torch.bool, device=device).tril()
    exact = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1).sum(dim=-2)
    assert sums.dtype == torch.float32
    torch.testing.assert_close(sums.double(), exact, atol=1e-5, rtol=1e-5)
    blockwise = attention_column_sums(query, query_positions, keys, key_positions, 0.35)
    torch.testing.assert_close(sums, blockwise, atol=1e-2, rtol=1e-2)
    assert (blockwise.double() - exact).abs().max() > 100 * (sums.double() - exact).abs().max()


@pytest.mark.parametrize("heads", [1, 2])
def test_last_reads_equal_the_pytorch_path(kernels, device, small, monkeypatch, heads):
    """LRU's access rule: the mean over all query heads (1 group) or over each KV head's group (2); each key tile's
    rows split over two programs (merged by maximum)."""
    _pytorch_path(monkeypatch)
    query, query_positions, keys, key_positions = _evicted_cache(device, torch.Generator().manual_seed(4))
    expected = attention_last_reads(query, query_positions, keys, key_positions, 0.35, heads)
    reads = kernels.last_reads(query, query_positions, keys, key_positions, 0.35, heads, tiles=small, row_splits=2)
    assert reads.dtype == torch.int64 and torch.equal(reads, expected)
    assert (expected == -1).any() and (expected >= 50).any()  # both unread and read keys occur


def test_given_row_log_sum_exps_replace_the_first_pass(kernels, device, small):
    """With the rows' base-2 log-sum-exps given (from the model's attention), both statistics use them instead of
    pass 1: the kernel's own reproduce its results, and every log-sum-exp one higher halves every probability."""
    query, query_positions, keys, key_positions = _prompt(device, torch.Generator().manual_seed(5))
    lse, counts = kernels._row_statistics(query, query_positions, keys, key_positions, 0.35, small, True, None)
    sums = kernels.column_sums(query, query_positions, keys, key_positions, 0.35, tiles=small)
    given = kernels.column_sums(query, query_positions, keys, key_positions, 0.35, tiles=small, lse=lse)
    torch.testing.assert_close(given, sums, atol=0, rtol=0)
    halved = kernels.column_sums(query, query_positions, keys, key_positions, 0.35, tiles=small, lse=lse + 1)
    torch.testing.assert_close(halved, sums / 2, atol=1e-7, rtol=1e-6)
    for query, query_positions, keys, key_positions in (_prompt(device, torch.Generator().manual_seed(6)),
                                                        _evicted_cache(device, torch.Generator().manual_seed(7))):
        lse, _ = kernels._row_statistics(query, query_positions, keys, key_positions, 0.35, small, False, None)
        reads = kernels.last_reads(query, query_positions, keys, key_positions, 0.35, 2, tiles=small)
        given = kernels.last_reads(query, query_positions, keys, key_positions, 0.35, 2, tiles=small, lse=lse)
        assert torch.equal(given, reads)  # the visible counts, from positions, equal pass 1's
        higher = kernels.last_reads(query, query_positions, keys, key_positions, 0.35, 2, tiles=small, lse=lse + 1)
        assert not torch.equal(higher, reads)


def test_row_log_sum_exps_come_from_the_attention_only_where_a_fused_kernel_returns_them():
    """On the CPU (and for chunks, fp32, other backends) `attend_with_row_lse` is `attend` with no log-sum-exps."""
    generator = torch.Generator().manual_seed(8)
    query, keys, values = (torch.randn(1, heads, 9, 8, generator=generator) for heads in (4, 2, 2))
    output, lse = attention.attend_with_row_lse(query, keys, values, 0.35)
    assert lse is None and torch.equal(output, attention.attend(query, keys, values, 0.35))


# --- On a GPU: realistic shapes and whole generations -----------------------------------------------------------

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@cuda_only
def test_dispatch_uses_the_kernels_on_cuda_unless_switched_off(kernels, monkeypatch):
    query, keys = torch.zeros(1, 4, 8, 64, device="cuda"), torch.zeros(1, 2, 8, 64, device="cuda")
    assert attention._scoring_kernels(query, keys) is not None
    assert attention._scoring_kernels(query[:, :, :1], keys) is None  # one row: the PyTorch path
    monkeypatch.setenv(attention.KERNELS_ENV, "0")
    assert attention._scoring_kernels(query, keys) is None


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernels_match_the_pytorch_path_at_4k_tokens(kernels, monkeypatch, dtype):
    """A 4K-token prompt on the Llama-3.1-8B attention geometry (32 query / 8 KV heads, d=128) with the default
    tiles."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    n = 4096
    query = torch.randn(1, 32, n, 128, device="cuda", generator=generator, dtype=dtype)
    keys = torch.randn(1, 8, n, 128, device="cuda", generator=generator, dtype=dtype)
    positions = torch.arange(n, device="cuda")
    query_positions, key_positions = positions.expand(1, n), positions.expand(1, 8, n)
    scaling = 128**-0.5
    sums = kernels.column_sums(query, query_positions, keys, key_positions, scaling)
    reads = kernels.last_reads(query, query_positions, keys, key_positions, scaling, 1)
    _pytorch_path(monkeypatch)
    expected = attention_column_sums(query, query_positions, keys, key_positions, scaling)
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 2e-2}
    torch.testing.assert_close(sums, expected, **tolerance)
    torch.testing.assert_close(sums.sum(dim=-1), torch.full_like(sums[..., 0], n), rtol=1e-4, atol=0)  # rows sum to 1
    if dtype == torch.float32:
        expected_reads = attention_last_reads(query, query_positions, keys, key_positions, scaling, 1)
        assert (reads != expected_reads).float().mean() < 1e-3  # a probability within rounding of 1/visible may flip


@cuda_only
def test_fused_attention_row_log_sum_exps_match_the_first_pass(kernels, monkeypatch):
    """A 4K-token bf16 prompt on the Llama-3.1-8B attention geometry: the log-sum-exps that the model's attention
    returns (`attend_with_row_lse`: cuDNN's kernel where its probe agrees, flash attention's, and each of the two on
    its own) equal the kernels' own pass 1 within fp32 rounding, the output is SDPA's, and column sums and last
    reads from them equal those of the kernels' two passes."""
    generator = torch.Generator(device="cuda").manual_seed(1)
    n = 4096
    query, keys, values = (torch.randn(1, heads, n, 128, device="cuda", generator=generator, dtype=torch.bfloat16)
                           for heads in (32, 8, 8))
    positions = torch.arange(n, device="cuda")
    query_positions, key_positions = positions.expand(1, n), positions.expand(1, 8, n)
    scaling = 128**-0.5
    own, _ = kernels._row_statistics(query, query_positions, keys, key_positions, scaling,
                                     kernels.default_tiles(128, torch.bfloat16), False, None)
    serves = attention._cudnn_serves(query, keys)
    if torch.cuda.get_device_capability() >= (9, 0):  # SDPA's own choice there (docs/performance.md)
        assert serves, "cuDNN's fused attention did not agree with flash attention's (or raised) on this GPU"
    fused = [attention._flash_with_lse] + ([attention._cudnn_with_lse] if serves else [])
    for kernel in fused:
        output, lse = kernel(query, keys, values, scaling)
        assert lse.shape == (1, 32, n) and lse.dtype == torch.float32, kernel.__name__
        torch.testing.assert_close(lse * attention.LOG2E, own, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(output, attention.attend(query, keys, values, scaling), atol=2e-2, rtol=2e-2)
    output, lse = attention.attend_with_row_lse(query, keys, values, scaling)
    assert lse is not None and lse.shape == (1, 32, n) and lse.dtype == torch.float32
    torch.testing.assert_close(output, attention.attend(query, keys, values, scaling), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, own, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(kernels.column_sums(query, query_positions, keys, key_positions, scaling, lse=lse),
                               kernels.column_sums(query, query_positions, keys, key_positions, scaling),
                               atol=1e-3, rtol=1e-3)
    reads = kernels.last_reads(query, query_positions, keys, key_positions, scaling, 8, lse=lse)
    expected = kernels.last_reads(query, query_positions, keys, key_positions, scaling, 8)
    assert (reads != expected).float().mean() < 1e-3  # a probability within rounding of 1/visible may flip
    monkeypatch.setenv(attention.KERNELS_ENV, "0")
    assert attention.attend_with_row_lse(query, keys, values, scaling)[1] is None


@pytest.mark.parametrize("case", ["h2o-chunked", *(["h2o", "lru", "lru-kv_head", "kvcV_fullhist"] if CUDA else [])])
def test_generation_keeps_the_same_positions_with_and_without_the_kernels(kernels, device, case, tokenizer,
                                                                          monkeypatch):
    """Every forward of a tiny model's generation attends to the same positions and generates the same tokens. On
    the CPU the interpreter stands in for the GPU (the dispatch is pointed at it) for one case, chunked H2O: its first
    chunk is a causal prompt, the later ones a chunk over an evicted cache."""
    from evalkv.kv.engine import Engine
    from evalkv.methods import build_method
    from evalkv.models.presets import build_random_model

    if not CUDA:
        monkeypatch.setattr(attention, "_scoring_kernels",
                            lambda query, keys: kernels if query.shape[-2] >= attention.KERNEL_MIN_ROWS else None)
        # Tiles of 128: each chunk is one row tile, so the interpreter runs few programs.
        monkeypatch.setattr(kernels, "default_tiles", lambda head_dim, dtype: kernels.Tiles(128, 128, 128, 128))
    model = build_random_model("tiny-llama", torch.float32, device, seed=0)
    options = CASES.get(case, {"budget": 64})

    def run():
        prompt = prompt_ids(tokenizer, repeats=5)  # 225 tokens: three chunks of 100 for h2o-chunked
        generation = Engine(model, build_method(method_name(case), options)).generate(prompt, 6, trace=True)
        return generation.token_ids, [[positions.cpu() for positions in forward] for forward in generation.trace]

    with_kernels = run()
    _pytorch_path(monkeypatch)
    if not CUDA:
        monkeypatch.setattr(attention, "_scoring_kernels", lambda query, keys: None)  # the stand-in ignores the switch
    without = run()
    assert with_kernels[0] == without[0]
    for forward, reference in zip(with_kernels[1], without[1], strict=True):
        for kept, expected in zip(forward, reference, strict=True):
            assert torch.equal(kept, expected)
