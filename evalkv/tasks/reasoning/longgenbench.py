"""LongGenBench's GSM8K (Liu et al., "LongGenBench: Long-context Generation Benchmark", EMNLP 2024 Findings, arXiv
2410.04199): K GSM8K problems asked in one prompt and answered in one long generation, so a model's own output grows to
thousands of tokens while it must still answer each question; "Can LLMs Maintain Fundamental Abilities under KV Cache
Compression?" (arXiv 2502.01941) uses it to rank KV-cache compression methods.

Everything here follows the reference script, Dominic789654/LongGenBench `longgenbench_GSM8K_openai.py` at commit
9845864 (docs/benchmarks.md#longgenbench-gsm8k):
- the test split of openai/gsm8k (main), the first `question_limit` problems (700) in dataset order, cut into prompts
  of `k` consecutive problems (35; the last prompt holds the remainder);
- the user turn: `Examples: \n`, the 8 chain-of-thought exemplars of Wei et al. (arXiv 2201.11903) as the reference's
  `data/LongGenBench_GSM8K_prompt/LongGenBench_prompt.txt` writes them (`EXEMPLARS`, byte for byte; its sha256 is
  checked by the tests), `\n\nFollowing Question: \n`, then `Question_{i}:\n{problem}\n` for i = 9, 10, ... and a
  final `\n`; the system turn is the reference's instruction (`SYSTEM`); greedy decoding (temperature 0), at most
  4,096 new tokens;
- scoring (evalkv/metrics/longgenbench.py): the output's answers are cut out as the reference cuts them and paired
  with the prompt's questions in order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Optional

from evalkv.errors import EvalkvError
from evalkv.tasks.base import Sample, Task
from evalkv.tasks.reasoning.data import HubDataset, field, load_problems
from evalkv.tasks.registry import register_task

# The reference's few-shot file, verbatim (no newline at its end; "tues- day" is in it).
EXEMPLARS = (
    'Question_1: \n'
    'There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are '
    'done, there will be 21 trees. How many trees did the grove workers plant today?\n'
    '\n'
    'Question_2: \n'
    'If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?\n'
    '\n'
    'Question_3: \n'
    'Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?\n'
    '\n'
    'Question_4: \n'
    'Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many '
    'lollipops did Jason give to Denny?\n'
    '\n'
    'Question_5: \n'
    'Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?\n'
    '\n'
    'Question_6: \n'
    'There were nine computers in the server room. Five more computers were installed each day, from '
    'monday to thursday. How many computers are now in the server room?\n'
    '\n'
    'Question_7: \n'
    'Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How '
    'many golf balls did he have at the end of wednesday?\n'
    '\n'
    'Question_8: \n'
    'Olivia has $23. She bought five bagels for $3 each. How much money does she have left?\n'
    '\n'
    'Answer_1:\n'
    'There are 15 trees originally.\n'
    'Then there were 21 trees after some more were planted.\n'
    'So there must have been 21 - 15 = 6.\n'
    'The answer is 6.\n'
    '\n'
    'Answer_2:\n'
    'There are originally 3 cars.\n'
    '2 more cars arrive.\n'
    '3 + 2 = 5.\n'
    'The answer is 5.\n'
    '\n'
    'Answer_3:\n'
    'Originally, Leah had 32 chocolates.\n'
    'Her sister had 42.\n'
    'So in total they had 32 + 42 = 74.\n'
    'After eating 35, they had 74 - 35 = 39.\n'
    'The answer is 39.\n'
    '\n'
    'Answer_4:\n'
    'Jason started with 20 lollipops.\n'
    'Then he had 12 after giving some to Denny.\n'
    'So he gave Denny 20 - 12 = 8.\n'
    'The answer is 8.\n'
    '\n'
    'Answer_5:\n'
    'Shawn started with 5 toys.\n'
    'If he got 2 toys each from his mom and dad, then that is 4 more toys.\n'
    '5 + 4 = 9.\n'
    'The answer is 9.\n'
    '\n'
    'Answer_6:\n'
    'There were originally 9 computers.\n'
    'For each of 4 days, 5 more computers were added.\n'
    'So 5 * 4 = 20 computers were added.\n'
    '9 + 20 is 29.\n'
    'The answer is 29.\n'
    '\n'
    'Answer_7:\n'
    'Michael started with 58 golf balls.\n'
    'After losing 23 on tues- day, he had 58 - 23 = 35.\n'
    'After losing 2 more, he had 35 - 2 = 33 golf balls.\n'
    'The answer is 33.\n'
    '\n'
    'Answer_8:\n'
    'Olivia had 23 dollars.\n'
    '5 bagels for 3 dollars each will be 5 x 3 = 15 dollars.\n'
    'So she has 23 - 15 dollars left.\n'
    '23 - 15 is 8.\n'
    'The answer is 8.'
)
SYSTEM = (
    "Answer each question step by step, adhering to the format shown in the examples provided. Start each response "
    "with 'Answer_' and introduce the final response with 'The answer is'. Do not repeat the question. Ensure that "
    "you respond to all the questions presented, regardless of their number."
)
FIRST_NUMBER = 9  # the asked questions are numbered on from the 8 exemplars


def user_turn(problems: list[str]) -> str:
    """The reference's user message for these problems (`process_question`)."""
    return ("Examples: \n" + EXEMPLARS + "\n\nFollowing Question: \n"
            + "".join(f"Question_{number}:\n{problem}\n" for number, problem in enumerate(problems, FIRST_NUMBER))
            + "\n")


