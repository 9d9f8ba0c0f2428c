"""KVzip: keep the entries the model needs to reconstruct the prompt, scored while it re-reads the prompt."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv.attention import attention_row_blocks, reduce_query_heads
from evalkv.kv.select import top_k_positions
from evalkv.methods.base import AttentionView, Keep, Method, PromptReplay
from evalkv.methods.registry import register

# The repeat prompts of the KVzip reference (snu-mllab/KVzip `ModelKVzip.self_task`) as kvpress's KVzipPress writes
# them (the reference's second prompt ends with a space), and the previous chunk's tokens the second one quotes.
FIRST_CHUNK_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_CHUNK_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
QUOTED_TOKENS = 8


def chat_suffix(tokenizer) -> str:
    """What the chat template puts between a user's message and the assistant's answer ("\\n" without a template),
    found as kvpress does: a dummy message with a marker, split at the marker."""
    if getattr(tokenizer, "chat_template", None) is None:
        return "\n"
    dummy = "dummy context"
    marker = "\n" + "#" * len(dummy)
    text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + marker}], add_generation_prompt=True,
                                         tokenize=False, enable_thinking=False)
    return text.split(marker)[1]


def repeat_inputs(prompt: Tensor, chunk_size: int, first: Tensor, following: Tensor, suffix: Tensor
                  ) -> list[tuple[int, int, Tensor]]:
    """(start, end, ids) per chunk of the 1-D `prompt`: the chunk `[start, end)` and the tokens that make the model
    re-read it: the repeat prompt (`first` for the first chunk; `following` plus the previous chunk's last
    `QUOTED_TOKENS` tokens after it), the chat suffix, then the chunk itself."""
    chunks = []
    for start in range(0, prompt.shape[0], chunk_size):
        end = min(prompt.shape[0], start + chunk_size)
        quoted = prompt[start - min(QUOTED_TOKENS, chunk_size) : start]  # the end of the previous chunk
        ask = first if start == 0 else torch.cat([following, quoted])
        chunks.append((start, end, torch.cat([ask, suffix, prompt[start:end]])))
    return chunks


def reconstruction_scores(view: AttentionView, start: int, end: int, sink: int) -> Tensor:
    """While the model re-reads the prompt chunk `[start, end)`, the attention each of the chunk's entries receives:
    the replayed tokens (`view.query`, the last `view.num_new` cache entries) attend over the first `sink` entries,
    the chunk's and their own (causally), normalised over those only; the maximum over the replayed tokens and over
    each KV head's query heads. Returns `[B, H_kv, end - start]` fp32, computed in row blocks (never `q x n`)."""
    if view.cache.is_ragged:
        raise EvalkvError("kvzip re-reads the prompt before any eviction; this layer already keeps a different "
                          "number of entries per head")
    replayed = view.num_new
    device = view.keys.device
    entries = torch.cat([torch.arange(sink, device=device), torch.arange(start, end, device=device),
                         torch.arange(view.length - replayed, view.length, device=device)])
    keys, positions = view.keys[:, :, entries], view.positions[:, :, entries]
    best = torch.zeros(*view.query.shape[:2], end - start, dtype=torch.float32, device=device)
    for _, probs in attention_row_blocks(view.query, view.query_positions, keys, positions, view.scaling):
        best = torch.maximum(best, probs[..., sink : sink + end - start].amax(dim=2))
    return reduce_query_heads(best, view.geometry.num_kv_heads, "max")


