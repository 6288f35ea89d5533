"""The pieces of distillation that need no trainer: the collator (one alignment per teacher), teacher
checks and loss resolution, and the CE + KD combination of SPEC.md §4."""

from __future__ import annotations

import pickle

import pytest
import torch
import xtoken
from distill_util import TEXTS, student_tokenizer, teacher_tokenizers, tiny_lm
from xtoken.align import align_texts
from xtoken.distill import (
    CHUNK_STAT_NAMES,
    DistillationCollator,
    Teacher,
    combine_ce_kd,
    prepare_teachers,
    teacher_loss,
)


@pytest.fixture(scope="module")
def tokenizers():
    return student_tokenizer(), teacher_tokenizers()


@pytest.fixture(scope="module")
def projections(tokenizers):
    student, teachers = tokenizers
    return {name: xtoken.Projection.build(student, t) for name, t in teachers.items()}


def test_collator_aligns_every_teacher(tokenizers):
    student, teachers = tokenizers
    collate = DistillationCollator(student, [teachers["digits"], teachers["sentencepiece"], None], max_length=40)
    examples = [{"text": t} for t in TEXTS[:5]]
    batch = collate(examples)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape
    assert torch.equal(batch["labels"] == -100, batch["attention_mask"] == 0)
    assert len(batch["teachers"]) == 3
    for tokenizer, aligned in zip([teachers["digits"], teachers["sentencepiece"], student], batch["teachers"]):
        expected = align_texts(TEXTS[:5], student, tokenizer, max_length=40)
        assert torch.equal(batch["input_ids"], expected.student_input_ids)
        assert torch.equal(batch["student_targets"], expected.student_targets)
        assert torch.equal(aligned["input_ids"], expected.teacher_input_ids)
        assert torch.equal(aligned["teacher_targets"], expected.teacher_targets)
        assert torch.equal(aligned["chunks"], expected.chunks)
        stats = dict(zip(CHUNK_STAT_NAMES, aligned["chunk_stats"].tolist()))
        assert {k: stats[k] for k in expected.stats.shapes} == expected.stats.shapes
        assert stats["student_tokens"] == expected.stats.student_tokens
    same = dict(zip(CHUNK_STAT_NAMES, batch["teachers"][2]["chunk_stats"].tolist()))
    assert same["1:1"] == batch["teachers"][2]["chunks"].shape[0]  # the student's own tokenization: all 1:1
    assert pickle.loads(pickle.dumps(collate))(TEXTS[:5])["input_ids"].equal(batch["input_ids"])


