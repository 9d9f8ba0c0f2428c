"""`evalkv plot pattern`: which prompt positions each layer and head kept for one sample (the eviction pattern).

The heatmap has one row per layer and KV head (per query head with `granularity=query_head`), one column per
position, dark where the entry is held; the strip above it is the share of rows holding each position. The pattern
itself is recomputed by evalkv/run/pattern.py (the model runs the sample again, traced).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
