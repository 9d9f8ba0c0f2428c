"""Needle-in-a-haystack: one fact hidden at a chosen depth of Paul Graham essays, over a grid of lengths x depths.

Two forms (specs/benchmarks.md §C.1, §C.2):

- `original`: gkamradt/LLMTest_NeedleInAHaystack. Grid: 35 lengths `linspace(1000, 16000)` x 35 depths
  `linspace(0, 100)`; the OpenAI provider's messages (system prompt, the context, the question + "Don't give
  information outside the document or repeat your findings"), through the model's chat template; 300 new tokens.
  The original scores with a GPT judge (1-10); evalkv scores with needle recall instead (below).
- `kv`: the KV-cache papers' form (KVCache-Factory `run_needle_in_haystack.py`, from FranxYao's
  Long-Context-Data-Engineering). Grid: lengths 1000..8000 step 100 (its Llama-3 script) x 10 depths
  `linspace(0, 100, 10)`; its plain prompt `<|im_start|> This is a very long story book: <book> ... </book>...`,
  no chat template; 30 new tokens, stopping at a newline.

Both build the context the same way: the essays, repeated until they hold the longest length, are cut to `length`
tokens; then `final_context_length_buffer` (200) more tokens are taken off, the needle's tokens are inserted at
`int(len * depth / 100)` moved back to just after a period token (depth 100: at the end), and the tokens are decoded.

With compress=context the question is everything after the haystack: the `kv` form's ` </book>.\n Based on the
content of the book, Question: ...\nAnswer:`, the `original` form's question message (and, either way, the chat
template's closing).

Scores (evalkv/metrics/needle.py): needle recall, the share of the answer's words in the response (KVCache-Factory
`visualize.py`, the heatmap score), and for the kv form also ROUGE-1 F x 10 against the needle (its stored score).

Deviations: the haystack is RULER's `PaulGrahamEssays.json` (the same essays, more of them) unless `haystack_path`
names a folder of the 49 `.txt` files; token counts never include special tokens (gkamradt's Hugging Face provider
counts a BOS); period tokens are the tokenizer's encoding of "." plus SentencePiece's "▁." where the vocabulary has
it (KVCache-Factory hard-codes these ids per model family); `original` falls back to one user message when the chat
template refuses a system turn or two user turns in a row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import numpy as np

from evalkv.errors import EvalkvError
from evalkv.tasks.base import Sample, Task
from evalkv.tasks.essays import load_essays
from evalkv.tasks.registry import register_task

NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day."  # visualize.py's expected answer
QUESTIONS = {"original": "What is the best thing to do in San Francisco?",
             "kv": "The best thing to do in San Francisco is: "}
SYSTEM_PROMPT = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct"
FORMS = ("original", "kv")
GRIDS = {
    "original": (np.round(np.linspace(1000, 16000, num=35, endpoint=True)).astype(int).tolist(),
                 np.round(np.linspace(0, 100, num=35, endpoint=True)).astype(int).tolist()),
    "kv": (np.arange(1000, 8000 + 1, step=100).tolist(), np.round(np.linspace(0, 100, num=10)).astype(int).tolist()),
}
MAX_NEW_TOKENS = {"original": 300, "kv": 30}


# KVCache-Factory's prompt for local models (verbatim).
KV_PROMPT = ("<|im_start|> This is a very long story book: <book> {context} </book>.\n Based on the content of the "
             "book, Question: {question}\nAnswer:")


def kv_prompt(context: str, question: str) -> str:
    return KV_PROMPT.format(context=context, question=question)


def original_messages(context: str, question: str) -> list[dict[str, str]]:
    """gkamradt's OpenAI provider messages (verbatim)."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": context},
            {"role": "user", "content": f"{question} Don't give information outside the document or repeat your "
                                        "findings"}]


def period_token_ids(tokenizer, form: str) -> set[int]:
    ids = set(tokenizer.encode(".", add_special_tokens=False))
    if form == "kv" and "▁." in tokenizer.get_vocab():
        ids.add(tokenizer.get_vocab()["▁."])
    return ids


def insert_needle(context_ids: list[int], needle_ids: list[int], depth: float, length: int, buffer: int,
                  periods: set[int]) -> list[int]:
    """gkamradt's `insert_needle` in token space."""
    length -= buffer
    if len(context_ids) + len(needle_ids) > length:
        context_ids = context_ids[:length - len(needle_ids)]
    if depth == 100:
        return context_ids + needle_ids
    point = int(len(context_ids) * (depth / 100))
    while point > 0 and context_ids[point - 1] not in periods:
        point -= 1
    return context_ids[:point] + needle_ids + context_ids[point:]


@register_task("needle")
@dataclass
class Needle(Task):
    """Needle-in-a-haystack over a grid of lengths x depths, in gkamradt's original form or the KV-cache papers' form.

    Based on gkamradt/LLMTest_NeedleInAHaystack and KVCache-Factory's run_needle_in_haystack.py (see the module
    docstring for both forms and every deviation).

    form: `kv` (KV-cache papers) or `original` (gkamradt).
    haystack_path: RULER's PaulGrahamEssays.json or a folder of .txt essays (required).
    lengths / depths: the grid (lengths in tokens, depths in percent); null takes the form's default grid.
    needle / retrieval_question / answer: the fact, the question (null: the form's) and the words recall looks for.
    final_context_length_buffer: tokens left off the context for the prompt's other text and the answer.
    max_new_tokens: null takes the form's (original 300, kv 30).
    chat_template: null takes the form's (original: on, kv: off).
    """

    form: str = "kv"
    haystack_path: Optional[str] = None
    lengths: Optional[list[int]] = None
    depths: Optional[list[float]] = None
    needle: str = NEEDLE
    retrieval_question: Optional[str] = None
    answer: str = ANSWER
    final_context_length_buffer: int = 200
    max_new_tokens: Optional[int] = None
    chat_template: Optional[bool] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.form not in FORMS:
            raise EvalkvError(f"needle: unknown form {self.form!r}; known: {', '.join(FORMS)}")
        lengths, depths = self.grid()
        if not lengths or min(lengths) <= self.final_context_length_buffer:
            raise EvalkvError(f"needle: lengths must exceed final_context_length_buffer "
                              f"({self.final_context_length_buffer}), got {list(lengths)}")
        if not depths or min(depths) < 0 or max(depths) > 100:
            raise EvalkvError(f"needle: depths must be percentages in [0, 100], got {list(depths)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise EvalkvError("needle: max_new_tokens must be >= 1")

    def grid(self) -> tuple[list[int], list[float]]:
        lengths, depths = GRIDS[self.form]
        return list(self.lengths or lengths), list(self.depths if self.depths is not None else depths)

    def size(self) -> int:
        lengths, depths = self.grid()
        return len(lengths) * len(depths)

    def samples(self, model) -> Iterator[Sample]:
        if not self.haystack_path:
            raise EvalkvError("needle: set task.haystack_path to RULER's PaulGrahamEssays.json or a folder of .txt "
                              "essays (gkamradt's PaulGrahamEssays/)")
        tokenizer = model.tokenizer
        lengths, depths = self.grid()
        haystack_ids = self._haystack_ids(tokenizer, load_essays(self.haystack_path), max(lengths))
        needle_ids = tokenizer.encode(self.needle, add_special_tokens=False)
        periods = period_token_ids(tokenizer, self.form)
        question = self.retrieval_question or QUESTIONS[self.form]
        chat = self.chat_template if self.chat_template is not None else self.form == "original"
        stop = [tokenizer.encode("\n", add_special_tokens=False)[-1]] if self.form == "kv" else []
        for length in lengths:
            trimmed = tokenizer.decode(haystack_ids[:length], skip_special_tokens=True)  # encode_and_trim
            context_ids = tokenizer.encode(trimmed, add_special_tokens=False)
            for depth in depths:
                ids = insert_needle(context_ids, needle_ids, depth, length, self.final_context_length_buffer,
                                    periods)
                context = tokenizer.decode(ids, skip_special_tokens=True)
                prompt_ids, suffix_ids = self._prompt_ids(model, context, question, chat)
                yield Sample(
                    id=f"len{length}_depth{depth:g}", task="needle", prompt_ids=prompt_ids, suffix_ids=suffix_ids,
                    answers=[self.answer], max_new_tokens=self.max_new_tokens or MAX_NEW_TOKENS[self.form],
                    length=len(prompt_ids) + len(suffix_ids or []), stop_token_ids=stop,
                    metadata={"context_length": length, "depth": depth, "form": self.form, "needle": self.needle},
                )

    @staticmethod
    def _haystack_ids(tokenizer, essays: str, longest: int) -> list[int]:
        """read_context_files: the essays repeated until they hold `longest` tokens, then encoded once."""
        text = essays
        while len(tokenizer.encode(text, add_special_tokens=False)) < longest:
            text += essays
        return tokenizer.encode(text, add_special_tokens=False)

    def _prompt_ids(self, model, context: str, question: str, chat: bool) -> tuple[list[int], list[int] | None]:
        """The prompt's token ids, or with compress=context the context's and the question's (cut after `context`)."""
        split = self.splits_question
        if self.form == "kv":
            opening = KV_PROMPT.partition("{context}")[0]
            return model.encode_parts(kv_prompt(context, question), len(opening) + len(context), chat=chat, split=split)
        messages = original_messages(context, question)
        joined = "\n\n".join(message["content"] for message in messages)
        context_end = len(messages[0]["content"]) + len("\n\n") + len(context)
        if not chat:
            return model.encode_parts(joined, context_end, split=split)
        if not getattr(model.tokenizer, "chat_template", None):
            raise EvalkvError(f"model {model.name} has no chat template; set task.chat_template=false")
        from jinja2 import TemplateError

        def render(marker: str) -> str:
            return model.tokenizer.apply_chat_template(original_messages(context + marker, question), tokenize=False,
                                                       add_generation_prompt=True)

        try:
            render("")
        except TemplateError:  # no system turn or no two user turns in a row: one user message
            return model.encode_parts(joined, context_end, chat=True, split=split)
        return model.encode_rendered(render, special_tokens=False, split=split)
