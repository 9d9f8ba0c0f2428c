"""`evalkv headmask`: CateKV's offline head classification (docs/methods.md#catekv).

For each sample of a reference task (RULER variable tracking by default), the prompt runs through the model with
the full cache while a probe measures, per layer and KV head, how consistently the last prompt queries hit the same
middle chunks (the coefficient of variation of per-chunk hit counts). Heads whose CV falls in the lowest
`cv_threshold` fraction most often across samples are adaptive (1, kept full by CateKV); the rest consistent (0).
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from evalkv.errors import EvalkvError
from evalkv.kv.engine import Engine
from evalkv.methods.base import AttentionView, Method
from evalkv.methods.catekv import ChunkGeometry, chunk_max, middle_attention
from evalkv.models.loader import LoadedModel
from evalkv.records import write_json_atomic, write_text_atomic
from evalkv.tasks import Task


def linear_quantile(values: Tensor, q: float) -> Tensor:
    """`torch.quantile(values, q)` (linear interpolation) without its 2^24-element limit."""
    flat = values.flatten().float()
    position = q * (flat.numel() - 1)
    low, high = math.floor(position), math.ceil(position)
    low_value = torch.kthvalue(flat, low + 1).values
    high_value = torch.kthvalue(flat, high + 1).values if high != low else low_value
    return low_value + (high_value - low_value) * (position - low)


def head_consistency(attention: Tensor, chunk_size: int, top_fraction: float, top_threshold: float) -> float:
    """CV of per-chunk hit counts for one head's `[last_q, n_mid]` attention (the reference's `CateKV_dynamic`).

    A query hits a chunk when any of its tokens gets more than `tau = max(vmin + (vmax - vmin) top_threshold, 1e-9)`,
    `vmax`/`vmin` the `top_fraction` / `1 - top_fraction` quantiles of all the head's values; the CV is the unbiased
    std over the mean of the chunks' hit counts (mean 0 counts as 1e-10).
    """
    vmax, vmin = linear_quantile(attention, top_fraction), linear_quantile(attention, 1 - top_fraction)
    threshold = torch.clamp(vmin + (vmax - vmin) * top_threshold, min=1e-9)
    hits = chunk_max(attention, chunk_size) > threshold  # [last_q, chunks]
    counts = hits.float().sum(dim=0)
    mean = counts.mean()
    return float(counts.std() / (mean if mean > 0 else 1e-10))


@dataclass
class ConsistencyProbe(Method):
    """Measures each head's consistency during the prompt; evicts nothing (not a registered method)."""

    chunk_size: int = 8
    init_tokens: int = 64
    recent_tokens: int = 256
    last_q: int = 64
    top_fraction: float = 0.998
    top_threshold: float = 1.0
    needs_budget = False

    def compress_prompt(self, view: AttentionView) -> None:
        if not view.sample.last_chunk:
            return None
        geometry = ChunkGeometry(view.length, self.chunk_size, self.init_tokens, self.recent_tokens)
        if geometry.middle_chunks < 2 or view.num_new < self.last_q:
            raise EvalkvError(f"headmask: a {view.length}-token prompt leaves no middle chunks to measure; use longer "
                              "prompts (the reference uses 128K-token RULER vt samples)")
        values = view.sample.state.setdefault("cv", {})
        values[view.layer_idx] = [
            head_consistency(middle_attention(view, geometry, self.last_q, kv_head)[0], self.chunk_size,
                             self.top_fraction, self.top_threshold)
            for kv_head in range(view.geometry.num_kv_heads)
        ]
        return None


def static_headmask(matrices: list[Tensor], ratio: float, draws: int = 50, seed: int = 42) -> Tensor:
    """The reference's `static.py`: over `draws` randomly chosen sample matrices, count how often each head is among
    the `ratio` lowest-CV heads (`CV <= quantile(M, ratio)`); heads whose count reaches the ceil(ratio * heads)-th
    largest count are adaptive (ties may add heads). Deviation: when that count is 0 (too few samples for the ties
    to spread) the reference would make every head adaptive; here a head must have been selected at least once."""
    chosen = random.Random(seed).sample(matrices, min(draws, len(matrices)))
    frequency = torch.zeros_like(chosen[0])
    for matrix in chosen:
        frequency += (matrix <= torch.quantile(matrix.flatten(), ratio)).float()
    wanted = max(1, math.ceil(ratio * frequency.numel()))
    cutoff = frequency.flatten().sort(descending=True).values[wanted - 1]
    return frequency >= max(float(cutoff), 1.0)  # a head never among the lowest CVs never becomes adaptive


def build_headmask(model: LoadedModel, task: Task, samples: int, probe: ConsistencyProbe) -> list[Tensor]:
    """One `[layers, KV heads]` CV matrix per sample."""
    engine = Engine(model.model, probe, model.backend, model.tokenizer)
    matrices = []
    for sample in tqdm(itertools.islice(task.samples(model), samples), total=samples, desc="headmask", unit="sample"):
        generation = engine.generate(sample.prompt_ids, 1, keep_session=True)
        per_layer = generation.session.sample.state["cv"]
        matrices.append(torch.tensor([per_layer[layer] for layer in sorted(per_layer)]))
    if not matrices:
        raise EvalkvError(f"headmask: task {task.name} produced no samples")
    return matrices


def write_headmask(path: Path, mask: Tensor, metadata: dict, matrices: list[Tensor]) -> None:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(mask.int().tolist())
    write_text_atomic(path, text.getvalue())
    write_json_atomic(path.with_suffix(path.suffix + ".json"), {
        **metadata, "adaptive_heads": int(mask.sum()), "heads": mask.numel(),
        "cv_per_sample": [matrix.tolist() for matrix in matrices],
    })
