"""StreamingLLM: attention sinks plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv.select import keep_sink_and_recent, slot_to_evict
from evalkv.kv.slots import SlotView
from evalkv.methods.base import AttentionView, Method
from evalkv.methods.registry import register


@register("streaming_llm")
@dataclass
class StreamingLLM(Method):
    """StreamingLLM (sink + recent tokens).

    Based on "Efficient Streaming Language Models with Attention Sinks", Xiao et al., ICLR 2024 (arXiv 2309.17453),
    reference code mit-han-lab/streaming-llm@2e50426 (`StartRecentKVCache`).

    Keeps the first `n_sink` tokens and the last `budget - n_sink`; after the prompt's attention and after every
    decode step, so `budget` is a hard cap during generation, the same set for every layer and head.

    Deviations: keys keep their original RoPE positions (as kvpress and the KV-cache papers' one-shot use do); the
    reference re-rotates cached keys with their index in the cache ("pos-shift", needed for unbounded streaming).
    KVCache-Factory's StreamingLLM (its LongBench driver keeps the first C - W tokens and the last W with W = C - 4:
    the same set) compresses the prompt only; this one holds the budget while decoding too, as the paper.

    n_sink: attention-sink tokens always kept (paper: 4).
    """

    n_sink: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_sink < 0:
            raise EvalkvError(f"streaming_llm: n_sink must be >= 0, got {self.n_sink}")
        if self.budget is not None and self.budget <= self.n_sink:
            raise EvalkvError(f"streaming_llm: budget {self.budget} must exceed n_sink {self.n_sink}")

    def compress_prompt(self, view: AttentionView) -> Tensor | None:
        capacity = self.capacity(view.sample.prompt_length)
        if view.length <= capacity:
            return None
        return keep_sink_and_recent(view.length, self.n_sink, capacity - self.n_sink, view.keys.device)

    after_step = compress_prompt

    def evict_slot(self, view: SlotView) -> Tensor:
        """The oldest entry after the sinks (docs/methods.md#the-method-api: a fixed-capacity cache's step)."""
        candidates = view.occupied & (view.positions >= self.n_sink)
        return slot_to_evict(view.positions.float(), view.positions, candidates)[:, :1]
