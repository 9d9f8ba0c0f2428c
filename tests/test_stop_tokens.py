"""Which tokens end generation: the EOS of the tokenizer and the generation config, and end-of-turn tokens that are
special tokens, never an ordinary vocabulary entry that spells one (Qwen2.5's `</s>` is plain text)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from evalkv.models.loader import stop_token_ids
from evalkv.models.presets import byte_tokenizer


def word_tokenizer(tmp_path, eos: str, specials: list[str]):
    """A saved and reloaded WordLevel tokenizer whose vocabulary holds `</s>`, `<|im_end|>`, `<|endoftext|>` and words;
    `specials` are registered as special tokens, the rest stay ordinary entries."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(["<unk>", "hello", "world", "</s>", "<|im_end|>",
                                                       "<|endoftext|>", "<end_of_turn>"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = [token for token in specials if token != eos]
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token=eos,
                            additional_special_tokens=extra).save_pretrained(tmp_path)
    return AutoTokenizer.from_pretrained(tmp_path), vocab


def test_byte_tokenizer_stops_at_its_eos_and_end_of_turn():
    tokenizer = byte_tokenizer()
    vocab = tokenizer.get_vocab()
    assert stop_token_ids(tokenizer, None) == sorted([vocab["<|eos|>"], vocab["<|end|>"]])


def test_an_ordinary_vocabulary_entry_never_stops_generation(tmp_path):
    tokenizer, vocab = word_tokenizer(tmp_path, eos="<|im_end|>", specials=["<|im_end|>", "<|endoftext|>"])
    assert tokenizer.tokenize("hello </s> world") == ["hello", "</s>", "world"]  # `</s>` is a word here
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[vocab["<|im_end|>"]]))
    assert stop_token_ids(tokenizer, model) == [vocab["<|im_end|>"], vocab["<|endoftext|>"]]


@pytest.mark.parametrize("configured", [None, 2, [2, 6]])
def test_eos_and_special_end_of_turn_tokens_stop(tmp_path, configured):
    tokenizer, vocab = word_tokenizer(tmp_path, eos="</s>", specials=["</s>", "<end_of_turn>"])
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=configured))
    expected = {vocab["</s>"], vocab["<end_of_turn>"]} | set(configured if isinstance(configured, list) else
                                                             [configured] if configured is not None else [])
    assert stop_token_ids(tokenizer, model) == sorted(expected)
    assert vocab["<|im_end|>"] not in stop_token_ids(tokenizer, model)  # in the vocabulary, not special
