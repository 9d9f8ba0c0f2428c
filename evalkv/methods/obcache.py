"""OBCache (kv-cache-pruner's kvcV / kvcK / kvcVK): evict the tokens whose pruning perturbs the attention output
least (Optimal Brain Damage on the cache), plus the presets of the reference code under their own tags."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv.attention import attention_column_sums, attention_row_blocks, pool_scores, reduce_query_heads
from evalkv.kv.cache import LayerCache
from evalkv.kv.select import keep_best_and_tail
from evalkv.methods.base import AttentionView, Method, Phase, require_choice
from evalkv.methods.registry import register

SCORE = "obcache_accumulated_score"
# Scoring blocks of at most this many probabilities: the K terms hold three more temporaries of the same size.
_SCORE_BLOCK = 1 << 24
# The LongBench scripts of the reference split the cache 5 % recent / 95 % heavy.
_RECENT_SHARE = 0.05


def _per_query_head(x: Tensor, y: Tensor) -> Tensor:
    """`x @ y^T` per query head, KV heads not repeated: x `[B, H, r, d]`, y `[B, H_c, m, d]` -> `[B, H, r, m]`."""
    batch, heads, rows, dim = x.shape
    kv_heads = y.shape[1]
    product = torch.matmul(x.reshape(batch, kv_heads, heads // kv_heads * rows, dim), y.transpose(-1, -2))
    return product.reshape(batch, heads, rows, -1)


def obcache_scores(
    query: Tensor, query_positions: Tensor, output: Tensor, cache: LayerCache, scaling: float, *,
    score: str, p: int = 2, use_vnorm: bool = True, cross: bool = True, row_lse: Tensor | None = None,
) -> Tensor:
    """OBCache saliency of every cached token for the given query rows, summed over the rows: `[B, H, m]` fp32.

    query `[B, H, r, d]` at `query_positions` `[B, r]`, output `[B, H, r, d]` (the attention output of those rows,
    before o_proj), `row_lse` `[B, H, r]` (optional) those rows' base-2 log-sum-exps (`view.row_lse`) for the fused
    kernels of the V score. With `A_ij` the attention, `z_ij = q_i . k_j * scaling` the logit, `o_i` the output
    (docs/methods.md#obcache):
      V:  sum_i A_ij^p * |v_j|_p^p (the last factor only with use_vnorm)     = |delta o|^2 when v_j is zeroed (p=2)
      K:  sum_i (A_ij z_ij)^2 |v_j - o_i|^2                                     first order when k_j is zeroed
      VK: V + K (+ sum_i 2 A_ij^2 z_ij (|v_j|^2 - v_j . o_i) with cross)       both zeroed
    """
    values = cache.values.float()
    groups = query.shape[1] // cache.num_heads
    squared_norms = values.square().sum(dim=-1).repeat_interleave(groups, dim=1)  # [B, H, m]
    value_norms = squared_norms if p == 2 else values.abs().sum(dim=-1).repeat_interleave(groups, dim=1)
    if score == "V":  # attention alone: column sums of A^p (a fused kernel on CUDA)
        attended = attention_column_sums(query, query_positions, cache.keys, cache.positions, scaling, p,
                                         row_lse=row_lse)
        return attended * value_norms if use_vnorm else attended
    total = torch.zeros(*query.shape[:2], cache.length, dtype=torch.float32, device=query.device)
    for rows, probs in attention_row_blocks(query, query_positions, cache.keys, cache.positions, scaling,
                                            _SCORE_BLOCK):
        if "V" in score:
            attended = probs.pow(p).sum(dim=-2)
            total += attended * value_norms if use_vnorm else attended
        if "K" in score:
            out = output[:, :, rows].float()
            logits = _per_query_head(query[:, :, rows], cache.keys).float() * scaling
            value_dot_output = _per_query_head(out, values)
            norms = squared_norms[:, :, None, :]
            distance = norms + out.square().sum(dim=-1, keepdim=True) - 2 * value_dot_output  # |v_j - o_i|^2
            total += ((probs * logits).square() * distance).sum(dim=-2)
            if score == "VK" and cross:
                total += (2 * probs.square() * logits * (norms - value_dot_output)).sum(dim=-2)
    return total


@register("obcache")
@dataclass
class OBCache(Method):
    """OBCache (Optimal Brain Cache; kv-cache-pruner's kvcV / kvcK / kvcVK).

    Based on "OBCache: Optimal Brain KV Cache Pruning for Efficient Long-Context LLM Inference", Gu, Liang, Zhao,
    Diao (arXiv 2510.07651); reference code MalachiAjayi/kv-cache-pruner@fc1779f (a renamed
    copy of DreamSoul-AI/OBCache, as the README of its first commit says: `KVCachePruner`, `KVScoreTracker`,
    `load_kv_cache`); docs/methods.md#obcache.

    A token's saliency is the perturbation of the attention outputs when its value (`score=V`), its key (`K`) or
    both (`VK`) are pruned, summed over query rows (`obcache_scores`). Rows: the last `num_recent` prompt queries
    (`queries=recent`; the recent window doubles as the observation window), every prompt query (`all`, the
    `_fullhist` tags), or only the newest query (`latest`, the `+tova` tags: no accumulation, and the recent budget
    moves into the heavy budget); while decoding each step adds its own row. Scores accumulate over steps and travel
    with the kept entries. After the prompt's attention (and after every decode step with `decode_evict`), if a head
    holds more than `num_recent + num_heavy` tokens it keeps its last `num_recent` tokens and the `num_heavy` others
    with the highest score, pooled along positions at eviction time when `pooling` is set.

    Budget: `budget` (or `compression_ratio`) is the total per head, split into `num_recent` (default 5 % of it, at
    least 1, as the reference's LongBench scripts) and `num_heavy`; or give `num_recent` + `num_heavy` as the
    reference README does; or `recent_ratio` + `heavy_ratio`, fractions of the prompt length fixed at the prompt.

    Presets: every `kvc*` tag of the reference's `load_kv_cache` is registered under its own name (`kvcV`, `kvcK`,
    `kvcVK`, `kvcVK_no_cross`, `kvcV_p1`, each with `+tova`, `+maxpool`, `+avgpool`, `_fullhist`); `obcache` itself
    defaults to the joint score (`kvcVK`). Hydra accepts `+` in a group option: `method=kvcV+tova`. The reference's
    other tags (`sink`, `h2o`, `h2o_fullhist`, `tova`, `snapkv`, `snapkv_avgpool`) are its baselines, which evalkv has
    as methods.

    Deviations: scores in fp32 (the reference casts the window probabilities to the model dtype); ties rank by
    position and kept entries are stored in position order; with ratios, `_fullhist` uses every prompt row (the
    reference silently falls back to the recent rows there); `queries=recent` with zero recent tokens
    is an error (the reference then scores every row); no streaming mode (the reference's `num_sink=4` and
    eviction before chunks of new tokens exist only there); the reference's `fix_recent_token` +
    `cache_ratio` is `compression_ratio` + `num_recent` here. `granularity=kv_head` (scores averaged over the GQA
    group, one selection per KV head) is an evalkv option; the reference selects per query head (`query_head`,
    default: the cache then holds one copy per query head).

    score: `V`, `K` or `VK`.   cross: the joint cross term (VK only).   p: attention power (2; 1 for `_p1`).
    use_vnorm: multiply the V term by |v_j|_p^p.   queries: `recent`, `all` or `latest`.
    pooling: `none`, `max` or `avg` (kernel `kernel_size`, stride 1, as SnapKV).
    num_recent, num_heavy, recent_ratio, heavy_ratio: the budget split (above).
    decode_evict: hold the budget while decoding (reference default) or compress the prompt only (its scripts).
    granularity: `query_head` (reference) or `kv_head`.
    """

    score: str = "VK"
    cross: bool = True
    p: int = 2
    use_vnorm: bool = True
    queries: str = "recent"
    pooling: str = "none"
    kernel_size: int = 7
    num_recent: Optional[int] = None
    num_heavy: Optional[int] = None
    recent_ratio: Optional[float] = None
    heavy_ratio: Optional[float] = None
    decode_evict: bool = True
    granularity: str = "query_head"

    @property
    def reads_row_lse(self) -> bool:
        """The V score's column sums take the rows' log-sum-exps; K and VK score row blocks of their own."""
        return self.score == "V"

    def __post_init__(self) -> None:
        require_choice(self.name, "score", self.score, ("V", "K", "VK"))
        require_choice(self.name, "queries", self.queries, ("recent", "all", "latest"))
        require_choice(self.name, "pooling", self.pooling, ("none", "max", "avg"))
        require_choice(self.name, "granularity", self.granularity, ("query_head", "kv_head"))
        if self.p not in (1, 2) or (self.p == 1 and self.score != "V"):
            raise EvalkvError(f"{self.name}: p must be 2, or 1 with score=V (the kvcV_p1 tags), got p={self.p}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise EvalkvError(f"{self.name}: kernel_size must be odd, got {self.kernel_size}")
        if any(v is not None and v < 0 for v in (self.num_recent, self.num_heavy)):
            raise EvalkvError(f"{self.name}: num_recent and num_heavy must be >= 0")
        if self._ratio_mode():
            if None in (self.recent_ratio, self.heavy_ratio) or not 0 < self.recent_ratio + self.heavy_ratio <= 1:
                raise EvalkvError(f"{self.name}: give recent_ratio and heavy_ratio, fractions of the prompt summing to "
                                  f"at most 1, got {self.recent_ratio}, {self.heavy_ratio}")
            if (self.budget, self.compression_ratio, self.num_recent, self.num_heavy) != (None,) * 4:
                raise EvalkvError(f"{self.name}: recent_ratio/heavy_ratio replace budget, compression_ratio, "
                                  "num_recent and num_heavy; give one way")
        elif self.num_heavy is not None:
            if self.num_recent is None or self.compression_ratio is not None:
                raise EvalkvError(f"{self.name}: num_heavy goes with num_recent (budget = their sum), not with "
                                  "compression_ratio")
            total = self.num_recent + self.num_heavy
            if self.budget not in (None, total):
                raise EvalkvError(f"{self.name}: budget {self.budget} != num_recent + num_heavy = {total}")
            self.budget = total
        super().__post_init__()
        if self.budget is not None and self.num_recent is not None and self.num_recent > self.budget:
            raise EvalkvError(f"{self.name}: num_recent {self.num_recent} exceeds the budget {self.budget}")
        if not self.decode_evict:
            self.after_step = None  # the prompt is compressed, generated tokens appended

    def _ratio_mode(self) -> bool:
        return self.recent_ratio is not None or self.heavy_ratio is not None

    def requires_budget(self) -> bool:
        return not self._ratio_mode()

    def describe(self) -> str:
        # With ratios there is no budget in the label; the run label adds recent_ratio=... heavy_ratio=...
        return self.name if self._ratio_mode() else super().describe()

    def decode_group_key(self, prompt_length: int):
        return self.split(prompt_length)

    def split(self, prompt_length: int) -> tuple[int, int]:
        """(recent, heavy) tokens per selection head for a prompt of `prompt_length` tokens."""
        if self._ratio_mode():
            recent, heavy = int(prompt_length * self.recent_ratio), int(prompt_length * self.heavy_ratio)
        else:
            total = self.capacity(prompt_length)
            recent = self.num_recent if self.num_recent is not None else max(1, int(total * _RECENT_SHARE))
            recent = min(recent, total)
            heavy = total - recent
        if self.queries == "latest":
            return 0, recent + heavy
        if recent == 0 and self.queries == "recent":
            raise EvalkvError(f"{self.name}: queries=recent scores with the last num_recent prompt queries, but this "
                              "prompt gets no recent tokens; raise recent_ratio or num_recent")
        return recent, heavy

    def compress_prompt(self, view: AttentionView) -> Tensor | None:
        prefill = view.phase is Phase.PREFILL
        recent, heavy = self.split(view.sample.prompt_length)
        if self.queries == "latest":
            rows = 1
        elif prefill and self.queries == "recent":
            rows = min(recent, view.num_new)
        else:
            rows = view.num_new
        scores = obcache_scores(
            view.query[:, :, -rows:], view.query_positions[:, -rows:], view.output[:, :, -rows:], view.cache,
            view.scaling, score=self.score, p=self.p, use_vnorm=self.use_vnorm, cross=self.cross,
            row_lse=None if view.row_lse is None else view.row_lse[..., -rows:],
        )
        if self.granularity == "kv_head":
            scores = reduce_query_heads(scores, view.cache.num_heads)
        if self.queries != "latest" and self.decode_evict:
            previous = view.cache.extras.get(SCORE)
            if previous is not None:
                scores[..., : previous.shape[-1]] += previous
            view.cache.extras[SCORE] = scores
        length = view.length
        if length <= recent + heavy:
            return None
        candidates = scores[..., : length - recent]
        if self.pooling != "none":
            candidates = pool_scores(candidates, self.kernel_size, self.pooling)
        return keep_best_and_tail(candidates, heavy, length)

    after_step = compress_prompt  # each decode step adds its row and holds the budget (decode_evict)


# The reference's `load_kv_cache` kvc* tags: base score x which queries / pooling (docs/methods.md#obcache-presets).
_BASES = {
    "kvcV": {"score": "V"},
    "kvcK": {"score": "K"},
    "kvcVK": {"score": "VK"},
    "kvcVK_no_cross": {"score": "VK", "cross": False},
    "kvcV_p1": {"score": "V", "p": 1},
}
_VARIANTS = {
    "": {},
    "+tova": {"queries": "latest"},
    "+maxpool": {"pooling": "max"},
    "+avgpool": {"pooling": "avg"},
    "_fullhist": {"queries": "all"},
}


def _register_preset(tag: str, defaults: dict) -> type[OBCache]:
    hints = typing.get_type_hints(OBCache)
    fields = [(name, hints[name], dataclasses.field(default=value)) for name, value in defaults.items()]
    settings = ", ".join(f"{name}={value}" for name, value in defaults.items())
    cls = dataclasses.make_dataclass(
        "OBCache_" + tag.replace("+", "_"), fields, bases=(OBCache,),
        namespace={"__doc__": f"OBCache preset `{tag}` of the reference code: {settings} (see `obcache`)."},
    )
    cls.__module__ = __name__
    return register(tag, preset_of="obcache")(cls)


PRESETS = {
    base + variant: _register_preset(base + variant, {**base_defaults, **variant_defaults})
    for base, base_defaults in _BASES.items()
    for variant, variant_defaults in _VARIANTS.items()
}
