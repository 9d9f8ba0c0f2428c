"""A fused Triton kernel for one decode step over a padded cache: attention that reads only the key blocks holding
entries (docs/performance.md#catekv-batched-goal-3-and-long-contexts-goal-5).

A ragged layer (heads keeping different numbers of entries: adakv, catekv, duo_attention, kvzip) decodes in batches
and CUDA graphs through dense buffers in which every head is laid out to the layer's longest head, the rest padding
at position -1 (`LayerCache.pad_heads`; `valid` marks the entries). The PyTorch path
(`attention._blockwise_decode_attention`, the CPU path and this kernel's reference in
`tests/test_decode_kernels.py`) multiplies the query with every slot and masks the padding, so a layer with one head
keeping a whole 128K prompt reads 128K slots of every head. Here a block of `KEYS_BLOCK` slots with no entry is
skipped before its keys and values are read: the step reads the entries (and one byte of `valid` per slot).

Flash decoding: the slots of each (row, KV head) are split into ranges that run in parallel (enough programs to fill
the GPU at batch 1); each program keeps the running maximum, sum and weighted values of its query heads in fp32 over
its range (base-2 exponentials, the scale folded in), and the ranges are combined afterwards. The query heads of a
KV head share its keys (grouped-query attention without copies), padded to 16 rows for the tensor cores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from evalkv.kv.attention import LOG2E
from evalkv.kv.scoring_kernels import MAX_HEAD_DIM, _on_device

DTYPES = (torch.float16, torch.bfloat16)
KEYS_BLOCK = 64  # slots per step of a program
TARGET_PROGRAMS = 264  # about two per streaming multiprocessor of an H100 (132)


def supports(query: Tensor, keys: Tensor) -> bool:
    """Whether the kernel takes this step: 16-bit (as a model caches keys), head_dim a power of two from 16 to 256."""
    head_dim = query.shape[-1]
    return (query.dtype in DTYPES and keys.dtype == query.dtype and 16 <= head_dim <= MAX_HEAD_DIM
            and head_dim & (head_dim - 1) == 0)


@triton.jit
def _padded_decode_kernel(
    query, keys, values, valid, accumulated, maxima, sums,
    kv_heads, length, keys_per_split, scale,
    stride_qb, stride_qh, stride_qg, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mn,
    GROUP: tl.constexpr, GROUP_BLOCK: tl.constexpr, DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row_head, split = tl.program_id(0), tl.program_id(1)
    row, head = (row_head // kv_heads).to(tl.int64), (row_head % kv_heads).to(tl.int64)  # 32 rows x 128K slots
    # x 8 heads x 128 dims is past 2^31 elements: offsets in 64 bits
    groups, dims = tl.arange(0, GROUP_BLOCK), tl.arange(0, DIM)
    q = tl.load(query + row * stride_qb + head * stride_qh + groups[:, None] * stride_qg + dims[None, :] * stride_qd,
                mask=groups[:, None] < GROUP, other=0.0)
    best = tl.full([GROUP_BLOCK], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_BLOCK], tl.float32)
    weighted = tl.zeros([GROUP_BLOCK, DIM], tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, length)
    for offset in range(start, end, BLOCK_N):
        slots = offset + tl.arange(0, BLOCK_N)
        held = tl.load(valid + row * stride_mb + head * stride_mh + slots * stride_mn, mask=slots < end, other=0) != 0
        if tl.max(held.to(tl.int32), axis=0) > 0:  # a block of padding only is never read
            k = tl.load(keys + row * stride_kb + head * stride_kh + slots[:, None] * stride_kn
                        + dims[None, :] * stride_kd, mask=held[:, None], other=0.0)
            logits = tl.dot(q, tl.trans(k)) * scale
            logits = tl.where(held[None, :], logits, float("-inf"))
            new_best = tl.maximum(best, tl.max(logits, axis=1))
            rescale = tl.exp2(best - new_best)
            probs = tl.exp2(logits - new_best[:, None])
            total = total * rescale + tl.sum(probs, axis=1)
            v = tl.load(values + row * stride_vb + head * stride_vh + slots[:, None] * stride_vn
                        + dims[None, :] * stride_vd, mask=held[:, None], other=0.0)
            weighted = weighted * rescale[:, None] + tl.dot(probs.to(v.dtype), v)
            best = new_best
    out = (row_head * tl.num_programs(1) + split) * GROUP_BLOCK + groups
    tl.store(maxima + out, best)
    tl.store(sums + out, total)
    tl.store(accumulated + out[:, None] * DIM + dims[None, :], weighted)


def padded_decode_attention(query: Tensor, keys: Tensor, values: Tensor, scaling: float, valid: Tensor) -> Tensor:
    """One query token per row over a padded cache: query `[B, H, 1, d]`, keys / values `[B, H_kv, m, d]`, valid
    `[B, H_kv, m]` (bool: the slots holding entries; every row and head holds at least one). Returns `[B, H, 1, d]`
    in the query's dtype: softmax attention over the valid slots, as `attention._blockwise_decode_attention` does."""
    batch, num_heads, _, head_dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = num_heads // kv_heads
    group_block = max(16, triton.next_power_of_2(group))
    blocks = triton.cdiv(length, KEYS_BLOCK)
    splits = max(1, min(blocks, triton.cdiv(TARGET_PROGRAMS, batch * kv_heads)))
    keys_per_split = triton.cdiv(blocks, splits) * KEYS_BLOCK
    splits = triton.cdiv(length, keys_per_split)
    grouped = query.reshape(batch, kv_heads, group, head_dim)
    interpreted = not isinstance(_padded_decode_kernel, triton.runtime.JITFunction)
    if interpreted:  # the interpreter multiplies 16-bit tiles as raw integers; fp32 holds them exactly
        grouped, keys, values = grouped.float(), keys.float(), values.float()
    shape = (batch * kv_heads, splits, group_block)
    maxima = torch.empty(shape, dtype=torch.float32, device=query.device)
    sums = torch.empty(shape, dtype=torch.float32, device=query.device)
    accumulated = torch.empty(*shape, head_dim, dtype=torch.float32, device=query.device)
    mask = valid.view(torch.uint8)  # Triton reads bytes
    with _on_device(query):
        _padded_decode_kernel[(batch * kv_heads, splits)](
            grouped, keys, values, mask, accumulated, maxima, sums,
            kv_heads, length, keys_per_split, scaling * LOG2E,
            *grouped.stride(), *keys.stride(), *values.stride(), *mask.stride(),
            GROUP=group, GROUP_BLOCK=group_block, DIM=head_dim, BLOCK_N=KEYS_BLOCK, num_warps=4, num_stages=2,
        )
    best = maxima.amax(dim=1, keepdim=True)
    weights = torch.exp2(maxima - best).nan_to_num_(0.0)  # a range without entries: -inf - max -> weight 0
    output = (accumulated * weights[..., None]).sum(1) / (sums * weights).sum(1)[..., None]
    return output[:, :group].reshape(batch, num_heads, 1, head_dim).to(query.dtype)
