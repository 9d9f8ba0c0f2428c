"""The typed model config (configs/model/*.yaml extend it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelConfig:
    """A model to load.

    source: `hub` (path = hub id or local folder of safetensors), `gguf` (path = a .gguf file), `embedded` (the
    default small model, from the `evalkv[model]` part packages), `random` (architecture = a preset; random weights).
    max_prompt_length: LongBench's middle-truncation length for this model (model2maxlen).
    chat_template_kwargs: variables every chat prompt is rendered with, as `apply_chat_template(..., **kwargs)` and
    vLLM's `chat_template_kwargs` pass them (Qwen3: `{enable_thinking: false}`); the loader fixes them in the template.
    attn_implementation: the attention kernel evalkv runs inside its hook: sdpa, eager or flash_attention_2.
    device_map: spread one model's layers over the host's GPUs (a model larger than one GPU) with one of accelerate's
    strategies, `auto`, `balanced`, `balanced_low_0` or `sequential`, instead of placing it on `device`.
    """

    name: str = "unnamed"
    source: str = "hub"
    path: Optional[str] = None
    tokenizer: Optional[str] = None
    revision: Optional[str] = None
    architecture: Optional[str] = None
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    device_map: Optional[str] = None
    attn_implementation: str = "sdpa"
    max_prompt_length: Optional[int] = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False
