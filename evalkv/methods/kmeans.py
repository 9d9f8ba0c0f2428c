"""k-means: cluster each KV head's keys and keep whole clusters, ranked by the attention they receive."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv.attention import attention_column_sums, reduce_query_heads
from evalkv.kv.cluster import cluster_sums, spherical_kmeans
from evalkv.kv.select import top_k_by_group
from evalkv.methods.base import AttentionView, Method, Phase, require_choice
from evalkv.methods.registry import register


@register("kmeans")
@dataclass
class KMeans(Method):
    """k-means over keys (semantic clusters; prompt, optionally re-clustered while decoding).

    Based on seed 004's `SemanticClusterCache` (public copy suhasramanand/kv-cache-compression@f74221a) as
    docs/methods.md#kmeans reconstructs it from the seed's stated intent and ClusterKV ("ClusterKV: Manipulating LLM
    KV Cache in Semantic Space for Recallable Compression", Liu et al., arXiv 2412.03213).

    After the prompt's attention, if a layer holds more than `budget` entries, each KV head keeps its first `n_sink`
    and last `window_size` entries, clusters the keys in between (as cached, after RoPE) with a deterministic
    spherical k-means (`evalkv.kv.cluster`: k = `num_clusters`, else ceil(candidates / `cluster_size`);
    `iterations` steps; centroids start at evenly spaced tokens), and fills the rest of the budget:
    - `selection=clusters` (default): whole clusters in score order while they fit, then the best tokens of the next
      one, so exactly `budget` entries remain. `scoring=window`: a token's score is the attention the last
      `window_size` queries give it (SnapKV's window block), summed over the rows and reduced over the GQA
      group (`gqa_reduce`); a cluster's score is the sum over its tokens (attention mass). `scoring=centroid`: a
      token's score is its logit `q·k / sqrt(d)` for q the group's mean window query; a cluster's score is the mean
      over its tokens, i.e. `q·centroid` with the cluster's mean key (ClusterKV's selection rule, window queries).
    - `selection=representative` (the seed's default strategy): each cluster's token closest to its centroid
      (largest clusters first when not all fit), then the most recent candidates.
    With `cluster_every=N` the whole cache is re-clustered and cut back to `budget` the same way at every N-th
    decode step (window = the last `window_size` tokens and their queries), as the seed re-clustered every 128
    tokens; by default generated tokens are appended and never evicted.

    Deviations from the seed: one selection per KV head (the seed clusters the mean key over heads, per layer);
    torch on the keys' device with a fixed init instead of sklearn `KMeans(n_init=10, random_state=42)` on CPU;
    cosine instead of Euclidean k-means; the cluster count follows the prompt length (the seed: 16); 4 sinks and a
    window always kept (the seed keeps the last budget//10); eviction after the step's attention (the seed evicts
    before it, inside `update()`). The seed's `attention` strategy (the first budget//16 tokens of the largest
    clusters) and `hybrid` (= representative) are not provided. Unlike ClusterKV (a retrieval method that recalls
    clusters from CPU memory at every step), clusters left out are evicted for good. Ties rank by cluster index,
    then position.

    window_size: observation window W, always kept (SnapKV's default 32).
    n_sink: first tokens always kept (StreamingLLM's 4).
    num_clusters: clusters per KV head (default: ceil(candidates / cluster_size)).
    cluster_size: mean tokens per cluster when num_clusters is not set.
    iterations: k-means iterations (assignment + centroid update).
    scoring: `window` (attention mass) or `centroid` (mean window query · cluster mean key); selection=clusters.
    selection: `clusters` or `representative`.
    gqa_reduce: `mean` or `max` over the query heads of a KV head (scoring=window).
    cluster_every: re-cluster every N decode steps (None: prompt only).
    """

    window_size: int = 32
    n_sink: int = 4
    num_clusters: Optional[int] = None
    cluster_size: int = 16
    iterations: int = 10
    scoring: str = "window"
    selection: str = "clusters"
    gqa_reduce: str = "mean"
    cluster_every: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice(self.name, "scoring", self.scoring, ("window", "centroid"))
        require_choice(self.name, "selection", self.selection, ("clusters", "representative"))
        require_choice(self.name, "gqa_reduce", self.gqa_reduce, ("mean", "max"))
        if self.window_size < 1 or self.n_sink < 0 or self.cluster_size < 1 or self.iterations < 0:
            raise EvalkvError("kmeans: window_size >= 1, n_sink >= 0, cluster_size >= 1 and iterations >= 0, got "
                              f"{self.window_size}, {self.n_sink}, {self.cluster_size}, {self.iterations}")
        if (self.num_clusters is not None and self.num_clusters < 1) or (
                self.cluster_every is not None and self.cluster_every < 1):
            raise EvalkvError(f"kmeans: num_clusters and cluster_every must be >= 1 (or null), got "
                              f"{self.num_clusters}, {self.cluster_every}")
        if self.budget is not None and self.budget < self.n_sink + self.window_size:
            raise EvalkvError(f"kmeans: budget {self.budget} is smaller than n_sink + window_size "
                              f"({self.n_sink} + {self.window_size})")
        if self.cluster_every is None:
            self.after_step = None  # generated tokens are appended, never evicted

    def compress_prompt(self, view: AttentionView) -> Tensor | None:
        if self.cluster_every is not None:
            self._remember_window_queries(view)
        return self._cut(view, view.query, view.query_positions)

    def after_step(self, view: AttentionView) -> Tensor | None:
        self._remember_window_queries(view)
        if view.phase is not Phase.DECODE or view.sample.decode_step % self.cluster_every:
            return None
        return self._cut(view, view.state["queries"], view.state["query_positions"])

    def _cut(self, view: AttentionView, queries: Tensor, positions: Tensor) -> Tensor | None:
        capacity = self.capacity(view.sample.prompt_length)
        if view.length <= capacity:
            return None
        window = min(self.window_size, queries.shape[-2], capacity)
        return self._keep(view, queries[:, :, -window:], positions[:, -window:], capacity)

    def _remember_window_queries(self, view: AttentionView) -> None:
        queries, positions = view.query, view.query_positions
        if view.phase is not Phase.PREFILL and "queries" in view.state:
            queries = torch.cat([view.state["queries"], queries], dim=-2)
            positions = torch.cat([view.state["query_positions"], positions], dim=-1)
        view.state["queries"] = queries[:, :, -self.window_size:]
        view.state["query_positions"] = positions[:, -self.window_size:]

    def _keep(self, view: AttentionView, queries: Tensor, query_positions: Tensor, capacity: int) -> Tensor:
        length, window = view.length, queries.shape[-2]
        sink = min(self.n_sink, capacity - window)
        keys = view.keys[:, :, sink : length - window]
        batch, heads, candidates, dim = keys.shape
        count = self.num_clusters or math.ceil(candidates / self.cluster_size)
        labels, centroids = spherical_kmeans(keys.reshape(batch * heads, candidates, dim), count, self.iterations)
        labels, centroids = labels.reshape(batch, heads, candidates), centroids.reshape(batch, heads, -1, dim)
        if self.selection == "representative":
            chosen = self._representatives(keys, labels, centroids, capacity - sink - window)
        else:
            scores = self._token_scores(view, queries, query_positions)[..., sink : length - window]
            chosen = self._whole_clusters(scores, labels, centroids.shape[2], capacity - sink - window)
        sinks = torch.arange(sink, device=chosen.device).expand(batch, heads, sink)
        tail = torch.arange(length - window, length, device=chosen.device).expand(batch, heads, window)
        return torch.cat([sinks, chosen + sink, tail], dim=-1)

    def _token_scores(self, view: AttentionView, queries: Tensor, query_positions: Tensor) -> Tensor:
        heads = view.cache.num_heads
        if self.scoring == "centroid":
            mean_query = reduce_query_heads(queries.float().mean(dim=-2), heads)  # [B, H_kv, d]
            return (view.keys.float() @ mean_query[..., None])[..., 0] * view.scaling
        received = attention_column_sums(queries, query_positions, view.keys, view.positions, view.scaling)
        return reduce_query_heads(received, heads, self.gqa_reduce)

    def _whole_clusters(self, scores: Tensor, labels: Tensor, count: int, room: int) -> Tensor:
        mass, size = _per_cluster(labels, torch.stack([scores, torch.ones_like(scores)], dim=-1), count).unbind(-1)
        cluster_scores = mass if self.scoring == "window" else mass / size.clamp(min=1)
        return top_k_by_group(scores, labels, cluster_scores.masked_fill(size == 0, float("-inf")), room)

    def _representatives(self, keys: Tensor, labels: Tensor, centroids: Tensor, room: int) -> Tensor:
        """Each cluster's token closest to its centroid, largest clusters first; then the most recent tokens."""
        similarity = (F.normalize(keys.float(), dim=-1) * centroids.gather(
            2, labels[..., None].expand(*labels.shape, centroids.shape[-1]))).sum(-1)
        count = centroids.shape[2]
        best = similarity.new_full((*labels.shape[:2], count), float("-inf")).scatter_reduce(
            -1, labels, similarity, "amax")
        index = torch.arange(labels.shape[-1], device=labels.device).expand_as(labels)
        first_best = torch.full_like(best, labels.shape[-1], dtype=torch.long).scatter_reduce(
            -1, labels, torch.where(similarity == best.gather(-1, labels), index, labels.shape[-1]), "amin")
        representative = first_best.gather(-1, labels) == index
        size = _per_cluster(labels, torch.ones_like(similarity)[..., None], count)[..., 0]
        scores = torch.where(representative, size.gather(-1, labels), index.float())
        groups = (~representative).long()  # group 0: representatives (by cluster size), 1: the rest (most recent)
        return top_k_by_group(scores, groups, torch.tensor([1.0, 0.0], device=labels.device).expand(
            *labels.shape[:2], 2), room)


def _per_cluster(labels: Tensor, values: Tensor, count: int) -> Tensor:
    """Per-cluster sums of `values` `[B, h, m, f]`: `[B, h, count, f]`."""
    batch, heads = labels.shape[:2]
    return cluster_sums(labels.flatten(0, 1), values.flatten(0, 1), count).reshape(batch, heads, count, -1)
