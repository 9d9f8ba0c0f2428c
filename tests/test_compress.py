"""compress=prompt|context: every task yields its context and its question apart when asked (the question fed after the
context was compressed, as kvpress evaluates), the two parts are exactly the whole prompt's token ids, and RULER's
niah_multiquery can ask its queries one at a time."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
from conftest import tiny_loaded
from longbench_fixtures import small_longbench
from ruler_helpers import count_words, multiquery_rows, needs_essays, setting
from test_ruler_generators import essay_words, generated, hotpot_fixture, squad_fixture
from tokenizers import Tokenizer

from evalkv.errors import EvalkvError
from evalkv.metrics import score_records
from evalkv.models.presets import byte_tokenizer
from evalkv.run.parallel import ShardedRun
from evalkv.run.pred import _batches, _protocol_checked
from evalkv.tasks import Sample, Task, build_task
from evalkv.tasks.needle import NEEDLE
from evalkv.tasks.passkey import FINAL_QUESTION
from evalkv.tasks.ruler import niah, qa
from evalkv.tasks.ruler.constants import RULER_TASKS, TEMPLATES

ESSAY = ("Some essay text. It goes on and on about startups. Then it ends. " * 40).strip()


def raw(model, ids) -> str:
    return model.tokenizer.decode(ids, skip_special_tokens=False)


def both(name: str, options: dict, model) -> list[tuple[Sample, Sample]]:
    """Each sample of the task under compress=prompt beside the same sample under compress=context."""
    whole = list(build_task(name, {**options, "compress": "prompt"}).samples(model))
    split = list(build_task(name, {**options, "compress": "context"}).samples(model))
    assert [s.id for s in whole] == [s.id for s in split] and whole
    return list(zip(whole, split))


def assert_exact_split(pairs: list[tuple[Sample, Sample]]) -> None:
    for whole, split in pairs:
        assert whole.suffix_ids is None and split.suffix_ids
        assert split.prompt_ids + split.suffix_ids == whole.prompt_ids
        assert split.length == whole.length


def merging_model():
    """The tiny model with a byte tokenizer that merges ".\\n" into one token."""
    base = byte_tokenizer()
    definition = json.loads(base.backend_tokenizer.to_str())
    vocab = definition["model"]["vocab"]
    vocab[".Ċ"] = max(max(vocab.values()), *(token["id"] for token in definition["added_tokens"])) + 1
    definition["model"]["merges"] = [[".", "Ċ"]]
    tokenizer = type(base)(tokenizer_object=Tokenizer.from_str(json.dumps(definition)), bos_token="<|bos|>",
                           eos_token="<|eos|>", pad_token="<|pad|>",
                           additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"])
    tokenizer.chat_template = base.chat_template
    return dataclasses.replace(tiny_loaded(), tokenizer=tokenizer)


@pytest.mark.parametrize("chat", [False, True])
def test_one_tokenization_cut_where_the_context_ends_and_a_straddling_token_goes_with_the_question(chat):
    model = merging_model()
    text = "Read this.\nWhat now?"
    whole, none = model.encode_parts(text, len("Read this."), chat=chat, split=False)
    context, question = model.encode_parts(text, len("Read this."), chat=chat)
    assert none is None and whole == model.encode_prompt(text, chat=chat) and context + question == whole
    assert len(model.tokenizer(".\n", add_special_tokens=False)["input_ids"]) == 1  # the merge straddles the cut
    opening, closing = ("<|user|>\n", "<|end|>\n<|assistant|>\n") if chat else ("", "")
    assert raw(model, context) == opening + "Read this"
    assert raw(model, question) == ".\nWhat now?" + closing


def test_a_chat_template_that_rewrites_the_users_text_cannot_be_split():
    model = tiny_loaded()
    model = dataclasses.replace(model, tokenizer=byte_tokenizer())
    model.tokenizer.chat_template = "{% for m in messages %}{{ m['content'][:12] }}{% endfor %}"
    assert model.encode_parts("context text. Question?", 13, chat=True, split=False)[1] is None
    with pytest.raises(EvalkvError, match="rewrites the prompt.*use compress=prompt"):
        model.encode_parts("context text. Question?", 13, chat=True)


def test_compress_takes_prompt_or_context():
    with pytest.raises(EvalkvError, match=r"compress='question': expected one of prompt \(.*\); context \("):
        build_task("passkey", {"compress": "question"})


@pytest.mark.parametrize("chat", [False, True])
def test_passkey_question_is_its_last_line(chat):
    model = tiny_loaded()
    pairs = both("passkey", {"lengths": [256], "depths": [0, 100], "chat_template": chat}, model)
    assert_exact_split(pairs)
    closing = "<|end|>\n<|assistant|>\n" if chat else ""
    for whole, split in pairs:
        assert raw(model, split.suffix_ids) == "\n" + FINAL_QUESTION + closing
        assert whole.length == len(whole.prompt_ids) <= 256


@pytest.mark.parametrize("form,chat,question", [
    ("kv", False, " </book>.\n Based on the content of the book, Question: The best thing to do in San Francisco is: "
                  "\nAnswer:"),
    ("original", True, "<|end|>\n<|user|>\nWhat is the best thing to do in San Francisco? Don't give information "
                       "outside the document or repeat your findings<|end|>\n<|assistant|>\n"),
    ("original", False, "\n\nWhat is the best thing to do in San Francisco? Don't give information outside the "
                        "document or repeat your findings"),
])
def test_needle_question_follows_the_haystack(tmp_path, form, chat, question):
    (tmp_path / "a.txt").write_text(ESSAY)
    model = tiny_loaded()
    pairs = both("needle", {"form": form, "chat_template": chat, "haystack_path": str(tmp_path), "lengths": [400],
                            "depths": [0, 50]}, model)
    assert_exact_split(pairs)
    for _, split in pairs:
        assert raw(model, split.suffix_ids) == question
        assert NEEDLE.strip() in raw(model, split.prompt_ids)


def test_longbench_samples_split_where_the_context_ends(tmp_path):
    model = tiny_loaded()
    pairs = both("longbench", {"data_dir": str(small_longbench(tmp_path)), "check_row_counts": False,
                               "tasks": ["hotpotqa", "samsum", "trec"]}, model)
    assert_exact_split(pairs)
    assert all(w.metadata["query_aware"] and not s.metadata["query_aware"] for w, s in pairs)
    trec = next(split for _, split in pairs if split.task == "trec")
    assert raw(model, trec.suffix_ids) == "\nQuestion: Where is Paris ?\nType:"


def test_minilongbench_refuses_compress_context():
    with pytest.raises(EvalkvError, match="minilongbench cannot run compress=context.*task=longbench"):
        build_task("minilongbench", {"compress": "context"})


def ruler_rows(task: str) -> list[dict]:
    """Two rows of a RULER task from its generator (word-counted lengths, the chat-like frame of ruler_helpers)."""
    if task in ("qa_1", "qa_2"):
        dataset = qa.read_squad(squad_fixture()) if task == "qa_1" else qa.read_hotpotqa(hotpot_fixture())
        return qa.generate(setting(task, 1024, num_samples=2), task, *dataset)
    if RULER_TASKS[task].args.get("type_haystack") == "essay":
        return generated(task, 2048, num_samples=2, essay_words=_essay_words())
    return generated(task, 1024, num_samples=2)


@functools.cache
def _essay_words() -> list[str]:
    return essay_words()


@pytest.mark.parametrize("task", [
    *(pytest.param(name, marks=needs_essays) if RULER_TASKS[name].args.get("type_haystack") == "essay" else name
      for name in RULER_TASKS)])
def test_ruler_question_is_the_template_after_the_haystack_and_the_answer_prefix(task):
    rows = ruler_rows(task)
    family = RULER_TASKS[task].family
    tail = TEMPLATES[family]["template"].partition("{context}")[2].split("{")[0]
    if family == "niah" and RULER_TASKS[task].args["num_needle_v"] * RULER_TASKS[task].args["num_needle_q"] == 1:
        tail = niah.singular(tail)
    model = tiny_loaded()
    ruler = {compress: build_task("ruler", {"tasks": [task], "compress": compress})
             for compress in ("prompt", "context")}
    for row in rows:
        question = row["question"]
        assert row["input"].endswith(question) and question.startswith(tail) and question.endswith("<|assistant|>\n")
        assert count_words(question) < 60  # the question alone, no haystack
        whole = ruler["prompt"]._sample(task, 1024, row, model)
        split = ruler["context"]._sample(task, 1024, row, model)
        assert_exact_split([(whole, split)])
        assert raw(model, split.suffix_ids) == question + row["answer_prefix"]
        assert "question" not in split.metadata and "single_queries" not in split.metadata


def multiquery_task(compress: str, **options) -> Task:
    """task=ruler with niah_multiquery's rows made on a noise haystack (no essays needed): four keys, four queries."""
    rows = multiquery_rows()
    task = build_task("ruler", {"tasks": ["niah_multiquery"], "lengths": [1024], "num_samples": 2,
                                "compress": compress, **options})
    task.generated = lambda tokenizer, name=None: iter([("niah_multiquery", 1024, rows)])
    return task


