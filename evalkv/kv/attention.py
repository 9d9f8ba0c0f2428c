"""Attention over a (possibly compressed) cache, and the scoring blocks eviction methods read.

Everything here works on plain tensors in the layout transformers uses, `[batch, heads, tokens, head_dim]`, and
never materialises an n x n attention matrix: scoring recomputes small blocks
(docs/methods.md#shared-observation-window, #shared-cost-classes). On CUDA, the statistics of many rows
(`attention_column_sums`, `attention_last_reads`) come from fused Triton kernels (`evalkv/kv/scoring_kernels.py`,
docs/performance.md#fused-scoring-kernels); the block-wise PyTorch code here is the CPU path and their reference.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

BACKENDS = ("sdpa", "eager", "flash_attention_2")

# Scoring blocks are computed in pieces of at most this many fp32 elements (256 MiB).
_BLOCK_ELEMENTS = 1 << 26
# The fused kernels serve at least this many query rows; one row (a decode step, TOVA's newest row) is a block of
# the size of its result, computed here.
KERNEL_MIN_ROWS = 2
# EVALKV_TRITON=0 keeps every call on the PyTorch path (A/B timing: docs/performance.md#fused-scoring-kernels).
KERNELS_ENV = "EVALKV_TRITON"
LOG2E = 1.4426950408889634  # log2(e): base-2 log-sum-exps, as flash attention and the scoring kernels use them


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """Repeat each KV head `groups` times: `[B, H_kv, m, d]` -> `[B, H_kv * groups, m, d]` (GQA expansion)."""
    if groups == 1:
        return x
    batch, heads, length, dim = x.shape
    return x[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)


def _bottom_right_causal(q_len: int, kv_len: int, device: torch.device) -> Tensor:
    """Boolean mask, True = may attend: query i sees cache entries up to `kv_len - q_len + i`."""
    rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return torch.arange(kv_len, device=device)[None, :] <= rows


def attend(query: Tensor, keys: Tensor, values: Tensor, scaling: float, backend: str = "sdpa",
           valid: Tensor | None = None) -> Tensor:
    """Causal attention of the `q` newest tokens over the cache; returns `[B, H, q, d]`.

    The new tokens are the last `q` cache entries and every other entry is older (eviction never reorders time),
    so the causal mask is aligned bottom-right whatever was evicted before. valid `[B, H_c, m]`: the entries that
    count (a padded layer's, `LayerCache.pad_heads`; one query token per sequence only).
    """
    q_len, kv_len = query.shape[-2], keys.shape[-2]
    groups = query.shape[1] // keys.shape[1]
    if valid is not None:
        if q_len != 1:
            raise ValueError("a padded cache (per-head budgets laid out dense) takes one query token per sequence")
        return _decode_attention(query, keys, values, scaling, valid)
    if q_len == 1 and backend != "flash_attention_2":
        return _decode_attention(query, keys, values, scaling)
    if backend == "flash_attention_2":
        from flash_attn import flash_attn_func

        out = flash_attn_func(
            query.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            softmax_scale=scaling, causal=q_len > 1,
        )
        return out.transpose(1, 2)
    if backend == "eager":
        keys, values = repeat_kv(keys, groups), repeat_kv(values, groups)
        logits = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scaling
        if q_len > 1:
            logits = logits.masked_fill(~_bottom_right_causal(q_len, kv_len, query.device), float("-inf"))
        probs = torch.softmax(logits, dim=-1).to(values.dtype)
        return torch.matmul(probs, values)
    if backend != "sdpa":
        raise ValueError(f"unknown attention backend {backend!r}; known: {', '.join(BACKENDS)}")
    mask, is_causal = None, False
    if q_len == kv_len and q_len > 1:
        is_causal = True
    elif q_len > 1:
        # New tokens after a cache (a prefill chunk, a question after the compressed context): a lower-right causal
        # bias, which SDPA runs in its fused kernels, where a boolean mask with grouped heads would fall back to the
        # unfused math path on CUDA (materialising every chunk's fp32 attention matrix).
        mask = causal_lower_right(q_len, kv_len)
    return F.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=groups > 1
    )


def attend_with_row_lse(query: Tensor, keys: Tensor, values: Tensor, scaling: float,
                        backend: str = "sdpa") -> tuple[Tensor, Tensor | None]:
    """`attend` for a forward whose queries are all of the cache's entries (a whole prompt in one forward), with
    each query row's base-2 log-sum-exp of its scaled logits `[B, H, q]` fp32 where a fused attention kernel of
    PyTorch returns it beside the output: on CUDA, fp16 / bf16, head_dim a multiple of 8 up to 256, the sdpa backend,
    and the scoring kernels in use (not switched off with EVALKV_TRITON=0). Passed on as `row_lse` to
    `attention_column_sums` / `attention_last_reads`, it spares the kernels their first pass. The kernel is cuDNN's
    where it serves this geometry (`_cudnn_serves`: what SDPA itself runs on Hopper, so the prompt's attention runs the
    full cache's kernel), else flash attention's. Else `(attend(...), None)`."""
    q_len, head_dim = query.shape[-2], query.shape[-1]
    if (backend == "sdpa" and q_len > 1 and keys.shape[-2] == q_len and query.dtype in (torch.float16, torch.bfloat16)
            and head_dim % 8 == 0 and head_dim <= 256 and kernels_serve(query)):
        fused = _cudnn_with_lse if _cudnn_serves(query, keys) else _flash_with_lse
        output, lse = fused(query, keys, values, scaling)
        return output, lse * LOG2E
    return attend(query, keys, values, scaling, backend), None


def _flash_with_lse(query: Tensor, keys: Tensor, values: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """Causal attention of a whole prompt and each row's natural log-sum-exp `[B, H, q]` from PyTorch's flash
    kernel (grouped heads taken as they are)."""
    output, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, keys, values, 0.0, True,
                                                                    scale=scaling)[:2]
    return output, lse[..., : query.shape[-2]]


def _cudnn_with_lse(query: Tensor, keys: Tensor, values: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """The same from cuDNN's fused attention (`compute_log_sumexp=True`; its statistics may carry a trailing unit
    dimension)."""
    output, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(query, keys, values, None, True, 0.0, True,
                                                                    False, scale=scaling)[:2]
    if lse.dim() == 4:
        lse = lse[..., 0]
    return output, lse[..., : query.shape[-2]]


# (kernel, device, dtype, query heads, KV heads, head_dim) -> whether the kernel's probe agreed with the reference
_kernel_verdicts: dict[tuple, bool] = {}
PROBE_LENGTH = 200  # keys of a probe: not a multiple of any tile, so padding would show


def _probe_inputs(query: Tensor, keys: Tensor, query_length: int) -> tuple[Tensor, Tensor, Tensor]:
    """Random query (`query_length` tokens), keys and values (`PROBE_LENGTH`) of one row with the head geometry and
    dtype of this call (seed 0)."""
    generator = torch.Generator(device=query.device).manual_seed(0)
    return tuple(torch.randn(1, heads, length, query.shape[-1], generator=generator, device=query.device,
                             dtype=query.dtype)
                 for heads, length in ((query.shape[1], query_length), (keys.shape[1], PROBE_LENGTH),
                                       (keys.shape[1], PROBE_LENGTH)))


def _kernel_agrees(name: str, query: Tensor, keys: Tensor, probe) -> bool:
    """Whether a faster kernel may serve this geometry: once per kernel, device, dtype and head geometry, `probe()`
    runs it and its reference on small inputs and says whether they agree (within the dtype's rounding). An error
    or a disagreement keeps the reference path for that geometry: the choice changes speed, never what is
    computed."""
    key = (name, str(query.device), query.dtype, query.shape[1], keys.shape[1], query.shape[-1])
    if key not in _kernel_verdicts:
        try:  # whatever a kernel raises here (a missing operator, a shape it refuses) only means "not this kernel"
            _kernel_verdicts[key] = bool(probe())
        except Exception:  # noqa: BLE001
            _kernel_verdicts[key] = False
    return _kernel_verdicts[key]


def _close(got: tuple[Tensor, ...], expected: tuple[Tensor, ...], tolerances: tuple[float, ...]) -> bool:
    return all(a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)
               for a, b, tol in zip(got, expected, tolerances))


def _cudnn_serves(query: Tensor, keys: Tensor) -> bool:
    """Whether cuDNN's fused attention serves this geometry: SDPA's cuDNN backend is enabled and its probe prompt
    gives the output and log-sum-exps of the flash kernel (an older cuDNN, grouped heads it does not take, or
    statistics of another base or shape keep the flash kernel)."""
    if not (torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cudnn.enabled):
        return False

    def probe() -> bool:
        inputs = _probe_inputs(query, keys, PROBE_LENGTH)
        scaling = query.shape[-1] ** -0.5
        return _close(_cudnn_with_lse(*inputs, scaling), _flash_with_lse(*inputs, scaling), (2e-2, 1e-3))

    return _kernel_agrees("cudnn", query, keys, probe)


def _decode_attention(query: Tensor, keys: Tensor, values: Tensor, scaling: float,
                      valid: Tensor | None = None) -> Tensor:
    """One query token per sequence: grouped matmuls that read each KV head once (no GQA copy).

    Decode is memory-bound and its KV length changes every step; this path avoids both the GQA expansion and the
    per-shape planning cost of fused SDPA kernels (about 1 ms of CPU per call for cuDNN on an H100). A padded cache
    (`valid` given) on CUDA goes to the fused kernel of `evalkv/kv/decode_kernels.py`, which skips blocks of padding
    instead of reading and masking them, where its probe agrees with `_blockwise_decode_attention` (its reference);
    a step being compiled (`decode_graphs=compile`) keeps the block-wise code, which the compiler fuses itself.
    """
    kernel = (_padded_kernel(query, keys) if valid is not None and not torch.compiler.is_compiling()
              and kernels_serve(query) else None)
    if kernel is not None:
        return kernel(query, keys, values, scaling, valid)
    return _blockwise_decode_attention(query, keys, values, scaling, valid)


def _blockwise_decode_attention(query: Tensor, keys: Tensor, values: Tensor, scaling: float,
                                valid: Tensor | None = None) -> Tensor:
    batch, num_heads, _, dim = query.shape
    kv_heads = keys.shape[1]
    grouped = query.reshape(batch, kv_heads, num_heads // kv_heads, dim)
    logits = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scaling  # [B, H_kv, G, m]
    if valid is not None:
        logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).to(values.dtype)
    return torch.matmul(probs, values).reshape(batch, num_heads, 1, dim)


def _padded_kernel(query: Tensor, keys: Tensor):
    """The padded decode kernel where it takes this step (16-bit, head_dim a power of two, and its probe, one query
    over a padded cache: a prefix, padding across whole blocks, appended entries, gives the block-wise output), else
    None."""
    from evalkv.kv import decode_kernels

    if not decode_kernels.supports(query, keys):
        return None

    def probe() -> bool:
        probe_query, probe_keys, probe_values = _probe_inputs(query, keys, 1)
        slots = torch.arange(PROBE_LENGTH, device=query.device)
        valid = ((slots < 37) | (slots >= PROBE_LENGTH - 5)).expand(1, keys.shape[1], PROBE_LENGTH)
        scaling = query.shape[-1] ** -0.5
        got = decode_kernels.padded_decode_attention(probe_query, probe_keys, probe_values, scaling, valid)
        return _close((got,), (_blockwise_decode_attention(probe_query, probe_keys, probe_values, scaling, valid),),
                      (2e-2,))

    return decode_kernels.padded_decode_attention if _kernel_agrees("padded_decode", query, keys, probe) else None


def _masked_probs(
    query: Tensor, query_positions: Tensor, keys: Tensor, key_positions: Tensor, scaling: float
) -> Tensor:
    """fp32 softmax of `query @ keys^T` where a key later than the query (by true position) is masked.

    The product runs in the model's dtype and the softmax in fp32, as the reference codes do; evalkv keeps the
    probabilities in fp32 where the references cast them back to the model's dtype (docs/methods.md#shared-numerics).
    """
    logits = torch.matmul(query, keys.transpose(-1, -2)).float() * scaling
    future = key_positions[..., None, :] > query_positions[..., :, None]
    logits = logits.masked_fill(future, torch.finfo(torch.float32).min)
    return torch.softmax(logits, dim=-1)


def _head_chunks(num_heads: int, rows: int, length: int, batch: int) -> int:
    per_head = max(1, batch * rows * length)
    return max(1, min(num_heads, _BLOCK_ELEMENTS // per_head))


def window_attention(
    query: Tensor, query_positions: Tensor, keys: Tensor, key_positions: Tensor, scaling: float
) -> Tensor:
    """Attention probabilities of a few query rows over the whole cache (docs/methods.md#shared-observation-window).

    query `[B, H, w, d]`, query_positions `[B, w]`, keys `[B, H_c, m, d]` (H_c divides H), key_positions
    `[B, H_c, m]`. Returns fp32 `[B, H, w, m]`, normalised over all m keys, keys after a query masked.
    """
    batch, num_heads, rows, dim = query.shape
    kv_heads = keys.shape[1]
    if kv_heads == num_heads:
        return _masked_probs(query, query_positions[:, None, :], keys, key_positions, scaling)
    # The query heads of a KV head become rows of one product over that head's keys, which are read once and never
    # copied per query head (a 32K prompt's keys repeated for 32 query heads would be 256 MiB per layer in bf16).
    groups = num_heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups * rows, dim)
    grouped_positions = query_positions[:, None, :].repeat(1, 1, groups)  # [B, 1, G * w], matching the rows
    probs = _masked_probs(grouped, grouped_positions, keys, key_positions, scaling)
    return probs.reshape(batch, num_heads, rows, keys.shape[-2])


def attention_row_blocks(
    query: Tensor, query_positions: Tensor, keys: Tensor, key_positions: Tensor, scaling: float,
    max_elements: int = _BLOCK_ELEMENTS,
):
    """Yield `(rows, probs)`: `window_attention` of the query rows `rows` (a slice) over the whole cache, all heads,
    in blocks of at most `max_elements` probabilities (one row at least).

    For scores that need more than column sums of every prompt row (OBCache `_fullhist`, LRU access times): one
    extra attention pass of FLOPs, `O(block)` memory, never the n x n matrix (class F,
    docs/methods.md#shared-cost-classes).
    """
    batch, num_heads, q_len, _ = query.shape
    rows_per_block = max(1, max_elements // max(1, batch * num_heads * keys.shape[-2]))
    for start in range(0, q_len, rows_per_block):
        rows = slice(start, min(q_len, start + rows_per_block))
        yield rows, window_attention(query[:, :, rows], query_positions[:, rows], keys, key_positions, scaling)


def attention_column_sums(
    query: Tensor, query_positions: Tensor, keys: Tensor, key_positions: Tensor, scaling: float, power: int = 1,
    row_lse: Tensor | None = None,
) -> Tensor:
    """Sum over query rows of the causal attention probabilities (to the `power`): `[B, H, m]` fp32.

    This is the H2O accumulated score of a forward (docs/methods.md#h2o, class F in #shared-column-sums), and with
    `power` OBCache's V score: one extra pass of attention FLOPs, never the full matrix. On CUDA a fused kernel
    (`scoring_kernels.column_sums`), which with `row_lse` (these rows' base-2 log-sum-exps over these keys, as
    `attend_with_row_lse` returns them) skips its first pass; else block by block, `O(block x m)` memory.
    """
    kernels = _scoring_kernels(query, keys)
    if kernels is not None:
        return kernels.column_sums(query, query_positions, keys, key_positions, scaling, power, lse=row_lse)
    batch, num_heads, q_len, _ = query.shape
    length = keys.shape[-2]
    groups = num_heads // keys.shape[1]
    sums = torch.zeros(batch, num_heads, length, dtype=torch.float32, device=query.device)
    heads_per_block = _head_chunks(num_heads, q_len, length, batch)
    rows_per_block = max(1, _BLOCK_ELEMENTS // max(1, batch * heads_per_block * length))
    # Entries are in position order, so the keys a row block can see end at the last one not after its latest
    # query; the causal upper triangle (about half of a prompt's matrix) is never computed.
    row_starts = list(range(0, q_len, rows_per_block))
    visible = [length] * len(row_starts)
    if q_len > 1:
        latest = query_positions.amax(dim=0)  # [q]
        block_latest = torch.stack([latest[r0 : r0 + rows_per_block].max() for r0 in row_starts])
        earliest_keys = key_positions.amin(dim=(0, 1))  # [m], the most permissive head
        visible = torch.searchsorted(earliest_keys.contiguous(), block_latest, right=True).tolist()
    for h0 in range(0, num_heads, heads_per_block):
        h1 = min(num_heads, h0 + heads_per_block)
        kv_heads = torch.arange(h0, h1, device=query.device) // groups
        head_keys = keys.index_select(1, kv_heads)
        head_positions = key_positions.index_select(1, kv_heads)
        for r0, end in zip(row_starts, visible):
            r1 = min(q_len, r0 + rows_per_block)
            probs = _masked_probs(
                query[:, h0:h1, r0:r1], query_positions[:, None, r0:r1], head_keys[..., :end, :],
                head_positions[..., :end], scaling,
            )
            sums[:, h0:h1, :end] += (probs if power == 1 else probs.pow(power)).sum(dim=-2)
    return sums


def attention_last_reads(
    query: Tensor, query_positions: Tensor, keys: Tensor, key_positions: Tensor, scaling: float, heads: int,
    row_lse: Tensor | None = None,
) -> Tensor:
    """Per key, the latest query position that *reads* it: `[B, heads, m]` int64, -1 where no row does.

    A row reads a key when its attention to it, averaged over each of `heads` groups of consecutive query heads (1:
    all heads; the KV-head count: each GQA group), exceeds the uniform level `1 / (number of keys the row sees)`,
    counted on KV head 0's keys (LRU's access rule, docs/methods.md#lru). On CUDA a fused kernel
    (`scoring_kernels.last_reads`; `row_lse` as in `attention_column_sums`); else `attention_row_blocks`.
    """
    kernels = _scoring_kernels(query, keys)
    if kernels is not None:
        return kernels.last_reads(query, query_positions, keys, key_positions, scaling, heads, lse=row_lse)
    batch, length = keys.shape[0], keys.shape[-2]
    latest = torch.full((batch, heads, length), -1, dtype=torch.long, device=query.device)
    first_head_positions = key_positions[:, :1]
    for rows, probs in attention_row_blocks(query, query_positions, keys, key_positions, scaling):
        probs = probs.mean(dim=1, keepdim=True) if heads == 1 else reduce_query_heads(probs, heads)
        row_positions = query_positions[:, None, rows, None]  # [B, 1, r, 1]
        visible = (first_head_positions[:, :, None, :] <= row_positions).sum(dim=-1, keepdim=True)
        read = probs > 1.0 / visible
        latest = torch.maximum(latest, torch.where(read, row_positions, -1).amax(dim=-2))
    return latest


def _scoring_kernels(query: Tensor, keys: Tensor):
    """`evalkv.kv.scoring_kernels` where it serves these tensors (CUDA, triton installed, at least KERNEL_MIN_ROWS
    rows, a dtype and head size it takes, not switched off with EVALKV_TRITON=0); None: the PyTorch path."""
    if query.shape[-2] < KERNEL_MIN_ROWS or not kernels_serve(query):
        return None
    from evalkv.kv import scoring_kernels

    return scoring_kernels if scoring_kernels.supports(query, keys) else None


def kernels_serve(tensor: Tensor) -> bool:
    """Whether evalkv's Triton kernels may take this tensor: on CUDA, triton installed, not switched off with
    EVALKV_TRITON=0 (each kernel module then says which dtypes and shapes it takes)."""
    return tensor.is_cuda and os.environ.get(KERNELS_ENV) != "0" and _triton_installed()


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def reduce_query_heads(scores: Tensor, num_kv_heads: int, how: str = "mean") -> Tensor:
    """`[B, H, ...]` per query head -> `[B, H_kv, ...]` per KV head (docs/methods.md#shared-gqa-granularity)."""
    batch, num_heads = scores.shape[:2]
    if num_heads == num_kv_heads:
        return scores
    grouped = scores.reshape(batch, num_kv_heads, num_heads // num_kv_heads, *scores.shape[2:])
    if how == "mean":
        return grouped.mean(dim=2)
    if how == "max":
        return grouped.amax(dim=2)
    raise ValueError(f"unknown GQA reduction {how!r}; known: mean, max")


def pool_scores(scores: Tensor, kernel_size: int, pooling: str) -> Tensor:
    """Pool scores along positions with stride 1 and `padding = kernel_size // 2` (docs/methods.md#shared-pooling).

    `max` pads with -inf; `avg` pads with zeros that count in the average (edge scores are diluted), as the reference.
    """
    if kernel_size <= 1:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    if pooling == "max":
        pooled = F.max_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2)
    elif pooling == "avg":
        pooled = F.avg_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=True)
    else:
        raise ValueError(f"unknown pooling {pooling!r}; known: max, avg")
    return pooled.reshape(shape)


__all__ = [
    "BACKENDS", "attend", "attention_column_sums", "attention_last_reads", "attention_row_blocks", "pool_scores",
    "reduce_query_heads", "repeat_kv", "window_attention",
]
