"""Class 8 of issue 12: valid input that used to be rejected. Each must now give the same result as its plain
Python equivalent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tokenizers_util as tu
from reliability_util import LOSSES, case

import xtoken
from xtoken import Projection
from xtoken.cli import _read_texts


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("empty", [[], (), torch.zeros(0, dtype=torch.int64), np.zeros((0, 4), dtype=np.int64)])
def test_an_empty_chunk_table_is_K_0(name, empty):
    zs, zt, _, W, _, _ = case()
    z = zs.clone().requires_grad_()
    loss = LOSSES[name][0](z, zt, empty, W)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(zs))
    assert LOSSES[name][0](zs, zt, empty, W, reduction="none").shape == (0,)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("tau", [np.float32(2.0), np.float64(2.0), np.int64(2), torch.tensor(2.0)])
def test_numpy_and_tensor_temperatures(name, tau):
    zs, zt, chunks, W, _, _ = case()
    expected = LOSSES[name][0](zs, zt, chunks, W, temperature=2.0)
    assert torch.equal(LOSSES[name][0](zs, zt, chunks, W, temperature=tau), expected)
    if name == "kd":
        assert torch.equal(xtoken.nn.KDLoss(temperature=tau)(zs, zt[:, : zs.shape[1]], chunks), expected)


def test_numpy_hybrid_options():
    zs, zt, chunks, W, _, _ = case()
    pairs = W.common_pairs("relaxed")
    expected = xtoken.gold_loss(zs, zt, chunks, pairs, uld_topk=3, beta=0.25, matched="jsd", weights=(0.5, 1))
    got = xtoken.gold_loss(zs, zt, chunks, pairs, uld_topk=np.int64(3), beta=np.float32(0.25), matched="jsd",
                           weights=(np.float32(0.5), np.int64(1)))
    assert torch.equal(got, expected)
    module = xtoken.nn.GOLDLoss(pairs, uld_topk=np.int32(3), beta=np.float64(0.25), matched="jsd",
                                weights=np.array([0.5, 1.0]))
    assert torch.equal(module(zs, zt, chunks), expected)


def test_numpy_counts():
    assert torch.equal(Projection.identity(np.int64(5)).idx, Projection.identity(5).idx)
    W = Projection.identity(4)
    assert Projection(W.idx, W.val, teacher_vocab_size=np.int32(9)).teacher_vocab_size == 9
    student, teacher = tu.digit_packing_bpe(), tu.digit_splitting_bpe()
    assert torch.equal(xtoken.align_texts(["12 + 7"], student, teacher, max_length=np.int64(4)).chunks,
                       xtoken.align_texts(["12 + 7"], student, teacher, max_length=4).chunks)


def test_texts_of_any_iterable():
    student, teacher = tu.digit_packing_bpe(), tu.digit_splitting_bpe()
    texts = ["12 + 7 = 19", "the 300 cats"]
    expected = xtoken.align_texts(texts, student, teacher)
    for given in (tuple(texts), (t for t in texts), np.array(texts, dtype=object)):
        got = xtoken.align_texts(given, student, teacher)
        assert torch.equal(got.chunks, expected.chunks) and got.stats == expected.stats


def test_jsonl_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\r\n')
    assert _read_texts(str(path), "text") == ["first", "second"]
