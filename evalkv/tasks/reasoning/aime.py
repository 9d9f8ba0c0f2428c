"""AIME 2024 and 2025: the 30 problems of each year's AIME I and II, integer answers 0-999."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from evalkv.errors import EvalkvError
from evalkv.tasks.reasoning.data import HubDataset, field
from evalkv.tasks.reasoning.task import Problem, ReasoningTask
from evalkv.tasks.registry import register_task

YEARS = {"2024": "aime24", "2025": "aime25"}


@register_task("aime")
@dataclass
class AIME(ReasoningTask):
    """AIME 2024 and 2025: olympiad problems with long sampled chains of thought, scored by math-verify.

    A `\\boxed{}` answer after a long sampled generation: pass@1 over k samples and maj@k
    (evalkv/metrics/reasoning.py); records are tasks `aime24` and `aime25`. Data: HuggingFaceH4/aime_2024 and
    yentinglin/aime_2025, split train (lighteval's aime24 / aime25 tasks), or task.data_path for one year (columns
    `problem` / `Problem` and `answer` / `Answer`, so Maxwell-Jia/AIME_2024's file works too). Defaults as
    DeepSeek-R1's evaluation: 32,768 new tokens and 64 samples per problem (lighteval's aime24_avg: avg@64).

    year: 2024, 2025 or both.
    Other options: see ReasoningTask (evalkv/tasks/reasoning/task.py).
    """

    year: str = "2024"
    samples_per_problem: int = 64
    max_new_tokens: int = 32768

    name: ClassVar[str] = "aime"
    sources: ClassVar[dict[str, HubDataset]] = {"aime24": HubDataset("HuggingFaceH4/aime_2024", "train"),
                                                "aime25": HubDataset("yentinglin/aime_2025", "train")}

    def __post_init__(self) -> None:
        self.year = str(self.year)
        if self.year not in (*YEARS, "both"):
            raise EvalkvError(f"task aime: year must be 2024, 2025 or both, got {self.year!r}")
        super().__post_init__()

    def record_tasks(self) -> list[str]:
        return list(YEARS.values()) if self.year == "both" else [YEARS[self.year]]

    def problem(self, row: dict, index: int, task: str, where: str) -> Problem:
        answer = str(field(row, ("answer", "Answer"), where)).strip()
        source_id = next((row[key] for key in ("id", "ID") if key in row), None)
        return Problem(f"{task}-{index}", task, str(field(row, ("problem", "Problem"), where)), answer,
                       {"year": int(next(y for y, t in YEARS.items() if t == task)), "source_id": source_id})
