"""The hybrid loss (GOLD, H-KL) and ULD: the fused kernels against the float64 reference, gradients, op
registration, modules, bad inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, assert_close_ratio, rel_error, requires_cuda

import xtoken
from xtoken import reference
from xtoken.testing import loss_and_grad, random_chunks, random_pairs, random_projection, random_targets

MERGES = ["first", "mean", "bayes"]
# (matched, beta): KL and the three forms of TRL's generalized JSD.
MATCHED = [("kl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0)]


def make_case(V_s=97, V_t=131, n_pairs=60, batch=2, T_s=23, T_t=29, dtype=torch.float32, device="cpu", scale=3.0,
              one_to_one=0.6):
    """Logits, chunks of every shape (1:1, 1:N, M:1, M:N, with gaps), common pairs and targets."""
    zs = (torch.randn(batch * T_s, V_s, dtype=torch.float64) * scale).to(dtype).to(device)
    zt = (torch.randn(batch * T_t, V_t, dtype=torch.float64) * scale).to(dtype).to(device)
    chunks = random_chunks(batch, T_s, T_t, one_to_one=one_to_one, drop=0.15).to(device)
    pairs = random_pairs(V_s, V_t, n_pairs).to(device)
    ts = random_targets(batch * T_s, V_s).to(device)
    tt = random_targets(batch * T_t, V_t).to(device)
    return zs, zt, chunks, pairs, ts, tt


def kernel_and_reference(zs, zt, chunks, pairs, ts, tt, *, grad_scale=2.0, reduction="none", weights=(0.7, 0.3),
                         **options):
    """Loss and gradient from the kernel and from the float64 reference on the same inputs."""
    kw = dict(reduction=reduction, weights=weights, student_targets=ts, teacher_targets=tt, **options)
    zk = zs.detach().clone().requires_grad_()
    loss = xtoken.gold_loss(zk, zt, chunks, pairs, **kw)
    (grad_scale * loss.sum()).backward()
    zr = zs.detach().double().cpu().requires_grad_()
    ref = reference.hybrid_loss(zr, zt.cpu(), chunks.cpu(), pairs.cpu(), **{
        k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    (grad_scale * ref.sum()).backward()
    return loss.detach(), zk.grad, ref.detach(), zr.grad


def assert_matches(loss, grad, ref, ref_grad, tol=1e-5):
    assert rel_error(loss.cpu(), ref) <= tol, (loss, ref)
    assert rel_error(grad.cpu(), ref_grad) <= tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("matched, beta", MATCHED)
@pytest.mark.parametrize("uld_topk", [None, 7])
def test_float32_matches_reference(device, merge, matched, beta, uld_topk):
    zs, zt, chunks, pairs, ts, tt = make_case(device=device)
    loss, grad, ref, ref_grad = kernel_and_reference(zs, zt, chunks, pairs, ts, tt, merge=merge, matched=matched,
                                                     beta=beta, uld_topk=uld_topk, temperature=1.7)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert_matches(loss, grad, ref, ref_grad)


@pytest.mark.parametrize("device", DEVICES)
def test_both_terms_match_reference(device):
    zs, zt, chunks, pairs, ts, tt = make_case(device=device)
    terms, _, _ = torch.ops.xtoken.hybrid_loss_fwd(zs, zt, chunks, pairs, 1.0, "first", "first", "jsd", 0.5, 9, None,
                                                   None)
    expected = reference.hybrid_chunk_losses(zs.cpu(), zt.cpu(), chunks.cpu(), pairs.cpu(), matched="jsd", beta=0.5,
                                             uld_topk=9)
    assert terms.shape == (chunks.shape[0], 2)
    torch.testing.assert_close(terms.cpu().double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("merge", MERGES)
def test_low_precision_matches_reference(device, dtype, merge):
    zs, zt, chunks, pairs, ts, tt = make_case(dtype=dtype, device=device)
    options = dict(merge=merge, matched="kl", uld_topk=None)
    loss, grad, ref, ref_grad = kernel_and_reference(zs, zt, chunks, pairs, ts, tt, **options)
    assert grad.dtype == dtype
    # The logits are read exactly and everything accumulates in float32: the loss has float32 accuracy.
    assert rel_error(loss.cpu(), ref) <= 1e-5
    # SPEC §6: at most 2x the error of a PyTorch implementation of the formula in the same dtype.
    z_low = zs.detach().cpu().requires_grad_()
    same_dtype = reference.hybrid_loss(z_low, zt.cpu(), chunks.cpu(), pairs.cpu(), reduction="none", weights=(0.7, 0.3),
                                       student_targets=ts.cpu(), teacher_targets=tt.cpu(), dtype=dtype, **options)
    (2.0 * same_dtype.sum()).backward()
    assert_close_ratio(loss.cpu(), same_dtype.detach(), ref, "loss")
    assert_close_ratio(grad.cpu(), z_low.grad, ref_grad, "gradient")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("uld_topk", [None, 8192])
def test_vocabularies_above_65536(device, uld_topk):
    zs, zt, chunks, pairs, ts, tt = make_case(V_s=70_001, V_t=66_037, n_pairs=50_000, batch=1, T_s=7, T_t=9,
                                              device=device, one_to_one=0.5)
    for merge in MERGES:
        loss, grad, ref, ref_grad = kernel_and_reference(zs, zt, chunks, pairs, ts, tt, merge=merge, matched="jsd",
                                                         beta=0.0, uld_topk=uld_topk)
        assert_matches(loss, grad, ref, ref_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("V_s, V_t, uld_topk", [(300, 120, None), (120, 300, None), (300, 120, 100), (120, 300, 100),
                                                 (300, 120, 200), (120, 300, 200)])
def test_uncommon_sets_of_different_sizes(device, V_s, V_t, uld_topk):
    # |U_s| = V_s - 40 and |U_t| = V_t - 40; the shorter ranking is zero-padded, R caps both.
    zs, zt, chunks, pairs, ts, tt = make_case(V_s=V_s, V_t=V_t, n_pairs=40, device=device)
    for matched, beta in (("kl", 0.5), ("jsd", 0.5)):
        loss, grad, ref, ref_grad = kernel_and_reference(zs, zt, chunks, pairs, ts, tt, merge="mean", matched=matched,
                                                         beta=beta, uld_topk=uld_topk)
        assert_matches(loss, grad, ref, ref_grad)


@pytest.mark.parametrize("device", DEVICES)
def test_uld_topk_selects_the_top_ranks(device):
    # R smaller than both uncommon sets: only the top R ranks count, on both sides; R = 1 and R >= n too.
    zs, zt, chunks, pairs, ts, tt = make_case(V_s=2_003, V_t=3_001, n_pairs=900, device=device)
    for uld_topk in (1, 64, 1_000, 5_000):
        loss, grad, ref, ref_grad = kernel_and_reference(zs, zt, chunks, pairs, ts, tt, merge="bayes", uld_topk=uld_topk)
        assert_matches(loss, grad, ref, ref_grad)
    full = xtoken.gold_loss(zs, zt, chunks, pairs, uld_topk=None, weights=(0.0, 1.0))
    capped = xtoken.gold_loss(zs, zt, chunks, pairs, uld_topk=5_000, weights=(0.0, 1.0))
    torch.testing.assert_close(full, capped)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("merge", MERGES)
def test_no_pairs_is_uld(device, merge):
    zs, zt, chunks, _, ts, tt = make_case(device=device)
    empty = torch.zeros(0, 2, dtype=torch.int32, device=device)
    loss, grad, ref, ref_grad = kernel_and_reference(zs, zt, chunks, empty, ts, tt, merge=merge, uld_topk=None,
                                                     weights="adaptive")
    assert_matches(loss, grad, ref, ref_grad)
    z = zs.clone().requires_grad_()
    uld = xtoken.uld_loss(z, zt, chunks, merge=merge, uld_topk=None, reduction="none", student_targets=ts,
                          teacher_targets=tt)
    torch.testing.assert_close(uld, loss)  # adaptive weights with C = 0: w_c = 0, w_u = 1
    (2.0 * uld.sum()).backward()
    torch.testing.assert_close(z.grad, grad)


@pytest.mark.parametrize("device", DEVICES)
def test_all_pairs(device):
    # Every student token is paired: U_s is empty, so the sorted-L1 term is the teacher's uncommon mass.
    zs, zt, chunks, _, ts, tt = make_case(device=device)
    V_s, V_t = zs.shape[1], zt.shape[1]
    pairs = random_pairs(V_s, V_t, V_s).to(device)
    loss, grad, ref, ref_grad = kernel_and_reference(zs, zt, chunks, pairs, ts, tt, merge="first", matched="jsd",
                                                     beta=0.5, uld_topk=None)
    assert_matches(loss, grad, ref, ref_grad)
    terms, _, _ = torch.ops.xtoken.hybrid_loss_fwd(zs, zt, chunks, pairs, 1.0, "first", "first", "kl", 0.5, None, None,
                                                   None)
    p_t = torch.softmax(zt.double().cpu(), dim=-1)
    uncommon = torch.ones(V_t, dtype=torch.bool)
    uncommon[pairs[:, 1].long().cpu()] = False
    expected = p_t[chunks[:, 2].long().cpu()][:, uncommon].sum(-1)
    torch.testing.assert_close(terms[:, 1].cpu().double(), expected, rtol=1e-5, atol=1e-7)
    # Same vocabulary, every token paired: no sorted-L1 term at all.
    square = torch.stack([torch.arange(V_s), torch.randperm(V_s)], dim=1).to(torch.int32).to(device)
    terms, _, _ = torch.ops.xtoken.hybrid_loss_fwd(zs, zt[:, :V_s].contiguous(), chunks, square, 1.0, "first", "first",
                                                   "kl", 0.5, None, None, None)
    assert torch.all(terms[:, 1] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_jsd_against_kl(device):
    # Moderate logits over a small vocabulary keep every probability above the JSD floor 1e-8, so jsd with
    # beta = 0 is the forward KL "kl" computes; beta = 1 is the reverse KL; beta = 0.5 is the symmetric JSD.
    zs, zt, chunks, pairs, ts, tt = make_case(device=device, scale=1.0)
    options = dict(uld_topk=None, weights=(1.0, 0.0), reduction="none")
    kl = xtoken.gold_loss(zs, zt, chunks, pairs, matched="kl", **options)
    forward = xtoken.gold_loss(zs, zt, chunks, pairs, matched="jsd", beta=0.0, **options)
    torch.testing.assert_close(forward, kl, rtol=1e-5, atol=1e-7)
    p_s = torch.softmax(zs.double().cpu(), -1)[chunks[:, 0].long().cpu()][:, pairs[:, 0].long().cpu()]
    p_t = torch.softmax(zt.double().cpu(), -1)[chunks[:, 2].long().cpu()][:, pairs[:, 1].long().cpu()]
    reverse = xtoken.gold_loss(zs, zt, chunks, pairs, matched="jsd", beta=1.0, **options)
    torch.testing.assert_close(reverse.cpu().double(), (p_s * (p_s.log() - p_t.log())).sum(-1), rtol=1e-5, atol=1e-7)
    m = 0.5 * (p_s + p_t)
    symmetric = 0.5 * (p_t * (p_t.log() - m.log())).sum(-1) + 0.5 * (p_s * (p_s.log() - m.log())).sum(-1)
    half = xtoken.gold_loss(zs, zt, chunks, pairs, matched="jsd", beta=0.5, **options)
    torch.testing.assert_close(half.cpu().double(), symmetric, rtol=1e-5, atol=1e-7)
    # The mixture is bounded by both KLs in the JSD sense: 0 <= JSD_0.5 <= (KL + reverse KL) / 4.
    assert torch.all(half >= 0) and torch.all(half <= (kl + reverse) / 4 + 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("uld_topk", [None, 20])
def test_tied_probabilities_rank_the_lower_id_first(device, uld_topk):
    # Integer logits from a small range: many exact ties on both sides.
    zs, zt, chunks, pairs, ts, tt = make_case(device=device)
    zs = torch.randint(-2, 3, zs.shape, device=device).float()
    zt = torch.randint(-2, 3, zt.shape, device=device).float()
    loss, grad, ref, ref_grad = kernel_and_reference(zs, zt, chunks, pairs, ts, tt, merge="first", uld_topk=uld_topk)
    assert_matches(loss, grad, ref, ref_grad)
    again = xtoken.gold_loss(zs.clone().requires_grad_(), zt, chunks, pairs, reduction="none", weights=(0.7, 0.3),
                             uld_topk=uld_topk)
    assert torch.equal(again.detach(), loss)


def test_tie_gradient_goes_to_the_lower_id():
    # Student tokens 1 and 3 tie at the top. Rank 0 goes to token 1 (the lower id) and meets the teacher's
    # top, which is larger: sign -1; rank 1 (token 3) meets a small teacher value: sign +1; so do ranks 2, 3.
    zs = torch.tensor([[0.0, 5.0, 0.0, 5.0]], requires_grad=True)
    zt = torch.tensor([[9.0, 0.0, 0.0, 0.0]])
    chunks = torch.tensor([[0, 1, 0, 1]], dtype=torch.int32)
    empty = torch.zeros(0, 2, dtype=torch.int32)
    xtoken.uld_loss(zs, zt, chunks, uld_topk=None).backward()
    p = torch.softmax(zs.detach(), -1)[0]
    h = torch.tensor([1.0, -1.0, 1.0, 1.0])
    torch.testing.assert_close(zs.grad[0], p * (h - (p * h).sum()))
    z = zs.detach().double().requires_grad_()
    reference.hybrid_loss(z, zt, chunks, empty, uld_topk=None).backward()
    torch.testing.assert_close(zs.grad, z.grad.float())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weights", ["adaptive", (0.25, 2.0)])
def test_reductions_weights_and_batched_shape(device, reduction, weights):
    zs, zt, chunks, pairs, ts, tt = make_case(device=device)
    B = 2
    loss, grad, ref, ref_grad = kernel_and_reference(
        zs.reshape(B, -1, zs.shape[-1]), zt.reshape(B, -1, zt.shape[-1]), chunks, pairs, ts, tt, merge="first",
        temperature=1.5, reduction=reduction, weights=weights,
    )  # fmt: skip
    assert loss.shape == ref.shape
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=1e-6)
    assert grad.shape == zs.reshape(B, -1, zs.shape[-1]).shape
    assert rel_error(grad.cpu(), ref_grad) <= 1e-5


def test_adaptive_weights_are_trls():
    zs, zt, chunks, pairs, ts, tt = make_case()
    terms, _, _ = torch.ops.xtoken.hybrid_loss_fwd(zs, zt, chunks, pairs, 1.0, "first", "first", "kl", 0.5, 8192, None,
                                                   None)
    w_c = pairs.shape[0] / zt.shape[1]
    expected = (w_c * terms[:, 0] + (1 - w_c) * terms[:, 1]).mean()
    torch.testing.assert_close(xtoken.gold_loss(zs, zt, chunks, pairs), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    zs, zt, chunks, pairs, ts, tt = make_case(device=device)
    wide_s = torch.randn(zs.shape[0], zs.shape[1] + 5, device=device)
    wide_s[:, 2 : 2 + zs.shape[1]] = zs
    zs_view = wide_s[:, 2 : 2 + zs.shape[1]]
    zt_view = zt.t().contiguous().t()
    pairs_view = pairs.t().contiguous().t()
    assert not zs_view.is_contiguous() and not zt_view.is_contiguous() and not pairs_view.is_contiguous()
    loss, grad, ref, ref_grad = kernel_and_reference(zs_view, zt_view, chunks, pairs_view, ts, tt, merge="mean",
                                                     uld_topk=11)
    assert_matches(loss, grad, ref, ref_grad)


@pytest.mark.parametrize("device", DEVICES)
def test_no_chunks_gives_zero_loss_and_zero_gradient(device):
    zs, zt, _, pairs, ts, tt = make_case(device=device)
    empty = torch.zeros(0, 4, dtype=torch.int32, device=device)
    for reduction in ("mean", "sum"):
        z = zs.clone().requires_grad_()
        loss = xtoken.gold_loss(z, zt, empty, pairs, reduction=reduction)
        loss.backward()
        assert float(loss.detach()) == 0.0 and not torch.isnan(loss)
        assert torch.equal(z.grad, torch.zeros_like(z))
    assert xtoken.gold_loss(zs, zt, empty, pairs, reduction="none").shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_outside_chunks_get_zero_gradient(device):
    zs, zt, chunks, pairs, ts, tt = make_case(device=device)
    z = zs.clone().fill_(0.5).requires_grad_()  # poison: any row the kernel forgot to write would show
    xtoken.gold_loss(z + zs - 0.5, zt, chunks, pairs, merge="first").backward()
    used = torch.zeros(zs.shape[0], dtype=torch.bool)
    for s0, *_ in chunks.tolist():
        used[s0] = True
    assert torch.all(z.grad[~used.to(device)] == 0)
    assert torch.all(z.grad[used.to(device)].abs().sum(-1) > 0)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    zs, zt, chunks, pairs, ts, tt = make_case(V_s=3001, V_t=2777, n_pairs=2000, batch=2, T_s=40, T_t=45,
                                              device=device)
    results = []
    for _ in range(2):
        z = zs.clone().requires_grad_()
        loss = xtoken.gold_loss(z, zt, chunks, pairs, merge="mean", uld_topk=300, reduction="none")
        loss.sum().backward()
        results.append((loss, z.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("matched, beta", MATCHED)
def test_gradcheck_float64(merge, matched, beta):
    zs, zt, chunks, pairs, ts, tt = make_case(V_s=11, V_t=13, n_pairs=5, batch=1, T_s=7, T_t=8, dtype=torch.float64)
    zs.requires_grad_()

    def fn(z):
        return xtoken.gold_loss(z, zt, chunks, pairs, merge=merge, matched=matched, beta=beta, temperature=1.3,
                                uld_topk=5, weights=(0.6, 0.4), reduction="none", student_targets=ts,
                                teacher_targets=tt)

    assert torch.autograd.gradcheck(fn, (zs,), eps=1e-6, atol=1e-7)


def test_opcheck():
    zs, zt, chunks, pairs, ts, tt = make_case(V_s=19, V_t=23, n_pairs=8, batch=1, T_s=9, T_t=11)
    for merge, targets, topk in (("first", (None, None), None), ("bayes", (ts, tt), 4)):
        for requires_grad in (False, True):
            args = (zs.clone().requires_grad_(requires_grad), zt, chunks, pairs, 1.0, merge, merge, "jsd", 0.5, topk,
                    *targets)
            torch.library.opcheck(torch.ops.xtoken.hybrid_loss_fwd.default, args)
    losses, lse_s, lse_t = torch.ops.xtoken.hybrid_loss_fwd(zs, zt, chunks, pairs, 1.0, "mean", "mean", "kl", 0.5, None,
                                                            None, None)
    bwd_args = (torch.rand_like(losses), zs, zt, chunks, pairs, 1.0, "mean", "mean", "kl", 0.5, None, None, None,
                lse_s, lse_t)
    torch.library.opcheck(torch.ops.xtoken.hybrid_loss_bwd.default, bwd_args)


def test_torch_compile_fullgraph():
    zs, zt, chunks, pairs, ts, tt = make_case()

    def step(z):
        return xtoken.gold_loss(z, zt, chunks, pairs, merge="bayes", matched="jsd", beta=0.0, uld_topk=None,
                                student_targets=ts, teacher_targets=tt)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    z1, z2 = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    eager, traced = step(z1), compiled(z2)
    eager.backward()
    traced.backward()
    torch.testing.assert_close(traced, eager)
    torch.testing.assert_close(z2.grad, z1.grad)


# ------------------------------------------------------------------------------------------ API and modules


def test_projection_gives_exact_or_relaxed_pairs(monkeypatch):
    zs, zt, chunks, _, ts, tt = make_case()
    W = random_projection(zs.shape[1], zt.shape[1], exact_fraction=0.6)
    relaxed = W.common_pairs("relaxed")
    torch.testing.assert_close(xtoken.hkl_loss(zs, zt, chunks, W), xtoken.gold_loss(zs, zt, chunks, relaxed))
    asked = []
    monkeypatch.setattr(type(W), "common_pairs", lambda self, kind="relaxed", threshold=0.6: asked.append(kind) or relaxed)
    xtoken.gold_loss(zs, zt, chunks, W)
    xtoken.hkl_loss(zs, zt, chunks, W)
    assert asked == ["exact", "relaxed"]


def test_modules_match_functional():
    zs, zt, chunks, pairs, ts, tt = make_case()
    options = dict(temperature=2.0, merge="mean", matched="jsd", beta=0.3, uld_topk=9, weights=(0.5, 0.5))
    module = xtoken.nn.GOLDLoss(pairs, **options)
    torch.testing.assert_close(module(zs, zt, chunks), xtoken.gold_loss(zs, zt, chunks, pairs, **options))
    assert set(module.state_dict()) == {"pairs"}
    W = random_projection(zs.shape[1], zt.shape[1], exact_fraction=0.6)
    torch.testing.assert_close(xtoken.nn.HKLLoss(W)(zs, zt, chunks), xtoken.hkl_loss(zs, zt, chunks, W))
    torch.testing.assert_close(xtoken.nn.ULDLoss(uld_topk=None)(zs, zt, chunks),
                               xtoken.uld_loss(zs, zt, chunks, uld_topk=None))
    assert "pairs=60" in repr(module)


@pytest.mark.parametrize("mode", ["pkl", "hkl"])
def test_xtoken_loss_modes(mode):
    zs, zt, chunks, _, ts, tt = make_case()
    W = random_projection(zs.shape[1], zt.shape[1], exact_fraction=0.6)
    module = xtoken.nn.XTokenLoss(W, mode=mode, merge="first")
    assert module.mode == mode
    expected = xtoken.pkl_loss(zs, zt, chunks, W) if mode == "pkl" else xtoken.hkl_loss(zs, zt, chunks, W)
    torch.testing.assert_close(module(zs, zt, chunks), expected)


def test_xtoken_loss_auto_follows_the_audit():
    import tokenizers_util as tu

    from xtoken.tokenizer import HFTokenizer

    student = HFTokenizer(tu.digit_packing_bpe(), roles=tu.DIGIT_PACKING_ROLES)
    teacher = HFTokenizer(tu.digit_splitting_bpe(), roles=tu.DIGIT_SPLITTING_ROLES)
    W = xtoken.Projection.build(student, teacher)
    module = xtoken.nn.XTokenLoss(W)
    assert module.mode == W.audit().recommendation
    bare = xtoken.Projection(W.idx, W.val, teacher_vocab_size=W.teacher_vocab_size)
    with pytest.raises(ValueError, match="mode='auto' follows the coverage audit"):
        xtoken.nn.XTokenLoss(bare)
    with pytest.raises(ValueError, match="mode"):
        xtoken.nn.XTokenLoss(W, mode="gold")


# ------------------------------------------------------------------------------------------ bad input


def _raw(zs, zt, chunks, pairs, matched="kl", beta=0.5, topk=None):
    return torch.ops.xtoken.hybrid_loss_fwd(zs, zt, chunks, pairs, 1.0, "first", "first", matched, beta, topk, None,
                                            None)


def test_bad_pairs_raise():
    zs, zt, chunks, pairs, ts, tt = make_case()
    with pytest.raises(RuntimeError, match=r"pairs: expected an int32 \[C, 2\]"):
        _raw(zs, zt, chunks, pairs.long())
    with pytest.raises(RuntimeError, match=r"pairs: expected an int32 \[C, 2\]"):
        _raw(zs, zt, chunks, pairs[:, :1].contiguous())
    with pytest.raises(TypeError, match="pairs: expected an integer"):
        xtoken.gold_loss(zs, zt, chunks, pairs.float())
    bad = pairs.clone()
    bad[3, 0] = zs.shape[1]
    with pytest.raises(RuntimeError, match=r"pairs\[:, 0\] \(student ids\): every value must lie in \[0, 97\)"):
        xtoken.gold_loss(zs, zt, chunks, bad)
    bad = pairs.clone()
    bad[3, 1] = -1
    with pytest.raises(RuntimeError, match=r"pairs\[:, 1\] \(teacher ids\)"):
        xtoken.gold_loss(zs, zt, chunks, bad)
    bad = pairs.clone()
    bad[5, 1] = bad[2, 1]
    with pytest.raises(RuntimeError, match=rf"each id may appear at most once; id {int(pairs[2, 1])} appears"):
        xtoken.gold_loss(zs, zt, chunks, bad)
    too_many = torch.zeros(98, 2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="98 pairs but the vocabularies have 97 and 131"):
        xtoken.gold_loss(zs, zt, chunks, too_many)


def test_bad_options_raise():
    zs, zt, chunks, pairs, ts, tt = make_case()
    with pytest.raises(ValueError, match="matched"):
        xtoken.gold_loss(zs, zt, chunks, pairs, matched="js")
    with pytest.raises(RuntimeError, match="matched: expected 'kl' or 'jsd'"):
        _raw(zs, zt, chunks, pairs, matched="js")
    for beta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            xtoken.gold_loss(zs, zt, chunks, pairs, matched="jsd", beta=beta)
        with pytest.raises(RuntimeError, match=r"beta: expected a value in \[0, 1\]"):
            _raw(zs, zt, chunks, pairs, beta=beta)
    for topk in (0, -3, True, 2.5):
        with pytest.raises((ValueError, TypeError), match="uld_topk"):
            xtoken.gold_loss(zs, zt, chunks, pairs, uld_topk=topk)
    with pytest.raises(RuntimeError, match="uld_topk: expected None or a count >= 1"):
        _raw(zs, zt, chunks, pairs, topk=0)
    for weights in ("fixed", (1.0,), (1.0, float("inf")), "ab"):
        with pytest.raises(ValueError, match="weights"):
            xtoken.gold_loss(zs, zt, chunks, pairs, weights=weights)
    with pytest.raises(ValueError, match="merge"):
        xtoken.gold_loss(zs, zt, chunks, pairs, merge="last")
    with pytest.raises(RuntimeError, match="merge='bayes' needs"):
        xtoken.gold_loss(zs, zt, chunks, pairs, merge="bayes")
    with pytest.raises(RuntimeError, match="chunks: every row"):
        xtoken.gold_loss(zs, zt, torch.tensor([[0, 0, 0, 1]], dtype=torch.int32), pairs)


@requires_cuda
def test_wrong_device_raises():
    zs, zt, chunks, pairs, ts, tt = make_case()
    with pytest.raises(RuntimeError, match="same device"):
        _raw(zs.cuda(), zt.cuda(), chunks.cuda(), pairs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_nan_logits_give_nan_loss(device, side):
    zs, zt, chunks, pairs, ts, tt = make_case(device=device)
    z = zs if side == "student" else zt
    z[int(chunks[0, 0 if side == "student" else 2]), 3] = float("nan")
    loss = xtoken.gold_loss(zs, zt, chunks, pairs, reduction="none")
    assert torch.isnan(loss[0]) and not torch.isnan(loss[1:]).any()


# ------------------------------------------------------------------------------------------ CUDA


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("uld_topk", [None, 1000])
def test_cuda_matches_cpu_kernel(dtype, merge, uld_topk):
    zs, zt, chunks, pairs, ts, tt = make_case(V_s=5003, V_t=6007, n_pairs=3000, batch=3, T_s=33, T_t=41, dtype=dtype)

    def loss_fn(z, zt, chunks, pairs, ts, tt):
        return xtoken.gold_loss(z, zt, chunks, pairs, merge=merge, matched="jsd", beta=0.5, uld_topk=uld_topk,
                                reduction="none", student_targets=ts, teacher_targets=tt)

    out = [loss_and_grad(loss_fn, zs, zt, chunks, pairs, ts, tt, device=device) for device in ("cpu", "cuda")]
    assert rel_error(out[1][0], out[0][0].double()) <= 1e-5
    assert rel_error(out[1][1].float(), out[0][1].float()) <= (1e-5 if dtype == torch.float32 else 1e-2)


@requires_cuda
def test_cuda_many_chunks_in_waves():
    # Enough chunks over a wide vocabulary that the 512 MB workspace splits them into several waves (each chunk
    # needs about 1.3 MB forward, 1.8 MB backward).
    zs, zt, chunks, pairs, ts, tt = make_case(V_s=128_256, V_t=151_936, n_pairs=100_000, batch=1, T_s=600, T_t=680,
                                              device="cuda", one_to_one=0.9)
    assert chunks.shape[0] > 450
    z = zs.clone().requires_grad_()
    loss = xtoken.gold_loss(z, zt, chunks, pairs, uld_topk=None, reduction="none")
    loss.sum().backward()
    zc = zs.cpu().requires_grad_()
    expected = xtoken.gold_loss(zc, zt.cpu(), chunks.cpu(), pairs.cpu(), uld_topk=None, reduction="none")
    expected.sum().backward()
    assert rel_error(loss.cpu(), expected.double()) <= 1e-5
    assert rel_error(z.grad.cpu(), zc.grad.double()) <= 1e-5


@requires_cuda
def test_cuda_compile_reduce_overhead():
    zs, zt, chunks, pairs, ts, tt = make_case(device="cuda")

    def step(z):
        return xtoken.gold_loss(z, zt, chunks, pairs, uld_topk=16)

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        z = zs.clone().requires_grad_()
        loss = compiled(z)
        loss.backward()
    z_ref = zs.clone().requires_grad_()
    step(z_ref).backward()
    torch.testing.assert_close(loss, step(zs))
    torch.testing.assert_close(z.grad, z_ref.grad)
