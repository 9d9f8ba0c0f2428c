"""How a text is fed to be scored under an eviction method (evalkv/kv/scoring.py runs it): the protocol's names
and options, apart from the scoring loop so that tasks and reports read them without importing torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from evalkv.errors import EvalkvError

if TYPE_CHECKING:
    from torch import Tensor

    from evalkv.kv.scoring import TokenScores

STREAM, CHUNKED = "stream", "chunked"
PROTOCOLS = (STREAM, CHUNKED)
DEFAULT_CHUNK = 512  # chunked protocol's tokens per forward when neither the caller nor the method sets one


@dataclass(frozen=True)
class Protocol:
    """How a text is fed to be scored: `stream` (a one-token prompt, then one decode step per token) or `chunked`
    (the whole text as the prompt in chunks of `chunk_size`; default the method's `prefill_chunk`, else
    DEFAULT_CHUNK). evalkv/kv/scoring.py's docstring describes both."""

    name: str = STREAM
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.name not in PROTOCOLS:
            raise EvalkvError(f"unknown perplexity protocol {self.name!r}; known: {', '.join(PROTOCOLS)}")
        if self.chunk_size is not None and (self.name != CHUNKED or self.chunk_size < 1):
            raise EvalkvError(f"chunk_size applies to the chunked protocol and is a positive number of tokens; got "
                              f"{self.chunk_size} with protocol {self.name}")

    def chunk(self, method) -> int | None:
        """Tokens per prompt forward for this method (None: the stream protocol's one-token prompt)."""
        return None if self.name == STREAM else self.chunk_size or method.prefill_chunk or DEFAULT_CHUNK

    def score(self, engine, ids: Sequence[int] | Tensor) -> TokenScores:
        """Every token of `ids` but the first."""
        from evalkv.kv.scoring import score_tokens

        if self.name == STREAM:
            return score_tokens(engine, ids, prompt_length=1)
        return score_tokens(engine, ids, chunk_size=self.chunk(engine.method))
