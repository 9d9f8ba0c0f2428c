"""`evalkv demo`: the README's main job, the same runs `evalkv pred` makes, in one process (one model load)."""

from __future__ import annotations

import sys
import time

from evalkv.config import compose_run
from evalkv.report.table import table
from evalkv.run.pred import run_pred
from evalkv.run.score import format_scores, score_paths

DEMO_METHODS = ("full", "snapkv", "streaming_llm")


def run_demo(output_dir: str, budget: int, lengths: str, depths: str) -> str:
    began = time.perf_counter()
    runs = []
    for method in DEMO_METHODS:
        cfg = compose_run([
            f"method={method}", f"budget={budget}", f"output_dir={output_dir}",
            f"task.lengths=[{lengths}]", f"task.depths=[{depths}]",
        ])
        run_dir = run_pred(cfg)
        for target, scores in score_paths([str(run_dir)]).scored:
            print(f"{target}\n{format_scores(scores)}\n", file=sys.stderr)
        runs.append(str(run_dir))
    summary = table(runs)
    return f"{summary}\ndemo wall time: {time.perf_counter() - began:.1f} s (runs under {output_dir})\n"
