"""What GSM8K, MATH-500 and AIME share: a short prompt asking for a `\\boxed{}` answer, a long sampled generation
(the cache grows while decoding, so decode-time eviction is what is measured), k samples per problem as records of
their own, each with a seed derived from (seed, problem, sample index). Scored by evalkv/metrics/reasoning.py."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Optional

from evalkv.errors import EvalkvError, unknown_name
from evalkv.tasks.base import Sample, Task
from evalkv.tasks.reasoning.data import HubDataset, Problems, load_problems

# The instruction around a problem (`{problem}`), by `task.prompt`:
# deepseek_r1: DeepSeek-R1's model card (Usage Recommendations, 3: "For mathematical problems, it is advisable to
#   include a directive in your prompt such as ..."), after the problem on a new line as Qwen2.5-Math's evaluation
#   (`qwen-boxed` in evaluation/utils.py) places it; the reasoning-KV papers' R1-distilled models take it.
# lighteval: lighteval's MATH_PROMPT_TEMPLATE for aime24 / aime25 (src/lighteval/tasks/tasks/aime.py, adapted there
#   from openai/simple-evals), verbatim, leading and trailing newline included.
# rkv: R-KV's prompt_template (Zefan-Cai/R-KV run_math.py @ d15c976), which R-KV feeds without a chat template
#   (task.chat_template=false reproduces that).
PROMPTS = {
    "deepseek_r1": "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "lighteval": (
        "\nSolve the following math problem efficiently and clearly.  The last line of your response should be of the "
        "following format: 'Therefore, the final answer is: $\\boxed{{ANSWER}}$. I hope it is correct' (without "
        "quotes) where ANSWER is just the final number or expression that solves the problem. Think step by step "
        "before answering.\n\n{problem}\n"
    ),
    "rkv": (
        "You are given a math problem.\n\nProblem: {problem}\n\n You need to solve the problem step by step. First, "
        "you need to provide the chain-of-thought, then provide the final answer.\n\n Provide the final answer in the "
        "format: Final answer:  \\boxed{{}}"
    ),
}


def sample_seed(seed: int, problem: str, index: int) -> int:
    """The seed of sample `index` of `problem`: the same in every run with the same `seed`, whatever the method, the
    batch or which samples a resumed run still has to do (paired samples across methods)."""
    return int(hashlib.sha256(f"{seed}/{problem}/{index}".encode()).hexdigest()[:15], 16)


@dataclass
class Problem:
    id: str  # `{task}-{row index}`; sample ids are `{id}-s{j}`
    task: str  # the record's task (picks the metric): gsm8k, math500, aime24, aime25
    text: str
    answer: str
    metadata: dict


@dataclass
class ReasoningTask(Task):
    """Base of the math reasoning tasks; the options every one of them takes (docs/benchmarks.md#gsm8k):

    data_path: a local .jsonl / .parquet file with the hub dataset's columns, used instead of the hub.
    revision: the hub dataset's branch, tag or commit (default its latest commit, resolved and recorded).
    samples_per_problem: k sampled generations per problem, each a record (`{problem}-s{j}`); pass@1 is their mean,
        maj@k their majority vote.
    temperature, top_p, top_k: sampled decoding (DeepSeek-R1's evaluation: 0.6, 0.95, no top-k); temperature 0 decodes
        greedily.
    seed: the run's seed; sample j of problem p samples with seed `sample_seed(seed, p, j)`.
    max_new_tokens: the generation budget (thought and answer).
    prompt: deepseek_r1, lighteval or rkv (PROMPTS).
    chat_template: wrap the prompt as one user turn with the model's chat template (thinking models: its
        `model.chat_template_kwargs`, e.g. `enable_thinking`, apply).
    """

    data_path: Optional[str] = None
    revision: Optional[str] = None
    samples_per_problem: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 42
    max_new_tokens: int = 32768
    prompt: str = "deepseek_r1"
    chat_template: bool = True

    sources: ClassVar[dict[str, HubDataset]] = {}  # record task name -> where its problems live

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt not in PROMPTS:
            raise unknown_name("prompt", self.prompt, PROMPTS, f"task.prompt of {self.name}")
        if self.samples_per_problem < 1 or self.max_new_tokens < 1:
            raise EvalkvError(f"task {self.name}: samples_per_problem and max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise EvalkvError(f"task {self.name}: temperature must be >= 0 (0 decodes greedily), got "
                              f"{self.temperature}")
        if self.temperature == 0 and self.samples_per_problem > 1:
            raise EvalkvError(f"task {self.name}: temperature=0 decodes greedily, so its {self.samples_per_problem} "
                              "samples per problem would all be the same; set task.temperature > 0 or "
                              "task.samples_per_problem=1")
        try:
            self._sampling(0)
        except ValueError as error:
            raise EvalkvError(f"task {self.name}: {error}") from None
        if self.data_path and len(self.record_tasks()) > 1:
            raise EvalkvError(f"task {self.name}: task.data_path gives one file, but {', '.join(self.record_tasks())} "
                              "are asked for; choose one of them")
        self._problems: list[Problem] | None = None

    def record_tasks(self) -> list[str]:
        """The record task names this configuration runs (AIME: one per year)."""
        return list(self.sources)

    @property
    def task_names(self) -> list[str]:
        """What run.json's labels list as the run's expected tasks."""
        return self.record_tasks()

    def problem(self, row: dict, index: int, task: str, where: str) -> Problem:
        """One dataset row as a problem (each task knows its columns)."""
        raise NotImplementedError

    def problems(self) -> list[Problem]:
        """Every problem of the configured datasets, in dataset order (loaded once)."""
        if self._problems is None:
            self._problems = []
            for task in self.record_tasks():
                loaded = load_problems(self.sources[task], self.data_path, self.revision)
                self._problems += [self._with_provenance(self.problem(row, index, task, f"{loaded.dataset} row "
                                                                      f"{index}"), loaded)
                                   for index, row in enumerate(loaded.rows)]
        return self._problems

    @staticmethod
    def _with_provenance(problem: Problem, loaded: Problems) -> Problem:
        problem.metadata = {"dataset": loaded.dataset, "dataset_revision": loaded.revision, **problem.metadata}
        return problem

    def _sampling(self, seed: int):
        """The sampling of a sample with this seed (an `evalkv.kv.sampling.Sampling`), None when greedy."""
        from evalkv.kv.sampling import Sampling  # torch loads with the engine, not with the task list

        if self.temperature == 0:
            return None
        return Sampling(self.temperature, self.top_k, self.top_p, seed)

    def samples(self, model) -> Iterator[Sample]:
        """Problem by problem, its k samples (which share the prompt, so they decode in one batch)."""
        template = PROMPTS[self.prompt]
        for problem in self.problems():
            ids = model.encode_prompt(template.format(problem=problem.text), chat=self.chat_template)
            for index in range(self.samples_per_problem):
                sampling = self._sampling(sample_seed(self.seed, problem.id, index))
                yield Sample(
                    id=f"{problem.id}-s{index}",
                    task=problem.task,
                    prompt_ids=ids,
                    answers=[problem.answer],
                    max_new_tokens=self.max_new_tokens,
                    length=len(ids),
                    sampling=sampling,
                    metadata={"problem": problem.id, "sample_index": index,
                              "sampling": None if sampling is None else {
                                  "temperature": sampling.temperature, "top_p": sampling.top_p,
                                  "top_k": sampling.top_k, "seed": sampling.seed},
                              **problem.metadata},
                )

    def size(self) -> int:
        return len(self.problems()) * self.samples_per_problem
