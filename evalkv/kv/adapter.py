"""The one module that knows transformers' internals.

transformers >= 5 routes every attention call through `AttentionInterface` and every cache write through
`Cache.update`. evalkv registers an attention function named "evalkv" and passes a `Cache` whose layers store into
a `Session` (or a `StaticDecoder`); with those two seams a method sees, for every layer of every model family that
uses the interface (Llama, Qwen2, Mistral, ...), the queries, the keys and values after RoPE and the attention
output, and the cache it shrinks is the one the model reads. No model class is patched.

Contract pinned by tests/test_adapter.py on tiny Llama, Qwen2, Mistral, Qwen3 and Phi-3 configs:
- the forward takes the cache as `cache=` (earlier transformers 5 releases: `past_key_values=`, which later ones
  accept with a deprecation warning on every call; `install` reads the name from the model's forward signature);
- the model calls the cache's `update(key, value, layer_idx)` with post-RoPE keys, then the attention function
  with `module.layer_idx`, the query after RoPE, `scaling=` and the forward's extra keyword arguments (evalkv passes
  the store as `evalkv_store=`: no global state, which torch.compile could not trace); it returns `[B, q, H, d]`;
- explicit `position_ids` set RoPE positions (so positions stay true after eviction);
- an attention implementation absent from the mask registry gets `attention_mask=None` (no n x n mask is built);
- `logits_to_keep=1` computes the last position's logits only (`0`: every position's);
- the decoder's `rotary_emb` is called once per forward, and its frequencies (`inv_freq`, `attention_scaling`) after
  that call are the ones that rotated the forward's queries and keys.

LongRoPE (Phi-3): transformers picks the short or the long factors per forward, long when the forward's last
position reaches `original_max_position_embeddings` (`longrope_frequency_update`); vLLM and SGLang also pick them per
forward batch. A sequence whose first forward ends before that length and a later one after it (a prompt fed in
chunks, or generation across it) holds keys of both sets. transformers' `generate` then recomputes the whole cache
(`Phi3ForCausalLM.prepare_inputs_for_generation`), which a compressed cache cannot do: evalkv runs each forward as
the model's forward does, and warns.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer

from evalkv.errors import EvalkvError
from evalkv.kv.rope import RotaryTable
from evalkv.kv.view import ModelGeometry

ATTENTION_NAME = "evalkv"


def _evalkv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, evalkv_store=None,
                      **kwargs):
    if evalkv_store is None:
        raise RuntimeError("the evalkv attention ran outside an evalkv session; use evalkv.kv.engine.Engine")
    output = evalkv_store.attention(module.layer_idx, query, scaling if scaling is not None else module.scaling)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, _evalkv_attention)


class _StoreLayer(DynamicLayer):
    """A cache layer whose storage is evalkv's: a `Session`'s shrinking `LayerCache`, or a
    `StaticDecoder`'s fixed-size buffer (CUDA-graph decoding). The store has `append` and `layer_length`."""

    def __init__(self, store, layer_idx: int):
        super().__init__()
        self._store, self._layer_idx = store, layer_idx

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._store.append(self._layer_idx, key_states, value_states)

    def get_seq_length(self) -> int:
        return self._store.layer_length(self._layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


class _StoreCache(Cache):
    """The model's cache; `store` (a `Session` or `StaticDecoder`) keeps what each layer adds and attends."""

    def __init__(self, store):
        super().__init__(layers=[_StoreLayer(store, i) for i in range(store.geometry.num_layers)])
        self.store = store


def make_cache(store, dtype: torch.dtype | None = None, device: torch.device | None = None) -> Cache:
    """The cache passed to `forward`: `store` (a `Session` or `StaticDecoder`) keeps what each layer adds.

    dtype, device: initialise the layers now rather than at the first update, so that a compiled step sees the same
    cache at every call (a flag that flips after the first call would recompile it)."""
    cache = _StoreCache(store)
    if dtype is not None:
        for layer in cache.layers:
            layer.dtype, layer.device, layer.is_initialized = dtype, device, True
    return cache


def _text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def geometry(model) -> ModelGeometry:
    config = _text_config(model)
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return ModelGeometry(
        num_layers=config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
    )


def rotary(model) -> RotaryTable | None:
    """The model's RoPE table, `positions [B, m] -> (cos, sin) [B, m, head_dim]` fp32, or None if it has none.

    Llama, Qwen2, Mistral, Qwen3, Phi-3 and most families keep one `rotary_emb` on the decoder, called once per forward
    with the hidden states (read for their dtype and device only) and the position ids. The table is computed from the
    embedding's frequencies as the model's latest forward left them, without the per-call update of
    `dynamic_rope_update`: for LongRoPE, the factor set that rotated the running forward's keys. Keys of earlier
    forwards are refused there when they may have been rotated with the other set (see `_check_longrope_positions`).
    """
    embedding = getattr(model.get_decoder(), "rotary_emb", None)
    if embedding is None:
        return None
    compute = getattr(type(embedding).forward, "__wrapped__", None)  # the forward without dynamic_rope_update
    switch = _longrope_switch(_text_config(model))

    def table(positions: Tensor) -> tuple[Tensor, Tensor]:
        if switch is not None:
            _check_longrope_positions(embedding, positions, switch)
        probe = torch.empty(0, dtype=torch.float32, device=positions.device)
        with torch.no_grad():
            cos, sin = compute(embedding, probe, positions) if compute else embedding(probe, positions)
        return cos.float(), sin.float()

    return table


def output_projections(model) -> list[Tensor | None]:
    """Each decoder layer's attention output projection weight `[hidden, heads * head_dim]` (`self_attn.o_proj`, as
    Llama, Qwen2, Mistral, Qwen3 and Phi-3 name it), or None where a layer has none (CriticalKV reads it)."""
    projections = []
    for layer in model.get_decoder().layers:
        projection = getattr(getattr(layer, "self_attn", None), "o_proj", None)
        projections.append(getattr(projection, "weight", None))
    return projections


def _longrope_switch(config) -> int | None:
    """For a LongRoPE model (Phi-3), the length from which a forward uses the long factors; None for other RoPE."""
    parameters = getattr(config, "rope_parameters", None) or {}
    if parameters.get("rope_type") != "longrope":
        return None
    return parameters.get("original_max_position_embeddings") or config.original_max_position_embeddings


def _check_longrope_positions(embedding, positions: Tensor, switch: int) -> None:
    """Refuse a LongRoPE table for keys whose factor set is unknown.

    The running forward uses the long factors when its last position reaches `switch`. Its own keys, and every key at
    a position >= `switch`, were rotated with them; a key below `switch` that an earlier forward wrote was rotated
    with the long factors only if that forward already reached `switch`, which nothing records."""
    current = getattr(embedding, "_evalkv_positions", None)
    if current is None:
        raise RuntimeError("the RoPE table of a LongRoPE model is read during a forward (adapter.forward)")
    if int(current.max()) + 1 <= switch:
        return  # a short forward: every earlier forward of the sequence ended earlier, so it was short too
    current = current.to(positions.device)
    first_new = current[:, :1] if current.shape[0] == positions.shape[0] else current.min()
    if bool(((positions < switch) & (positions < first_new)).any()):
        raise EvalkvError(
            f"cannot undo RoPE on keys of earlier forwards at positions below {switch} for this LongRoPE model: "
            "transformers picks the short or long factors per forward, so they may have been rotated with either. "
            "Undo RoPE on the running forward's keys (view.keys_before_rope(start) with start at the new entries) and "
            "keep what you need from them"
        )


def _sliding_window_layers(config) -> bool:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return "sliding_attention" in layer_types
    window = getattr(config, "sliding_window", None)  # Mistral, Phi-3: one window for every layer
    return window is not None and window < config.max_position_embeddings


def install(model) -> None:
    """Route the model's attention through evalkv; raise a clear error for models the engine cannot serve."""
    config = model.config
    if _sliding_window_layers(config):
        raise EvalkvError(
            f"{config.model_type} model with sliding-window attention layers is not supported: evalkv's cache "
            "serves full-attention layers only (set the config's sliding_window to null if the model allows it)"
        )
    if not getattr(model, "_supports_attention_backend", False):
        raise EvalkvError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface, "
            "so evalkv cannot hook it (supported: Llama, Qwen2, Mistral and other families that do)"
        )
    if config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
    model._evalkv_cache_argument = cache_argument(model)
    model._evalkv_longrope_switch = _longrope_switch(_text_config(model))


