"""`evalkv train-policy`: learn learned_mlp's eviction policy from the attention a model pays while it generates.

For each training prompt the model runs with the full cache: the prompt forward records, per layer and KV head,
every prompt token's features (key before RoPE, log position, value norm), then `steps` greedy decode steps add
up the attention each prompt token receives (summed over the steps, mean over the GQA group). Among the tokens
the method does not always keep (after the `n_sink` first, before the `window_size` last), the `top` most
attended per layer and KV head are labelled 1, the others 0. The per-(layer, KV head) MLPs are then fit with BCE
(Adam, fp32, fixed seed); a share of the prompts is held out to report how well the policy ranks unseen prompts.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import evalkv
from evalkv.config import compose_run, model_config
from evalkv.config import options as config_options
from evalkv.errors import EvalkvError
from evalkv.kv.attention import attention_column_sums, reduce_query_heads
from evalkv.kv.engine import Engine
from evalkv.kv.select import top_k_positions
from evalkv.methods.base import AttentionView, Method, ModelGeometry, Phase
from evalkv.methods.eviction_policy import EvictionPolicy, token_features
from evalkv.methods.learned_mlp import LearnedMLP
from evalkv.models.loader import load_model
from evalkv.overrides import Dialect
from evalkv.tasks import build_task

# A task seed other than the evaluation default (passkey: 42), so that training prompts differ from evaluation ones.
TRAINING_TASK_SEED = 1729


@dataclass
class TrainingOptions:
    steps: int = 32  # decode steps whose attention makes the target
    top: int = 128  # tokens labelled 1 per layer and KV head (C)
    epochs: int = 20
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    features: list[str] = field(default_factory=lambda: ["key", "value_norm"])
    lr: float = 1e-3
    batch_size: int = 256
    seed: int = 0
    holdout: float = 0.2  # share of the prompts held out for the report (none with a single prompt)
    n_sink: int = LearnedMLP.n_sink
    window_size: int = LearnedMLP.window_size

    def __post_init__(self) -> None:
        if min(self.steps, self.top, self.epochs, self.batch_size) < 1 or not 0 <= self.holdout < 1:
            raise EvalkvError("train-policy: --steps, --top, --epochs, --batch-size must be >= 1 and --holdout in "
                              f"[0, 1), got {self.steps}, {self.top}, {self.epochs}, {self.batch_size}, {self.holdout}")


@dataclass
class _AttentionRecorder(Method):
    """Full cache; records each layer's prompt-token features and the attention they get from decode steps."""

    features: list[str] = field(default_factory=list)
    needs_budget = False

    def compress_prompt(self, view: AttentionView) -> None:
        view.state["features"] = token_features(view.keys_before_rope(), view.positions, view.values,
                                                self.features)[0].cpu()
        view.state["received"] = torch.zeros(view.keys.shape[1], view.length)

    def after_step(self, view: AttentionView) -> None:
        if view.phase is Phase.DECODE:
            received = attention_column_sums(view.query, view.query_positions, view.keys, view.positions,
                                             view.scaling)
            prompt = view.state["received"].shape[-1]
            view.state["received"] += reduce_query_heads(received, view.keys.shape[1])[0, :, :prompt].cpu()


def training_examples(engine: Engine, prompt_ids: list[int], opts: TrainingOptions) -> tuple[torch.Tensor, ...]:
    """One prompt's candidates: features `[L, H_kv, c, F]`, labels `[L, H_kv, c]` (1 = among the `top` most
    attended by the next `steps` tokens) and the attention received `[L, H_kv, c]`."""
    generation = engine.generate(prompt_ids, opts.steps + 1, stop_token_ids=(), keep_session=True)
    states = generation.session.layer_state
    candidates = slice(opts.n_sink, len(prompt_ids) - opts.window_size)
    received = torch.stack([state["received"][:, candidates] for state in states])
    if received.shape[-1] <= opts.top:
        raise EvalkvError(f"train-policy: a {len(prompt_ids)}-token prompt leaves {received.shape[-1]} candidate "
                          f"tokens, not more than --top {opts.top}; use longer prompts or a smaller --top")
    labels = torch.zeros_like(received).scatter_(-1, top_k_positions(received, opts.top), 1.0)
    features = torch.stack([state["features"][:, candidates] for state in states])
    return features, labels, received