def test_collator_keeps_encodings(tokenizers):
    """keep_encodings: over three epochs of shuffled batches (texts and conversations, a teacher that is the
    student), the batches equal those of a collator without it; each distinct side encodes each text once;
    the caller's span tokenizers are not touched; a pickled collator starts with nothing kept; bad values."""
    import random

    from xtoken.align import KeptEncodings, as_span_tokenizer

    student, teachers = tokenizers
    sides = [teachers["digits"], teachers["sentencepiece"], None]
    plain = DistillationCollator(student, sides, max_length=40)
    kept = DistillationCollator(student, sides, max_length=40, keep_encodings=len(TEXTS))
    assert isinstance(kept.student, KeptEncodings) and kept.teachers[2] is kept.student
    assert kept.student.tokenizer is plain.student  # the wrapper cached for the tokenizer, not modified
    calls = {}
    for i, side in enumerate([kept.student, kept.teachers[0], kept.teachers[1]]):
        inner = side.tokenizer.encode_spans

        def counted(texts, *, _i=i, _inner=inner, **options):
            calls.setdefault(_i, []).extend(texts)
            return _inner(texts, **options)

        side.tokenizer = _Counting(side.tokenizer, counted)
    rng = random.Random(0)
    chat = dict(student_chat_template="chatml", max_length=40)
    plain_chat = DistillationCollator(student, [None], **chat)
    kept_chat = DistillationCollator(student, [None], **chat, keep_encodings=len(TEXTS))
    conversations = [[{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]}] for t in TEXTS]
    for _ in range(3):
        order = list(range(len(TEXTS)))
        rng.shuffle(order)
        for start in range(0, len(order), 3):
            batch = order[start : start + 3]
            _assert_same_batch(plain([TEXTS[i] for i in batch]), kept([TEXTS[i] for i in batch]))
            talks = [conversations[i] for i in batch]
            _assert_same_batch(plain_chat(talks), kept_chat(talks))
    assert sorted(calls) == [0, 1, 2]
    for i, texts in calls.items():
        assert sorted(texts) == sorted(set(TEXTS)), f"side {i} did not encode each text exactly once"
    assert as_span_tokenizer(student) is plain.student and not plain.student._keep
    assert len(kept_chat.student._kept) == len(set(TEXTS))  # TEXTS holds each text twice
    copy = pickle.loads(pickle.dumps(kept_chat))
    assert len(copy.student._kept) == 0 and copy.student._keep == len(TEXTS)
    _assert_same_batch(copy(conversations[:2]), plain_chat(conversations[:2]))
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="keep_encodings: expected an integer >= 0"):
            DistillationCollator(student, sides, keep_encodings=bad)
        with pytest.raises(ValueError, match="texts: expected an integer >= 0"):
            KeptEncodings(plain.student, bad)
    with pytest.raises(TypeError, match="tokenizer: expected an xtoken.align.SpanTokenizer, got str"):
        KeptEncodings("llama3.2", 4)


class _Counting(xtoken.align.SpanTokenizer):
    """A span tokenizer that reports every text it encodes."""

    def __init__(self, inner, encode):
        self.inner, self._encode, self.pad_token_id = inner, encode, inner.pad_token_id

    def encode_spans(self, texts, *, add_special_tokens, max_length):
        return self._encode(texts, add_special_tokens=add_special_tokens, max_length=max_length)

    def token(self, token_id):
        return self.inner.token(token_id)


