"""What a task is: deterministic samples (token ids ready to feed, answers, metadata) and the benchmark task name
that picks the metric. Tasks register by name; each one's Hydra config is generated from its dataclass
(evalkv/config.py).

Every task takes `compress` (the run's `compress=` fills it): `prompt` compresses the whole prompt, question
included, as the KV-cache papers evaluate; `context` compresses the context alone and feeds the question (with the
answer cue and the chat template's closing) after it without eviction, as kvpress's leaderboard evaluates. A task
honours it by yielding `suffix_ids` exactly when `splits_question` (`LoadedModel.encode_parts` / `encode_rendered`
cut one tokenization of the whole prompt, so the parts concatenate to the `prompt` protocol's ids).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from evalkv.errors import EvalkvError
from evalkv.kv.protocol import Protocol

if TYPE_CHECKING:  # tasks load without torch: reports read them
    from evalkv.kv.sampling import Sampling


@dataclass
class Sample:
    id: str  # stable across runs: resuming skips ids already recorded
    task: str  # the benchmark's task name (picks the metric), e.g. "passkey", "hotpotqa", "niah_single_1"
    prompt_ids: list[int]  # fed (and compressed) before decoding
    answers: list[str]
    max_new_tokens: int
    suffix_ids: list[int] | None = None  # compress=context: the question, fed after prompt_ids were compressed
    all_classes: list[str] | None = None
    length: int | str | None = None  # the dataset's length field (LongBench v2: its bucket); synthetic: prompt tokens
    stop_token_ids: list[int] = field(default_factory=list)  # besides the model's end-of-turn tokens
    min_new_tokens: int = 0  # stop tokens cannot be generated before this many tokens (HF generate's min_length)
    sampling: Sampling | None = None  # sampled decoding with its own seed (reasoning tasks); None: greedy
    metadata: dict[str, Any] = field(default_factory=dict)  # written into the record (context_length, depth, ...)
    # A second prompt made from this one's decoded output (LongBench v2's chain of thought), or None for none. It is
    # generated with the full cache (it holds no context to compress); its output is the record's `pred`, its
    # metadata joins the record's.
    follow_up: Callable[[str], Sample | None] | None = None
    scoring: Protocol | None = None  # set: the prompt's tokens are scored (perplexity) instead of generating after it

    def shares_context(self, other: Sample) -> bool:
        """Whether both are questions about one context (compressed once when they run together)."""
        return self.suffix_ids is not None and other.suffix_ids is not None and self.prompt_ids == other.prompt_ids


# What `compress=` takes: which part of each prompt the method compresses.
COMPRESS = {
    "prompt": "the whole prompt, question included (the KV-cache papers' protocol)",
    "context": "the context alone; the question follows without eviction (kvpress's protocol)",
}


@dataclass
class Task:
    """Base of every task config. n_samples caps how many samples a run takes (in the task's order); compress: which
    part of each prompt the method compresses (COMPRESS; the run's `compress=` sets it)."""

    n_samples: Optional[int] = None
    compress: str = "prompt"

    name: ClassVar[str] = ""
    # Options that neither name the run directory nor must match when a run resumes (data locations, caps).
    free_options: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if self.n_samples is not None and self.n_samples < 1:
            raise EvalkvError(f"task {self.name}: n_samples must be >= 1 (or null for all), got {self.n_samples}")
        if self.compress not in COMPRESS:
            raise EvalkvError(f"compress={self.compress!r}: expected one of "
                              + "; ".join(f"{name} ({meaning})" for name, meaning in COMPRESS.items()))

    @property
    def splits_question(self) -> bool:
        """compress=context: samples carry the question apart (`Sample.suffix_ids`)."""
        return self.compress == "context"

    def samples(self, model) -> Iterator[Sample]:
        """Every sample of the task for this model (a `evalkv.models.loader.LoadedModel`), in a fixed order."""
        raise NotImplementedError

    def size(self) -> int | None:
        """How many samples `samples` yields, when known without building them (for progress bars)."""
        return None
