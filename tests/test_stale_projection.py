"""Class 5 of issue 12: a stale W. Projection kept the caller's tensors and cached its transpose, so editing
them made the forward read the old W and the backward the new one; PKLLoss.load_state_dict took a W whose
rows sum to 2. Now W copies its inputs, re-validates and rebuilds its cached forms after any in-place edit, and
the module validates a W before loading it."""

from __future__ import annotations

import pytest
import torch
from reliability_util import case, loss_and_grad, reference_loss_and_grad

import xtoken
from xtoken import Projection


def _assert_matches_reference(zs, zt, chunks, W):
    loss, grad = loss_and_grad("pkl", zs, zt, chunks, W, reduction="none")
    ref, ref_grad = reference_loss_and_grad("pkl", zs, zt, chunks, W, reduction="none")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_editing_the_callers_tensors_does_not_change_W():
    zs, zt, chunks, W0, _, _ = case()
    idx, val = W0.idx.clone(), W0.val.clone()
    W = Projection(idx, val, teacher_vocab_size=W0.teacher_vocab_size)
    before = xtoken.pkl_loss(zs, zt, chunks, W, reduction="none")
    idx.fill_(0)
    val.zero_()
    val[:, 0] = 1.0
    assert torch.equal(W.idx, W0.idx) and torch.equal(W.val, W0.val)
    assert torch.equal(xtoken.pkl_loss(zs, zt, chunks, W, reduction="none"), before)


def test_an_in_place_edit_of_W_rebuilds_its_transpose_for_forward_and_backward():
    zs, zt, chunks, W, _, _ = case()
    _assert_matches_reference(zs, zt, chunks, W)  # builds and caches the transpose
    W.idx[:, 0] = (W.idx[:, 0] + 5) % W.teacher_vocab_size
    W.idx[:, 1:] = -1
    W.val.zero_()
    W.val[:, 0] = 1.0
    _assert_matches_reference(zs, zt, chunks, W)
    cols = W.columns()
    assert torch.equal(cols.col_src.long(), torch.argsort(W.idx[:, 0].long() * W.student_vocab_size
                                                           + torch.arange(W.student_vocab_size)))


def test_an_invalid_in_place_edit_is_refused_at_the_next_use():
    zs, zt, chunks, W, _, _ = case()
    xtoken.pkl_loss(zs, zt, chunks, W)
    W.val[3] *= 2
    with pytest.raises(ValueError, match="row 3 sums to 2"):
        xtoken.pkl_loss(zs, zt, chunks, W)
    with pytest.raises(ValueError, match="row 3 sums to 2"):
        xtoken.project(torch.softmax(zs, -1), W)
    W.val[3] /= 2
    W.idx[2, 0] = W.teacher_vocab_size
    with pytest.raises(ValueError, match="teacher ids must lie in"):
        xtoken.pkl_loss(zs, zt, chunks, W)


def test_W_tensors_cannot_be_replaced():
    W = Projection.identity(4)
    for attribute in ("idx", "val", "teacher_vocab_size"):
        with pytest.raises(AttributeError):
            setattr(W, attribute, getattr(W, attribute))


def test_pkl_module_refuses_an_invalid_state_dict_and_keeps_its_W():
    zs, zt, chunks, W, _, _ = case()
    module = xtoken.nn.PKLLoss(W, reduction="none")
    before = module(zs, zt, chunks)
    state = module.state_dict()
    state["proj_val"] = state["proj_val"] * 2
    with pytest.raises(ValueError, match="proj_idx/proj_val: the state dict holds an invalid W: .*row 0 sums to 2"):
        module.load_state_dict(state)
    assert torch.equal(module(zs, zt, chunks), before)
    idx = module.state_dict()["proj_idx"].clone()
    idx[0, 0] = 10**6
    with pytest.raises(ValueError, match="teacher ids must lie"):
        module.load_state_dict({"proj_idx": idx, "proj_val": module.proj_val})


def test_pkl_module_uses_a_loaded_W_in_forward_and_backward_and_leaves_the_callers_W_alone():
    zs, zt, chunks, W, _, _ = case()
    other = xtoken.testing.random_projection(W.student_vocab_size, W.teacher_vocab_size, top_k=W.top_k)
    module = xtoken.nn.PKLLoss(W, reduction="none")
    module(zs, zt, chunks)
    W_idx, W_val = W.idx.clone(), W.val.clone()
    module.load_state_dict({"proj_idx": other.idx, "proj_val": other.val})
    assert torch.equal(W.idx, W_idx) and torch.equal(W.val, W_val)
    z = zs.clone().requires_grad_()
    loss = module(z, zt, chunks)
    (2.0 * loss.sum()).backward()
    ref, ref_grad = reference_loss_and_grad("pkl", zs, zt, chunks, other, reduction="none")
    torch.testing.assert_close(loss.detach().double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_pkl_module_buffers_edited_in_place_are_validated():
    zs, zt, chunks, W, _, _ = case()
    module = xtoken.nn.PKLLoss(W)
    module(zs, zt, chunks)
    with torch.no_grad():
        module.proj_val.mul_(2)
    with pytest.raises(ValueError, match="sums to 2"):
        module(zs, zt, chunks)


def test_hybrid_module_keeps_its_own_pairs():
    zs, zt, chunks, W, _, _ = case()
    pairs = W.common_pairs("relaxed")
    module = xtoken.nn.GOLDLoss(pairs, reduction="none")
    before = module(zs, zt, chunks)
    pairs[:, 1] = torch.arange(pairs.shape[0]).flip(0)
    assert torch.equal(module(zs, zt, chunks), before)