def keep_most_reconstructive(scores: Tensor, capacity: int, n_sink: int, layerwise: bool) -> list[Keep]:
    """Per layer, what to keep of `scores` `[L, H_kv, n]` (batch 1): the `L * H_kv * capacity` best entries of all
    layers and heads together (`layerwise`: the `H_kv * capacity` best of each layer), the first `n_sink` positions
    first. Ties rank by (layer, head, position). A layer whose heads keep equal counts gets one `[1, H_kv, k]` tensor,
    otherwise one index tensor per head (a ragged layer); None where everything stays."""
    layers, heads, length = scores.shape
    ranked = scores.clone()
    ranked[..., :n_sink] = float("inf")
    if layerwise:
        chosen = [top_k_positions(layer.reshape(1, 1, -1), heads * capacity)[0, 0] for layer in ranked]
    else:
        best = top_k_positions(ranked.reshape(1, 1, -1), layers * heads * capacity)[0, 0]
        chosen = [best[(best // (heads * length)) == layer] % (heads * length) for layer in range(layers)]
    keeps: list[Keep] = []
    for flat in chosen:
        per_head = [flat[flat // length == head] % length for head in range(heads)]
        counts = {len(kept) for kept in per_head}
        if counts == {length}:
            keeps.append(None)
        elif len(counts) == 1:
            keeps.append(torch.stack(per_head)[None])
        else:
            keeps.append(per_head)
    return keeps


@register("kvzip")
@dataclass
class KVzip(Method):
    """KVzip (query-agnostic: entries scored by how much the model reads them to reconstruct the prompt; prompt only).

    Based on "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", Kim et al. (arXiv 2505.23416),
    reference code snu-mllab/KVzip (`attention/score.py@4c2ed0f` `KVScore._get_score`, `model/wrapper.py@04d315b`
    `ModelKVzip.self_task`) and kvpress's `KVzipPress` (0.5.5); docs/methods.md#kvzip.

    After the prompt, the engine replays it (`Method.rescore_prompt`, docs/methods.md#the-method-api): chunk by chunk
    of `chunk_size` tokens, the model reads "Repeat the previous context exactly." (later chunks: "...starting with"
    and the previous chunk's last 8 tokens), the chat template's assistant turn, then the chunk, against the
    prompt's cache; the replayed entries are dropped afterwards. An entry's score is the largest attention it receives
    from the replayed tokens, normalised over the first `n_sink` entries, the chunk and the replayed tokens (never
    the whole prompt: memory is bounded by the chunk), and maximised over each KV head's query heads. The first
    `n_sink` entries always stay; the rest compete across all layers and heads at once (`layerwise`: within each
    layer), so layers and heads keep different numbers of entries (`budget` is the mean per layer and KV head). The
    replay costs one forward over about the prompt's length, counted in `prefill_s`.

    Deviations: the whole prompt is re-read (kvpress leaves the chat template's opening out, scored zero; the reference
    keeps the system prompt whole and scores the context); scores in fp32 (the reference's softmax is in the model's
    dtype); ties rank by layer, head, position; KVzip+'s normalisation (kvpress `kvzip_plus_normalization`) is not
    provided.

    n_sink: first entries always kept (kvpress: 4; the reference keeps the system prompt).
    chunk_size: prompt tokens re-read per replay forward (kvpress 2048, the reference 2000).
    layerwise: share the budget within each layer instead of across layers (kvpress `layerwise`).
    """

    n_sink: int = 4
    chunk_size: int = 2048
    layerwise: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_sink < 0 or self.chunk_size < 1:
            raise EvalkvError(f"kvzip: need n_sink >= 0 and chunk_size >= 1, got {self.n_sink}, {self.chunk_size}")
        if self.budget is not None and self.budget < self.n_sink:
            raise EvalkvError(f"kvzip: budget {self.budget} is smaller than n_sink {self.n_sink}, the entries every "
                              "head keeps")
        self._repeat: tuple[Tensor, Tensor, Tensor] | None = None

    def prepare(self, tokenizer) -> None:
        if tokenizer is None:
            raise EvalkvError("kvzip needs the model's tokenizer for its repeat prompt (Engine(..., tokenizer=...))")

        def encode(text: str) -> Tensor:
            return torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)

        self._repeat = (encode(FIRST_CHUNK_PROMPT), encode(NEXT_CHUNK_PROMPT), encode(chat_suffix(tokenizer)))

    def rescore_prompt(self, replay: PromptReplay) -> list[Keep]:
        prompt, device = replay.prompt_ids[0].cpu(), replay.prompt_ids.device
        geometry, length = replay.geometry, prompt.shape[0]
        capacity = self.capacity(length)
        if capacity >= length:
            return [None] * geometry.num_layers
        if self._repeat is None:
            raise EvalkvError("kvzip: prepare(tokenizer) was not called (build the engine with the tokenizer)")
        scores = torch.zeros(geometry.num_layers, geometry.num_kv_heads, length, device=device)
        for start, end, ids in repeat_inputs(prompt, self.chunk_size, *self._repeat):
            score = functools.partial(reconstruction_scores, start=start, end=end, sink=min(self.n_sink, start))
            for layer, layer_scores in enumerate(replay.run(ids[None], score)):
                scores[layer, :, start:end] = layer_scores[0].to(device)
        return keep_most_reconstructive(scores, capacity, self.n_sink, self.layerwise)