@register_task("longgenbench_gsm8k")
@dataclass
class LongGenBenchGSM8K(Task):
    """LongGenBench's GSM8K: `k` GSM8K problems per prompt, answered in one greedy generation.

    data_path: a local .jsonl / .parquet file of openai/gsm8k's test split (columns `question`, `answer`), used
        instead of the hub. revision: the hub dataset's branch, tag or commit (default its latest, resolved).
    k: problems per prompt (the reference's run script: 35). question_limit: the first this many problems (700).
    max_new_tokens: the generation budget (the reference's max_tokens: 4096).
    chat_template: the system and user turns through the model's chat template, as the reference's chat API call;
        false feeds the system text, a blank line and the user text as plain text (for base models).
    Each record is one prompt: its `answers` are the k gold solutions, in question order."""

    data_path: Optional[str] = None
    revision: Optional[str] = None
    k: int = 35
    question_limit: int = 700
    max_new_tokens: int = 4096
    chat_template: bool = True

    name: ClassVar[str] = "longgenbench_gsm8k"
    free_options: ClassVar[tuple[str, ...]] = ("data_path",)
    source: ClassVar[HubDataset] = HubDataset("openai/gsm8k", "test", "main")

    def __post_init__(self) -> None:
        super().__post_init__()
        for option in ("k", "question_limit", "max_new_tokens"):
            if getattr(self, option) < 1:
                raise EvalkvError(f"task {self.name}: {option} must be >= 1, got {getattr(self, option)}")
        if self.splits_question:
            raise EvalkvError(f"task {self.name} asks its questions inside the prompt and answers them in one "
                              "generation: there is no question to feed after a compressed context; use "
                              "compress=prompt")
        self._rows: list[tuple[str, str]] | None = None
        self._where = ""

    def rows(self) -> list[tuple[str, str]]:
        """(problem, gold solution) of the first question_limit problems, in dataset order (loaded once)."""
        if self._rows is None:
            loaded = load_problems(self.source, self.data_path, self.revision)
            self._where = f"{loaded.dataset}@{loaded.revision}"
            self._rows = [(str(field(row, ("question",), f"{loaded.dataset} row {index}")),
                           str(field(row, ("answer",), f"{loaded.dataset} row {index}")))
                          for index, row in enumerate(loaded.rows[:self.question_limit])]
        return self._rows

    def prompt_ids(self, model, problems: list[str]) -> list[int]:
        if self.chat_template:
            if not model.has_chat_template:
                raise EvalkvError(f"model {model.name} has no chat template; set task.chat_template=false")
            text = model.tokenizer.apply_chat_template(
                [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_turn(problems)}],
                tokenize=False, add_generation_prompt=True)
            return model.tokenizer(text, add_special_tokens=False)["input_ids"]
        return model.encode_prompt(SYSTEM + "\n\n" + user_turn(problems))

    def samples(self, model) -> Iterator[Sample]:
        rows = self.rows()
        for first in range(0, len(rows), self.k):
            chunk = rows[first:first + self.k]
            ids = self.prompt_ids(model, [problem for problem, _ in chunk])
            yield Sample(
                id=f"{self.name}-{first // self.k}",
                task=self.name,
                prompt_ids=ids,
                answers=[solution for _, solution in chunk],
                max_new_tokens=self.max_new_tokens,
                length=len(ids),
                metadata={"questions": len(chunk), "first_problem": first, "dataset": self._where},
            )

    def size(self) -> int:
        return math.ceil(len(self.rows()) / self.k)
