"""Learned MLP: sinks and a recent window, the rest ranked by a small MLP on each token's key, at every step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv.select import keep_best_and_tail
from evalkv.methods.base import AttentionView, Method
from evalkv.methods.eviction_policy import EvictionPolicy, token_features
from evalkv.methods.registry import register

SCORE = "learned_mlp_score"


@register("learned_mlp")
@dataclass
class LearnedMLP(Method):
    """Learned MLP eviction policy (key-only scores, held to the budget at every step).

    Based on seed 004's `LearnedEvictionPolicy` / `LearnedEvictionCache` (public copy
    suhasramanand/kv-cache-compression@f74221a) with the fixes listed in docs/methods.md#learned_mlp. No paper.

    After each forward (the prompt, then every decode step) the new tokens are scored by the policy's MLP for their
    layer and KV head, from their key before RoPE (position-free, recovered with the model's RoPE table) and, as the
    policy was trained, log(1 + position) and the value's norm; scores are cached with the entries (keys never
    change). When a layer holds more than `budget` entries, each KV head keeps its first `n_sink` and last
    `window_size` entries and the `budget - n_sink - window_size` others with the highest score. `evalkv
    train-policy` trains the policy: its target is the attention mass a prompt token receives from the next N
    generated tokens (full cache), its labels the `--top` most attended per layer and KV head (128 by default, a
    training option apart from the budget), its loss BCE.

    With `prefill_chunk` the prompt is fed in chunks with eviction between them, so prompt tokens see the compressed
    cache: the mode a perplexity evaluation needs (the seed's perplexity scored a whole window in one forward with a
    fresh cache, so eviction never touched the scored tokens).

    Deviations from the seed: one MLP per layer and KV head on that head's key before RoPE (the seed: one MLP for
    all layers on the post-RoPE key averaged over KV heads), no dropout, target and loss as above (the seed: MSE +
    0.1 mean on "H2O score >= layer median" labels from generated tokens only); sinks and the window are reserved
    before ranking (the seed's final `sorted(...)[:budget]` could drop its recent tokens); one selection per KV head
    (the seed: per layer); eviction after the step's attention (the seed: inside `update()`, before it). Ties rank by
    position.

    policy_path: the policy file (safetensors, from `evalkv train-policy`); required, read when a run starts, its
      model geometry checked at the first attention.
    window_size: recent tokens always kept.
    n_sink: first tokens always kept.
    """

    policy_path: Optional[str] = None
    window_size: int = 32
    n_sink: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size < 0 or self.n_sink < 0:
            raise EvalkvError(f"learned_mlp: window_size and n_sink must be >= 0, got {self.window_size}, "
                              f"{self.n_sink}")
        if self.budget is not None and self.budget < self.n_sink + self.window_size:
            raise EvalkvError(f"learned_mlp: budget {self.budget} is smaller than n_sink + window_size "
                              f"({self.n_sink} + {self.window_size})")
        self._policy: EvictionPolicy | None = None  # read by prepare (a plain attribute, not an option)
        self._checked_geometry = None

    def prepare(self, tokenizer) -> None:
        if not self.policy_path:
            raise EvalkvError("learned_mlp needs a policy file: method.policy_path=<policy.safetensors> (train one "
                              "with `evalkv train-policy model=<model> -o policy.safetensors`)")
        self._policy = EvictionPolicy.load(self.policy_path)
        trained_vocab = self._policy.metadata.get("vocab_size")
        if tokenizer is not None and trained_vocab is not None and len(tokenizer) != trained_vocab:
            raise EvalkvError(f"policy {self.policy_path!r} was trained with a {trained_vocab}-token vocabulary, "
                              f"this model's tokenizer has {len(tokenizer)}: train a policy for this model")

    def _policy_for(self, view: AttentionView) -> EvictionPolicy:
        if self._policy is None:
            self.prepare(None)
        if self._checked_geometry != view.geometry:
            self._policy.check_geometry(view.geometry, repr(self.policy_path))
            self._checked_geometry = view.geometry
        if self._policy.feature_mean.device != view.keys.device:
            self._policy.to(view.keys.device)
        return self._policy

    def compress_prompt(self, view: AttentionView) -> Tensor | None:
        policy = self._policy_for(view)
        start = view.length - view.num_new
        features = token_features(view.keys_before_rope(start), view.positions[..., start:],
                                  view.values[..., start:, :], policy.features)
        scores = policy.logits(features, view.layer_idx)
        if start > 0:
            scores = torch.cat([view.cache.extras[SCORE], scores], dim=-1)
        view.cache.extras[SCORE] = scores
        length, capacity = view.length, self.capacity(view.sample.prompt_length)
        if length <= capacity:
            return None
        window = min(self.window_size, capacity)
        candidates = scores[..., : length - window].clone()
        candidates[..., : min(self.n_sink, capacity - window)] = float("inf")  # sinks rank first
        return keep_best_and_tail(candidates, capacity - window, length)

    after_step = compress_prompt  # new tokens are scored and the cache cut after every decode step