def cache_argument(model) -> str:
    """The name under which the model's forward takes the cache: `cache`, or `past_key_values` in the transformers
    releases before the rename."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def chunk_mlp(model, tokens: int | None) -> None:
    """Run each decoder layer's MLP over at most `tokens` positions at a time (None: in one piece).

    A long prefill's MLP intermediate (`n x intermediate_size`, three of them in a gated MLP) is its largest
    activation; the MLP is position-wise, so chunking changes memory, not what is computed (bf16 kernels may
    round differently for a different row count). The layer's forward is wrapped on the instance, once.
    """
    if tokens is not None and tokens < 1:
        raise EvalkvError(f"the MLP chunk must be a positive number of tokens, got {tokens}")
    layers = model.get_decoder().layers
    if tokens is None and not any(hasattr(getattr(layer, "mlp", None), "_evalkv_forward") for layer in layers):
        return
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            raise EvalkvError(f"{type(layer).__name__} has no `mlp` module; MLP chunking cannot serve this model")
        if not hasattr(mlp, "_evalkv_forward"):
            mlp._evalkv_forward = mlp.forward
            mlp.forward = _chunked_forward(mlp)
        mlp._evalkv_chunk = tokens


def _chunked_forward(mlp):
    def forward(hidden: Tensor) -> Tensor:
        chunk = mlp._evalkv_chunk
        if chunk is None or hidden.dim() != 3 or hidden.shape[1] <= chunk:
            return mlp._evalkv_forward(hidden)
        return torch.cat([mlp._evalkv_forward(hidden[:, i : i + chunk]) for i in range(0, hidden.shape[1], chunk)],
                         dim=1)

    return forward


def forward(model, input_ids: Tensor, positions: Tensor, cache: Cache, all_logits: bool = False) -> Tensor:
    """One forward pass over `input_ids` at true `positions` (`cache` from `make_cache`: its store attends); returns
    the last position's logits `[B, vocab]`, or with `all_logits` every position's `[B, q, vocab]` (scoring a text)."""
    # both read in `install`, not here: a compiled step must not trace `inspect` or the config
    switch = getattr(model, "_evalkv_longrope_switch", None)
    if switch is not None and not _capturing():
        _note_longrope_forward(model, positions, switch)
    name = getattr(model, "_evalkv_cache_argument", None) or cache_argument(model)
    output = model(input_ids=input_ids, position_ids=positions, use_cache=True, logits_to_keep=0 if all_logits else 1,
                   evalkv_store=cache.store, **{name: cache})
    return output.logits if all_logits else output.logits[:, -1, :]


def _capturing() -> bool:
    """Whether this call is being traced (torch.compile) or captured (CUDA graph): no host reads of device values."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _note_longrope_forward(model, positions: Tensor, switch: int) -> None:
    """Keep the forward's positions for `rotary`'s table; warn when it switches a sequence to the long factors."""
    embedding = getattr(model.get_decoder(), "rotary_emb", None)
    if embedding is not None:
        embedding._evalkv_positions = positions
    first_new = positions[:, 0]
    if int(positions.max()) + 1 > switch and bool(((first_new > 0) & (first_new <= switch)).any()):
        warnings.warn(
            f"a sequence passed this LongRoPE model's original_max_position_embeddings ({switch}) after its first "
            "forward: its earlier keys keep the short-factor rotation and the new ones use the long factors (each "
            "forward as the model's forward runs it; transformers' generate would recompute the whole cache here, "
            "which a compressed cache cannot do). Results for such prompts differ from generate's",
            RuntimeWarning, stacklevel=3,
        )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
