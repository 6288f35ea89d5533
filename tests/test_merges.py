"""Per-side merges (SPEC.md §3): every loss (P-KL, the hybrid op of GOLD/H-KL/ULD, KD) with every
(student merge, teacher merge) pair, the kernels against the float64 reference; ``logmean`` and its
log-space forms; NeMo-RL's pooling (``xtoken.NEMO_MERGE``)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import DEVICES, assert_close_ratio, rel_error, requires_cuda

import xtoken
from xtoken import reference
from xtoken.testing import random_chunks, random_pairs, random_projection, random_targets

PAIRS = list(itertools.product(reference.MERGES, reference.MERGES))
PAIR_IDS = [f"{s}-{t}" for s, t in PAIRS]
LOSSES = ["pkl", "hybrid", "kd"]


def make_case(loss, *, V_s=97, V_t=131, batch=2, T_s=23, T_t=29, dtype=torch.float32, device="cpu", scale=3.0):
    """Logits, chunks of every shape (1:1, 1:N, M:1, M:N, with gaps), targets and the loss's mapping (W or the
    pairs; KD shares one vocabulary)."""
    if loss == "kd":
        V_t = V_s
    zs = (torch.randn(batch * T_s, V_s, dtype=torch.float64) * scale).to(dtype).to(device)
    zt = (torch.randn(batch * T_t, V_t, dtype=torch.float64) * scale).to(dtype).to(device)
    chunks = random_chunks(batch, T_s, T_t, one_to_one=0.5, drop=0.15).to(device)
    ts = random_targets(batch * T_s, V_s).to(device)
    tt = random_targets(batch * T_t, V_t).to(device)
    if loss == "pkl":
        mapping = random_projection(V_s, V_t, exact_fraction=0.6, empty_fraction=0.05)
    elif loss == "hybrid":
        mapping = random_pairs(V_s, V_t, min(V_s, V_t) // 2).to(device)
    else:
        mapping = None
    return zs, zt, chunks, mapping, ts, tt


def kernel_loss(loss, zs, zt, chunks, mapping, ts, tt, **kw):
    if loss == "pkl":
        return xtoken.pkl_loss(zs, zt, chunks, mapping, student_targets=ts, teacher_targets=tt, **kw)
    if loss == "hybrid":
        return xtoken.gold_loss(zs, zt, chunks, mapping, matched="kl", uld_topk=7, weights=(0.7, 0.3),
                                student_targets=ts, teacher_targets=tt, **kw)
    return xtoken.kd_loss(zs, zt, chunks, student_targets=ts, teacher_targets=tt, **kw)


def reference_loss(loss, zs, zt, chunks, mapping, ts, tt, **kw):
    zt, chunks, ts, tt = zt.cpu(), chunks.cpu(), ts.cpu(), tt.cpu()
    if loss == "pkl":
        return reference.pkl_loss(zs, zt, chunks, mapping.idx, mapping.val, student_targets=ts, teacher_targets=tt,
                                  **kw)
    if loss == "hybrid":
        return reference.hybrid_loss(zs, zt, chunks, mapping.cpu(), matched="kl", uld_topk=7, weights=(0.7, 0.3),
                                     student_targets=ts, teacher_targets=tt, **kw)
    return reference.kd_loss(zs, zt, chunks, student_targets=ts, teacher_targets=tt, **kw)


def kernel_and_reference(loss, zs, zt, chunks, mapping, ts, tt, *, merge, temperature=1.0, grad_scale=2.0):
    kw = dict(temperature=temperature, merge=merge, reduction="none")
    zk = zs.detach().clone().requires_grad_()
    out = kernel_loss(loss, zk, zt, chunks, mapping, ts, tt, **kw)
    (grad_scale * out.sum()).backward()
    zr = zs.detach().double().cpu().requires_grad_()
    ref = reference_loss(loss, zr, zt, chunks, mapping, ts, tt, **kw)
    (grad_scale * ref.sum()).backward()
    return out.detach(), zk.grad, ref.detach(), zr.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("merge", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_float32_matches_reference(device, loss, merge):
    zs, zt, chunks, mapping, ts, tt = make_case(loss, device=device)
    out, grad, ref, ref_grad = kernel_and_reference(loss, zs, zt, chunks, mapping, ts, tt, merge=merge,
                                                    temperature=1.7)
    assert out.dtype == torch.float32 and grad.dtype == torch.float32
    assert rel_error(out.cpu(), ref) <= 1e-5, (out, ref)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-6)
    assert rel_error(grad.cpu(), ref_grad) <= 1e-5
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-4, atol=1e-6 * float(ref_grad.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("merge", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_bf16_matches_reference(device, loss, merge):
    zs, zt, chunks, mapping, ts, tt = make_case(loss, dtype=torch.bfloat16, device=device)
    out, grad, ref, ref_grad = kernel_and_reference(loss, zs, zt, chunks, mapping, ts, tt, merge=merge)
    assert grad.dtype == torch.bfloat16
    assert rel_error(out.cpu(), ref) <= 1e-5  # bf16 logits read exactly, float32 accumulation
    # SPEC §6: at most 2x the error of a PyTorch implementation of the same formula in bf16.
    z_low = zs.detach().cpu().requires_grad_()
    same_dtype = reference_loss(loss, z_low, zt, chunks, mapping, ts, tt, merge=merge, reduction="none",
                                dtype=torch.bfloat16)
    (2.0 * same_dtype.sum()).backward()
    assert_close_ratio(out.cpu(), same_dtype.detach(), ref, "loss")
    assert_close_ratio(grad.cpu(), z_low.grad, ref_grad, "gradient")


@pytest.mark.parametrize("merge", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck_float64(loss, merge):
    zs, zt, chunks, mapping, ts, tt = make_case(loss, V_s=11, V_t=13, batch=1, T_s=7, T_t=8, dtype=torch.float64)
    zs.requires_grad_()

    def fn(z):
        return kernel_loss(loss, z, zt, chunks, mapping, ts, tt, merge=merge, temperature=1.3, reduction="none")

    assert torch.autograd.gradcheck(fn, (zs,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("loss", LOSSES)
def test_opcheck(loss):
    zs, zt, chunks, mapping, ts, tt = make_case(loss, V_s=19, V_t=23, batch=1, T_s=9, T_t=11)
    for (student_merge, teacher_merge), targets in ((("mean", "logmean"), (None, None)),
                                                    (("logmean", "bayes"), (None, tt)),
                                                    (("bayes", "mean"), (ts, None))):
        if loss == "pkl":
            fwd, bwd, extra = torch.ops.xtoken.pkl_loss_fwd, torch.ops.xtoken.pkl_loss_bwd, mapping.kernel_args(23)
            options = (1.0, student_merge, teacher_merge)
        elif loss == "hybrid":
            fwd, bwd, extra = torch.ops.xtoken.hybrid_loss_fwd, torch.ops.xtoken.hybrid_loss_bwd, (mapping,)
            options = (1.0, student_merge, teacher_merge, "jsd", 0.5, 5)
        else:
            fwd, bwd, extra = torch.ops.xtoken.kd_loss_fwd, torch.ops.xtoken.kd_loss_bwd, ()
            options = (1.0, student_merge, teacher_merge)
        for requires_grad in (False, True):
            args = (zs.clone().requires_grad_(requires_grad), zt, chunks, *extra, *options, *targets)
            torch.library.opcheck(fwd.default, args)
        losses, lse_s, lse_t = fwd(zs, zt, chunks, *extra, *options, *targets)
        bwd_args = (torch.rand_like(losses), zs, zt, chunks, *extra, *options, *targets, lse_s, lse_t)
        torch.library.opcheck(bwd.default, bwd_args + ((True,) if loss == "pkl" else ()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", LOSSES)
def test_no_chunks_give_zero_loss_and_gradient(device, loss):
    zs, zt, _, mapping, ts, tt = make_case(loss, device=device)
    empty = torch.zeros(0, 4, dtype=torch.int32, device=device)
    for merge in (xtoken.NEMO_MERGE, ("logmean", "first")):
        z = zs.clone().requires_grad_()
        out = kernel_loss(loss, z, zt, empty, mapping, ts, tt, merge=merge, reduction="sum")
        out.backward()
        assert float(out.detach()) == 0.0
        assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["pkl", "kd"])
def test_vocabularies_above_65536(device, loss):
    zs, zt, chunks, mapping, ts, tt = make_case(loss, V_s=70_001, V_t=66_037, batch=1, T_s=7, T_t=9, device=device)
    for merge in (xtoken.NEMO_MERGE, ("logmean", "bayes")):
        out, grad, ref, ref_grad = kernel_and_reference(loss, zs, zt, chunks, mapping, ts, tt, merge=merge)
        assert rel_error(out.cpu(), ref) <= 1e-5, merge
        assert rel_error(grad.cpu(), ref_grad) <= 1e-5, merge


def test_bayes_targets_only_for_a_bayes_side():
    zs, zt, chunks, W, ts, tt = make_case("pkl")
    expected = xtoken.pkl_loss(zs, zt, chunks, W, merge=("bayes", "mean"), student_targets=ts, teacher_targets=tt)
    torch.testing.assert_close(xtoken.pkl_loss(zs, zt, chunks, W, merge=("bayes", "mean"), student_targets=ts),
                               expected)
    with pytest.raises(RuntimeError, match="student_targets: merge='bayes' needs"):
        xtoken.pkl_loss(zs, zt, chunks, W, merge=("bayes", "mean"), teacher_targets=tt)
    with pytest.raises(RuntimeError, match="teacher_targets: merge='bayes' needs"):
        xtoken.gold_loss(zs, zt, chunks, random_pairs(97, 131, 20), merge=("first", "bayes"), student_targets=ts)
    zs, zt, chunks, _, _, tt = make_case("kd")
    kd = xtoken.kd_loss(zs, zt, chunks, merge=("logmean", "bayes"), teacher_targets=tt)
    expected = reference.kd_loss(zs, zt, chunks, merge=("logmean", "bayes"), teacher_targets=tt)
    torch.testing.assert_close(kd, expected.float())


def test_merge_forms_and_bad_merges():
    zs, zt, chunks, W, ts, tt = make_case("pkl")
    assert xtoken.NEMO_MERGE == ("mean", "logmean")
    nemo = xtoken.pkl_loss(zs, zt, chunks, W, merge=xtoken.NEMO_MERGE)
    torch.testing.assert_close(xtoken.pkl_loss(zs, zt, chunks, W, merge=["mean", "logmean"]), nemo)
    torch.testing.assert_close(xtoken.nn.PKLLoss(W, merge=xtoken.NEMO_MERGE)(zs, zt, chunks), nemo)
    # One name means both sides.
    torch.testing.assert_close(xtoken.pkl_loss(zs, zt, chunks, W, merge="logmean"),
                               xtoken.pkl_loss(zs, zt, chunks, W, merge=("logmean", "logmean")))
    assert not torch.allclose(nemo, xtoken.pkl_loss(zs, zt, chunks, W, merge="mean"))
    for bad in ("last", ("mean",), ("mean", "logmean", "first"), ("mean", "geometric"), 3):
        with pytest.raises(ValueError, match="merge"):
            xtoken.pkl_loss(zs, zt, chunks, W, merge=bad)
        with pytest.raises(ValueError, match="merge"):
            xtoken.nn.KDLoss(merge=bad)
    with pytest.raises(RuntimeError, match="teacher_merge: expected 'first', 'mean', 'bayes' or 'logmean'"):
        torch.ops.xtoken.kd_loss_fwd(zs, zs, chunks, 1.0, "mean", "geometric", None, None)
    with pytest.raises(RuntimeError, match="student_merge: expected"):
        torch.ops.xtoken.pkl_loss_fwd(zs, zt, chunks, *W.kernel_args(131), 1.0, "last", "mean", None, None)


def test_logmean_pools_the_geometric_mean_without_renormalizing():
    log_probs = torch.log_softmax(torch.randn(3, 50, dtype=torch.float64) * 2, dim=-1)
    pooled = reference.pool(log_probs.exp(), "logmean")
    torch.testing.assert_close(pooled, log_probs.exp().prod(0) ** (1 / 3))
    assert float(pooled.sum()) < 1 - 1e-3  # a geometric mean of different distributions has mass < 1
    torch.testing.assert_close(reference.log_pool(log_probs, "logmean"), pooled.log())


@pytest.mark.parametrize("device", DEVICES)
def test_logmean_reads_log_probabilities_that_underflow(device):
    # Student rows that disagree by 200 nats: each row's probability of the other's token is exp(-200),
    # below float32's range, but their geometric mean's log (the mean of the log-probabilities) is finite.
    V = 40
    zs = torch.zeros(4, V)
    zs[0, 0] = zs[1, 1] = zs[2, 2] = zs[3, 3] = 200.0
    zt = torch.randn(4, V) * 2
    chunks = torch.tensor([[0, 2, 0, 1], [2, 4, 1, 4]], dtype=torch.int32)
    for merge in ("logmean", ("logmean", "first"), ("first", "logmean")):
        z = zs.to(device).clone().requires_grad_()
        out = xtoken.kd_loss(z, zt.to(device), chunks.to(device), merge=merge, reduction="none")
        out.sum().backward()
        zr = zs.double().requires_grad_()
        ref = reference.kd_loss(zr, zt, chunks, merge=merge, reduction="none")
        ref.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(z.grad).all(), merge
        torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(z.grad.cpu().double(), zr.grad, rtol=1e-4, atol=1e-5)


def test_nemo_merge_is_nemo_rl_pkl():
    # NeMo-RL's P-KL with the full teacher vocabulary (no top-k): per chunk the mean of the projected student
    # probabilities, the mean of the teacher's log-probabilities, then sum exp(L) (L - log(Q + eps)). W has no
    # empty rows, so NeMo's renormalization of Q is the identity.
    V_s, V_t = 37, 41
    W = random_projection(V_s, V_t, empty_fraction=0.0)
    zs, zt = torch.randn(20, V_s, dtype=torch.float64) * 2, torch.randn(24, V_t, dtype=torch.float64) * 2
    chunks = random_chunks(1, 20, 24, one_to_one=0.3, drop=0.0)
    q = torch.softmax(zs, -1) @ W.to_dense().double()
    log_pt = torch.log_softmax(zt, -1)
    expected = []
    for s0, s1, t0, t1 in chunks.tolist():
        Q, L = q[s0:s1].mean(0), log_pt[t0:t1].mean(0)
        Q = Q / (Q.sum() + 1e-10)
        expected.append((L.exp() * (L - (Q + 1e-10).log())).sum())
    got = xtoken.pkl_loss(zs, zt, chunks, W, merge=xtoken.NEMO_MERGE, reduction="none")
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-6, atol=1e-8)


def test_teacher_accepts_a_merge_pair():
    model = torch.nn.Linear(2, 2)
    assert xtoken.Teacher(model, merge=xtoken.NEMO_MERGE).merge == ("mean", "logmean")
    assert xtoken.Teacher(model, merge="logmean").merge == "logmean"
    with pytest.raises(ValueError, match="merge"):
        xtoken.Teacher(model, merge=("mean", "median"))


# ------------------------------------------------------------------------------------------ CUDA


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("merge", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_cuda_matches_cpu_kernel(loss, merge, dtype):
    zs, zt, chunks, mapping, ts, tt = make_case(loss, V_s=5003, V_t=6007, batch=3, T_s=33, T_t=41, dtype=dtype)
    out = []
    for device in ("cpu", "cuda"):
        z = zs.to(device).requires_grad_()
        m = mapping.to(device) if isinstance(mapping, torch.Tensor) else mapping
        value = kernel_loss(loss, z, zt.to(device), chunks.to(device), m, ts.to(device), tt.to(device), merge=merge,
                            reduction="none")
        (2 * value.sum()).backward()
        out.append((value.cpu(), z.grad.cpu()))
    assert rel_error(out[1][0], out[0][0].double()) <= 1e-5
    assert rel_error(out[1][1].float(), out[0][1].float()) <= (1e-5 if dtype == torch.float32 else 1e-2)