def test_split_queries_asks_each_query_alone_about_the_same_context():
    model = tiny_loaded()
    task = multiquery_task("context", split_queries=True)
    samples = list(task.samples(model))
    assert task.size() == len(samples) == 8
    assert [s.id for s in samples[:5]] == [f"niah_multiquery-1024-0-q{j}" for j in range(4)] + [
        "niah_multiquery-1024-1-q0"]
    (combined,) = [s for s in multiquery_task("context").samples(model) if s.id == "niah_multiquery-1024-0"]
    assert [a for s in samples[:4] for a in s.answers] == combined.answers and all(len(s.answers) == 1
                                                                                   for s in samples)
    assert all(s.prompt_ids == combined.prompt_ids and s.shares_context(samples[0]) for s in samples[:4])
    assert not samples[4].shares_context(samples[3])
    for sample in samples[:4]:
        (key,) = sample.metadata["queries"]
        assert raw(model, sample.suffix_ids) == (
            f"\nWhat are all the special magic numbers for {key} mentioned in the provided text?<|end|>\n"
            f"<|assistant|>\n The special magic numbers for {key} mentioned in the provided text are")
    whole = list(multiquery_task("prompt", split_queries=True).samples(model))
    assert [w.prompt_ids for w in whole] == [s.prompt_ids + s.suffix_ids for s in samples]


