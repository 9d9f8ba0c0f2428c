#!/usr/bin/env python3
"""SDPA's backends on a causal bf16 prompt of the Llama-3.1-8B attention geometry (32 query / 8 KV heads, d = 128)
at 8K, 16K and 32K tokens: which kernel SDPA picks by default (from the profiler), and the time and TFLOP/s of the
flash, cuDNN and memory-efficient backends each (five runs after one warm-up), then whether the flash operator that
`attention.attend_with_row_lse` calls takes grouped heads. Needs a CUDA GPU (docs/performance.md, issue 21).

    python3 scripts/sdpa_backends.py
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

RUNS = 5


def _attention(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _milliseconds(q, k, v) -> float:
    _attention(q, k, v)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(RUNS):
        _attention(q, k, v)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / RUNS


def main() -> None:
    torch.manual_seed(0)
    for n in (8192, 16384, 32768):
        q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        flops = 4 * n * n * 128 * 32 / 2  # causal: half of the two products
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _attention(q, k, v)
            torch.cuda.synchronize()
        names = sorted({event.name[:90] for event in prof.events() if event.device_type.name == "CUDA"})
        print(n, "default picks:", names[:3])
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            try:
                with sdpa_kernel([backend]):
                    ms = _milliseconds(q, k, v)
                print(f"  {backend.name}: {ms:.2f} ms, {flops / ms / 1e9:.0f} TFLOP/s")
            except Exception as error:  # noqa: BLE001 (a backend that refuses the inputs is a result)
                print(f"  {backend.name}: {str(error).splitlines()[0][:150]}")
        if n == 32768:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, scale=128**-0.5)[:2]
            print("  aten flash op with GQA:", tuple(out.shape), tuple(lse.shape), lse.dtype)


if __name__ == "__main__":
    main()
