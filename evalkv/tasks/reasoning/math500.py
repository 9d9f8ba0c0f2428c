"""MATH-500 (Lightman et al., arXiv 2305.20050): the 500 MATH test problems of "Let's Verify Step by Step"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from evalkv.tasks.reasoning.data import HubDataset, field
from evalkv.tasks.reasoning.task import Problem, ReasoningTask
from evalkv.tasks.registry import register_task


@register_task("math500")
@dataclass
class MATH500(ReasoningTask):
    """MATH-500: competition problems with long sampled generations, scored by math-verify.

    A `\\boxed{}` answer after a long sampled generation, checked against the dataset's `answer` (LaTeX) by
    math-verify: pass@1 over k samples and maj@k (evalkv/metrics/reasoning.py). Data: HuggingFaceH4/MATH-500, split
    test (lighteval's math_500 task), or task.data_path (columns `problem`, `answer`; `subject`, `level` and
    `unique_id` are recorded when present). Default budget 16,384 new tokens (R-KV's maximum generation length for
    MATH-500). Options: see ReasoningTask (evalkv/tasks/reasoning/task.py)."""

    max_new_tokens: int = 16384

    name: ClassVar[str] = "math500"
    sources: ClassVar[dict[str, HubDataset]] = {"math500": HubDataset("HuggingFaceH4/MATH-500", "test")}

    def problem(self, row: dict, index: int, task: str, where: str) -> Problem:
        extra = {key: row[key] for key in ("subject", "level", "unique_id") if key in row}
        return Problem(f"{task}-{index}", task, str(field(row, ("problem",), where)),
                       str(field(row, ("answer",), where)), extra)
