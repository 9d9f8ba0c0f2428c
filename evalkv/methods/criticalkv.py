"""CriticalKV: any scorer's scores rescaled by what each value adds to the layer's output, in two stages.

A regime of every scorer (`critical=true` on evalkv/methods/scorer.py's `Scorer`), not a registered method:
`method=snapkv method.critical=true` is CriticalKV over SnapKV (the paper's CriticalSnapKV), `method=adakv
method.critical=true` CriticalAdaKV.

Based on "Identify Critical KV Cache in LLM Inference from an Output Perturbation Perspective", Feng et al.
(arXiv 2502.03805), reference code kvpress 0.5.5 (`CriticalKVPress`, `CriticalAdaKVPress` in
`kvpress/presses/criticalkv_press.py`; the authors' own copy FFY0/AdaKV-in-NVIDIA-kvpress@88f5b1f, branch
`criticalkv`, computes the same); docs/methods.md#criticalkv.

A selection head that keeps `b` entries besides the scorer's window `w` (its share of the budget: uniform, or
AdaKV's adaptive share) keeps, in a first stage, the `max(0, int(first_stage * (b + w)) - w)` candidates with the
best scores `s_j` (the window counts in the first stage, as kvpress's windowed scorers give their window the
maximum score), then fills the rest by `(s_j + epsilon) * ||W_o,h v_j||_1`, where `W_o,h` is the columns of the
layer's output projection that head `h` writes through: the L1 norm of what value `v_j` would add to the residual
stream if head `h` attended only to it. A selection per KV head averages the norms over its query heads, one per
layer over all heads. A score of +inf (a scorer's always-kept entries: Expected Attention's sinks) stays +inf.

Reads the layer's output projection weights on the view (`view.output_projection`, `[hidden, heads * head_dim]`
as `o_proj.weight`, which the engine takes from the model through evalkv/kv/adapter.py); a view without them (a
harness that runs no model) stops with an error.

Deviations: norms in fp32 from products in the model's dtype (kvpress takes the norm in the model's dtype); ties by
position (docs/methods.md#shared-tie-rule). With `head_budgets=adaptive`, the per-head budgets are AdaKV's
(evalkv/methods/budgets.py: floor `floor_alpha`, the reference's rounding) computed from the raw scores;
kvpress's `CriticalAdaKVPress` forces each head's top `alpha_safeguard` share before a global top-k instead. The
rescaled score multiplies a score that may be negative (Knorm's, KeyDiff's) as kvpress does, which then ranks
large norms last: the regime is meant for attention-mass scores.

critical_first_stage: the first stage's share of each head's budget (kvpress `first_stage_ratio`: 0.5).
critical_epsilon: added to the scores before rescaling (kvpress: 1e-4).
"""

from __future__ import annotations

import torch
from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv.select import top_k_positions
from evalkv.methods.base import AttentionView

_PRODUCT_BLOCK = 1 << 24  # fp32 elements of one block of value x output-projection products


def output_value_norms(values: Tensor, weight: Tensor, num_heads: int) -> Tensor:
    """`||W_o,h v_j||_1` for every query head h and entry j: values `[B, H_c, m, d]` (H_c divides num_heads; query
    head h reads cache head `h // (num_heads / H_c)`), weight `[hidden, num_heads * d]` -> fp32 `[B, num_heads, m]`.

    One head and a block of entries at a time, so no `[m, hidden]` product of the whole cache is ever held."""
    batch, cache_heads, length, dim = values.shape
    groups = num_heads // cache_heads
    per_head = weight.to(values.device, values.dtype).reshape(weight.shape[0], num_heads, dim)
    rows = max(1, _PRODUCT_BLOCK // max(1, batch * weight.shape[0]))
    norms = torch.empty(batch, num_heads, length, dtype=torch.float32, device=values.device)
    for head in range(num_heads):
        projection = per_head[:, head].T  # [d, hidden]
        for start in range(0, length, rows):
            block = values[:, head // groups, start : start + rows]
            # One reduction reads the product once, accumulating in fp32 (no fp32 or abs copy of the block).
            norms[:, head, start : start + rows] = torch.linalg.vector_norm(block @ projection, ord=1, dim=-1,
                                                                            dtype=torch.float32)
    return norms


def critical_scores(view: AttentionView, scores: Tensor, budgets: list[int], window: int, first_stage: float,
                    epsilon: float) -> Tensor:
    """The two-stage scores of the candidates scored `[B, h, c]`: each head's first-stage entries (the best of its
    budget's first share) at +inf, the others rescaled by their output norms (see the module docstring).

    budgets: the candidates each selection head keeps (window excluded); window: entries kept after the candidates."""
    weight = view.output_projection
    if weight is None:
        raise EvalkvError("critical=true rescales scores by the layer's output projection, which this view does not "
                          "carry (AttentionView.output_projection: the engine passes the model's o_proj weights)")
    candidates = scores.shape[-1]
    norms = output_value_norms(view.values[..., :candidates, :], weight, view.geometry.num_heads)
    batch, heads = scores.shape[:2]
    norms = norms.reshape(batch, heads, -1, candidates).mean(dim=2)  # query heads -> the selection heads
    rescaled = torch.where(torch.isinf(scores), scores, (scores + epsilon) * norms)
    firsts = [max(0, int(first_stage * (budget + window)) - window) for budget in budgets]
    for head, first in enumerate(firsts):
        best = top_k_positions(scores[:, head], first)
        rescaled[:, head].scatter_(-1, best, float("inf"))
    return rescaled
