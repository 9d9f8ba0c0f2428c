"""The padded-cache decode kernel (evalkv/kv/decode_kernels.py) against fp64 attention and the block-wise path it
replaces on CUDA; in Triton's interpreter without a GPU (`conftest.triton_kernels`)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import triton_kernels

from evalkv.kv import attention

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def kernels():
    return triton_kernels("decode_kernels")


def _padded_layer(batch, num_heads, kv_heads, slots, head_dim, dtype, device, seed):
    """A step over a layer laid out as `LayerCache.pad_heads` does: each (row, KV head) holds a prefix of its own
    length, padding up to the layer's longest head, then the entries decode steps appended (valid for all)."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, num_heads, 1, head_dim, generator=generator)
    keys, values = (torch.randn(batch, kv_heads, slots, head_dim, generator=generator) for _ in range(2))
    appended = 7
    held = torch.randint(1, slots - appended, (batch, kv_heads), generator=generator)
    held[0, 0] = slots - appended  # the longest head
    if kv_heads > 1:
        held[0, 1] = 1  # one entry, then whole blocks of padding
    index = torch.arange(slots)
    valid = (index < held[..., None]) | (index >= slots - appended)
    return query.to(device, dtype), keys.to(device, dtype), values.to(device, dtype), valid.to(device)


def _exact(query, keys, values, scaling, valid):
    """fp64 softmax attention over the valid slots."""
    batch, num_heads, _, head_dim = query.shape
    kv_heads = keys.shape[1]
    grouped = query.double().reshape(batch, kv_heads, num_heads // kv_heads, head_dim)
    logits = (grouped @ keys.double().transpose(-1, -2)) * scaling
    probs = torch.softmax(logits.masked_fill(~valid[:, :, None, :], float("-inf")), dim=-1)
    return (probs @ values.double()).reshape(batch, num_heads, 1, head_dim)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch, num_heads, kv_heads, slots, head_dim", [(2, 8, 2, 300, 32), (1, 4, 4, 130, 16),
                                                                         (3, 6, 2, 64, 64)])
def test_kernel_equals_softmax_attention_over_the_valid_slots(kernels, device, dtype, batch, num_heads, kv_heads,
                                                              slots, head_dim):
    """Grouped and ungrouped heads (3 query heads per KV head: rows of the 16-row tile left empty), ragged blocks
    of 64 slots, heads of one entry before whole blocks of padding: the kernel gives fp64 attention over the valid
    slots within the output's rounding, and the block-wise path's output within two of its roundings."""
    query, keys, values, valid = _padded_layer(batch, num_heads, kv_heads, slots, head_dim, dtype, device, slots)
    scaling = head_dim**-0.5
    output = kernels.padded_decode_attention(query, keys, values, scaling, valid)
    assert output.dtype == dtype and output.shape == (batch, num_heads, 1, head_dim)
    exact = _exact(query, keys, values, scaling, valid)
    rounding = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert ((output.double() - exact).abs() <= rounding * (exact.abs() + 1)).all()
    blockwise = attention._decode_attention(query, keys, values, scaling, valid)
    torch.testing.assert_close(output, blockwise, atol=4 * rounding, rtol=4 * rounding)


def test_ranges_without_entries_and_padding_that_is_not_a_number_leave_the_output_alone(kernels, device):
    """One row and head: the 512 slots split into ranges of 64, the entries only in the last one, and NaN in every
    padding slot's key and value: the empty ranges weigh nothing and no padding value reaches the output (the
    block-wise path multiplies NaN values by zero probabilities and returns NaN, so its reference here has zeros
    there)."""
    query, keys, values, _ = _padded_layer(1, 4, 1, 512, 32, torch.bfloat16, device, 3)
    valid = torch.zeros(1, 1, 512, dtype=torch.bool, device=device)
    valid[..., 450:470] = True
    padded_keys, padded_values = keys.masked_fill(~valid[..., None], float("nan")), values.masked_fill(
        ~valid[..., None], float("nan"))
    output = kernels.padded_decode_attention(query, padded_keys, padded_values, 0.25, valid)
    assert torch.isfinite(output).all()
    exact = _exact(query, keys.masked_fill(~valid[..., None], 0), values.masked_fill(~valid[..., None], 0), 0.25,
                   valid)
    assert ((output.double() - exact).abs() <= 2.0**-8 * (exact.abs() + 1)).all()


def test_padded_caches_decode_through_the_kernel_where_kernels_serve_and_its_probe_agrees(kernels, device,
                                                                                          monkeypatch):
    """`attend` with `valid` (eager padded layers and the static buffers' padded layers alike) takes the kernel for
    16-bit caches where the kernels serve and its probe (once per geometry) agrees with the block-wise path; fp32,
    the kernels switched off, and a kernel whose probe disagrees keep the block-wise path."""
    query, keys, values, valid = _padded_layer(2, 8, 2, 200, 32, torch.bfloat16, device, 5)
    monkeypatch.setenv(attention.KERNELS_ENV, "0")
    blockwise = attention.attend(query, keys, values, 0.2, valid=valid)
    monkeypatch.delenv(attention.KERNELS_ENV)
    serve = attention.kernels_serve
    monkeypatch.setattr(attention, "kernels_serve", lambda tensor: serve(tensor) or (  # on the CPU: as on a GPU
        not tensor.is_cuda and os.environ.get(attention.KERNELS_ENV) != "0"))
    monkeypatch.setattr(attention, "_kernel_verdicts", {})
    calls = []
    padded = kernels.padded_decode_attention
    monkeypatch.setattr(kernels, "padded_decode_attention", lambda *args: calls.append(1) or padded(*args))
    output = attention.attend(query, keys, values, 0.2, valid=valid)
    assert len(calls) == 2  # the probe, then the step
    torch.testing.assert_close(output, blockwise, atol=0.02, rtol=0.02)
    attention.attend(query, keys, values, 0.2, valid=valid)
    attention.attend(query.float(), keys.float(), values.float(), 0.2, valid=valid)
    monkeypatch.setenv(attention.KERNELS_ENV, "0")
    attention.attend(query, keys, values, 0.2, valid=valid)
    assert len(calls) == 3  # one more step; no second probe, no fp32, nothing with the kernels off
    monkeypatch.delenv(attention.KERNELS_ENV)

    monkeypatch.setattr(attention, "_kernel_verdicts", {})
    monkeypatch.setattr(kernels, "padded_decode_attention", lambda *args: calls.append(1) or 2 * padded(*args))
    assert torch.equal(attention.attend(query, keys, values, 0.2, valid=valid), blockwise)
    assert len(calls) == 4  # its probe only


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_kernel_on_the_8b_geometry_at_a_long_padded_cache(kernels):
    """Llama-3.1-8B's decode geometry (32 query / 8 KV heads, d = 128), 64K slots of which two heads hold all and the
    others 2,048 (catekv's layout at 64K): the kernel's output equals fp64 attention within bf16 rounding."""
    query, keys, values, _ = _padded_layer(1, 32, 8, 65536, 128, torch.bfloat16, "cuda", 11)
    held = torch.full((1, 8), 2048, device="cuda")
    held[0, :2] = 65536
    valid = torch.arange(65536, device="cuda") < held[..., None]
    output = kernels.padded_decode_attention(query, keys, values, 128**-0.5, valid)
    exact = _exact(query, keys, values, 128**-0.5, valid)
    assert ((output.double() - exact).abs() <= 2.0**-8 * (exact.abs() + 1)).all()