def test_split_queries_score_weighs_each_query_as_ruler_does():
    """RULER's string_match_all over a sample is the share of its answers found; over split records, each record holds
    one query's answer, so the mean over records weighs every query alike, as the mean over samples does."""
    answers = ["111", "222", "333", "444"]
    combined = score_records([{"task": "niah_multiquery", "pred": "111 and 333", "answers": answers}])
    split = score_records([{"task": "niah_multiquery", "pred": pred, "answers": [answer]}
                           for pred, answer in zip(["111", "no", "333", "no"], answers)])
    assert combined["task_scores"] == split["task_scores"] == {"niah_multiquery": 50.0}


def test_split_queries_needs_niah_multiquery():
    with pytest.raises(EvalkvError, match="split_queries splits niah_multiquery's queries"):
        build_task("ruler", {"tasks": ["niah_single_1"], "split_queries": True})


def test_a_task_that_ignores_compress_context_is_refused():
    @dataclasses.dataclass
    class Whole(Task):
        name = "whole"

        def samples(self, model):
            yield Sample("s0", "whole", [1, 2, 3], ["a"], 4)

    with pytest.raises(EvalkvError, match="task whole does not support compress=context"):
        list(_protocol_checked(Whole(compress="context").samples(None), Whole(compress="context")))
    assert len(list(_protocol_checked(Whole().samples(None), Whole()))) == 1


class _Progress:
    def update(self, count: int) -> None:
        pass


def _questions(contexts: str) -> list[Sample]:
    """One sample per letter; equal letters are questions about one context (lowercase: no question apart)."""
    return [Sample(f"s{i}", "t", [ord(c.upper())], ["a"], 1, suffix_ids=None if c.islower() else [i])
            for i, c in enumerate(contexts)]


def test_a_batch_never_splits_the_questions_about_one_context():
    samples = _questions("AAABCCdd")
    batches = list(_batches(samples, {"s1"}, 2, _Progress()))
    assert [[s.id for s in batch] for batch in batches] == [["s0", "s2"], ["s3", "s4", "s5"], ["s6", "s7"]]
    assert [len(batch) for batch in _batches(samples, set(), 1, _Progress())] == [3, 1, 2, 1, 1]


def test_ranks_take_whole_runs_of_questions_about_one_context():
    samples = _questions("AAABCCdd")
    shares = [[s.id for s in ShardedRun(rank, 2).assign(samples, {"s6"})] for rank in (0, 1)]
    assert shares == [["s0", "s1", "s2", "s4", "s5"], ["s3", "s7"]]
