"""Class 1 of issue 12: tensors on different devices, meta tensors mixed with real ones. The dispatcher runs
an op's fake kernel whenever any argument is a meta tensor; without a device check it returned uninitialized
memory as the loss and the gradient. Every op, and every public loss, must refuse mixed devices by name."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda
from reliability_util import LOSSES, case

import xtoken


def _meta(t):
    return t.to("meta")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_meta_teacher_with_a_real_student_raises(name):
    zs, zt, chunks, W, _, _ = case()
    with pytest.raises(RuntimeError, match="teacher_logits is on meta but student_logits is on cpu"):
        LOSSES[name][0](zs.requires_grad_(), _meta(zt), chunks, W)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_meta_student_with_a_real_teacher_raises(name):
    zs, zt, chunks, W, _, _ = case()
    with pytest.raises(RuntimeError, match="teacher_logits is on cpu but student_logits is on meta"):
        LOSSES[name][0](_meta(zs), zt, chunks, W)


def test_the_reported_case_raises_instead_of_returning_garbage():
    zs = torch.randn(6, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="is on meta"):
        xtoken.kd_loss(zs, torch.randn(5, 16, device="meta"), torch.tensor([[1, 2, 1, 2]])).backward()
    assert zs.grad is None


def test_meta_chunks_or_targets_with_real_logits_raise():
    zs, zt, chunks, W, ts, tt = case()
    with pytest.raises(ValueError, match="chunks is on meta but the logits are on cpu"):
        xtoken.pkl_loss(zs, zt, _meta(chunks), W)
    with pytest.raises(ValueError, match="student_targets is on meta"):
        xtoken.pkl_loss(zs, zt, chunks, W, merge="bayes", student_targets=_meta(ts), teacher_targets=tt)


def _op_args(W, zs, zt, chunks, ts, tt):
    """Valid arguments of every op (the backward ops with the LSEs their forward saved)."""
    kernel_W = W.kernel_args(zt.shape[1])
    kd_zt = zt[:, : zs.shape[1]].contiguous()
    pairs = W.common_pairs("relaxed")
    pkl = (zs, zt, chunks, *kernel_W, 1.0, "bayes", "bayes", ts, tt)
    hybrid = (zs, zt, chunks, pairs, 1.0, "bayes", "bayes", "kl", 0.5, 8, ts, tt)
    kd = (zs, kd_zt, chunks, 1.0, "bayes", "bayes", ts, tt.remainder(zs.shape[1]))
    V_s, V_t = zs.shape[1], zt.shape[1]  # one piece per token: a valid pair of piece tables
    pieces = xtoken.PieceTables(torch.arange(V_s, dtype=torch.int32).remainder(V_t).reshape(-1, 1),
                                torch.arange(V_t, dtype=torch.int32).remainder(V_s).reshape(-1, 1))
    chain = (zs, zt, chunks, *pieces.kernel_args(V_s, V_t), 1.0, ts.clamp_min(0), tt.clamp_min(0))
    probs = torch.softmax(zs, -1)
    args = {
        "project_fwd": (probs, *kernel_W),
        "project_bwd": (torch.randn(zs.shape[0], zt.shape[1]), *kernel_W),
        "pkl_loss_fwd": pkl,
        "hybrid_loss_fwd": hybrid,
        "kd_loss_fwd": kd,
        "chain_loss_fwd": chain,
        "align_spans": (torch.tensor([[1, 2, 3]], dtype=torch.int32), torch.tensor([3], dtype=torch.int32), False,
                        torch.tensor([[1, 3]], dtype=torch.int32), torch.tensor([2], dtype=torch.int32), False),
    }
    for fwd in ("pkl_loss", "hybrid_loss", "kd_loss", "chain_loss"):
        losses, lse_s, lse_t = getattr(torch.ops.xtoken, f"{fwd}_fwd")(*args[f"{fwd}_fwd"])
        args[f"{fwd}_bwd"] = (torch.ones_like(losses), *args[f"{fwd}_fwd"], lse_s, lse_t)
    args["pkl_loss_bwd"] += (True,)  # with the gradient in W's values
    return args


@pytest.mark.parametrize("op", xtoken.ops.OP_NAMES)
def test_every_op_refuses_one_meta_tensor_among_real_ones(op):
    zs, zt, chunks, W, ts, tt = case()
    args = _op_args(W, zs, zt, chunks, ts, tt)[op]
    names = [a.name for a in getattr(torch.ops.xtoken, op).default._schema.arguments]
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    assert len(tensors) >= 2
    for i in tensors:
        mixed = tuple(_meta(a) if j == i else a for j, a in enumerate(args))
        with pytest.raises(RuntimeError, match=rf"xtoken::{op}: .* is on (meta|cpu) but .* is on (cpu|meta)") as e:
            getattr(torch.ops.xtoken, op)(*mixed)
        assert names[i] in str(e.value)


@pytest.mark.parametrize("op", ["pkl_loss_fwd", "kd_loss_fwd", "hybrid_loss_fwd", "kd_loss_bwd", "chain_loss_fwd",
                                "pkl_loss_bwd"])
def test_all_meta_inputs_still_give_shapes(op):
    zs, zt, chunks, W, ts, tt = case()
    args = _op_args(W, zs, zt, chunks, ts, tt)[op]
    out = getattr(torch.ops.xtoken, op)(*(_meta(a) if isinstance(a, torch.Tensor) else a for a in args))
    expected = getattr(torch.ops.xtoken, op)(*args)
    for o, e in zip(out if isinstance(out, tuple) else (out,), expected if isinstance(expected, tuple) else (expected,)):
        assert o.is_meta and o.shape == e.shape and o.dtype == e.dtype


@requires_cuda
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_cuda_and_meta_or_cpu_mixed_raise(name):
    zs, zt, chunks, W, _, _ = case()
    with pytest.raises(RuntimeError, match="is on meta"):
        LOSSES[name][0](zs.cuda(), _meta(zt), chunks, W)
    with pytest.raises(RuntimeError, match="is on cpu"):
        LOSSES[name][0](zs.cuda(), zt, chunks, W)
