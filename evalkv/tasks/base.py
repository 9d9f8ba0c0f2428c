"""What a task is: deterministic samples (token ids ready to feed, answers, metadata) and the benchmark task name
that picks the metric. Tasks register by name; each one's Hydra config is generated from its dataclass
(evalkv/config.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from evalkv.errors import EvalkvError
from evalkv.kv.scoring import Protocol


@dataclass
class Sample:
    id: str  # stable across runs: resuming skips ids already recorded
    task: str  # the benchmark's task name (picks the metric), e.g. "passkey", "hotpotqa", "niah_single_1"
    prompt_ids: list[int]  # fed (and compressed) before decoding
    answers: list[str]
    max_new_tokens: int
    suffix_ids: list[int] | None = None  # fed after the prompt was compressed (query-agnostic mode)
    all_classes: list[str] | None = None
    length: int | str | None = None  # the dataset's length field (LongBench v2: its bucket); synthetic: prompt tokens
    stop_token_ids: list[int] = field(default_factory=list)  # besides the model's end-of-turn tokens
    min_new_tokens: int = 0  # stop tokens cannot be generated before this many tokens (HF generate's min_length)
    metadata: dict[str, Any] = field(default_factory=dict)  # written into the record (context_length, depth, ...)
    # A second prompt made from this one's decoded output (LongBench v2's chain of thought), or None for none. It is
    # generated with the full cache (it holds no context to compress); its output is the record's `pred`, its
    # metadata joins the record's.
    follow_up: Callable[[str], Sample | None] | None = None
    scoring: Protocol | None = None  # set: the prompt's tokens are scored (perplexity) instead of generating after it


@dataclass
class Task:
    """Base of every task config. n_samples caps how many samples a run takes (in the task's order)."""

    n_samples: Optional[int] = None

    name: ClassVar[str] = ""
    # Options that neither name the run directory nor must match when a run resumes (data locations, caps).
    free_options: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if self.n_samples is not None and self.n_samples < 1:
            raise EvalkvError(f"task {self.name}: n_samples must be >= 1 (or null for all), got {self.n_samples}")

    def samples(self, model) -> Iterator[Sample]:
        """Every sample of the task for this model (a `evalkv.models.loader.LoadedModel`), in a fixed order."""
        raise NotImplementedError

    def size(self) -> int | None:
        """How many samples `samples` yields, when known without building them (for progress bars)."""
        return None