def fit(policy: EvictionPolicy, features: torch.Tensor, labels: torch.Tensor, opts: TrainingOptions) -> list[float]:
    """Fit every (layer, KV head) MLP at once on `[L, H_kv, N, F]` features and `[L, H_kv, N]` labels; returns the
    mean training loss of each epoch. Inputs are standardised with the training data's per-head statistics."""
    policy.feature_mean.copy_(features.mean(dim=2))
    policy.feature_std.copy_(features.std(dim=2).clamp(min=1e-6))
    optimizer = torch.optim.Adam(policy.parameters(), lr=opts.lr)
    generator = torch.Generator().manual_seed(opts.seed)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    count, losses = features.shape[2], []
    policy.train()
    for _ in range(opts.epochs):
        order = torch.randperm(count, generator=generator).to(features.device)
        total = 0.0
        for start in range(0, count, opts.batch_size):
            batch = order[start : start + opts.batch_size]
            loss = loss_fn(policy.logits(features[:, :, batch]), labels[:, :, batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * batch.numel()
        losses.append(total / count)
    policy.eval()
    return losses


def top_overlap(policy: EvictionPolicy, features: torch.Tensor, received: torch.Tensor, top: int) -> float:
    """Mean share of the `top` most attended tokens that the policy's own top `top` recovers, per layer and head."""
    with torch.no_grad():
        predicted = top_k_positions(policy.logits(features), top)
    actual = top_k_positions(received, top)
    hits = (predicted[..., :, None] == actual[..., None, :]).any(dim=-1).float()
    return float(hits.mean())


TRAIN_POLICY = Dialect("train-policy", ("model", "model.", "task", "task.", "progress"),
                       "it always runs the full cache")


def compose_config(overrides: list[str]) -> DictConfig:
    """The same config tree as `evalkv pred`; passkey-style tasks get a training seed unless one is given."""
    cfg = compose_run(overrides, TRAIN_POLICY)
    if "seed" in cfg.task and not any(o.startswith("task.seed=") for o in overrides):
        cfg = compose_run([*overrides, f"task.seed={TRAINING_TASK_SEED}"])
    return cfg


def train_policy(cfg: DictConfig, output: str | Path, opts: TrainingOptions) -> dict:
    """Collect targets on the config's model and task, fit, write the policy; returns its metadata."""
    task = build_task(cfg.task.name, config_options(cfg.task))
    loaded = load_model(model_config(cfg))
    recorder = _AttentionRecorder(features=list(opts.features))
    engine = Engine(loaded.model, recorder, loaded.backend, loaded.tokenizer)
    samples, total = task.samples(loaded), task.size()
    if task.n_samples is not None:
        samples = itertools.islice(samples, task.n_samples)
        total = task.n_samples if total is None else min(total, task.n_samples)
    examples = [training_examples(engine, sample.prompt_ids, opts) for sample in tqdm(
        samples, total=total, desc="train-policy: recording attention", unit="prompt", file=sys.stderr,
        disable=not cfg.progress, dynamic_ncols=True)]
    if not examples:
        raise EvalkvError(f"train-policy: task {task.name} produced no samples")
    held = int(round(opts.holdout * len(examples))) if len(examples) > 1 else 0
    training, held_out = examples[: len(examples) - held], examples[len(examples) - held :]

    geometry: ModelGeometry = engine.geometry
    description = {
        "model": loaded.description, "model_config": cfg.model.name, "vocab_size": len(loaded.tokenizer),
        "training": {
            "task": OmegaConf.to_container(cfg.task, resolve=True), "prompts": len(training),
            "held_out_prompts": len(held_out), "tokens_per_head": sum(f.shape[2] for f, _, _ in training),
            "target": f"attention mass from the next {opts.steps} greedy decode steps (full cache), summed over the "
                      "steps, mean over the GQA group",
            "labels": f"top {opts.top} per layer and KV head among prompt tokens {opts.n_sink}..n-{opts.window_size}",
            "loss": "binary cross-entropy (Adam, fp32)", "options": asdict(opts), "evalkv": evalkv.__version__,
        },
    }
    policy = EvictionPolicy.initialise(geometry, list(opts.features), list(opts.hidden), opts.seed, description)
    policy.to(loaded.device)
    features = torch.cat([f for f, _, _ in training], dim=2).to(loaded.device)
    labels = torch.cat([y for _, y, _ in training], dim=2).to(loaded.device)
    losses = fit(policy, features, labels, opts)
    report = policy.metadata["training"]
    report["final_loss"] = round(losses[-1], 5)
    if held_out:
        overlaps = [top_overlap(policy, f.to(loaded.device), r.to(loaded.device), opts.top) for f, _, r in held_out]
        report["held_out_top_overlap"] = round(sum(overlaps) / len(overlaps), 4)
        report["chance_top_overlap"] = round(sum(opts.top / r.shape[-1] for _, _, r in held_out) / len(held_out), 4)
    policy.save(output)
    return policy.metadata