def _assert_same_batch(a, b):
    assert a.keys() == b.keys()
    assert a.get("conversations") == b.get("conversations")
    for key in ("input_ids", "attention_mask", "labels", "student_targets"):
        assert torch.equal(a[key], b[key]), key
    for x, y in zip(a["teachers"], b["teachers"], strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_collator_rejects_examples_without_text(tokenizers):
    student, teachers = tokenizers
    collate = DistillationCollator(student, [teachers["digits"]])
    with pytest.raises(TypeError, match="example 1: expected a text or a mapping with a 'text' text"):
        collate(["fine", {"body": "no text here"}])
    with pytest.raises(ValueError, match="max_length"):
        DistillationCollator(student, [teachers["digits"]], max_length=0)


def test_auto_loss_follows_the_audit(tokenizers, projections):
    _, teachers = tokenizers
    model = tiny_lm(8, seed=0)
    digits = Teacher(model, teachers["digits"], projections["digits"])
    audit = projections["digits"].audit()
    assert audit.recommendation == "pkl" and digits.resolved_loss() == audit.teacher_loss == "pkl+chain"
    assert "trainer (Teacher(loss='auto')): pkl+chain" in str(audit)
    assert Teacher(model).resolved_loss() == "kd"
    bare = xtoken.Projection(projections["digits"].idx, projections["digits"].val)
    with pytest.raises(ValueError, match="name the loss"):
        Teacher(model, teachers["digits"], bare).resolved_loss()


def test_bad_teachers(tokenizers, projections):
    student, teachers = tokenizers
    model = tiny_lm(8, seed=0)
    with pytest.raises(TypeError, match="Teacher.model"):
        Teacher("not a model")
    with pytest.raises(ValueError, match="Teacher.loss"):
        Teacher(model, loss="kl")
    with pytest.raises(ValueError, match="Teacher.weight"):
        Teacher(model, weight=-1.0)
    with pytest.raises(ValueError, match="Teacher.dtype"):
        Teacher(model, dtype=torch.int8)
    with pytest.raises(ValueError, match="temperature"):
        Teacher(model, temperature=0.0)
    with pytest.raises(ValueError, match="no projection was given"):
        prepare_teachers([Teacher(model, teachers["digits"], None, loss="pkl")], student)
    with pytest.raises(ValueError, match="KD needs the student's vocabulary"):
        prepare_teachers([Teacher(model, teachers["digits"], projections["digits"], loss="kd")], student)
    with pytest.raises(ValueError, match="not the one W was built for"):
        prepare_teachers([Teacher(model, teachers["sentencepiece"], projections["digits"], loss="pkl")], student)
    twice = [Teacher(model, teachers["digits"], projections["digits"], loss="pkl", name="t")] * 2
    with pytest.raises(ValueError, match="two teachers are named 't'"):
        prepare_teachers(twice, student)


def test_prepare_pads_w_for_a_padded_student_head(tokenizers, projections):
    student, teachers = tokenizers
    teacher = Teacher(tiny_lm(8, seed=0), teachers["digits"], projections["digits"], loss="pkl")
    (prepared,) = prepare_teachers(teacher, student, student_vocab_size=len(student) + 13)
    assert prepared.mapping.student_vocab_size == len(student) + 13


def test_teacher_loss_is_the_registered_loss(tokenizers, projections):
    student, teachers = tokenizers
    batch = align_texts(TEXTS[:3], student, teachers["digits"])
    teacher = Teacher(tiny_lm(8, seed=0), teachers["digits"], projections["digits"], loss="pkl", temperature=2.0)
    (prepared,) = prepare_teachers(teacher, student)
    zs = torch.randn(*batch.student_input_ids.shape, len(student))
    zt = torch.randn(*batch.teacher_input_ids.shape, len(teachers["digits"]), dtype=torch.bfloat16)
    expected = xtoken.pkl_loss(zs, zt.float(), batch.chunks, projections["digits"], temperature=2.0, reduction="sum")
    torch.testing.assert_close(teacher_loss(prepared, zs, zt, batch.chunks), expected)
    for loss, function, pairs in [("gold", xtoken.gold_loss, "exact"), ("hkl", xtoken.hkl_loss, "relaxed")]:
        teacher = Teacher(tiny_lm(8, seed=0), teachers["digits"], projections["digits"], loss=loss,
                          options={"weights": (1.0, 0.5)})
        (prepared,) = prepare_teachers(teacher, student)
        expected = function(zs, zt.float(), batch.chunks, projections["digits"].common_pairs(pairs),
                            weights=(1.0, 0.5), reduction="sum")
        torch.testing.assert_close(teacher_loss(prepared, zs, zt, batch.chunks), expected)


def test_combine_ce_kd():
    ce = torch.tensor(2.0, requires_grad=True)
    kd = torch.tensor(0.5, requires_grad=True)
    loss = combine_ce_kd(ce, kd, "dynamic")
    loss.backward()
    assert float(loss.detach()) == pytest.approx(4.0)  # L_ce + (L_ce / L_kd) L_kd
    assert float(ce.grad) == pytest.approx(1.0)  # the ratio is a constant (stop-gradient)
    assert float(kd.grad) == pytest.approx(4.0)
    ce.grad = kd.grad = None
    combine_ce_kd(ce, kd, (0.3, 2.0)).backward()
    assert (float(ce.grad), float(kd.grad)) == pytest.approx((0.3, 2.0))
    zero = torch.tensor(0.0, requires_grad=True)
    assert float(combine_ce_kd(ce, zero, "dynamic").detach()) == pytest.approx(2.0)  # no chunks: CE alone
    reference = (torch.tensor(1.0), torch.tensor(4.0))
    assert float(combine_ce_kd(ce, kd, "dynamic", reference=reference).detach()) == pytest.approx(2.0 + 0.25 * 0.5)
    with pytest.raises(ValueError, match="kd_scaling"):
        combine_ce_kd(ce, kd, "fixed")
