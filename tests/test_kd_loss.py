"""Same-vocabulary KD: the fused kernels against the float64 reference, gradients, op registration, bad
inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, assert_close_ratio, rel_error, requires_cuda

import xtoken
from xtoken import reference
from xtoken.testing import loss_and_grad, random_chunks, random_targets

MERGES = ["first", "mean", "bayes"]


def make_case(V=97, batch=2, T_s=23, T_t=29, dtype=torch.float32, device="cpu", scale=3.0, one_to_one=0.6):
    zs = (torch.randn(batch * T_s, V, dtype=torch.float64) * scale).to(dtype).to(device)
    zt = (torch.randn(batch * T_t, V, dtype=torch.float64) * scale).to(dtype).to(device)
    chunks = random_chunks(batch, T_s, T_t, one_to_one=one_to_one, drop=0.15).to(device)
    ts = random_targets(batch * T_s, V).to(device)
    tt = random_targets(batch * T_t, V).to(device)
    return zs, zt, chunks, ts, tt


def kernel_and_reference(zs, zt, chunks, ts, tt, *, grad_scale=2.0, reduction="none", **options):
    kw = dict(reduction=reduction, student_targets=ts, teacher_targets=tt, **options)
    zk = zs.detach().clone().requires_grad_()
    loss = xtoken.kd_loss(zk, zt, chunks, **kw)
    (grad_scale * loss.sum()).backward()
    zr = zs.detach().double().cpu().requires_grad_()
    ref = reference.kd_loss(zr, zt.cpu(), chunks.cpu(), **{
        k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    (grad_scale * ref.sum()).backward()
    return loss.detach(), zk.grad, ref.detach(), zr.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_float32_matches_reference(device, merge, temperature):
    zs, zt, chunks, ts, tt = make_case(device=device)
    loss, grad, ref, ref_grad = kernel_and_reference(zs, zt, chunks, ts, tt, merge=merge, temperature=temperature)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert rel_error(loss.cpu(), ref) <= 1e-5 and rel_error(grad.cpu(), ref_grad) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("merge", MERGES)
def test_low_precision_matches_reference(device, dtype, merge):
    zs, zt, chunks, ts, tt = make_case(dtype=dtype, device=device)
    loss, grad, ref, ref_grad = kernel_and_reference(zs, zt, chunks, ts, tt, merge=merge)
    assert grad.dtype == dtype
    assert rel_error(loss.cpu(), ref) <= 1e-5
    z_low = zs.detach().cpu().requires_grad_()
    same_dtype = reference.kd_loss(z_low, zt.cpu(), chunks.cpu(), merge=merge, reduction="none",
                                   student_targets=ts.cpu(), teacher_targets=tt.cpu(), dtype=dtype)
    (2.0 * same_dtype.sum()).backward()
    assert_close_ratio(loss.cpu(), same_dtype.detach(), ref, "loss")
    assert_close_ratio(grad.cpu(), z_low.grad, ref_grad, "gradient")


@pytest.mark.parametrize("device", DEVICES)
def test_vocabulary_above_65536_and_far_apart_logits(device):
    # Logits 40 apart in scale: some student probabilities underflow float32, but their logs are exact.
    zs, zt, chunks, ts, tt = make_case(V=70_001, batch=1, T_s=7, T_t=9, device=device, scale=40.0, one_to_one=0.5)
    for merge in MERGES:
        loss, grad, ref, ref_grad = kernel_and_reference(zs, zt, chunks, ts, tt, merge=merge)
        assert torch.isfinite(loss).all()
        assert rel_error(loss.cpu(), ref) <= 1e-5 and rel_error(grad.cpu(), ref_grad) <= 1e-5, merge


@pytest.mark.parametrize("device", DEVICES)
def test_one_to_one_is_torch_kl_div(device):
    zs, zt, _, _, _ = make_case(device=device)
    n = min(zs.shape[0], zt.shape[0])
    chunks = torch.tensor([[i, i + 1, i, i + 1] for i in range(n)], dtype=torch.int32, device=device)
    expected = torch.nn.functional.kl_div(zs[:n].log_softmax(-1), zt[:n].log_softmax(-1), log_target=True,
                                          reduction="sum") / n
    torch.testing.assert_close(xtoken.kd_loss(zs, zt, chunks), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_batched_shape(device, reduction):
    zs, zt, chunks, ts, tt = make_case(device=device)
    B = 2
    loss, grad, ref, ref_grad = kernel_and_reference(zs.reshape(B, -1, zs.shape[-1]), zt.reshape(B, -1, zt.shape[-1]),
                                                     chunks, ts, tt, merge="first", temperature=1.5,
                                                     reduction=reduction)
    assert loss.shape == ref.shape and grad.shape == (B, zs.shape[0] // B, zs.shape[1])
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=1e-6)
    assert rel_error(grad.cpu(), ref_grad) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    zs, zt, chunks, ts, tt = make_case(device=device)
    zt_view = zt.t().contiguous().t()
    zs_view = torch.cat([zs, zs], dim=1)[:, : zs.shape[1]]
    assert not zs_view.is_contiguous() and not zt_view.is_contiguous()
    loss, grad, ref, ref_grad = kernel_and_reference(zs_view, zt_view, chunks, ts, tt, merge="mean")
    assert rel_error(loss.cpu(), ref) <= 1e-5 and rel_error(grad.cpu(), ref_grad) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_no_chunks_gives_zero_loss_and_zero_gradient(device):
    zs, zt, _, ts, tt = make_case(device=device)
    z = zs.clone().requires_grad_()
    loss = xtoken.kd_loss(z, zt, torch.zeros(0, 4, dtype=torch.int32, device=device))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("device", DEVICES)
def test_rows_outside_chunks_get_zero_gradient_and_deterministic(device):
    zs, zt, chunks, ts, tt = make_case(device=device)
    grads = []
    for _ in range(2):
        z = zs.clone().requires_grad_()
        xtoken.kd_loss(z, zt, chunks, merge="bayes", student_targets=ts, teacher_targets=tt).backward()
        grads.append(z.grad)
    assert torch.equal(grads[0], grads[1])
    used = torch.zeros(zs.shape[0], dtype=torch.bool)
    for s0, s1, _, _ in chunks.tolist():
        used[s0:s1] = True
    assert torch.all(grads[0][~used.to(device)] == 0)


@pytest.mark.parametrize("merge", MERGES)
def test_gradcheck_float64(merge):
    zs, zt, chunks, ts, tt = make_case(V=11, batch=1, T_s=7, T_t=8, dtype=torch.float64)
    zs.requires_grad_()

    def fn(z):
        return xtoken.kd_loss(z, zt, chunks, merge=merge, temperature=1.3, reduction="none", student_targets=ts,
                              teacher_targets=tt)

    assert torch.autograd.gradcheck(fn, (zs,), eps=1e-6, atol=1e-7)


def test_opcheck():
    zs, zt, chunks, ts, tt = make_case(V=19, batch=1, T_s=9, T_t=11)
    for merge, targets in (("first", (None, None)), ("bayes", (ts, tt))):
        for requires_grad in (False, True):
            args = (zs.clone().requires_grad_(requires_grad), zt, chunks, 1.0, merge, merge, *targets)
            torch.library.opcheck(torch.ops.xtoken.kd_loss_fwd.default, args)
    losses, lse_s, lse_t = torch.ops.xtoken.kd_loss_fwd(zs, zt, chunks, 1.0, "mean", "mean", None, None)
    torch.library.opcheck(torch.ops.xtoken.kd_loss_bwd.default,
                          (torch.rand_like(losses), zs, zt, chunks, 1.0, "mean", "mean", None, None, lse_s, lse_t))


def test_torch_compile_fullgraph():
    zs, zt, chunks, ts, tt = make_case()

    def step(z):
        return xtoken.kd_loss(z, zt, chunks, merge="mean")

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    z1, z2 = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    eager, traced = step(z1), compiled(z2)
    eager.backward()
    traced.backward()
    torch.testing.assert_close(traced, eager)
    torch.testing.assert_close(z2.grad, z1.grad)


def test_module_matches_functional():
    zs, zt, chunks, ts, tt = make_case()
    module = xtoken.nn.KDLoss(temperature=2.0, merge="mean")
    torch.testing.assert_close(module(zs, zt, chunks), xtoken.kd_loss(zs, zt, chunks, temperature=2.0, merge="mean"))


def test_bad_inputs_raise():
    zs, zt, chunks, ts, tt = make_case()
    with pytest.raises(RuntimeError, match="share one vocabulary, got widths 97 and 96"):
        xtoken.kd_loss(zs, zt[:, :-1], chunks)
    with pytest.raises(RuntimeError, match="teacher_logits: expected the dtype of student_logits"):
        xtoken.kd_loss(zs, zt.double(), chunks)
    with pytest.raises(RuntimeError, match="merge='bayes' needs"):
        xtoken.kd_loss(zs, zt, chunks, merge="bayes")
    with pytest.raises(ValueError, match="temperature"):
        xtoken.kd_loss(zs, zt, chunks, temperature=0.0)
    with pytest.raises(RuntimeError, match="N_t = 58"):
        xtoken.kd_loss(zs, zt, torch.tensor([[0, 1, 0, 59]], dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
def test_nan_logits_give_nan_loss(device):
    zs, zt, chunks, ts, tt = make_case(device=device)
    zt[int(chunks[0, 2]), 3] = float("nan")
    loss = xtoken.kd_loss(zs, zt, chunks, reduction="none")
    assert torch.isnan(loss[0]) and not torch.isnan(loss[1:]).any()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("merge", MERGES)
def test_cuda_matches_cpu_kernel(dtype, merge):
    zs, zt, chunks, ts, tt = make_case(V=5003, batch=3, T_s=33, T_t=41, dtype=dtype)

    def loss_fn(z, zt, chunks, ts, tt):
        return xtoken.kd_loss(z, zt, chunks, merge=merge, reduction="none", student_targets=ts, teacher_targets=tt)

    out = [loss_and_grad(loss_fn, zs, zt, chunks, ts, tt, device=device) for device in ("cpu", "cuda")]
    assert rel_error(out[1][0], out[0][0].double()) <= 1e-5
    assert rel_error(out[1][1].float(), out[0][1].float()) <= (1e-5 if dtype == torch.float32 else 1e-2)
