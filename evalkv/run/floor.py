"""The physical floor of a workload that `evalkv bench --workload` times: the least time the device could take, from
its measured peak matmul rate (FLOP/s) and copy bandwidth (bytes/s).

Prefill counts compute. A prompt of n tokens costs 2 x (the decoder's linear weights) x n FLOPs (every token is
multiplied by every linear layer; the embedding lookup is no matmul), plus 2 x (the LM head's weights) once (the
engine asks for the last position's logits only, `adapter.forward`), plus causal attention's
2 x 2 x layers x query heads x head_dim x n(n+1)/2 (QK^T and the weighted sum of values over the n(n+1)/2 query-key
pairs). prefill floor = the samples' FLOPs / peak rate.

Decode counts bytes read. A sample of m new tokens takes m - 1 decode steps (its first token comes from the prefill's
logits). Samples decode in batches of `batch_size` consecutive samples, in sample order as the bench sends them to
`Engine.generate_batch`. A batch's step reads the decode weights once (every weight but an input embedding that the
LM head does not share, of which a step reads one row per sample), for as many steps as its longest sample; at its
step j (1 .. m - 1) a sample still decoding reads its cache,

    K0 + (K1 - K0) j / (m - 1) bytes,

the line from its KV bytes after prefill K0 to those after its last step K1, both as the run measured them
(`Generation.kv_bytes`, `final_kv_bytes`). The line is exact for a cache that grows by one token a step (the full
cache, methods that compress the prompt only) and for one held at its budget (methods that evict every step, with the
prompt over the budget); where such a cache grows until it reaches its budget, the line lies under its true size, so
the floor stays a floor. decode floor = the bytes / copy bandwidth.

The floor is for the configured batch size, whether or not the method decoded its samples together (per-sample state,
or, on the eager path, the full cache's rows of different lengths, decode one at a time); `all_together_decode_floor_s`
is the decode floor if every sample decoded in one batch.
Left out, so the floor stays under what any run can reach: decode's compute, prefill's memory traffic, the method's
scoring and eviction, and writing the new keys and values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """What the floor needs to know of a model."""

    linear_parameters: int  # weights of the decoder's linear layers (attention projections, MLP)
    lm_head_parameters: int
    layers: int
    query_heads: int
    head_dim: int
    decode_weight_bytes: int  # what a decode step reads: every weight but an input embedding the LM head does not share


@dataclass(frozen=True)
class SampleCost:
    """One sample as the run measured it."""

    prompt_tokens: int
    new_tokens: int
    kv_bytes: int  # after prefill
    final_kv_bytes: int  # after the last decode step


def prefill_flops(architecture: Architecture, prompt_tokens: int) -> int:
    attention_pairs = prompt_tokens * (prompt_tokens + 1) // 2
    attention = 2 * 2 * architecture.layers * architecture.query_heads * architecture.head_dim * attention_pairs
    return 2 * architecture.linear_parameters * prompt_tokens + 2 * architecture.lm_head_parameters + attention


def kv_bytes_read(sample: SampleCost) -> float:
    """The cache bytes a sample's decode steps read: the sum over j = 1 .. s of K0 + (K1 - K0) j / s, s = m - 1."""
    steps = sample.new_tokens - 1
    if steps < 1:
        return 0.0
    return steps * sample.kv_bytes + (sample.final_kv_bytes - sample.kv_bytes) * (steps + 1) / 2


def decode_bytes(architecture: Architecture, samples: Sequence[SampleCost], batch_size: int) -> float:
    """Weights once per step of each batch of `batch_size` consecutive samples (as many steps as its longest sample),
    plus every sample's cache at each of its steps."""
    weight_reads = sum(max(sample.new_tokens - 1 for sample in samples[start : start + batch_size])
                       for start in range(0, len(samples), batch_size))
    return weight_reads * architecture.decode_weight_bytes + sum(kv_bytes_read(sample) for sample in samples)


def workload_floor(architecture: Architecture, samples: Sequence[SampleCost], batch_size: int, peak_flops: float,
                   copy_bandwidth: float) -> dict:
    """The floor block of a workload row: the rates it used, prefill FLOPs, decode bytes and their times in seconds."""
    flops = sum(prefill_flops(architecture, sample.prompt_tokens) for sample in samples)
    read = decode_bytes(architecture, samples, batch_size)
    together = decode_bytes(architecture, samples, len(samples))
    return {
        "peak_flops": peak_flops, "copy_bandwidth": copy_bandwidth, "batch_size": batch_size,
        "decode_weight_bytes": architecture.decode_weight_bytes,
        "prefill_flops": flops, "prefill_floor_s": flops / peak_flops,
        "decode_bytes": round(read), "decode_floor_s": read / copy_bandwidth,
        "floor_s": flops / peak_flops + read / copy_bandwidth,
        "all_together_decode_floor_s": together / copy_bandwidth,
    }
