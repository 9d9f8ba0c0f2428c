"""RULER's needle-in-a-haystack generator (`scripts/data/synthetic/niah.py`): niah_single_*, niah_multikey_*,
niah_multivalue, niah_multiquery.

Random draws follow niah.py call for call (one `random.Random(seed)` stands for its seeded global `random`), and the
essay haystack is split into sentences by NLTK's Punkt exactly where niah.py splits it (sentences.py), so with the same
tokenizer the samples are RULER's byte for byte with its base template, and with a chat wrapper up to the deviation
below (checked against RULER's own prepare.py: scripts/ruler_reference_check.py, docs/results.md).

Deviation, with a chat wrapper only: when one value is asked for, niah.py re-words its whole prompt template
(`Some` -> `A`, `are all` -> `is`, `are` -> `is`, `answers` -> `answer`), and that template already holds RULER's
chat wrapper (prepare.py formats `model_template` around the task template first). evalkv re-words RULER's task
template and answer prefix only, never the chat wrapper around them. Of RULER's own wrappers (scripts/data/template.py)
two contain the words: `vicuna-chat` ("polite answers" becomes "polite answer") and `lwm-chat` ("You are a helpful
assistant" becomes "You is a helpful assistant"); the others are unchanged by it. Wrapped in the tokenizer's chat
template, as evalkv does, RULER's procedure would turn Qwen2.5's system prompt into "You is Qwen, created by Alibaba
Cloud. You is a helpful assistant."; evalkv keeps the wrapper as the model was trained on it. Without a chat wrapper
(`task.chat_template=false`, RULER's `base` template) there is no difference.
"""

from __future__ import annotations

import random
import uuid

import numpy as np

from evalkv.tasks.ruler.common import Generated, Setting, ask, render, search_size, sized_rows
from evalkv.tasks.ruler.constants import TEMPLATES
from evalkv.tasks.ruler.sentences import split_sentences
from evalkv.tasks.ruler.words import niah_words

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int).tolist()
INCREMENTAL = {"essay": 500, "noise": 25, "needle": 25}


def singular(text: str) -> str:
    """niah.py's rewording of the template when one value is asked for (applied in this order)."""
    return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


class NeedleHaystack:
    def __init__(self, setting: Setting, essay_words: list[str] | None):
        self.setting = setting
        args = setting.args
        self.haystack_type = args["type_haystack"]
        self.key_type, self.value_type = args["type_needle_k"], args["type_needle_v"]
        self.num_v, self.num_q = args["num_needle_v"], args["num_needle_q"]
        self.num_k = max(args["num_needle_k"], self.num_q)
        self.essay_words = essay_words
        self.random = random.Random(setting.seed)

    def random_value(self, kind: str) -> str:
        if kind == "numbers":
            return str(self.random.randint(10**6, 10**7 - 1))
        if kind == "words":
            return self.random.choice(niah_words())
        return str(uuid.UUID(int=self.random.getrandbits(128), version=4))

    def build(self, num_haystack: int) -> Generated:
        keys, values, needles = [], [], []
        for _ in range(self.num_k):
            keys.append(self.random_value(self.key_type))
            value = []
            for _ in range(self.num_v):
                value.append(self.random_value(self.value_type))
                needles.append(NEEDLE.format(type_needle_v=self.value_type, key=keys[-1], value=value[-1]))
            values.append(value)
        random.Random(self.setting.seed).shuffle(needles)

        context = self._essay(num_haystack, needles) if self.haystack_type == "essay" else self._lines(
            num_haystack, needles)

        indices = self.random.sample(range(self.num_k), self.num_q)
        queries = [keys[i] for i in indices]
        answers = [a for i in indices for a in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]

        template, answer_prefix = TEMPLATES["niah"]["template"], TEMPLATES["niah"]["answer_prefix"]
        type_needle_v = self.value_type
        if self.num_q * self.num_v == 1:
            template, answer_prefix, type_needle_v = singular(template), singular(answer_prefix), type_needle_v[:-1]
        text, prefix, question = render(self.setting, template, answer_prefix, type_needle_v=type_needle_v,
                                        context=context, query=query)
        depths = sorted(round(100 * context.index(needle) / len(context), 1) for needle in needles)
        metadata = {"queries": queries, "needle_depths": depths}
        if self.num_q > 1:
            metadata["single_queries"] = [self.single_query(template, answer_prefix, keys[i], values[i])
                                          for i in indices]
        return Generated(text, prefix, answers, metadata, question)

    def single_query(self, template: str, answer_prefix: str, key: str, values: list[str]) -> dict:
        """One of several queries asked alone about the same context (task.split_queries): RULER's question and
        answer prefix with that key as `{query}`, worded as the task's (plural) template, and that key's values."""
        question, prefix = ask(self.setting, template, answer_prefix, type_needle_v=self.value_type, query=key)
        return {"question": question, "answer_prefix": prefix, "outputs": list(values)}

    def _essay(self, num_haystack: int, needles: list[str]) -> str:
        haystack = self.essay_words
        if num_haystack > len(haystack):
            haystack = haystack * ((num_haystack + len(haystack) - 1) // len(haystack))
        sentences = split_sentences(" ".join(haystack[:num_haystack]).strip())
        depths = self.random.sample(DEPTHS, len(needles))
        positions = [0] + sorted(int(len(sentences) * (depth / 100)) for depth in depths) + [len(sentences)]
        pieces = []
        for i in range(1, len(positions)):
            pieces.append(" ".join(sentences[positions[i - 1]:positions[i]]))
            if i - 1 < len(needles):
                pieces.append(needles[i - 1])
        return " ".join(pieces)

    def _lines(self, num_haystack: int, needles: list[str]) -> str:
        if self.haystack_type == "noise":
            lines = [NOISE] * num_haystack
        else:  # every line a distractor needle with its own random key and value
            lines = [NEEDLE.format(type_needle_v=self.value_type, key=self.random_value(self.key_type),
                                   value=self.random_value(self.value_type)) for _ in range(num_haystack)]
        for index, needle in zip(sorted(self.random.sample(range(num_haystack), len(needles)), reverse=True),
                                 needles):
            lines.insert(index, needle)
        return "\n".join(lines)


def generate(setting: Setting, task: str, essay_words: list[str] | None = None) -> list[dict]:
    generator = NeedleHaystack(setting, essay_words)
    incremental = INCREMENTAL[generator.haystack_type]
    if generator.haystack_type != "essay" and setting.max_seq_length < 4096:
        incremental = 5
    probe = generator.build(incremental)
    tokens_per_haystack = setting.count(probe.prompt) / incremental
    upper = int((setting.max_seq_length / tokens_per_haystack) * 3)
    size = search_size(setting, generator.build, incremental, upper)
    return sized_rows(setting, task, generator.build, size, incremental)
