"""project: q = W^T p against the reference, gradients, op registration, bad input."""

import pytest
import torch
from conftest import DEVICES, rel_error

import xtoken
from xtoken import reference
from xtoken.testing import random_projection


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("V_s, V_t", [(37, 41), (70_001, 66_037)])
def test_matches_reference(device, dtype, V_s, V_t):
    W = random_projection(V_s, V_t, exact_fraction=0.5)
    probs = torch.softmax(torch.randn(2, 3, V_s, dtype=torch.float64), -1).to(dtype).to(device).requires_grad_()
    q = xtoken.project(probs, W)
    assert q.shape == (2, 3, V_t) and q.dtype == dtype
    grad_q = torch.randn_like(q)
    (q * grad_q).sum().backward()
    p64 = probs.detach().double().cpu().requires_grad_()
    q_ref = reference.project(p64, W.idx, W.val, V_t)
    (q_ref * grad_q.double().cpu()).sum().backward()
    tol = 1e-5 if dtype != torch.bfloat16 else 1e-2
    assert rel_error(q.detach().cpu(), q_ref) <= tol
    assert rel_error(probs.grad.cpu(), p64.grad) <= tol


def test_projected_rows_stay_distributions():
    W = random_projection(300, 200, empty_fraction=0.0)
    probs = torch.softmax(torch.randn(5, 300, dtype=torch.float64), -1)
    torch.testing.assert_close(xtoken.project(probs, W).sum(-1), torch.ones(5, dtype=torch.float64))


def test_gradcheck_and_opcheck():
    W = random_projection(13, 17)
    probs = torch.rand(4, 13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: xtoken.project(p, W), (probs,))
    assert torch.autograd.gradgradcheck(lambda p: xtoken.project(p, W), (probs,))
    args = (probs, *W.kernel_args(17))
    torch.library.opcheck(torch.ops.xtoken.project_fwd.default, args)
    torch.library.opcheck(torch.ops.xtoken.project_bwd.default, (torch.rand(4, 17, dtype=torch.float64), *W.kernel_args(17)))


def test_compile_fullgraph():
    W = random_projection(13, 17)
    W.columns()
    probs = torch.rand(4, 13)
    compiled = torch.compile(lambda p: xtoken.project(p, W), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(probs), xtoken.project(probs, W))


def test_bad_input_raises():
    W = random_projection(13, 17)
    with pytest.raises(RuntimeError, match="probs: expected 13 columns"):
        xtoken.project(torch.rand(4, 12), W)
    with pytest.raises(RuntimeError, match="probs: expected float32"):
        xtoken.project(torch.ones(4, 13, dtype=torch.long), W)
    cols = W.columns()
    bad_ptr = cols.col_ptr.clone()
    bad_ptr[3] = bad_ptr[4] + 1
    with pytest.raises(RuntimeError, match="col_ptr: must start at 0, never decrease"):
        torch.ops.xtoken.project_fwd(torch.rand(4, 13), W.idx, W.val, bad_ptr, cols.col_src, cols.col_val)
    bad_val = cols.col_val.clone()
    bad_val[0] = float("nan")
    with pytest.raises(RuntimeError, match="col_val: every value must be finite"):
        torch.ops.xtoken.project_fwd(torch.rand(4, 13), W.idx, W.val, cols.col_ptr, cols.col_src, bad_val)
