"""Class 3 of issue 12: the fused losses have no formula for the gradient of their gradient. A gradient
penalty or a Hessian-vector product through them used to drop the second-order term silently (PyTorch only
warned that the backward op had no autograd kernel); it must raise, by name."""

from __future__ import annotations

import pytest
import torch
from reliability_util import LOSSES, case

import xtoken

OP_OF = {"pkl": "pkl_loss_bwd", "gold": "hybrid_loss_bwd", "hkl": "hybrid_loss_bwd", "uld": "hybrid_loss_bwd",
         "kd": "kd_loss_bwd"}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradient_penalty_raises(name):
    zs, zt, chunks, W, _, _ = case()
    zs.requires_grad_()
    loss = LOSSES[name][0](zs, zt, chunks, W)
    (grad,) = torch.autograd.grad(loss, zs, create_graph=True)
    penalty = grad.square().sum()
    with pytest.raises(RuntimeError, match=rf"xtoken::{OP_OF[name]}: double backward is not supported"):
        penalty.backward()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_hessian_vector_product_raises(name):
    zs, zt, chunks, W, _, _ = case()
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.functional.hvp(lambda z: LOSSES[name][0](z, zt, chunks, W), zs, torch.randn_like(zs))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_create_graph_without_a_second_backward_gives_the_first_order_gradient(name):
    zs, zt, chunks, W, _, _ = case()
    z1, z2 = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    (g1,) = torch.autograd.grad(LOSSES[name][0](z1, zt, chunks, W), z1)
    (g2,) = torch.autograd.grad(LOSSES[name][0](z2, zt, chunks, W), z2, create_graph=True)
    assert torch.equal(g1, g2.detach())


def test_project_is_linear_and_keeps_its_double_backward():
    W = xtoken.Projection.identity(5)
    probs = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda p: xtoken.project(p, W), (probs,))


def test_chain_loss_gradient_penalty_raises():
    zs, zt, chunks, _, ts, tt = case()
    V_s, V_t = zs.shape[1], zt.shape[1]  # one piece per token: a valid pair of piece tables
    pieces = xtoken.PieceTables(torch.arange(V_s, dtype=torch.int32).remainder(V_t).reshape(-1, 1),
                                torch.arange(V_t, dtype=torch.int32).remainder(V_s).reshape(-1, 1))
    zs.requires_grad_()
    loss = xtoken.chain_loss(zs, zt, chunks, pieces, student_targets=ts.clamp_min(0), teacher_targets=tt.clamp_min(0))
    (grad,) = torch.autograd.grad(loss, zs, create_graph=True)
    with pytest.raises(RuntimeError, match="xtoken::chain_loss_bwd: double backward is not supported"):
        grad.square().sum().backward()
