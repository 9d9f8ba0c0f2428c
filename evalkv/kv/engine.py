"""Greedy generation with an eviction method: prefill (one forward or chunks), optional suffix, decode steps.

Prefill asks the model for the last position's logits only; every forward passes the tokens' true positions, so
RoPE positions never shift after eviction (specs/methods.md §0.5).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from evalkv.kv import adapter
from evalkv.kv.session import Session
from evalkv.kv.view import Phase
from evalkv.methods.base import Method


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens, a final stop token included
    prompt_tokens: int  # prompt + suffix tokens fed before decoding
    kept_tokens: float  # mean entries per layer and KV head once the prompt was processed
    kv_bytes: int  # bytes of keys and values held at that moment
    final_kept_tokens: float  # the same after the last decode step
    final_kv_bytes: int
    prefill_s: float  # prompt (and suffix) forwards, eviction included, up to the first token
    decode_s: float
    trace: list | None = None  # Session.trace when asked for
    forwards: list | None = None  # with trace: (input ids, positions, last logits) of every forward
    session: Session | None = None  # kept when asked for (tests inspect the cache)


class Engine:
    """Runs one model with one method; `generate` handles one prompt (batch of one)."""

    def __init__(self, model, method: Method, backend: str = "sdpa", tokenizer=None):
        adapter.install(model)
        method.prepare(tokenizer)
        self.model = model
        self.method = method
        self.backend = backend
        self.geometry = adapter.geometry(model)
        self.rotary = adapter.rotary(model)
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: Sequence[int] | Tensor,
        max_new_tokens: int,
        stop_token_ids: Sequence[int] = (),
        suffix_ids: Sequence[int] | Tensor | None = None,
        trace: bool = False,
        keep_session: bool = False,
        min_new_tokens: int = 0,
    ) -> Generation:
        """Greedy tokens after `prompt_ids` (compressed by the method) and `suffix_ids` (fed after compression).

        Generation stops after a stop token or `max_new_tokens`; stop tokens are masked out of the first
        `min_new_tokens` choices (HF generate's `min_length`, which LongBench uses on samsum).
        """
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=self.device).reshape(1, -1)
        suffix = None
        if suffix_ids is not None and len(suffix_ids) > 0:
            suffix = torch.as_tensor(suffix_ids, dtype=torch.long, device=self.device).reshape(1, -1)
        session = Session(self.method, self.geometry, prompt, backend=self.backend, trace=trace, rotary=self.rotary)
        cache = adapter.make_cache(session)
        stops = set(int(t) for t in stop_token_ids)
        masked = torch.tensor(sorted(stops), dtype=torch.long, device=self.device) if min_new_tokens and stops else None
        forwards = [] if trace else None

        def choose(logits: Tensor, generated: int) -> int:
            if masked is not None and generated < min_new_tokens:
                logits = logits.index_fill(-1, masked, float("-inf"))
            return int(logits.argmax(dim=-1)[0])

        def step(ids: Tensor, start: int, phase: Phase, last_chunk: bool = True) -> Tensor:
            positions = torch.arange(start, start + ids.shape[-1], device=self.device)[None, :]
            session.begin_forward(phase, positions, last_chunk)
            logits = adapter.forward(self.model, ids, positions, cache)
            if forwards is not None:
                forwards.append((ids, positions, logits.float().clone()))
            return logits

        with adapter.activated(session):
            adapter.synchronize(self.device)
            began = time.perf_counter()
            length = prompt.shape[-1]
            chunk = self.method.prefill_chunk_size() or length
            for start in range(0, length, chunk):
                end = min(length, start + chunk)
                logits = step(prompt[:, start:end], start, Phase.PREFILL, last_chunk=end == length)
            if suffix is not None:
                logits = step(suffix, length, Phase.SUFFIX)
                length += suffix.shape[-1]
            token = choose(logits, 0)
            adapter.synchronize(self.device)
            prefill_s = time.perf_counter() - began
            kept_tokens, kv_bytes = session.cache.kept_tokens(), session.cache.nbytes

            generated = [token]
            began = time.perf_counter()
            while len(generated) < max_new_tokens and token not in stops:
                fed = torch.tensor([[token]], device=self.device)
                logits = step(fed, length + len(generated) - 1, Phase.DECODE)
                token = choose(logits, len(generated))
                generated.append(token)
            adapter.synchronize(self.device)
            decode_s = time.perf_counter() - began

        return Generation(
            token_ids=generated,
            prompt_tokens=length,
            kept_tokens=kept_tokens,
            kv_bytes=kv_bytes,
            final_kept_tokens=session.cache.kept_tokens(),
            final_kv_bytes=session.cache.nbytes,
            prefill_s=prefill_s,
            decode_s=decode_s,
            trace=session.trace,
            forwards=forwards,
            session=session if keep_session else None,
        )
