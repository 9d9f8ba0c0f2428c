"""The property that pins eviction semantics (docs/methods.md#shared-masked-reference): with any method, every
forward's logits over the compressed cache equal those of a full-cache forward in which the keys the method evicted are
masked out."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny_model
from method_cases import CASES, method_name

from evalkv.kv.engine import Engine
from evalkv.kv.reference import masked_reference_logits
from evalkv.methods import build_method


def _compressed_and_reference(architecture: str, case: str, tokenizer, prompt: list[int] | None = None,
                              max_new_tokens: int = 8):
    """A traced generation with the method of `case` (default prompt: `prompt_ids`) and its masked full-cache logits."""
    model = tiny_model(architecture)
    method = build_method(method_name(case), CASES[case])
    engine = Engine(model, method, tokenizer=tokenizer)
    generation = engine.generate(prompt or prompt_ids(tokenizer), max_new_tokens=max_new_tokens, trace=True)
    forwards = [ids for ids, _, _ in generation.forwards]
    positions = [pos for _, pos, _ in generation.forwards]
    reference = masked_reference_logits(model, forwards, positions, generation.trace)
    return generation, reference


def _assert_equal_logits(generation, reference, max_new_tokens: int = 8) -> None:
    assert len(generation.forwards) == len(reference) >= max_new_tokens
    for (_, _, logits), expected in zip(generation.forwards, reference):
        torch.testing.assert_close(logits, expected.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_compressed_logits_equal_masked_full_cache(architecture, case, tokenizer):
    _assert_equal_logits(*_compressed_and_reference(architecture, case, tokenizer))


@pytest.mark.parametrize("case", ["snapkv", "h2o", "streaming_llm"])
def test_masking_matters(case, tokenizer):
    """The equivalence above is not vacuous: unmasking the evicted keys changes the logits."""
    generation, _ = _compressed_and_reference("tiny-llama", case, tokenizer)
    model = tiny_model("tiny-llama")
    everything = [
        [torch.arange(int(pos[0, -1]) + 1)[None, None, :]] * model.config.num_hidden_layers
        for _, pos, _ in generation.forwards
    ]
    unmasked = masked_reference_logits(
        model, [ids for ids, _, _ in generation.forwards], [pos for _, pos, _ in generation.forwards], everything
    )
    assert (generation.forwards[-1][2] - unmasked[-1].float()).abs().max() > 1e-2
