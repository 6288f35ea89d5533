"""Class 6 of issue 12: extreme temperatures. tau <= 1e-10 gave NaN for ordinary logits and KD at tau = 1e4 gave
17.05 against 0.709 in float64 (cancellation in float32, then multiplied by tau^2). KD of chunks with one row per
side is now computed without the cancellation (kd_math.h); inside xtoken.checks.TEMPERATURE_RANGE every loss
(the chain KL included, every merge) matches the float64 reference; outside it every entry point (the Python
losses, the modules, the raw ops) refuses the temperature and says why."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES
from reliability_util import LOSSES, V_S, case, chain_targets, loss_and_grad, reference_loss_and_grad

import xtoken
from xtoken.checks import TEMPERATURE_RANGE
from xtoken.reference import MERGES

LOW, HIGH = TEMPERATURE_RANGE
NAMES = sorted(LOSSES) + ["chain"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("tau", [LOW, 1e-4, 0.3, 7.0, HIGH])
def test_losses_match_the_reference_across_the_range(device, name, merge, tau):
    zs, zt, chunks, W, ts, tt = case(device=device)
    if name == "chain":
        if merge != "first":
            pytest.skip("the chain loss reads every row itself (merge='first' only)")
        options = chain_targets(ts, tt)
    else:
        options = dict(merge=merge, student_targets=ts, teacher_targets=tt % V_S if name == "kd" else tt)
    loss, grad = loss_and_grad(name, zs, zt, chunks, W, temperature=tau, reduction="none", **options)
    ref, ref_grad = reference_loss_and_grad(name, zs, zt, chunks, W, temperature=tau, reduction="none", **options)
    # Losses that do not reduce to two rows' KL (mean and logmean pooling of several rows, bayes prefixes) carry
    # float32's rounding of the log-probabilities (~1e-7) times tau^2 in absolute terms.
    atol = 1e-6 * max(1.0, float(ref.abs().max())) * max(1.0, tau**2)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=atol)
    # The gradient is tau^2 / tau = tau times a bounded term: compare it on the scale of its largest entry
    # (at tiny tau the probabilities are one-hot and most entries are 0).
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5 * max(tau, float(ref_grad.abs().max())))


@pytest.mark.parametrize("tau", [LOW / 2, 1e-30, 0.0, HIGH * 1.01, 1e4, float("inf")])
def test_temperatures_outside_the_range_are_refused_everywhere(tau):
    zs, zt, chunks, W, ts, tt = case()
    match = "temperature: .*(outside|finite|> 0)"
    for name in sorted(LOSSES):
        with pytest.raises(ValueError, match=match):
            LOSSES[name][0](zs, zt, chunks, W, temperature=tau)
    with pytest.raises(ValueError, match=match):
        loss_and_grad("chain", zs, zt, chunks, W, temperature=tau, **chain_targets(ts, tt))
    with pytest.raises(ValueError, match=match):
        xtoken.nn.PKLLoss(W, temperature=tau)
    with pytest.raises(ValueError, match=match):
        xtoken.Teacher(torch.nn.Linear(1, 1), temperature=tau)
    kd_zt = zt[:, : zs.shape[1]].contiguous()
    if tau > 0 and tau != float("inf"):
        with pytest.raises(RuntimeError, match=r"temperature: .* is outside \[.*\], the range the float32 kernels"):
            torch.ops.xtoken.kd_loss_fwd(zs, kd_zt, chunks, tau, "first", "first", None, None)


def test_the_message_says_why():
    zs, zt, chunks, W, _, _ = case()
    with pytest.raises(ValueError) as e:
        xtoken.kd_loss(zs, zt[:, : zs.shape[1]], chunks, temperature=HIGH * 10)
    assert "the range the float32 kernels compute exactly" in str(e.value) and "tau^2" in str(e.value)
    with pytest.raises(ValueError) as e:
        xtoken.kd_loss(zs, zt[:, : zs.shape[1]], chunks, temperature=LOW / 10)
    assert "underflow" in str(e.value)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("closeness", [1.0, 1e-2, 1e-3])
def test_kd_of_one_row_chunks_has_no_cancellation(device, merge, closeness):
    # KL ~ (closeness / tau)^2: a large tau or a student close to its teacher. The plain float32 sum of
    # p_t (log p_t - log p_s) lost it (17.05 against 0.709 at tau = 1e4); at tau = 10 and closeness 1e-3 its
    # error was 76 times the KL. 1:1 chunks (as same-tokenizer alignment makes), any merge.
    V = 4099
    zs = torch.randn(6, V, dtype=torch.float64) * 3
    zt = zs + torch.randn(6, V, dtype=torch.float64) * closeness
    chunks = torch.tensor([[i, i + 1, i, i + 1] for i in range(6)], dtype=torch.int32)
    targets = torch.randint(0, V, (6,))
    for tau in (1.0, HIGH):
        options = dict(temperature=tau, merge=merge, student_targets=targets, teacher_targets=targets,
                       reduction="none")
        z = zs.float().to(device).requires_grad_()
        loss = xtoken.kd_loss(z, zt.float().to(device), chunks.to(device), **options)
        (2.0 * loss.sum()).backward()
        z_ref = zs.float().double().requires_grad_()
        ref = xtoken.reference.kd_loss(z_ref, zt.float().double(), chunks, **options)
        (2.0 * ref.sum()).backward()
        torch.testing.assert_close(loss.detach().cpu().double(), ref.detach(), rtol=3e-6, atol=0)
        torch.testing.assert_close(z.grad.cpu().double(), z_ref.grad, rtol=1e-4,
                                   atol=1e-5 * float(z_ref.grad.abs().max()))


def test_the_python_and_kernel_bounds_agree():
    zs, zt, chunks, W, _, _ = case()
    kd_zt = zt[:, : zs.shape[1]].contiguous()
    for tau in (LOW, HIGH):
        torch.ops.xtoken.kd_loss_fwd(zs, kd_zt, chunks, tau, "first", "first", None, None)
    for tau in (LOW * (1 - 1e-9), HIGH * (1 + 1e-9)):
        with pytest.raises(RuntimeError, match="temperature"):
            torch.ops.xtoken.kd_loss_fwd(zs, kd_zt, chunks, tau, "first", "first", None, None)
