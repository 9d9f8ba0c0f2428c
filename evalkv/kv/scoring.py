"""Per-token log-likelihoods of a text under an eviction method: what perplexity measures with a compressed cache.

A text is fed through one `Session`, forward by forward, exactly as `Engine` drives a prompt and its decode steps
(`session.begin_forward(phase, positions)`, then `adapter.forward`), so every hook of the method runs where it runs
while generating. Two protocols:

- `stream`, the references' protocol (StreamingLLM's `examples/eval_long_ppl.py`, mit-han-lab/streaming-llm@2e50426;
  LaCache's `ppl/run.py`, GATECH-EIC/LaCache@0f27c33): the first token is the prompt (one `Phase.PREFILL` forward,
  `compress_prompt` after it) and every later token is one `Phase.DECODE` forward, after which a method with step
  hooks evicts (streaming_llm, h2o, tova, ...). The token at position i is scored from the logits of the forward that
  fed position i - 1: it attends to exactly the cache the method left, plus itself. A prompt-only method (snapkv,
  pyramidkv, ...) compresses a one-token prompt, i.e. nothing, and its cache then grows like the full cache's: use
  `chunked` for those.
- `chunked`: the whole text is the prompt, fed in chunks of `chunk_size` tokens (`Phase.PREFILL`; the method's
  `prefill_chunk` mechanics), `compress_prompt` after each chunk. Every token of a chunk is scored from that
  forward's logits, so it attends to the compressed past plus the earlier tokens of its own chunk, which eviction
  has not touched yet (it runs after the chunk's attention); a chunk's first token is scored from the previous
  chunk's last position.

`score_tokens` is the one loop under both, and under lm-evaluation-harness's `loglikelihood`
(evalkv/integrations/lm_eval.py): a prompt of `prompt_length` tokens in chunks, then one decode step per later token.
The first token is never scored (nothing predicts it), as in both references.

The pitfall this rules out by construction: scoring windows of a text each with a fresh cache, where eviction never
touches a scored token and every method scores as the full cache. Here one session is made per text before its first
forward and never replaced; every token is fed once, in order, at its true position; and a token's log-likelihood is
read only from the forward that fed its predecessor into that session. There is no window, stride or re-feeding
option. tests/test_perplexity.py checks that a small budget changes the NLL, that a budget covering the text leaves
it exactly the full cache's, and that a hand-written masked reference reproduces streaming_llm's NLL per token.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv import adapter
from evalkv.kv.session import Session
from evalkv.kv.view import Phase


@dataclass
class TokenScores:
    """Log-likelihoods of the tokens at positions `start`, `start + 1`, ... of a text."""

    logprobs: Tensor  # fp32, log p(token i | what the cache held when token i - 1 was fed)
    greedy: Tensor  # bool: token i was the argmax of those logits
    start: int  # position of the first scored token
    prompt_tokens: int  # tokens fed as the prompt (Phase.PREFILL)
    kept_tokens: float  # mean entries per layer and KV head after the last forward
    kv_bytes: int  # bytes of keys and values held then
    prefill_s: float  # the prompt's forwards, eviction included
    decode_s: float  # the decode steps'

    def nll(self) -> list[float]:
        """Negative log-likelihood of every scored token, in position order."""
        return (-self.logprobs).tolist()


class _Collector:
    """Log-probabilities of the scored targets, filled forward by forward."""

    def __init__(self, ids: Tensor, score_from: int):
        self.ids = ids[0]
        self.score_from = score_from
        count = ids.shape[-1] - score_from
        self.logprobs = torch.full((count,), float("nan"), dtype=torch.float32, device=ids.device)
        self.greedy = torch.zeros(count, dtype=torch.bool, device=ids.device)

    def targets(self, start: int, end: int) -> range:
        """The scored positions predicted by a forward over positions `start:end` (each predicts the next one)."""
        return range(max(start + 1, self.score_from), min(end, self.ids.shape[-1] - 1) + 1)

    def add(self, logits: Tensor, targets: range) -> None:
        """`logits [len(targets), vocab]`: row j predicts the token at `targets[j]`."""
        if not targets:
            return
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        tokens = self.ids[targets.start : targets.stop]
        rows = slice(targets.start - self.score_from, targets.stop - self.score_from)
        self.logprobs[rows] = logprobs.gather(-1, tokens[:, None])[:, 0]
        self.greedy[rows] = logprobs.argmax(dim=-1) == tokens


def _forward(engine, session: Session, cache, ids: Tensor, start: int, end: int, phase: Phase, last_chunk: bool,
             collector: _Collector) -> Tensor:
    """Feed positions `start:end` and score what they predict; returns the last position's logits `[1, vocab]`."""
    positions = torch.arange(start, end, device=ids.device)[None, :]
    session.begin_forward(phase, positions, last_chunk)
    targets = collector.targets(start, end)
    every = bool(targets) and targets.start != end  # rows other than the last one are scored
    logits = adapter.forward(engine.model, ids[:, start:end], positions, cache, all_logits=every)
    if every:
        collector.add(logits[0, targets.start - 1 - start : targets.stop - 1 - start], targets)
        return logits[:, -1]
    collector.add(logits, targets)
    return logits


