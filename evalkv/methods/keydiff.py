"""KeyDiff: keep the entries whose keys differ most from the layer's average key direction."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from evalkv.methods.base import AttentionView
from evalkv.methods.registry import register
from evalkv.methods.scorer import Scorer


@register("keydiff")
@dataclass
class KeyDiff(Scorer):
    """KeyDiff (key diversity, attention-free; block-wise with `prefill_chunk`).

    Based on "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in Resource-Constrained
    Environments", Park et al. (arXiv 2504.15364), reference code kvpress 0.5.5 (`KeyDiffPress`,
    `kvpress/presses/keydiff_press.py`, and `BlockPress` for the block-wise form); docs/methods.md#keydiff.

    Per KV head, the anchor is the mean of the cache's L2-normalised keys (keys after RoPE, as cached; every entry of
    the layer, the newest included); an entry scores minus the cosine similarity of its key to the anchor, so the
    `budget` most distinct keys stay. No window, no sinks, no attention. The paper evaluates it block-wise: the
    prompt fed in blocks with eviction after each, later blocks attending to the compressed past, which is
    `prefill_chunk=<block size>` here (kvpress's `BlockPress` default: 128). Generated tokens are appended (or cut
    again with `decode_interval`, docs/methods.md#regimes).

    Deviations: fp32 scores; ties by position. kvpress's `BlockPress` only simulates the blocks (one full forward,
    then the scores of the kept set plus each next block in turn); evalkv's `prefill_chunk` runs them, so from the
    second layer on the keys of later blocks differ from kvpress's.
    """

    def score(self, view: AttentionView, candidates: int) -> Tensor:
        keys = view.keys.float()
        anchor = F.normalize(keys, dim=-1).mean(dim=-2, keepdim=True)
        return -F.cosine_similarity(keys[..., :candidates, :], anchor, dim=-1)
