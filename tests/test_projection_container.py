"""The Projection container: validation, constructors, the transpose."""

import pytest
import torch

import xtoken
from xtoken.testing import random_projection


def test_transpose_matches_dense():
    W = random_projection(200, 150)
    dense = W.to_dense()
    cols = W.columns(160)
    assert cols.col_ptr.shape == (161,) and int(cols.col_ptr[-1]) == W.nnz
    rebuilt = torch.zeros(200, 160)
    for t in range(160):
        for j in range(int(cols.col_ptr[t]), int(cols.col_ptr[t + 1])):
            rebuilt[int(cols.col_src[j]), t] += float(cols.col_val[j])
    torch.testing.assert_close(rebuilt[:, :150], dense)
    assert torch.all(rebuilt[:, 150:] == 0)


def test_identity_and_from_dense():
    I = xtoken.Projection.identity(7)
    assert torch.equal(I.to_dense(), torch.eye(7))
    dense = torch.tensor([[0.0, 2.0, 1.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0]])
    W = xtoken.Projection.from_dense(dense, top_k=2)
    expected = torch.tensor([[0.0, 2 / 3, 1 / 3, 0.0, 0.0], [0.0] * 5, [1.0, 0.0, 0.0, 0.0, 0.0]])
    # The row with a tie (2.0, 1.0, 1.0) keeps the largest and one of the tied pair.
    got = W.to_dense()
    torch.testing.assert_close(got.sum(1), torch.tensor([1.0, 0.0, 1.0]))
    assert got[0, 1] == pytest.approx(2 / 3) and got[2, 0] == 1.0
    assert expected.shape == got.shape


def test_validation_errors():
    idx = torch.tensor([[0, 1], [2, -1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="row 0 sums to 0.9"):
        xtoken.Projection(idx, torch.tensor([[0.5, 0.4], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="empty slot"):
        xtoken.Projection(idx, torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="finite"):
        xtoken.Projection(idx, torch.tensor([[float("nan"), 0.5], [1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"teacher ids must lie in \[-1, 2\)"):
        xtoken.Projection(idx, torch.tensor([[0.5, 0.5], [1.0, 0.0]]), teacher_vocab_size=2)
    with pytest.raises(ValueError, match="val: expected a float tensor"):
        xtoken.Projection(idx, torch.ones(3, 2))


def test_pad_to_adds_empty_rows():
    W = random_projection(20, 30).pad_to(24)
    assert W.student_vocab_size == 24 and torch.all(W.idx[20:] == -1)
