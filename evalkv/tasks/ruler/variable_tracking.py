"""RULER's variable tracking generator (`scripts/data/synthetic/variable_tracking.py`): task `vt`.

A chain `VAR A = 12345`, `VAR B = VAR A `, ... hidden in the noise haystack; the answer is every variable that holds
the value. One in-context example is built first (3-letter names, value 12345, sized to 500 tokens without the
model's chat wrapper), and before each sample it is re-randomised and inserted between the chat prefix and the task
text. Random draws follow the script call for call: Python's `random` and NumPy's legacy global generator, both
seeded with `seed`. Only the `noise` haystack of RULER's vt task is implemented.
"""

from __future__ import annotations

import random
import string

import numpy as np

from evalkv.tasks.ruler.common import (
    Frame,
    Generated,
    Setting,
    fit_sample,
    measured,
    render,
    search_size,
    sized_rows,
)
from evalkv.tasks.ruler.constants import TEMPLATES
from evalkv.tasks.ruler.niah import NOISE

ICL_VALUE = "12345"


class VariableTracking:
    def __init__(self, setting: Setting):
        self.setting = setting
        self.num_chains, self.num_hops = setting.args["num_chains"], setting.args["num_hops"]
        # The example is sized to 500 tokens with nothing to generate, without the chat wrapper.
        self.example_setting = Setting(**{**vars(setting), "max_seq_length": 500, "tokens_to_generate": 0,
                                          "frame": Frame()})
        self.random = random.Random(setting.seed)
        self.numpy = np.random.RandomState(setting.seed)

    def _name(self, length: int) -> str:
        return "".join(self.random.choices(string.ascii_uppercase, k=length)).upper()

    def chains(self, is_icl: bool) -> tuple[list[list[str]], list[list[str]]]:
        k = 3 if is_icl else 5
        num_hops = min(10, self.num_hops) if is_icl else self.num_hops
        names = [self._name(k) for _ in range((num_hops + 1) * self.num_chains)]
        while len(set(names)) < self.num_chains * (num_hops + 1):
            names.append(self._name(k))
        variables, chains = [], []
        for i in range(0, len(names), num_hops + 1):
            chain_names = names[i:i + num_hops + 1]
            variables.append(chain_names)
            value = ICL_VALUE if is_icl else str(self.numpy.randint(10000, 99999))
            chain = [f"VAR {chain_names[0]} = {value}"]
            chain += [f"VAR {chain_names[j + 1]} = VAR {chain_names[j]} " for j in range(num_hops)]
            chains.append(chain)
        return variables, chains

    def build(self, num_noises: int, is_icl: bool = False) -> Generated:
        variables, chains = self.chains(is_icl)
        value = chains[0][0].split("=")[-1].strip()
        lines = [NOISE] * num_noises
        for chain in chains:
            positions = sorted(self.random.sample(range(len(lines)), len(chain)))
            for position, j in zip(positions, range(len(chain))):
                lines.insert(position + j, chain[j])
        context = "\n".join(lines).replace(". \n", ".\n")
        setting = self.example_setting if is_icl else self.setting
        entry = TEMPLATES["variable_tracking"]
        text, prefix, question = render(setting, entry["template"], entry["answer_prefix"], context=context,
                                        query=value, num_v=self.num_hops + 1)
        return Generated(text, prefix, variables[0], {"value": value}, question)

    def randomized_example(self, example: str) -> str:
        """variable_tracking.py `randomize_icl`: fresh names (same lengths) and a fresh value, by text replacement."""
        for name in example.strip().split()[-self.num_hops - 1:]:
            example = example.replace(name, self._name(len(name)))
        return example.replace(ICL_VALUE, str(self.numpy.randint(10000, 99999)))


def _example(generator: VariableTracking) -> str:
    """The in-context example: RULER's first call, one sample with `is_icl` and noise step 5."""
    icl = generator.example_setting
    build = lambda size: generator.build(size, is_icl=True)  # noqa: E731
    incremental = 5
    tokens_per_noise = icl.count(build(incremental).prompt) / incremental
    size = search_size(icl, build, incremental, int((500 / tokens_per_noise) * 3))
    sample, _, _ = fit_sample(lambda n: measured(icl, build(n)), size, incremental, icl.max_seq_length,
                              "vt (in-context example)")
    return sample.prompt + " " + " ".join(sample.outputs) + "\n"


def generate(setting: Setting, task: str) -> list[dict]:
    generator = VariableTracking(setting)
    example = _example(generator)
    example_tokens = setting.count(example)
    incremental = 5 if setting.max_seq_length < 4096 else 10
    probe = generator.build(incremental)
    tokens_per_noise = setting.count(probe.prompt) / incremental
    upper = int((setting.max_seq_length / tokens_per_noise) * 3)
    size = search_size(setting, generator.build, incremental, upper, extra_tokens=example_tokens)

    cut = len(setting.frame.prefix)

    def with_example(num_noises: int) -> Generated:
        sample = generator.build(num_noises)
        sample.input = sample.input[:cut] + generator.randomized_example(example) + "\n" + sample.input[cut:]
        return sample

    return sized_rows(setting, task, with_example, size, incremental)
