"""`evalkv plot pattern`: which prompt positions each layer and head kept for one sample (the eviction pattern).

The sample is recomputed: the model, method and task come from a run directory's `config.yaml` or from `evalkv pred`
overrides, the sample from its id (default: the task's first). Generation is greedy and ignores stop tokens up to
decode step `step`, traced by the engine (`Engine.generate(trace=True)`); the pattern is what each layer's attention
read at that step, i.e. what survived the prompt's compression (step 1) or `step` steps of decode-time eviction.
The heatmap has one row per layer and KV head (per query head with `granularity=query_head`), one column per
position, dark where the entry is held; the strip above it is the share of rows holding each position.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from evalkv.config import compose_run, options
from evalkv.errors import EvalkvError
from evalkv.records import CONFIG
from evalkv.report.figure import check_output, pyplot, save_figure


@dataclass
class Pattern:
    kept: np.ndarray  # bool [layers * heads, positions]: row layer * heads + head
    layers: int
    heads: int
    prompt_tokens: int  # prompt (+ suffix) tokens; later columns are generated tokens
    step: int
    sample_id: str
    label: str  # model / method / task


def pattern_config(arguments: list[str]) -> DictConfig:
    """A run directory's stored config, or the config `evalkv pred` would compose from these overrides."""
    if len(arguments) == 1 and "=" not in arguments[0]:
        run = Path(arguments[0])
        if not (run / CONFIG).is_file():
            raise EvalkvError(f"{run} is not a run directory (no {CONFIG}); give a run directory or evalkv pred "
                              "overrides such as model=random-tiny-llama method=snapkv budget=64")
        return OmegaConf.load(run / CONFIG)
    unexpected = [argument for argument in arguments if "=" not in argument]
    if unexpected:
        raise EvalkvError(f"expected one run directory or KEY=VALUE overrides, got {' '.join(unexpected)}")
    return compose_run(arguments)


def _rows(layer_entry) -> list[np.ndarray]:
    """One 1-D array of positions per head, from `[B, H, m]` or a list of per-head `[B, 1, m]` tensors."""
    if isinstance(layer_entry, list):
        return [head.reshape(-1).cpu().numpy() for head in layer_entry]
    return [layer_entry[0, h].cpu().numpy() for h in range(layer_entry.shape[1])]


def kept_matrix(attended: list, length: int) -> np.ndarray:
    """bool [layers * heads, length]: True where a layer's head held that position in one traced forward."""
    rows = [positions for layer_entry in attended for positions in _rows(layer_entry)]
    kept = np.zeros((len(rows), length), dtype=bool)
    for row, positions in enumerate(rows):
        kept[row, positions] = True
    return kept


def eviction_pattern(cfg: DictConfig, sample_id: str | None = None, step: int = 1) -> Pattern:
    """Recompute one sample under the config's model, method and task and return what each head held at `step`."""
    from evalkv.kv.engine import Engine
    from evalkv.methods import build_method
    from evalkv.models.config import ModelConfig
    from evalkv.models.loader import load_model
    from evalkv.tasks import build_task

    if step < 1:
        raise EvalkvError(f"--step must be >= 1 (1 = right after the prompt was compressed), got {step}")
    method = build_method(cfg.method.name, options(cfg.method))
    task = build_task(cfg.task.name, options(cfg.task))
    model = load_model(ModelConfig(**options(cfg.model), name=cfg.model.name))
    seen = []
    for sample in task.samples(model):
        if sample_id is None or sample.id == sample_id:
            break
        seen.append(sample.id)
    else:
        shown = ", ".join(seen[:5]) + (", ..." if len(seen) > 5 else "")
        raise EvalkvError(f"task {task.name} has no sample {sample_id!r} (its ids: {shown})")
    engine = Engine(model.model, method, model.backend, model.tokenizer)
    generation = engine.generate(sample.prompt_ids, step + 1, suffix_ids=sample.suffix_ids, trace=True)
    attended = generation.trace[-1]
    length = generation.prompt_tokens + step
    kept = kept_matrix(attended, length)
    label = f"{cfg.model.name} / {method.describe()} / {cfg.task.name}"
    return Pattern(kept, len(attended), kept.shape[0] // len(attended), generation.prompt_tokens, step, sample.id,
                   label)


def plot_pattern(pattern: Pattern, output: str | Path, title: str | None = None) -> Path:
    """The heatmap (rows layer x head, columns positions) with the share of rows holding each position above."""
    check_output(output)
    plt = pyplot()
    from matplotlib.colors import ListedColormap

    rows, length = pattern.kept.shape
    figure, (share_axis, axis) = plt.subplots(
        2, 1, figsize=(12, 1.6 + min(9.0, 0.12 * rows + 1.5)), sharex=True,
        gridspec_kw={"height_ratios": [1, 4]},
    )
    share_axis.plot(np.arange(length), pattern.kept.mean(axis=0), color="#1f4e79", linewidth=0.8)
    share_axis.set_ylim(0, 1.05)
    share_axis.set_ylabel("share of\nheads keeping", fontsize=9)
    axis.imshow(pattern.kept, aspect="auto", interpolation="nearest", cmap=ListedColormap(["#f4f4f4", "#1f4e79"]),
                extent=(-0.5, length - 0.5, rows - 0.5, -0.5))
    for boundary in range(pattern.heads, rows, pattern.heads):
        axis.axhline(boundary - 0.5, color="white", linewidth=0.6)
    ticks = list(range(0, pattern.layers, max(1, pattern.layers // 12)))
    axis.set_yticks([layer * pattern.heads + (pattern.heads - 1) / 2 for layer in ticks], [f"L{t}" for t in ticks])
    axis.set_ylabel(f"layer ({pattern.heads} head{'s' if pattern.heads > 1 else ''} each)")
    axis.set_xlabel("position in the sequence (dark: held in the cache, light: evicted)")
    for target in (share_axis, axis):
        target.axvline(pattern.prompt_tokens - 0.5, color="#c0392b", linewidth=1, linestyle="--")
    share_axis.annotate("prompt ends", xy=(pattern.prompt_tokens - 0.5, 1.0), color="#c0392b", fontsize=8,
                        ha="right", va="bottom")
    held = pattern.kept.sum(axis=1)
    share_axis.set_title(title or f"Eviction pattern: {pattern.label}, sample {pattern.sample_id}, decode step "
                         f"{pattern.step} (held per head: mean {held.mean():.1f}, min {held.min()}, max {held.max()} "
                         f"of {length})", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, output)
