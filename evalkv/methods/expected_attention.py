"""Expected Attention: the attention future queries are expected to pay each entry, from the statistics of past
queries, without an attention matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv.rope import rotate_half, unrotate_keys
from evalkv.methods.base import AttentionView
from evalkv.methods.registry import register
from evalkv.methods.scorer import Scorer


def query_statistics(queries: Tensor, covariance: bool) -> tuple[Tensor, Tensor | None]:
    """Mean `[..., d]` and covariance `[..., d, d]` (biased: divided by the row count, as kvpress) of query rows
    `[..., r, d]`, fp32."""
    queries = queries.float()
    mean = queries.mean(dim=-2)
    if not covariance:
        return mean, None
    centred = queries - mean[..., None, :]
    return mean, centred.transpose(-1, -2) @ centred / queries.shape[-2]


def average_rotation(cos: Tensor, sin: Tensor) -> Tensor:
    """The mean over positions of RoPE's rotation matrices, `[B, d, d]` from `cos, sin` `[B, T, d]`.

    RoPE maps `q -> q * cos + rotate_half(q) * sin`, so the mean map is `diag(mean cos) + diag(mean sin) P` with
    `P` the matrix of `rotate_half`."""
    dim = cos.shape[-1]
    rotate = rotate_half(torch.eye(dim, dtype=cos.dtype, device=cos.device)).T  # P: rotate_half(x) = P x
    mean_cos, mean_sin = cos.mean(dim=-2), sin.mean(dim=-2)
    return torch.diag_embed(mean_cos) + mean_sin[..., :, None] * rotate


def expected_logits(keys: Tensor, mean: Tensor, covariance: Tensor | None, scaling: float) -> Tensor:
    """`s k_j . mu_h + s^2 / 2 k_j^T Sigma_h k_j` for every query head h and key j: the log of E[exp(s q . k_j)] for
    Gaussian queries q ~ N(mu_h, Sigma_h). keys `[B, H_c, m, d]` (query head h reads cache head h // G), mean
    `[B, H, d]`, covariance `[B, H, d, d]` or None -> fp32 `[B, H, m]`; one head at a time."""
    keys = keys.float()
    num_heads = mean.shape[1]
    groups = num_heads // keys.shape[1]
    logits = torch.empty(keys.shape[0], num_heads, keys.shape[2], dtype=torch.float32, device=keys.device)
    for head in range(num_heads):
        head_keys = keys[:, head // groups]  # [B, m, d]
        logits[:, head] = scaling * (head_keys @ mean[:, head, :, None])[..., 0]
        if covariance is not None:
            logits[:, head] += scaling**2 / 2 * ((head_keys @ covariance[:, head]) * head_keys).sum(dim=-1)
    return logits


@register("expected_attention")
@dataclass
class ExpectedAttention(Scorer):
    """Expected Attention (closed-form attention of future queries; prompt, and decoding with `decode_interval`).

    Based on "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries Distribution",
    Devoto, Jeblick, Jégou (arXiv 2510.00636), reference code kvpress 0.5.5 (`ExpectedAttentionPress`,
    `kvpress/presses/expected_attention_press.py`); docs/methods.md#expected_attention.

    In each layer, the observation rows (the prompt's queries; while decoding, the queries since the last cut, as
    `decode_interval` / `decode_buffer` give them) without those at positions below `n_sink` are taken before RoPE
    (RoPE undone with the model's table, evalkv/kv/rope.py); their mean mu and covariance Sigma per query head are
    rotated by the mean RoPE rotation R of the next `n_future_positions` positions (mu' = R mu, Sigma' = R Sigma
    R^T). Every entry after the first `n_sink` scores `softmax_j(s k_j . mu' + s^2/2 k_j^T Sigma' k_j)` (s the
    attention scaling; the softmax over those entries), averaged over each KV head's query heads, times
    `||v_j||_2` (plus `epsilon` first) with `use_vnorm`; the first `n_sink` entries score +inf (always kept). One
    selection per KV head, no observation window: the best `budget` entries. No attention matrix is computed.

    Deviations: fp32 throughout (kvpress computes the statistics in the model's dtype). While decoding the future
    positions follow the newest query's true position and sink rows are those at positions below `n_sink`; kvpress's
    `DecodingPress` counts them from the buffer's length and drops the buffer's first `n_sink` rows. RoPE is undone
    on the queries with the model's table, where kvpress re-projects the hidden states (the same queries); for a
    LongRoPE model evalkv refuses queries of earlier forwards below the switch, whose factor set is unknown
    (evalkv/kv/adapter.py), which only a decoding cut can meet. Ties by position.

    n_future_positions: future positions the rotation is averaged over (kvpress: 512).
    n_sink: first entries always kept and left out of the statistics (kvpress: 4).
    use_covariance: include the covariance term (kvpress: true).
    use_vnorm: multiply by the value norm (kvpress: true; false under CriticalKV, which rescales by its own norm).
    epsilon: added before the value-norm rescaling (kvpress: 0).
    """

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_future_positions < 1 or self.n_sink < 0:
            raise EvalkvError(f"{self.name}: need n_future_positions >= 1 and n_sink >= 0, got "
                              f"{self.n_future_positions}, {self.n_sink}")

    def score(self, view: AttentionView, candidates: int) -> Tensor:
        if view.rotary is None:
            raise EvalkvError(f"{self.name} needs the model's RoPE table to undo RoPE on the queries (models run "
                              "through evalkv's Engine provide it)")
        mean, covariance = self._rotated_statistics(view)
        sink = min(self.n_sink, view.length)
        logits = expected_logits(view.keys[..., sink:, :], mean, covariance, view.scaling)
        batch, num_heads, length = logits.shape
        cache_heads = view.keys.shape[1]
        scores = torch.softmax(logits, dim=-1).reshape(batch, cache_heads, num_heads // cache_heads, length).mean(2)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * view.values[..., sink:, :].float().norm(dim=-1)
        always = scores.new_full((batch, cache_heads, sink), float("inf"))
        return torch.cat([always, scores], dim=-1)[..., :candidates]

    def _rotated_statistics(self, view: AttentionView) -> tuple[Tensor, Tensor | None]:
        """The observation rows' mean and covariance before RoPE, rotated by the mean RoPE of the next positions."""
        rows, positions = view.query, view.query_positions
        after_sinks = (positions[0] >= self.n_sink).nonzero().flatten()
        if after_sinks.numel() > 0:  # rows share positions across the batch except in a batched decode step
            rows, positions = rows[:, :, after_sinks], positions[:, after_sinks]
        # One query head at a time: the RoPE table and the unrotated rows of one head, never `H x r` of them.
        per_head = [query_statistics(unrotate_keys(rows[:, head : head + 1], positions[:, None, :], view.rotary)[:, 0],
                                     self.use_covariance) for head in range(rows.shape[1])]
        mean = torch.stack([head_mean for head_mean, _ in per_head], dim=1)
        covariance = torch.stack([head_cov for _, head_cov in per_head], dim=1) if self.use_covariance else None
        future = positions[:, -1:] + torch.arange(1, self.n_future_positions + 1, device=positions.device)
        rotation = average_rotation(*view.rotary(future))[:, None]  # [B, 1, d, d]
        mean = (rotation @ mean[..., None])[..., 0]
        if covariance is not None:
            covariance = rotation @ covariance @ rotation.transpose(-1, -2)
        return mean, covariance
