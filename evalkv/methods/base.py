"""What a method is: a dataclass of hyper-parameters that looks at one layer's attention and says what to keep.

The engine owns the cache surgery. A method implements `before_attention` and/or `after_attention`; each receives an
`AttentionView` of one layer in one forward pass and returns the indices of the cache entries to keep
(`[batch, heads, k]`, heads = 1 for one set shared by all heads, the KV-head count, or the query-head count for
query-head granularity), or a list with one 1-D index tensor per head when heads keep different numbers of entries
(batch size 1), or None to keep everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv.view import AttentionView, ModelGeometry, Phase, SampleState

__all__ = ["AttentionView", "Method", "ModelGeometry", "Phase", "SampleState", "require_choice"]


@dataclass
class Method:
    """Base of every eviction method.

    budget: tokens kept per head per layer, observation window included, as the papers count.
    compression_ratio: alternatively, the fraction of the prompt to evict (budget = int(n * (1 - ratio))).
    """

    budget: Optional[int] = None
    compression_ratio: Optional[float] = None

    name: ClassVar[str] = ""
    needs_budget: ClassVar[bool] = True
    # True when the cache is held to the budget during decoding too (H2O, TOVA, StreamingLLM); False when only the
    # prompt is compressed and generated tokens are appended. A method whose options decide it (kmeans'
    # cluster_every) overrides it with a property: read it from an instance.
    evicts_while_decoding: ClassVar[bool] = False
    # False when a decode-time hook reads per-sample data beyond the cache entries, their extras and
    # `decode_group_key` without keeping it in `view.state` (state already rules batched decoding out).
    batch_decoding: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.budget is not None and self.compression_ratio is not None:
            raise EvalkvError(f"{self.name}: give budget or compression_ratio, not both")
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget <= 0):
            raise EvalkvError(
                f"{self.name}: budget must be a positive number of tokens per head per layer, got {self.budget!r}"
            )
        if self.compression_ratio is not None and not 0.0 <= self.compression_ratio < 1.0:
            raise EvalkvError(f"{self.name}: compression_ratio must be in [0, 1), got {self.compression_ratio!r}")
        if self.requires_budget() and self.budget is None and self.compression_ratio is None:
            raise EvalkvError(
                f"method {self.name!r} needs a budget: add budget=<tokens per head per layer> "
                "(e.g. budget=128) or compression_ratio=<0..1>"
            )

    def requires_budget(self) -> bool:
        return self.needs_budget

    def capacity(self, prompt_length: int) -> int:
        """Entries per head per layer this method may keep for a prompt of `prompt_length` tokens."""
        if self.budget is not None:
            return self.budget
        if self.compression_ratio is not None:
            return max(1, int(prompt_length * (1.0 - self.compression_ratio)))
        return prompt_length

    def decode_group_key(self, prompt_length: int):
        """What decode steps read of the prompt length; samples decode as one batch only when it is equal."""
        return self.capacity(prompt_length)

    def prepare(self, tokenizer) -> None:
        """Called once before a run with the model's tokenizer (for methods that derive token sets from it)."""

    def prefill_chunk_size(self) -> int | None:
        """Feed the prompt in chunks of this many tokens, evicting between chunks (None: one forward)."""
        return None

    def before_attention(self, view: AttentionView) -> Tensor | None:
        return None

    def after_attention(self, view: AttentionView) -> Tensor | None:
        return None

    def describe(self) -> str:
        """Short label for run directories and tables: `snapkv_128`, `snapkv_r0.5`, `full`."""
        if not self.needs_budget:
            return self.name
        if self.budget is not None:
            return f"{self.name}_{self.budget}"
        return f"{self.name}_r{self.compression_ratio:g}"


def require_choice(method: str, option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise EvalkvError(f"{method}: {option} must be one of {', '.join(choices)}, got {value!r}")
