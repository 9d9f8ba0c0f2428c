"""The `minilongbench` task: MiniLongBench's 237 pre-rendered LongBench prompts as a 21-task smoke run."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from evalkv.errors import EvalkvError
from evalkv.tasks.base import Sample, Task
from evalkv.tasks.longbench.data import minilongbench_file, read_minilongbench
from evalkv.tasks.longbench.prompt import build_prompt, longbench_sample
from evalkv.tasks.longbench.spec import TASKS
from evalkv.tasks.registry import register_task


@register_task("minilongbench")
@dataclass
class MiniLongBench(Task):
    """MiniLongBench: 237 real LongBench samples over all 21 tasks, with their prompts already rendered.

    Data: MilkThink-Lab/MiniLongBench `pred_data/example/MiniLongBench_{task}.json` (OpenCompass's output format).
    Each sample's `origin_prompt` replaces LongBench's template step; truncation, the chat-template rule, max new
    tokens, samsum's stop and the metrics are LongBench's (evalkv/tasks/longbench/prompt.py). Records carry the
    LongBench task name, so `evalkv score` applies LongBench's metrics.
    Deviations: the prompts follow OpenCompass's LongBench templates, which are close to LongBench's but not
    byte-identical (e.g. "as concisely" for narrativeqa); the files have no `length`, so records have none;
    context and question are not stored apart, so only compress=prompt runs (compress=context is refused).

    data_dir: the folder of MiniLongBench_{task}.json files (required).
    tasks: which of the 21 tasks, in run order (default all).
    chat_template: as in `longbench` (null = the reference's rule).
    samples_per_task: take the first N samples of each task.
    """

    data_dir: Optional[str] = None
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    chat_template: Optional[bool] = None
    samples_per_task: Optional[int] = None

    free_options: ClassVar[tuple[str, ...]] = ("data_dir", "samples_per_task")

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [task for task in self.tasks if task not in TASKS]
        if unknown or not self.tasks:
            raise EvalkvError(f"minilongbench: tasks must be LongBench tasks ({', '.join(TASKS)}); got {unknown or []}")
        if self.samples_per_task is not None and self.samples_per_task < 1:
            raise EvalkvError(f"minilongbench: samples_per_task must be >= 1 (or null), got {self.samples_per_task}")
        if self.splits_question:
            raise EvalkvError(
                "minilongbench cannot run compress=context: its prompts come rendered whole (OpenCompass's templates, "
                "which differ from LongBench's on narrativeqa, qasper and repobench-p), so where the context ends is "
                "not known; use compress=prompt, or task=longbench with LongBench's files for compress=context")

    def _entries(self, task: str):
        return read_minilongbench(minilongbench_file(self.data_dir, task))[: self.samples_per_task]

    def samples(self, model) -> Iterator[Sample]:
        for task in self.tasks:  # every file is found before the first sample
            minilongbench_file(self.data_dir, task)
        for task in self.tasks:
            for entry in self._entries(task):
                prompt = build_prompt(model, task, entry.prompt, "", self.chat_template, split=False)
                yield longbench_sample(model, task, f"{task}/{entry.key}", prompt, entry.answers, entry.all_classes,
                                       None, {})

    def size(self) -> int:
        return sum(len(self._entries(task)) for task in self.tasks)
