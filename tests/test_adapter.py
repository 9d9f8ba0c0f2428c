"""The contract between evalkv and transformers (evalkv/kv/adapter.py), on tiny Llama, Qwen2, Mistral, Qwen3 and
Phi-3."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import NEW_ARCHITECTURES, TINY_ARCHITECTURES, projected_keys, prompt_ids, tiny_model

from evalkv.errors import EvalkvError
from evalkv.kv import adapter
from evalkv.kv.engine import Engine
from evalkv.kv.view import Phase
from evalkv.methods import build_method


@pytest.fixture(params=TINY_ARCHITECTURES + NEW_ARCHITECTURES)
def architecture(request) -> str:
    return request.param


def _hf_greedy(model, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding with transformers' own cache and sdpa attention: the ground truth for the full cache."""
    model.set_attn_implementation("sdpa")
    name = adapter.cache_argument(model)  # the model's own name for its cache, in and out
    tokens, logits_seen = [], []
    with torch.inference_mode():
        out = model(torch.tensor([ids]), use_cache=True)
        cache = out[name]
        logits = out.logits[:, -1]
        for _ in range(steps):
            token = int(logits.argmax(-1))
            tokens.append(token)
            logits_seen.append(logits.float())
            out = model(torch.tensor([[token]]), use_cache=True, **{name: cache})
            cache, logits = out[name], out.logits[:, -1]
    return tokens, logits_seen


def test_full_cache_matches_transformers_generation(architecture, tokenizer):
    model = tiny_model(architecture)
    ids = prompt_ids(tokenizer, repeats=4)
    expected_tokens, expected_logits = _hf_greedy(model, ids, steps=6)
    generation = Engine(model, build_method("full", {})).generate(ids, max_new_tokens=6, trace=True)
    assert generation.token_ids == expected_tokens
    for (_, _, logits), expected in zip(generation.forwards, expected_logits):
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_cache_holds_post_rope_keys_at_true_positions(tokenizer):
    """The keys a method sees are the model's keys after RoPE: recomputing k_proj + RoPE at the recorded positions
    reproduces them exactly, also after eviction shrank the cache."""
    model = tiny_model("tiny-llama")
    ids = prompt_ids(tokenizer, repeats=4)
    method = build_method("streaming_llm", {"budget": 40})
    generation = Engine(model, method).generate(ids, max_new_tokens=5, keep_session=True)
    layer0 = generation.session.cache.layers[0]
    sequence = torch.tensor([ids + generation.token_ids[:-1]])
    positions = layer0.positions[0, 0]
    attention = model.model.layers[0].self_attn
    with torch.inference_mode():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(sequence[:, positions]))
        keys = attention.k_proj(hidden).view(1, len(positions), -1, attention.head_dim).transpose(1, 2)
        cos, sin = model.model.rotary_emb(hidden, positions[None, :])
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        _, rotated = apply_rotary_pos_emb(keys, keys, cos, sin)
    torch.testing.assert_close(layer0.keys, rotated, atol=1e-5, rtol=0)
    assert positions[:4].tolist() == [0, 1, 2, 3]
    assert positions[-1].item() == len(ids) + len(generation.token_ids) - 2


def test_prefill_computes_last_position_logits_only(tokenizer):
    model = tiny_model("tiny-qwen2")
    engine = Engine(model, build_method("full", {}))
    generation = engine.generate(prompt_ids(tokenizer, repeats=2), max_new_tokens=1, trace=True)
    assert generation.forwards[0][2].shape == (1, model.config.vocab_size)


def _one_layer_model(model_type: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=300, pad_token_id=0,
                                  **overrides)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", ["mistral", "phi3"])
def test_sliding_window_models_are_refused(model_type):
    model = _one_layer_model(model_type, sliding_window=16)
    with pytest.raises(EvalkvError, match="sliding-window"):
        adapter.install(model)


def test_a_window_wider_than_the_context_is_no_window():
    """Phi-3-mini-128k's config sets sliding_window 262144 over 131072 positions: every layer attends to all."""
    model = _one_layer_model("phi3", sliding_window=1024, max_position_embeddings=512)
    adapter.install(model)
    assert model.config._attn_implementation == adapter.ATTENTION_NAME


def test_attention_outside_a_session_is_an_error(tokenizer):
    model = tiny_model("tiny-llama")
    adapter.install(model)
    with pytest.raises(RuntimeError, match="outside an evalkv session"), torch.inference_mode():
        model(torch.tensor([prompt_ids(tokenizer, 1)]))


def test_the_cache_goes_under_the_name_the_forward_takes_so_nothing_warns(architecture, tokenizer):
    """transformers renamed the forward's `past_key_values=` to `cache=` and warns (FutureWarning) on the old name;
    the adapter reads the name from the forward's signature."""
    model = tiny_model(architecture)
    assert adapter.cache_argument(model) == "cache"  # the installed transformers has the new name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Engine(model, build_method("snapkv", {"budget": 24, "window_size": 4})).generate(
            prompt_ids(tokenizer, repeats=2), max_new_tokens=3)


def test_a_forward_that_takes_past_key_values_gets_it():
    """transformers releases before the rename: the forward's parameter is `past_key_values`."""
    seen = {}

    class OldModel(torch.nn.Module):
        def forward(self, input_ids, position_ids=None, past_key_values=None, use_cache=None, logits_to_keep=0,
                    **kwargs):
            seen.update(cache=past_key_values, store=kwargs["evalkv_store"])
            return type("Output", (), {"logits": torch.zeros(1, 2, 5)})()

    class Cache:
        store = object()

    cache = Cache()
    assert adapter.cache_argument(OldModel()) == "past_key_values"
    assert adapter.forward(OldModel(), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2), cache).shape == (1, 5)
    assert seen == {"cache": cache, "store": cache.store}


def test_keys_before_rope_are_the_models_projected_keys(architecture, tokenizer):
    """`view.keys_before_rope()` undoes RoPE with the model's own table: it equals k_proj of the layer's input,
    position-free, also for entries kept at scattered positions after eviction."""
    from evalkv.methods.streaming_llm import StreamingLLM

    class Recorder(StreamingLLM):
        def after_step(self, view):
            if view.layer_idx == 0 and view.phase is Phase.DECODE:
                view.state["positions"] = view.positions[0, 0].clone()
                view.state["keys"] = view.keys_before_rope()
            return super().after_step(view)

    model = tiny_model(architecture)
    ids = prompt_ids(tokenizer, repeats=2)
    generation = Engine(model, Recorder(budget=24)).generate(ids, max_new_tokens=3, keep_session=True)
    state = generation.session.layer_state[0]
    sequence = torch.tensor([ids + generation.token_ids[:-1]])
    assert state["positions"].tolist() == [0, 1, 2, 3, *range(len(ids) - 19, len(ids) + 2)]
    with torch.inference_mode():
        keys = projected_keys(model, sequence)
    torch.testing.assert_close(state["keys"], keys[:, :, state["positions"]], atol=1e-5, rtol=0)
