"""Random-init architectures built from a config: tiny ones for tests, full-size ones for speed and memory runs.

Throughput and memory do not depend on weight values, so a full-size architecture with random weights measures them
honestly as long as generation length is fixed (EOS ignored); quality numbers need real weights.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from evalkv.errors import unknown_name

# Byte-level tokenizer for random-weight models: one token per UTF-8 byte, built offline, deterministic.
_SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"]
BYTE_VOCAB_SIZE = 256 + len(_SPECIALS)

_TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=BYTE_VOCAB_SIZE, max_position_embeddings=32768, rope_theta=10000.0, initializer_range=0.2,
    tie_word_embeddings=False,
)
# The byte tokenizer's own special ids, for configs whose defaults name ids outside its vocabulary (Phi-3: 32000).
_BYTE_SPECIAL_IDS = {f"{name}_token_id": 256 + _SPECIALS.index(f"<|{name}|>") for name in ("bos", "eos", "pad")}

# Phi-3's LongRoPE on the tiny geometry: per-frequency factors growing with the dimension index, as Phi-3-mini-128k's
# do, and a short original context, so that a forward whose last position is below 128 uses the short factors and
# test prompts of a few hundred tokens the long ones.
_TINY_LONGROPE = dict(
    original_max_position_embeddings=128,
    rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 4.0],
                  "long_factor": [1.0, 1.5, 2.5, 4.0, 8.0, 16.0, 32.0, 64.0]},
)

# Full-size geometries from the models' public config.json files (the configs/model/*.yaml of the real models cite
# them). Llama-3-8B is Meta-Llama-3-8B's geometry; Gradient's 1048k model changes only its RoPE base and length.
_LLAMA_3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, vocab_size=128256, rms_norm_eps=1e-5, tie_word_embeddings=False,
)

ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": ("llama", _TINY),
    "tiny-qwen2": ("qwen2", {**_TINY, "use_sliding_window": False}),
    "tiny-mistral": ("mistral", {**_TINY, "sliding_window": None}),
    # Qwen3: RMSNorm over each head's queries and keys before RoPE (q_norm, k_norm), no qkv bias.
    "tiny-qwen3": ("qwen3", {**_TINY, **_BYTE_SPECIAL_IDS, "use_sliding_window": False}),
    # Phi-3: fused qkv_proj and gate_up_proj, LongRoPE.
    "tiny-phi3": ("phi3", {**_TINY, **_BYTE_SPECIAL_IDS, **_TINY_LONGROPE, "sliding_window": None}),
    "llama-3.1-8b": ("llama", dict(
        _LLAMA_3_8B, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )),
    "llama-3-8b-1m": ("llama", dict(_LLAMA_3_8B, max_position_embeddings=1048576, rope_theta=3580165449.0)),
    "mistral-7b": ("mistral", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=32000, max_position_embeddings=32768,
        rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False,
    )),
    "qwen2.5-0.5b": ("qwen2", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
        use_sliding_window=False, tie_word_embeddings=True,
    )),
    "qwen3-8b": ("qwen3", dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
        rms_norm_eps=1e-6, use_sliding_window=False, tie_word_embeddings=False,
    )),
}


def build_random_model(architecture: str, dtype: torch.dtype, device: torch.device, seed: int):
    """The architecture's model with seeded random weights."""
    if architecture not in ARCHITECTURES:
        raise unknown_name("architecture", architecture, list(ARCHITECTURES), "evalkv list models")
    model_type, overrides = ARCHITECTURES[architecture]
    config = AutoConfig.for_model(model_type, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    for special in _SPECIALS:
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"],
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer
