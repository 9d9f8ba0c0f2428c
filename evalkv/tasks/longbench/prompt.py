"""LongBench prompts as the reference builds them (specs/benchmarks.md §A.2), and the samples made from them.

Reference (THUDM/LongBench `LongBench/pred.py`, `get_pred`):
1. `prompt = dataset2prompt[task].format(**row)`;
2. middle truncation on the token ids of `tokenizer(prompt)` (special tokens included): when longer than the model's
   max prompt length, keep the first and the last `int(max_length / 2)` tokens, decode each half with
   `skip_special_tokens=True` and join the two strings;
3. the chat template, except on trec, triviaqa, samsum, lsht, lcc and repobench-p;
4. re-tokenize; greedy generation with the task's max new tokens; samsum also stops at "\\n" (the last id of
   `tokenizer.encode("\\n", add_special_tokens=False)`) and has `min_length=context_length+1` (no stop token first);
5. only the new tokens are decoded, with `skip_special_tokens=True`.

Deviations: step 3 uses the model's own chat template (`apply_chat_template`, as KVCache-Factory does for Llama-3)
instead of pred.py's hand-written wrappers for its 2023 models; the rendered text is tokenized without adding
special tokens (the template writes its BOS), so no second BOS appears. Generation stops on every end-of-turn token
of the tokenizer (pred.py: the tokenizer's EOS only), and samsum's first token may be none of them (min_length masks
the EOS and "\\n" there).
"""

from __future__ import annotations

from dataclasses import dataclass

from evalkv.tasks.base import Sample
from evalkv.tasks.longbench.spec import MAX_NEW_TOKENS, NO_CHAT_TASKS, base_task


@dataclass
class Prompt:
    prompt_ids: list[int]
    suffix_ids: list[int] | None  # compress=context: the question, fed after the context was compressed
    truncated: bool
    chat: bool


def middle_truncation(model, text: str, max_length: int | None) -> tuple[str, str] | None:
    """pred.py's truncation: the decoded first and last `int(max_length / 2)` tokens, or None when `text` fits."""
    ids = model.tokenizer(text)["input_ids"]
    if max_length is None or len(ids) <= max_length:
        return None
    half = int(max_length / 2)
    return model.decode(ids[:half]), model.decode(ids[-half:])


def uses_chat(task: str, chat_template: bool | None, model) -> bool:
    """Whether the prompt is wrapped: never on the reference's skip list; `None` = when the model has a template."""
    if base_task(task) in NO_CHAT_TASKS or chat_template is False:
        return False
    return model.has_chat_template if chat_template is None else True


def build_prompt(model, task: str, context_part: str, question_part: str, chat_template: bool | None,
                 split: bool) -> Prompt:
    """Token ids for one LongBench prompt `context_part + question_part` (the template filled in, cut after
    `{context}`), truncated to `model.max_prompt_length` as pred.py does (no truncation when it is unset).

    With `split` (compress=context) the same token ids come in two parts: the prompt to compress ends where the
    context ends, the rest (the question, the answer cue and the chat template's closing) follows compression. When
    truncation keeps the whole question the split is exactly there; when it cuts into the question (a question
    longer than half the budget), the kept tail of the prompt is the question part.
    """
    text, boundary = context_part + question_part, len(context_part)
    halves = middle_truncation(model, text, model.max_prompt_length)
    if halves is not None:
        head, tail = halves
        text = head + tail
        boundary = len(text) - len(question_part) if tail.endswith(question_part) else len(head)
    chat = uses_chat(task, chat_template, model)
    prompt_ids, suffix_ids = model.encode_parts(text, boundary, chat=chat, split=split)
    return Prompt(prompt_ids, suffix_ids, halves is not None, chat)


def newline_token(tokenizer) -> int:
    """pred.py's extra samsum stop: `tokenizer.encode("\\n", add_special_tokens=False)[-1]`."""
    return tokenizer.encode("\n", add_special_tokens=False)[-1]


def longbench_sample(model, task: str, sample_id: str, prompt: Prompt, answers: list[str],
                     all_classes: list[str] | None, length: int | None, metadata: dict) -> Sample:
    """A sample with the task's generation settings: max new tokens, and samsum's newline stop and minimum length."""
    samsum = base_task(task) == "samsum"
    return Sample(
        id=sample_id,
        task=task,
        prompt_ids=prompt.prompt_ids,
        suffix_ids=prompt.suffix_ids,
        answers=list(answers),
        max_new_tokens=MAX_NEW_TOKENS[base_task(task)],
        all_classes=all_classes,
        length=length,
        stop_token_ids=[newline_token(model.tokenizer)] if samsum else [],
        min_new_tokens=1 if samsum else 0,
        metadata={
            **metadata,
            "query_aware": prompt.suffix_ids is None,
            "chat_template": prompt.chat,
            "truncated": prompt.truncated,
            "max_prompt_length": model.max_prompt_length,
        },
    )
