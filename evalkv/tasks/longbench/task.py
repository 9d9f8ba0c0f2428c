"""The `longbench` task: LongBench v1's 21 tasks and LongBench-E from the official task files."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from evalkv.errors import EvalkvError
from evalkv.tasks.base import Sample, Task
from evalkv.tasks.longbench.data import check_row_count, count_rows, read_rows, task_file
from evalkv.tasks.longbench.prompt import build_prompt, longbench_sample
from evalkv.tasks.longbench.spec import (
    CHINESE_TASKS,
    E_SUFFIX,
    E_TASKS,
    ENGLISH_TASKS,
    PROMPTS,
    TASKS,
    base_task,
)
from evalkv.tasks.registry import register_task

TASK_GROUPS = {
    "all": TASKS,
    "en": ENGLISH_TASKS,
    "zh": CHINESE_TASKS,
    "all_e": tuple(f"{task}{E_SUFFIX}" for task in E_TASKS),
}


def expand_tasks(names: list[str]) -> list[str]:
    """Task names with the groups (`all`, `en`, `zh`, `all_e`) expanded, in the given order, without repeats."""
    known = set(TASKS) | set(TASK_GROUPS["all_e"])
    expanded: list[str] = []
    for name in names:
        for task in TASK_GROUPS.get(name, (name,)):
            if task in known:
                if task not in expanded:
                    expanded.append(task)
            elif task.removesuffix(E_SUFFIX) in TASKS:
                raise EvalkvError(f"longbench: {task.removesuffix(E_SUFFIX)} has no LongBench-E file; "
                                  f"LongBench-E tasks: {', '.join(E_TASKS)}")
            else:
                raise EvalkvError(f"longbench: unknown task {task!r}; known: {', '.join(TASKS)}, their LongBench-E "
                                  f"versions {{task}}_e, and the groups {', '.join(TASK_GROUPS)}")
    if not expanded:
        raise EvalkvError("longbench: task.tasks is empty; e.g. task.tasks=[all] or task.tasks=[hotpotqa,qasper_e]")
    return expanded


def split_template(task: str, row: dict) -> tuple[str, str]:
    """The filled template cut right after `{context}`: (instructions + context, the rest: question and cue)."""
    head, _, tail = PROMPTS[base_task(task)].partition("{context}")
    try:
        return (head + "{context}").format(**row), tail.format(**row)
    except KeyError as error:
        raise EvalkvError(f"{task} row {row.get('_id')!r} has no field {error} that its prompt needs") from None


def sample_ids(task: str, rows: list[dict]) -> list[str]:
    """`{task}/{_id}`; an `_id` seen before in the file gets `#2`, `#3`, ... so ids stay unique and stable."""
    seen: Counter = Counter()
    ids = []
    for row in rows:
        seen[row["_id"]] += 1
        count = seen[row["_id"]]
        ids.append(f"{task}/{row['_id']}" + (f"#{count}" if count > 1 else ""))
    return ids


@register_task("longbench")
@dataclass
class LongBench(Task):
    """LongBench v1 and LongBench-E with the reference's prompts, truncation, generation lengths and metrics.

    Based on LongBench (Bai et al., arXiv 2308.14508), THUDM/LongBench `LongBench/pred.py` and `eval.py`
    (specs/benchmarks.md §A); the defaults follow what the KV-cache papers run (§D): the 16 English tasks, the whole
    prompt compressed (compress=prompt). Prompts: evalkv/tasks/longbench/prompt.py (deviations listed there).
    Records carry the task name (`hotpotqa`; LongBench-E rows `hotpotqa_e`), the row's `length` and `language`, and
    whether the prompt was query-aware, chat-wrapped and truncated.

    data_dir: a folder with the official `{task}.jsonl` / `{task}_e.jsonl` files (data.zip unpacked; a `data/`
        subfolder is found too). `evalkv data longbench --dest DIR` fetches them.
    tasks: task names in run order; `{task}_e` for LongBench-E; groups `all` (21), `en` (16 English, the default),
        `zh` (5 Chinese), `all_e` (13 LongBench-E).
    compress: `context` compresses the context alone, then feeds the question (and the answer cue and chat closing)
        without eviction, as kvpress does (records say `query_aware: false`); `prompt` (default) compresses the
        whole prompt, as the KV-cache papers do. The split keeps the whole prompt's token ids: the whole prompt is
        truncated first (as the reference), then cut where `{context}` ends in it (the template's opening and the
        chat template's opening go with the context, the rest with the question; a token straddling the cut goes
        with the question). When truncation cuts into the question itself (a question longer than half the
        budget), the kept tail is the question part. (Runs before `compress` existed set `query_agnostic: true`.)
    chat_template: null = the reference's rule (the model's chat template on every task but trec, triviaqa,
        samsum, lsht, lcc, repobench-p, when the tokenizer has one); true = the same rule, and a model without a
        template is an error; false = never.
    samples_per_task: take the first N rows of each task (n_samples caps the whole run).
    check_row_counts: refuse files whose row count is not the official one.
    Truncation uses `model.max_prompt_length` (LongBench's model2maxlen); a model without one is not truncated and
    its records say `max_prompt_length: null`.
    """

    data_dir: Optional[str] = None
    tasks: list[str] = field(default_factory=lambda: list(ENGLISH_TASKS))
    chat_template: Optional[bool] = None
    samples_per_task: Optional[int] = None
    check_row_counts: bool = True

    free_options: ClassVar[tuple[str, ...]] = ("data_dir", "samples_per_task")

    def __post_init__(self) -> None:
        super().__post_init__()
        expand_tasks(list(self.tasks))
        if self.samples_per_task is not None and self.samples_per_task < 1:
            raise EvalkvError(f"longbench: samples_per_task must be >= 1 (or null), got {self.samples_per_task}")

    @property
    def task_names(self) -> list[str]:
        return expand_tasks(list(self.tasks))

    def _files(self) -> dict:
        return {name: task_file(self.data_dir, name) for name in self.task_names}

    def samples(self, model) -> Iterator[Sample]:
        files = self._files()  # every file is found (and counted) before the first sample
        if self.check_row_counts:
            for name, path in files.items():
                check_row_count(path, name, count_rows(path))
        for name, path in files.items():
            rows = read_rows(path, name, self.check_row_counts)[: self.samples_per_task]
            for sample_id, row in zip(sample_ids(name, rows), rows):
                context_part, question_part = split_template(name, row)
                prompt = build_prompt(model, name, context_part, question_part, self.chat_template,
                                      self.splits_question)
                yield longbench_sample(model, name, sample_id, prompt, row["answers"], row.get("all_classes"),
                                       row.get("length"), {"language": row.get("language")})

    def size(self) -> int:
        counts = [count_rows(path) for path in self._files().values()]
        return sum(min(count, self.samples_per_task or count) for count in counts)
