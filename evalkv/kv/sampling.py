"""Sampled decoding: temperature, top-k and top-p (nucleus) filtering, one seeded generator per request.

The filters follow transformers' logits warpers in the order `generate` applies them (`_get_logits_processor`:
`TemperatureLogitsWarper`, then `TopKLogitsWarper`, then `TopPLogitsWarper`, each keeping at least one token):
temperature divides the logits; top-k keeps the tokens whose logit is at least the k-th largest (ties at the k-th
value stay); top-p keeps the smallest set of most probable tokens whose probabilities add up to at least p (it sorts
ascending and removes the tokens whose cumulative probability is <= 1 - p; the most probable token always stays).
The token is drawn from the softmax of what remains with `torch.multinomial`, as `generate` draws it, but from the
request's own `torch.Generator`: each row of a batch draws from its own generator, once per step, so a sample's
tokens do not depend on which samples decode beside it, on the decode path, or on the order samples run in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    """How one request samples its tokens (a request without one decodes greedily).

    temperature: divides the logits (> 0; use greedy decoding for 0).
    top_k: keep the k most probable tokens (0: no top-k filter).
    top_p: keep the smallest set of most probable tokens whose probabilities reach p (1.0: no top-p filter).
    seed: seeds the request's generator; the same seed and logits give the same tokens.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (greedy decoding samples nothing), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")

    def generator(self, device: torch.device) -> torch.Generator:
        """A generator on `device` seeded with `seed` (draws are reproducible on one device type)."""
        return torch.Generator(device=device).manual_seed(self.seed)


def filtered_logits(logits: Tensor, sampling: Sampling) -> Tensor:
    """One row's logits `[vocab]` (float32) after temperature, top-k and top-p; removed tokens are -inf."""
    scores = logits.float() / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = torch.sort(scores, descending=False)
        removed = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - sampling.top_p
        removed[-1] = False
        scores = scores.masked_fill(removed.scatter(0, order, removed), float("-inf"))
    return scores


def sample_token(logits: Tensor, sampling: Sampling, generator: torch.Generator) -> Tensor:
    """One token id (a 1-element tensor) drawn from one row's filtered logits with the row's generator."""
    return torch.multinomial(filtered_logits(logits, sampling).softmax(dim=-1), 1, generator=generator)
