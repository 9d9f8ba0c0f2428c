"""The physical floor of a workload (evalkv/run/floor.py), checked against numbers worked out here step by step
rather than with the module's closed forms."""

from __future__ import annotations

import pytest
from conftest import tiny_model

from evalkv.run.bench import model_architecture, weight_bytes
from evalkv.run.floor import Architecture, SampleCost, decode_bytes, kv_bytes_read, prefill_flops, workload_floor

TINY = Architecture(linear_parameters=10, lm_head_parameters=7, layers=2, query_heads=3, head_dim=4,
                    decode_weight_bytes=1000)


def test_prefill_flops_count_every_token_the_last_logits_and_causal_pairs():
    # 5 tokens: 2 FLOPs per linear weight per token (100), the LM head once (14), and per layer and query head each
    # of the 1 + 2 + 3 + 4 + 5 query-key pairs costs 4 multiply-adds for QK^T and 4 for the value sum (8 x 2 FLOPs).
    pairs = sum(range(1, 6))
    assert pairs == 15
    assert prefill_flops(TINY, 5) == 100 + 14 + 2 * 3 * pairs * 16


def test_decode_reads_weights_once_a_step_per_batch_and_each_cache_every_step():
    # A: 4 new tokens = 3 decode steps, its cache 100 -> 130 bytes: it reads 110, 120, 130.
    # B: 2 new tokens = 1 step, 50 -> 55 bytes: it reads 55.
    first, second = SampleCost(10, 4, 100, 130), SampleCost(10, 2, 50, 55)
    assert kv_bytes_read(first) == 110 + 120 + 130 and kv_bytes_read(second) == 55
    # Together: 3 steps of weights (B leaves after the first); apart: 3 + 1.
    assert decode_bytes(TINY, [first, second], batch_size=2) == 3 * 1000 + 360 + 55
    assert decode_bytes(TINY, [first, second], batch_size=1) == 4 * 1000 + 360 + 55


def test_batches_are_consecutive_samples_in_order():
    # Batches of 2: (4 new, 2 new) then (9 new): 3 + 8 steps of weights; (4, 9) then (2) would be 8 + 1.
    samples = [SampleCost(1, 4, 0, 0), SampleCost(1, 2, 0, 0), SampleCost(1, 9, 0, 0)]
    assert decode_bytes(TINY, samples, batch_size=2) == (3 + 8) * 1000


def test_one_new_token_reads_nothing_while_decoding():
    assert kv_bytes_read(SampleCost(10, 1, 100, 100)) == 0
    assert decode_bytes(TINY, [SampleCost(10, 1, 100, 100)], batch_size=1) == 0


def test_a_cache_that_fills_its_budget_is_under_counted_never_over():
    # Prompt 6 tokens of 10 bytes, budget 8 tokens, 5 steps: the cache holds 7, 8, 8, 8, 8 tokens at the steps.
    true_bytes = sum(10 * min(6 + step, 8) for step in range(1, 6))
    line = kv_bytes_read(SampleCost(6, 6, 60, 80))
    assert line < true_bytes
    # Growing without a cap (the full cache), the line is exact.
    assert kv_bytes_read(SampleCost(6, 6, 60, 110)) == sum(10 * (6 + step) for step in range(1, 6))


def test_workload_floor_adds_prefill_compute_and_decode_bytes():
    samples = [SampleCost(5, 4, 100, 130), SampleCost(5, 2, 50, 55)]
    floor = workload_floor(TINY, samples, batch_size=1, peak_flops=100.0, copy_bandwidth=10.0)
    prefill = 2 * (100 + 14 + 2 * 3 * 15 * 16)
    assert floor["prefill_flops"] == prefill and floor["prefill_floor_s"] == pytest.approx(prefill / 100)
    assert floor["decode_bytes"] == 4415 and floor["decode_floor_s"] == pytest.approx(441.5)
    assert floor["floor_s"] == pytest.approx(prefill / 100 + 441.5)
    assert floor["all_together_decode_floor_s"] == pytest.approx(341.5)  # 3 steps of weights instead of 4
    assert (floor["peak_flops"], floor["copy_bandwidth"], floor["batch_size"]) == (100.0, 10.0, 1)


def test_architecture_of_the_tiny_llama():
    # hidden 64, 4 query heads and 2 KV heads of 16, MLP 128, 2 layers, the byte vocabulary, an untied LM head.
    model = tiny_model()
    per_layer = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * (64 * 128)  # q, k and v, o, gate up and down
    vocab = model.config.vocab_size
    architecture = model_architecture(model)
    assert architecture.linear_parameters == 2 * per_layer
    assert architecture.lm_head_parameters == vocab * 64
    assert (architecture.layers, architecture.query_heads, architecture.head_dim) == (2, 4, 16)
    # A decode step reads every weight but the input embedding, of which it looks up one row.
    assert architecture.decode_weight_bytes == weight_bytes(model) - vocab * 64 * 4
