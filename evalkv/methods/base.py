"""What a method is: a dataclass of hyper-parameters that looks at one layer's attention and says what to keep.

The engine owns the cache surgery and calls a method's hooks around each layer's attention; a method says what it
does by the hooks it implements (docs/methods.md#the-method-api), and the engine derives the rest from them:

- `compress_prompt(view)`: after the attention of the prompt (of each chunk when `prefill_chunk` is set);
- `before_step(view)` / `after_step(view)`: before / after the attention of every later forward (the question fed
  after a query-agnostic compression, then each decode step).

A method without step hooks only appends while decoding, so its samples may decode through fixed-size buffers
replayed as CUDA graphs; one with step hooks decodes eagerly, unless its hook acts only every few steps and can
catch up on the steps in between at once (`segment_steps`: a scorer cutting every `decode_interval` steps).
Batching needs no per-sample state: a method keeps
what must travel with the kept entries in `view.cache.extras` (gathered and batched with the entries) and anything
else about a sample in `view.state` (this layer) or `view.sample.state` (every layer); either keeps that sample out
of a decode batch, unless the method sets `batched_state`: its `view.state` then holds only tensors whose first
dimension is the batch row, which samples in lockstep may hold side by side (a scorer's buffered decode queries,
evalkv/methods/scorer.py). Options are dataclass fields, fixed once built; `prepare` may load run-wide resources.

A method that compresses the prompt only may also prune key channels (ThinK, docs/methods.md#think): with
`key_channel_ratio` set, `select_key_channels(view)` runs after the prompt's last `compress_prompt` and names the
channels each head keeps of the kept entries' keys; the engine frees the others (evalkv/kv/channels.py).

A hook returns the indices of the cache entries to keep (`[batch, heads, k]`, heads = 1 for one set shared by all
heads, the KV-head count, or the query-head count for query-head granularity), or a list with one 1-D index tensor
per head when heads keep different numbers of entries (batch size 1), or None to keep everything. A hook that a
method's options switch off is set to None on the instance (`self.after_step = None`), which the engine reads the
same way as a hook never written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Optional, Protocol, Union

from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv.channels import KeyChannels, choose_key_channels
from evalkv.kv.view import AttentionView, ModelGeometry, Phase, SampleState

__all__ = ["AttentionView", "Keep", "Method", "ModelGeometry", "Phase", "PromptReplay", "SampleState",
           "check_key_channels",
           "require_choice"]

Keep = Optional[Union[Tensor, list[Tensor]]]
Hook = Callable[[AttentionView], Keep]


class PromptReplay(Protocol):
    """What `Method.rescore_prompt` receives (the engine's side of it: docs/methods.md#the-method-api).

    `run(ids, score)` is one forward of `ids` (`[1, q]` token ids) at the positions after the prompt's, against the
    sample's cache as the prompt left it. In every layer, after the attention, `score(view)` is called with the
    replayed tokens' queries and the cache holding the prompt's entries followed by the q replayed ones; the replayed
    entries are dropped afterwards, so the cache is as before. No other hook runs, nothing is traced, and the forward
    counts in the sample's prefill time. Returns each layer's `score(view)`, in layer order.
    """

    prompt_ids: Tensor  # [1, n]
    geometry: ModelGeometry

    def run(self, ids: Tensor, score: Callable[[AttentionView], Tensor]) -> list[Tensor]: ...


@dataclass
class Method:
    """Base of every eviction method.

    budget: tokens kept per head per layer, observation window included, as the papers count.
    compression_ratio: alternatively, the fraction of the prompt to evict (budget = int(n * (1 - ratio))).
    prefill_chunk: feed the prompt in chunks of this many tokens and run `compress_prompt` after each chunk, so later
        prompt tokens attend to the compressed past (None: the prompt in one forward).
    key_channel_ratio: ThinK: the fraction of key channels each head drops from the kept prompt entries' keys once
        the prompt is compressed (`int(head_dim * ratio)` channels; 0: none). Methods that compress the prompt only.
    key_channel_window: ThinK's observation window: the last prompt queries that score the channels (reference: 32).
    key_channel_recent: the newest prompt entries whose keys keep every channel (reference: 32; kvpress: 0).
    """

    budget: Optional[int] = None
    compression_ratio: Optional[float] = None
    prefill_chunk: Optional[int] = None
    key_channel_ratio: float = 0.0
    key_channel_window: int = 32
    key_channel_recent: int = 32

    name: ClassVar[str] = ""
    needs_budget: ClassVar[bool] = True
    # Whether `view.state` holds only batch-major tensors (dim 0: the batch row), the same for every row that has
    # decoded as many steps: samples then decode as one batch, their state rows stacked (`Session.merge`).
    batched_state: ClassVar[bool] = False
    # Whether `compress_prompt` passes `view.row_lse` to the scoring functions (`attention_column_sums(row_lse=)`):
    # the prompt's attention then runs where it returns each row's log-sum-exp too, which the fused scoring kernels
    # would otherwise compute in a first pass of their own.
    reads_row_lse: ClassVar[bool] = False
    # The hooks; None = not implemented (see the module docstring).
    compress_prompt: ClassVar[Optional[Hook]] = None
    before_step: ClassVar[Optional[Hook]] = None
    after_step: ClassVar[Optional[Hook]] = None
    # After the prompt's forwards: what each layer keeps (one Keep per layer), given a PromptReplay.
    rescore_prompt: ClassVar[Optional[Callable[[PromptReplay], list[Keep]]]] = None

    def __post_init__(self) -> None:
        if self.budget is not None and self.compression_ratio is not None:
            raise EvalkvError(f"{self.name}: give budget or compression_ratio, not both")
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget <= 0):
            raise EvalkvError(
                f"{self.name}: budget must be a positive number of tokens per head per layer, got {self.budget!r}"
            )
        if self.compression_ratio is not None and not 0.0 <= self.compression_ratio < 1.0:
            raise EvalkvError(f"{self.name}: compression_ratio must be in [0, 1), got {self.compression_ratio!r}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise EvalkvError(f"{self.name}: prefill_chunk must be a positive number of tokens (or null), got "
                              f"{self.prefill_chunk!r}")
        if not 0.0 <= self.key_channel_ratio < 1.0 or self.key_channel_window < 1 or self.key_channel_recent < 0:
            raise EvalkvError(f"{self.name}: need key_channel_ratio in [0, 1), key_channel_window >= 1 and "
                              f"key_channel_recent >= 0, got {self.key_channel_ratio!r}, {self.key_channel_window!r}, "
                              f"{self.key_channel_recent!r}")
        if self.key_channel_ratio == 0:
            self.select_key_channels = None
        if self.requires_budget() and self.budget is None and self.compression_ratio is None:
            raise EvalkvError(
                f"method {self.name!r} needs a budget: add budget=<tokens per head per layer> "
                "(e.g. budget=128) or compression_ratio=<0..1>"
            )

    def select_key_channels(self, view: AttentionView) -> Optional[KeyChannels]:
        """ThinK's channel choice for the layer of `view` after the prompt's last `compress_prompt`: each head's kept
        channels, scored by the last `key_channel_window` prompt queries over the kept entries' keys; the newest
        `key_channel_recent` entries keep every channel. None on the instance when `key_channel_ratio` is 0."""
        cache = view.cache
        keys = [head.keys for head in cache.heads] if cache.is_ragged else [cache.keys]
        kept = choose_key_channels(view.query[:, :, -self.key_channel_window :], keys, self.key_channel_ratio)
        return None if kept is None else KeyChannels(kept, self.key_channel_recent)

    @property
    def acts_while_decoding(self) -> bool:
        """Whether a hook runs around decode steps (derived from the hooks, as the engine derives it)."""
        return self.before_step is not None or self.after_step is not None

    def requires_budget(self) -> bool:
        return self.needs_budget

    def capacity(self, prompt_length: int) -> int:
        """Entries per head per layer this method may keep for a prompt of `prompt_length` tokens."""
        if self.budget is not None:
            return self.budget
        if self.compression_ratio is not None:
            return max(1, int(prompt_length * (1.0 - self.compression_ratio)))
        return prompt_length

    def segment_steps(self, sample: SampleState) -> Optional[int]:
        """How many decode forwards from where `sample` stands may run with no step hook, the method's `after_step`
        then running once over all of them (its view's query holding every forward's query, their entries already in
        the cache) with the same effect as once after each: such steps only append, so they run over fixed-size
        buffers replayed as CUDA graphs (evalkv/kv/graphs.py, `SegmentDecoder`). None (the default): the hook must
        run after every step. A scorer cutting every few steps answers the forwards up to its next cut."""
        return None

    def segment_queries(self) -> Optional[int]:
        """How many of a segment's newest queries `after_step` reads when it catches up (`segment_steps`); the
        buffers keep only those (None: all)."""
        return None

    def decodes_padded(self) -> bool:
        """Whether rows of prompts shorter than the capacity may decode as one batch padded to the longest (padding
        entries at position -1, which attention masks): the method's step hooks then read a padded batch row by row,
        each over its own entries, and decide for every row what it would decide alone. No unless a method says so
        (a scorer cutting every few steps, evalkv/methods/scorer.py)."""
        return False

    def decode_group_key(self, prompt_length: int):
        """What decode steps read of the prompt length; samples decode as one batch only when it is equal."""
        return self.capacity(prompt_length)

    def prepare(self, tokenizer) -> None:
        """Called once before a run with the model's tokenizer (for methods that derive token sets from it)."""

    def describe(self) -> str:
        """Short label for run directories and tables: `snapkv_128`, `snapkv_r0.5`, `full`."""
        if not self.needs_budget:
            return self.name
        if self.budget is not None:
            return f"{self.name}_{self.budget}"
        if self.compression_ratio is not None:
            return f"{self.name}_r{self.compression_ratio:g}"
        return self.name  # a method whose options need no budget (sink_recent_uniform's stride mode)

    def budget_label(self) -> str | None:
        """The run's budget in tables: `128`, `r0.5`, or None for a method that keeps no budget (`full`)."""
        if not self.requires_budget():
            return None
        return str(self.budget) if self.budget is not None else f"r{self.compression_ratio:g}"


def check_key_channels(method: Method) -> None:
    """Refuse key channel pruning on a method that evicts or re-reads its keys while decoding (a step hook), once its
    options are final (subclasses switch hooks off after `Method.__post_init__`)."""
    if method.select_key_channels is None or not (method.acts_while_decoding or method.rescore_prompt is not None):
        return
    hooks = [name for name in ("before_step", "after_step", "rescore_prompt") if getattr(method, name) is not None]
    raise EvalkvError(
        f"{method.name}: key_channel_ratio (ThinK) prunes the channels of the prompt's keys once the prompt is "
        f"compressed, so it needs a method that compresses the prompt only; {method.name} with these options also "
        f"acts after it ({', '.join(hooks)}). Use a prompt-only method (e.g. snapkv, pyramidkv, adakv, knorm, "
        "expected_attention, or think for the full cache), drop its decoding-time options (decode_interval, "
        "cluster_every, decode_evict), or drop key_channel_ratio."
    )


def require_choice(method: str, option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise EvalkvError(f"{method}: {option} must be one of {', '.join(choices)}, got {value!r}")
