"""The families added after Llama, Qwen2 and Mistral, through evalkv's engine: Qwen3 (RMSNorm on each head's queries
and keys before RoPE) and Phi-3 (fused projections, LongRoPE). Every method case equals the masked full-cache
reference on them, and LongRoPE's two factor sets are handled as evalkv/kv/adapter.py states."""

from __future__ import annotations

import pytest
import torch
from conftest import NEW_ARCHITECTURES, projected_keys, prompt_ids, tiny_model
from method_cases import CASES
from test_equivalence import _assert_equal_logits, _compressed_and_reference

from evalkv.errors import EvalkvError
from evalkv.kv.engine import Engine
from evalkv.kv.view import Phase
from evalkv.methods import build_method
from evalkv.methods.streaming_llm import StreamingLLM

REPEATS = 6  # a 270-token prompt: above every case's budget and above tiny-phi3's LongRoPE switch
STEPS = 4
SWITCH = 128  # tiny-phi3's original_max_position_embeddings
CROSSING = "ignore:a sequence passed this LongRoPE model"  # chunked prefills cross the switch (tested below)


@pytest.mark.filterwarnings(CROSSING)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("architecture", NEW_ARCHITECTURES)
def test_every_method_equals_the_masked_full_cache(architecture, case, tokenizer):
    prompt = prompt_ids(tokenizer, REPEATS)
    _assert_equal_logits(*_compressed_and_reference(architecture, case, tokenizer, prompt, STEPS), STEPS)


def _longrope_inv_freq(model, factors: str) -> torch.Tensor:
    """LongRoPE's inverse frequencies (Phi-3): 1 / (factor_i * theta^(2i/d)), from the config's factors."""
    config = model.config
    dim = config.hidden_size // config.num_attention_heads
    base = config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim)
    return 1.0 / (torch.tensor(config.rope_parameters[f"{factors}_factor"]) * base)


@pytest.mark.parametrize(("repeats", "factors"), [(2, "short"), (REPEATS, "long")])
def test_tiny_phi3_runs_both_longrope_factor_sets(repeats, factors, tokenizer):
    """A prompt ending before position 128 rotates with the short factors, the equivalence prompt with the long ones
    (and the two sets differ), so the tests above exercise the long path."""
    model = tiny_model("tiny-phi3")
    assert model.config.rope_parameters["original_max_position_embeddings"] == SWITCH
    assert not torch.allclose(_longrope_inv_freq(model, "short"), _longrope_inv_freq(model, "long"))
    Engine(model, build_method("full", {})).generate(prompt_ids(tokenizer, repeats), max_new_tokens=1)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, _longrope_inv_freq(model, factors))


class _Unrotating(StreamingLLM):
    """StreamingLLM that undoes RoPE in layer 0 at a decode step: on that step's key, then on every cached key."""

    def after_step(self, view):
        if view.layer_idx == 0 and view.phase is Phase.DECODE and "new_key" not in view.state:
            view.state["new_key"] = view.keys_before_rope(view.length - 1)
            try:
                view.keys_before_rope()
            except EvalkvError as error:
                view.state["refused"] = str(error)
        return super().after_step(view)


def test_longrope_keys_before_rope_undo_the_long_factors(tokenizer):
    """After a long prefill, a decode step's own key unrotates with the long factors (the position-free key it came
    from), while cached keys below the switch, written by an earlier forward, are refused: nothing records whether
    that forward used the long factors too."""
    model = tiny_model("tiny-phi3")
    ids = prompt_ids(tokenizer, REPEATS)
    generation = Engine(model, _Unrotating(budget=24)).generate(ids, max_new_tokens=2, keep_session=True)
    state = generation.session.layer_state[0]
    with torch.inference_mode():
        keys = projected_keys(model, torch.tensor([ids + generation.token_ids[:1]]))
    torch.testing.assert_close(state["new_key"], keys[:, :, -1:], atol=1e-5, rtol=0)
    assert f"positions below {SWITCH}" in state["refused"]


def test_generation_across_the_longrope_switch_warns_and_matches_the_reference(tokenizer):
    """A prompt that ends before the switch and a generation that crosses it: evalkv warns (transformers' generate
    would recompute the cache there) and runs every forward as the model's forward does, which the masked full-cache
    replay of the same forwards reproduces."""
    prompt = prompt_ids(tokenizer, 2)
    steps = SWITCH - len(prompt) + 4
    with pytest.warns(RuntimeWarning, match=f"original_max_position_embeddings \\({SWITCH}\\)"):
        generation, reference = _compressed_and_reference("tiny-phi3", "snapkv", tokenizer, prompt, steps)
    assert int(generation.forwards[-1][1].max()) >= SWITCH > len(prompt)
    _assert_equal_logits(generation, reference, steps)