def _prefill(engine, ids: Tensor, prompt_length: int, chunk_size: int | None,
             collector: _Collector) -> tuple[Session, Tensor, float]:
    """A new session holding the compressed prompt `ids[:, :prompt_length]`, the prompt's last logits `[1, vocab]`
    and the seconds it took."""
    adapter.synchronize(ids.device)
    began = time.perf_counter()
    session = Session(engine.method, engine.geometry, ids[:, :prompt_length], backend=engine.backend,
                      rotary=engine.rotary)
    cache = adapter.make_cache(session)
    chunk = chunk_size or engine.method.prefill_chunk or prompt_length
    for start in range(0, prompt_length, chunk):
        end = min(prompt_length, start + chunk)
        logits = _forward(engine, session, cache, ids, start, end, Phase.PREFILL, end == prompt_length, collector)
    adapter.synchronize(ids.device)
    return session, logits, time.perf_counter() - began


def _decode(engine, session: Session, ids: Tensor, first: int, collector: _Collector) -> float:
    """Feed positions `first`, ..., n - 2 one decode step each (the last token predicts nothing); returns seconds."""
    adapter.synchronize(ids.device)
    began = time.perf_counter()
    cache = adapter.make_cache(session)
    for position in range(first, ids.shape[-1] - 1):
        _forward(engine, session, cache, ids, position, position + 1, Phase.DECODE, True, collector)
    adapter.synchronize(ids.device)
    return time.perf_counter() - began


def _as_ids(ids: Sequence[int] | Tensor, device: torch.device) -> Tensor:
    return torch.as_tensor(ids, dtype=torch.long, device=device).reshape(1, -1)


def _result(collector: _Collector, session: Session, prompt_length: int, prefill_s: float,
            decode_s: float) -> TokenScores:
    return TokenScores(collector.logprobs.cpu(), collector.greedy.cpu(), collector.score_from, prompt_length,
                       session.cache.kept_tokens(), session.cache.nbytes, prefill_s, decode_s)


@torch.inference_mode()
def score_tokens(engine, ids: Sequence[int] | Tensor, prompt_length: int | None = None,
                 chunk_size: int | None = None, score_from: int = 1) -> TokenScores:
    """Log-likelihoods of `ids[score_from:]` with `engine`'s model and method (see the module docstring).

    prompt_length: leading tokens fed as the prompt, in chunks of `chunk_size` (default the method's `prefill_chunk`,
        else one forward), `compress_prompt` after each; every later token is one decode step. Default: every token
        (the chunked protocol); 1: the stream protocol.
    score_from: the first position scored (>= 1); forwards before it ask the model for their last logits only.
    """
    ids = _as_ids(ids, engine.device)
    length = ids.shape[-1]
    prompt_length = length if prompt_length is None else prompt_length
    if length < 2 or not 1 <= prompt_length <= length or not 1 <= score_from < length:
        raise EvalkvError(f"scoring needs at least two tokens, a prompt of 1..{length} tokens and a first scored "
                          f"position in 1..{length - 1}; got {length} tokens, prompt_length {prompt_length}, "
                          f"score_from {score_from}")
    collector = _Collector(ids, score_from)
    session, _, prefill_s = _prefill(engine, ids, prompt_length, chunk_size, collector)
    decode_s = _decode(engine, session, ids, prompt_length, collector)
    return _result(collector, session, prompt_length, prefill_s, decode_s)


@torch.inference_mode()
def score_continuations(engine, context: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[TokenScores]:
    """Log-likelihoods of each continuation after one compression of `context` (lm-evaluation-harness's
    loglikelihood): the context is the prompt, compressed as `Engine.generate` compresses one (the method's
    `prefill_chunk` pieces, else one forward); its last logits score each continuation's first token, and the rest
    are fed one decode step per token from the continuation's own copy of the compressed context, so they see what
    greedy generation would have seen had it produced them. `prefill_s` is the context's, shared by all."""
    if not context or not continuations or not all(continuations):
        raise EvalkvError("scoring continuations needs a non-empty context and non-empty continuations")
    length = len(context)
    context_ids = _as_ids(context, engine.device)
    compressed, last, prefill_s = _prefill(engine, context_ids, length, None, _Collector(context_ids, length))
    results = []
    for index, continuation in enumerate(continuations):
        ids = _as_ids([*context, *continuation], engine.device)
        collector = _Collector(ids, length)
        collector.add(last, range(length, length + 1))
        session = compressed if index == len(continuations) - 1 else compressed.fork()
        decode_s = _decode(engine, session, ids, length, collector)
        results.append(_result(collector, session, length, prefill_s, decode_s))
    return results
