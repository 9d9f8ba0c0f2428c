"""GSM8K (Cobbe et al., arXiv 2110.14168): 1,319 grade-school word problems, test split of openai/gsm8k (main)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from evalkv.tasks.reasoning.data import HubDataset, field
from evalkv.tasks.reasoning.task import Problem, ReasoningTask
from evalkv.tasks.registry import register_task


def gsm8k_answer(solution: str) -> str:
    """The final answer of a GSM8K solution: the text after `####`, thousands separators removed (lighteval's
    gsm8k `record_to_sample` takes the text after the delimiter)."""
    return solution.split("####")[-1].strip().replace(",", "")


@register_task("gsm8k")
@dataclass
class GSM8K(ReasoningTask):
    """GSM8K: grade-school word problems with long sampled generations, scored by math-verify.

    A `\\boxed{}` answer after a long sampled generation, pass@1 over k samples and maj@k (evalkv/metrics/reasoning.py).
    Data: openai/gsm8k, config main, split test (lighteval's gsm8k task), or task.data_path (columns
    `question`, `answer` with the `#### N` line). Default budget 8,192 new tokens (R-KV's run_math.py
    length for gsm8k, prompt included there).
    Options: see ReasoningTask (evalkv/tasks/reasoning/task.py)."""

    max_new_tokens: int = 8192

    name: ClassVar[str] = "gsm8k"
    sources: ClassVar[dict[str, HubDataset]] = {"gsm8k": HubDataset("openai/gsm8k", "test", "main")}

    def problem(self, row: dict, index: int, task: str, where: str) -> Problem:
        return Problem(f"{task}-{index}", task, str(field(row, ("question",), where)),
                       gsm8k_answer(str(field(row, ("answer",), where))), {})
