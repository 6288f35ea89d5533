"""The span wrappers of Hugging Face tokenizers: cached per tokenizer object, built without reading the
vocabulary, never modifying the tokenizer, and giving every token the surface bytes that the tokenizer adapters
(an independent implementation) give it."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from test_align import CORPUS, real, trained
from tokenizers import Tokenizer

from xtoken.align import _WRAPPERS, WRAPPER_CACHE_SIZE, HFSpanTokenizer, align_texts, as_span_tokenizer
from xtoken.tokenizer import load_tokenizer


def fresh(kind: str) -> Tokenizer:
    return Tokenizer.from_str(trained(kind).to_str())


def test_wrapper_is_cached_per_tokenizer_object():
    tokenizer = fresh("digits3")
    wrapper = as_span_tokenizer(tokenizer)
    assert as_span_tokenizer(tokenizer) is wrapper
    assert as_span_tokenizer(fresh("digits3")) is not wrapper  # another object, another wrapper
    tokenizer.add_tokens(["zzzq"])  # a changed vocabulary gets a new wrapper
    rebuilt = as_span_tokenizer(tokenizer)
    assert rebuilt is not wrapper
    batch = align_texts(["a zzzq b"], tokenizer, trained("digits1"))
    assert tokenizer.token_to_id("zzzq") in batch.student_input_ids[0].tolist()
    for _ in range(WRAPPER_CACHE_SIZE):  # plain tokenizers: the cache holds the most recent wrappers only
        as_span_tokenizer(fresh("digits1"))
    assert len(_WRAPPERS) <= WRAPPER_CACHE_SIZE and id(tokenizer) not in _WRAPPERS


def test_cache_does_not_keep_transformers_tokenizers_alive():
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=fresh("digits1"))
    wrapper = as_span_tokenizer(fast)
    assert as_span_tokenizer(fast) is wrapper
    key = id(fast)
    del fast
    gc.collect()
    assert key not in _WRAPPERS


def test_transformers_tokenizer_wrapper_follows_its_pad_token():
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=fresh("digits1"))
    assert as_span_tokenizer(fast).pad_token_id == 0
    fast.pad_token = "a"
    assert as_span_tokenizer(fast).pad_token_id == fast.pad_token_id != 0


def test_wrapper_shares_the_tokenizer_unless_it_pads_or_truncates():
    tokenizer = fresh("digits3")
    expected = align_texts(CORPUS, trained("digits3"), trained("digits1"))
    wrapper = HFSpanTokenizer(tokenizer)
    assert wrapper._tokenizer is tokenizer
    tokenizer.enable_padding(length=300)  # set after the wrapper was built: the wrapper stops sharing it
    tokenizer.enable_truncation(3)
    batch = align_texts(CORPUS, wrapper, trained("digits1"))
    assert wrapper._tokenizer is not tokenizer and tokenizer.padding["length"] == 300
    assert np.array_equal(batch.chunks, expected.chunks)
    padded = HFSpanTokenizer(tokenizer)  # set before: a private copy from the start
    assert padded._tokenizer is not tokenizer and tokenizer.truncation["max_length"] == 3
    assert np.array_equal(align_texts(CORPUS, padded, trained("digits1")).chunks, expected.chunks)


def _check_surfaces(hf_tokenizer, adapter) -> None:
    wrapper = HFSpanTokenizer(hf_tokenizer)
    ids = np.arange(len(adapter))
    rng = np.random.default_rng(0)
    for part in np.array_split(rng.permutation(ids), 3):  # met batch by batch, in any order
        wrapper._surfaces(part)
    length, leading_space = wrapper._surfaces(ids)
    for i, (surface, string) in enumerate(zip(adapter.surface_bytes, adapter.token_strings)):
        if string is None:
            continue
        expected = string.encode() if surface is None else surface  # a special token stands for its text
        assert (length[i], leading_space[i]) == (len(expected), expected[:1] == b" "), (i, string)


@pytest.mark.parametrize("kind", ["digits1", "digits3", "sentencepiece"])
def test_surface_lengths_match_the_adapters(kind):
    _check_surfaces(trained(kind), load_tokenizer(trained(kind)))


@pytest.mark.parametrize("name", ["llama3.2", "qwen"])
def test_surface_lengths_match_the_adapters_on_real_vocabularies(name):
    _check_surfaces(real(name), load_tokenizer(name))


@pytest.mark.parametrize("kind", ["digits1", "digits3", "metaspace"])
def test_kept_encodings_give_the_same_spans(kind):
    """keep_encodings: batches that repeat, mix kept and new texts, hold a text twice, truncate or not, with
    special tokens or not, and a cache smaller than a batch (entries dropped while still in use) all encode as
    without it; a pickled copy starts with nothing kept."""
    import pickle
    import random

    plain, kept = HFSpanTokenizer(trained(kind)), HFSpanTokenizer(trained(kind))
    kept.keep_encodings(7)
    texts = CORPUS + ["", "x", CORPUS[0] + CORPUS[1]]
    rng = random.Random(0)
    for _ in range(200):
        batch = [rng.choice(texts) for _ in range(rng.randint(0, 10))]
        options = {"add_special_tokens": rng.random() < 0.5, "max_length": rng.choice([None, 3, 5, 64])}
        a, b = plain.encode_spans(batch, **options), kept.encode_spans(batch, **options)
        for name in ("ids", "spans", "lengths"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name
    assert len(kept._kept) == 7
    assert len(pickle.loads(pickle.dumps(kept))._kept) == 0
    kept.keep_encodings(0)
    assert len(kept._kept) == 0
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="texts: expected an integer >= 0"):
            kept.keep_encodings(bad)
