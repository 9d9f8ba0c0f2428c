"""`evalkv demo`: the README's main job, the same runs `evalkv pred` makes, in one process (one model load)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from omegaconf import DictConfig

from evalkv.config import compose_methods
from evalkv.overrides import Dialect
from evalkv.report.table import table
from evalkv.run.pred import run_pred
from evalkv.run.score import format_scores, score_paths

DEMO_METHODS = ("full", "snapkv", "streaming_llm")
DEMO_DEFAULTS = ("output_dir=results/demo", "task.lengths=[1024]", "task.depths=[0,25,50,75,100]")
DEMO_BUDGET = 128
DEMO = Dialect("demo", ("model", "model.", "method.", "task.", "budget", "compression_ratio", "output_dir", "progress",
                        "batch_size", "mlp_chunk", "decode_graphs"), "its task and methods are fixed")


def demo_configs(overrides: Sequence[str]) -> list[DictConfig]:
    """The composed config of each demo run: passkey at DEMO_DEFAULTS and budget DEMO_BUDGET, then `overrides`
    (`method.X=` sets X for each demo method that has it, `snapkv.X=` for snapkv alone)."""
    keys = {override.partition("=")[0] for override in overrides}
    budget = [] if keys & {"budget", "compression_ratio"} else [f"budget={DEMO_BUDGET}"]
    return compose_methods(DEMO_METHODS, [*DEMO_DEFAULTS, *budget, *overrides], DEMO)


def run_demo(configs: Sequence[DictConfig]) -> str:
    began = time.perf_counter()
    runs = []
    for cfg in configs:
        run_dir = run_pred(cfg)
        for target, scores in score_paths([str(run_dir)]).scored:
            print(f"{target}\n{format_scores(scores)}\n", file=sys.stderr)
        runs.append(str(run_dir))
    summary = table(runs)
    return f"{summary}\ndemo wall time: {time.perf_counter() - began:.1f} s (runs under {configs[0].output_dir})\n"
