"""DuoAttention: retrieval heads keep the whole prompt, streaming heads only its first and most recent tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv.attention import reduce_query_heads, repeat_kv
from evalkv.kv.rope import RotaryTable, rotate_half
from evalkv.kv.select import keep_sink_and_recent
from evalkv.methods.base import AttentionView, Keep, Method
from evalkv.methods.registry import register

ON_THE_FLY = "on_the_fly"
PATTERN_FILE = "full_attention_heads.tsv"
# kvpress's on-the-fly mode (`duo_attention_on_the_fly`, `DuoAttentionPress.post_init_from_model`): the mean query
# and key repeated at this many positions; its fixed sink and recent sizes.
ON_THE_FLY_POSITIONS = 500
ON_THE_FLY_SIZES = (128, 256)
_QUERY_SUM, _QUERY_COUNT, _SCORES, _STREAMING, _CUT = "query_sum", "query_count", "duo_scores", "duo_streaming", "cut"
_BLOCK = 4096  # positions un-rotated at a time (bounded memory on long prompts)


def read_pattern(path: str | Path) -> tuple[Tensor, Optional[int], Optional[int]]:
    """The authors' head pattern (mit-han-lab/duo-attention `attn_patterns/<model>/<run>/`): `full_attention_heads.tsv`,
    one row per layer and one tab-separated gate per KV head, clipped to [0, 1] as `load_attn_pattern` does, and the
    `sink_size` / `recent_size` of the `config.json` beside it (None where there is none). `path`: the folder or the
    .tsv file. Returns (gates `[L, H_kv]` float64, sink, recent)."""
    path = Path(path).expanduser()
    table = path / PATTERN_FILE if path.is_dir() else path
    try:
        rows = [line.split("\t") for line in table.read_text().splitlines() if line.strip()]
        gates = torch.tensor([[float(cell) for cell in row] for row in rows], dtype=torch.float64)
    except (OSError, ValueError, RuntimeError) as error:
        raise EvalkvError(f"duo_attention: cannot read the head pattern {table} ({error}); expected the authors' "
                          f"{PATTERN_FILE}: one row per layer, one tab-separated gate per KV head") from None
    if gates.ndim != 2 or gates.numel() == 0:
        raise EvalkvError(f"duo_attention: {table} must hold rows of equal length (layers x KV heads)")
    config = table.parent / "config.json"
    sizes = json.loads(config.read_text()) if config.is_file() else {}
    return gates.clamp(0, 1), sizes.get("sink_size"), sizes.get("recent_size")


def streaming_heads(scores: Tensor, ratio: float, threshold: Optional[float]) -> Tensor:
    """Which heads stream (bool, the shape of `scores`): those under `threshold` (the authors' deployment), else the
    `round(ratio * heads)` lowest scores of all layers together (kvpress), ties going to the earlier layer and head."""
    if threshold is not None:
        return scores < threshold
    count = round(scores.numel() * ratio)
    lowest = torch.sort(scores.flatten(), stable=True).indices[:count]
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[lowest] = True
    return mask.view(scores.shape)


def sum_before_rope(states: Tensor, positions: Tensor, rotary: RotaryTable) -> Tensor:
    """Sum over tokens of queries or keys `[B, h, m, d]` rotated at `positions` `[B, m]` (the same for every head), with
    RoPE undone (`evalkv/kv/rope.py`'s inverse), block by block: `[B, h, d]` fp32."""
    total = torch.zeros(*states.shape[:2], states.shape[-1], dtype=torch.float32, device=states.device)
    for start in range(0, states.shape[2], _BLOCK):
        cos, sin = (part[:, None] for part in rotary(positions[:, start : start + _BLOCK]))
        block = states[:, :, start : start + _BLOCK].float()
        total += ((block * cos - rotate_half(block) * sin) / (cos * cos + sin * sin)).sum(dim=2)
    return total


def on_the_fly_scores(mean_query: Tensor, mean_key: Tensor, rotary: RotaryTable, scaling: float,
                      length: int = ON_THE_FLY_POSITIONS) -> Tensor:
    """kvpress's on-the-fly head score: the mean query `[B, H, d]` and mean key `[B, H_kv, d]` (before RoPE) repeated
    at positions `0 .. length-1`; the last query's attention over those keys; the mean of its cumulative sum (the
    area under the cumulative attention curve: high when a head reads far back), averaged over each KV head's query
    heads. Returns `[B, H_kv]` fp32."""
    batch, heads, _ = mean_query.shape
    cos, sin = rotary(torch.arange(length, device=mean_query.device)[None, :])
    query = mean_query.float() * cos[:, -1:] + rotate_half(mean_query.float()) * sin[:, -1:]
    keys = mean_key.float()[:, :, None, :]
    keys = keys * cos[:, None] + rotate_half(keys) * sin[:, None]  # [B, H_kv, length, d]
    keys = repeat_kv(keys, heads // mean_key.shape[1])
    weights = torch.softmax(torch.einsum("bhd,bhmd->bhm", query, keys) * scaling, dim=-1)
    return reduce_query_heads(weights.cumsum(dim=-1).mean(dim=-1), mean_key.shape[1])


@register("duo_attention")
@dataclass
class DuoAttention(Method):
    """DuoAttention (retrieval heads keep the prompt, streaming heads its sinks and recent tokens; prompt only).

    Based on "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads", Xiao et al.,
    ICLR 2025 (arXiv 2410.10819), reference code mit-han-lab/duo-attention@03dca84 (`load_attn_pattern`,
    `sparsify_attention_heads`, `DuoAttentionStaticKVCache`) and kvpress's `DuoAttentionPress` (0.5.5);
    docs/methods.md#duo_attention.

    Each KV head of each layer is a retrieval head or a streaming head. After the prompt's attention, retrieval heads
    keep every entry and streaming heads their first `sink_size` and last `recent_size`; generated tokens are appended
    to every head. Heads keep different numbers of entries and the cache stores them per head (batch size 1).

    Which heads stream: `patterns` names the authors' trained gates (`full_attention_heads.tsv`, or its folder, whose
    `config.json` gives the sink and recent sizes), or `on_the_fly`: kvpress's experimental score from the mean query
    and key of each layer (`on_the_fly_scores`), computed here from the prompt itself (kvpress averages it over 50
    BookSum chapters, which needs the hub). The `round(head_compression_ratio * heads)` lowest-scoring heads of the
    whole model stream (kvpress), or, with `threshold`, those whose gate is under it (the authors' deployment).
    On the fly, a layer's heads are known only once every layer has scored the prompt, so the cut happens before the
    first forward after the prompt (the first generated token still comes from the whole prompt, as for every method).

    Deviations: streaming heads grow by the generated tokens (as kvpress; the authors' cache keeps them at
    `sink_size + recent_size` while decoding too); keys keep their positions (the authors' streaming attention too);
    ties in the head ranking go to the earlier layer and head (the authors add random noise, kvpress's sort leaves them
    unspecified); scores in fp32.

    patterns: `on_the_fly`, or a `full_attention_heads.tsv` (or its folder) from mit-han-lab/duo-attention.
    head_compression_ratio: fraction of KV heads that stream (kvpress's `head_compression_ratio`).
    compression_ratio: when given, the head_compression_ratio (kvpress's evaluation sets DuoAttentionPress's
        `head_compression_ratio` from its `compression_ratio`), so a ratio sweep sweeps the head split; the run is
        labelled by it (`duo_attention_r0.5`). Ignored with `threshold`.
    threshold: heads whose gate is under it stream (the authors' default 0.5); replaces the ratio.
    sink_size, recent_size: what streaming heads keep (default: the pattern's config.json; on the fly 128 and 256).
    budget: ignored, as for `full` (a sweep's budget fills every method's); the cache follows from the head split and
        the two sizes.
    """

    patterns: str = ON_THE_FLY
    head_compression_ratio: float = 0.5
    threshold: Optional[float] = None
    sink_size: Optional[int] = None
    recent_size: Optional[int] = None

    needs_budget = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.split_by_ratio:
            self.head_compression_ratio = self.compression_ratio
        if not 0.0 <= self.head_compression_ratio <= 1.0:
            raise EvalkvError(f"duo_attention: head_compression_ratio must be in [0, 1], got "
                              f"{self.head_compression_ratio}")
        if min(self.sink_size or 0, self.recent_size or 0) < 0:
            raise EvalkvError("duo_attention: sink_size and recent_size must be >= 0")
        self._pattern: tuple[Tensor, Optional[int], Optional[int]] | None = None
        if self.patterns != ON_THE_FLY:
            self.before_step = None

    def prepare(self, tokenizer) -> None:
        if self.patterns != ON_THE_FLY and self._pattern is None:
            self._pattern = read_pattern(self.patterns)
            self.sizes()  # a pattern without sizes is refused before the model runs

    def describe(self) -> str:
        if self.threshold is not None:
            return f"{self.name}_t{self.threshold:g}"
        if self.split_by_ratio:  # the sweep's label, which tables read as the run's ratio
            return f"{self.name}_r{self.compression_ratio:g}"
        return f"{self.name}_h{self.head_compression_ratio:g}"

    @property
    def split_by_ratio(self) -> bool:
        """Whether the run's compression_ratio sets the head split (kvpress's evaluation's rule), as it does
        without a threshold."""
        return self.compression_ratio is not None and self.threshold is None

    @property
    def free_options(self) -> tuple[str, ...]:
        """Options the run label leaves out (evalkv/run/pred.py `_non_default`): a head ratio the ratio set."""
        return ("head_compression_ratio",) if self.split_by_ratio else ()

    def budget_label(self) -> str | None:
        """`r<ratio>` when the run's compression_ratio set the head split (the leaderboard's ratio), else none."""
        return f"r{self.compression_ratio:g}" if self.split_by_ratio else None

    def sizes(self) -> tuple[int, int]:
        """(sink, recent) kept by streaming heads."""
        if self.patterns == ON_THE_FLY:
            default_sink, default_recent = ON_THE_FLY_SIZES
        else:
            self.prepare(None)
            _, default_sink, default_recent = self._pattern
        sink = self.sink_size if self.sink_size is not None else default_sink
        recent = self.recent_size if self.recent_size is not None else default_recent
        if sink is None or recent is None:
            raise EvalkvError(f"duo_attention: {self.patterns} has no config.json with sink_size and recent_size "
                              "beside it; set method.sink_size and method.recent_size")
        return sink, recent

    def compress_prompt(self, view: AttentionView) -> Keep:
        if self.patterns != ON_THE_FLY:
            self.prepare(None)
            gates = self._pattern[0]
            shape = (view.geometry.num_layers, view.geometry.num_kv_heads)
            if tuple(gates.shape) != shape:
                raise EvalkvError(f"duo_attention: the pattern {self.patterns} is {tuple(gates.shape)} (layers x KV "
                                  f"heads) but the model has {shape[0]} layers and {shape[1]} KV heads")
            streaming = streaming_heads(gates, self.head_compression_ratio, self.threshold)
            return self._cut(view, streaming[view.layer_idx], 0)
        self._score_prompt(view)
        return None

    def before_step(self, view: AttentionView) -> Keep:
        """On the fly: the first forward after the prompt cuts each layer once every layer has scored it."""
        if view.state.get(_CUT):
            return None
        view.state[_CUT] = True
        state = view.sample.state
        if _STREAMING not in state:
            scores = torch.stack([state[_SCORES][layer] for layer in range(view.geometry.num_layers)])
            state[_STREAMING] = streaming_heads(scores, self.head_compression_ratio, self.threshold)
        return self._cut(view, state[_STREAMING][view.layer_idx], view.num_new)

    def _score_prompt(self, view: AttentionView) -> None:
        """Add this forward's queries (RoPE undone) to the layer's sum; after the last prompt chunk, score its heads."""
        queries = sum_before_rope(view.query, view.query_positions, view.rotary)
        view.state[_QUERY_SUM] = view.state.get(_QUERY_SUM, 0) + queries
        view.state[_QUERY_COUNT] = view.state.get(_QUERY_COUNT, 0) + view.num_new
        if view.sample.last_chunk:
            mean_query = view.state.pop(_QUERY_SUM) / view.state.pop(_QUERY_COUNT)
            # Nothing was cut yet, so every head holds the prompt at the same positions.
            mean_key = sum_before_rope(view.keys, view.positions[:, 0], view.rotary) / view.length
            scores = on_the_fly_scores(mean_query, mean_key, view.rotary, view.scaling)
            view.sample.state.setdefault(_SCORES, {})[view.layer_idx] = scores[0]

    def _cut(self, view: AttentionView, streaming: Tensor, newest: int) -> Keep:
        """Streaming heads keep the first `sink` and last `recent` of their entries before the `newest` ones, and the
        newest; retrieval heads keep everything. A ragged layer (an earlier prompt chunk cut it) is cut head by head."""
        sink, recent = self.sizes()
        cache, device = view.cache, view.query.device
        lengths = [head.length for head in cache.heads] if cache.is_ragged else [view.length] * cache.num_heads
        if not any(stream and length - newest > sink + recent for stream, length in zip(streaming.tolist(), lengths)):
            return None

        def kept(length: int, stream: bool) -> Tensor:
            if not stream or length - newest <= sink + recent:
                return torch.arange(length, device=device)
            old = keep_sink_and_recent(length - newest, sink, recent, device)[0, 0]
            return torch.cat([old, torch.arange(length - newest, length, device=device)])

        if bool(streaming.all()) and not cache.is_ragged:
            return kept(view.length, True)[None, None, :]
        if cache.batch_size != 1 or cache.num_heads != view.geometry.num_kv_heads:
            raise EvalkvError("duo_attention keeps a different number of entries per head: it needs batch size 1 "
                              "and a cache of KV heads")
        return [kept(length, stream) for length, stream in zip(lengths, streaming.tolist())]
