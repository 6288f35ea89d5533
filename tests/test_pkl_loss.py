"""P-KL: the fused kernels against the float64 reference, gradients, op registration, bad inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, assert_close_ratio, rel_error, requires_cuda

import xtoken
from xtoken import reference
from xtoken.testing import loss_and_grad, random_chunks, random_projection, random_targets

MERGES = ["first", "mean", "bayes"]


def make_case(V_s=97, V_t=131, batch=2, T_s=23, T_t=29, dtype=torch.float32, device="cpu", top_k=4, one_to_one=0.6,
              scale=3.0):
    """Logits, chunks of every shape (1:1, 1:N, M:1, M:N, with gaps), W and targets."""
    W = random_projection(V_s, V_t, top_k=top_k, exact_fraction=0.6, empty_fraction=0.05)
    zs = (torch.randn(batch * T_s, V_s, dtype=torch.float64) * scale).to(dtype).to(device)
    zt = (torch.randn(batch * T_t, V_t, dtype=torch.float64) * scale).to(dtype).to(device)
    chunks = random_chunks(batch, T_s, T_t, one_to_one=one_to_one, drop=0.15).to(device)
    ts = random_targets(batch * T_s, V_s).to(device)
    tt = random_targets(batch * T_t, V_t).to(device)
    return zs, zt, chunks, W, ts, tt


def kernel_and_reference(zs, zt, chunks, W, ts, tt, *, merge, temperature=1.0, reduction="none", grad_scale=2.0):
    """Loss and gradient from the kernel and from the float64 reference on the same inputs."""
    kw = dict(temperature=temperature, merge=merge, reduction=reduction, student_targets=ts, teacher_targets=tt)
    zk = zs.detach().clone().requires_grad_()
    loss = xtoken.pkl_loss(zk, zt, chunks, W, **kw)
    (grad_scale * loss.sum()).backward()
    zr = zs.detach().double().cpu().requires_grad_()
    ref = reference.pkl_loss(zr, zt.cpu(), chunks.cpu(), W.idx, W.val, **kw)
    (grad_scale * ref.sum()).backward()
    return loss.detach(), zk.grad, ref.detach(), zr.grad


def test_chunk_shapes_are_all_exercised():
    chunks = random_chunks(2, 23, 29, one_to_one=0.6, drop=0.15)
    shapes = {(s1 - s0, t1 - t0) for s0, s1, t0, t1 in chunks.tolist()}
    assert (1, 1) in shapes and any(m == 1 and n > 1 for m, n in shapes)
    assert any(m > 1 and n == 1 for m, n in shapes) and any(m > 1 and n > 1 for m, n in shapes)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_float32_matches_reference(device, merge, temperature):
    zs, zt, chunks, W, ts, tt = make_case(device=device)
    loss, grad, ref, ref_grad = kernel_and_reference(zs, zt, chunks, W, ts, tt, merge=merge, temperature=temperature)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert rel_error(loss.cpu(), ref) <= 1e-5, (loss, ref)
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=1e-6)
    assert rel_error(grad.cpu(), ref_grad) <= 1e-5
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-4, atol=1e-6 * float(ref_grad.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("merge", MERGES)
def test_low_precision_matches_reference(device, dtype, merge):
    zs, zt, chunks, W, ts, tt = make_case(dtype=dtype, device=device)
    loss, grad, ref, ref_grad = kernel_and_reference(zs, zt, chunks, W, ts, tt, merge=merge)
    assert grad.dtype == dtype
    # The logits are read exactly and everything accumulates in float32: the loss has float32 accuracy.
    assert rel_error(loss.cpu(), ref) <= 1e-5
    # SPEC §6: at most 2x the error of a PyTorch implementation of the formula in the same dtype.
    zt_low = zs.detach().cpu().requires_grad_()
    same_dtype = reference.pkl_loss(zt_low, zt.cpu(), chunks.cpu(), W.idx, W.val, merge=merge, reduction="none",
                                    student_targets=ts.cpu(), teacher_targets=tt.cpu(), dtype=dtype)
    (2.0 * same_dtype.sum()).backward()
    assert_close_ratio(loss.cpu(), same_dtype.detach(), ref, "loss")
    assert_close_ratio(grad.cpu(), zt_low.grad, ref_grad, "gradient")
    assert rel_error(grad.cpu(), ref_grad) <= 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_vocabularies_above_65536(device):
    zs, zt, chunks, W, ts, tt = make_case(V_s=70_001, V_t=66_037, batch=1, T_s=7, T_t=9, device=device, one_to_one=0.5)
    for merge in MERGES:
        loss, grad, ref, ref_grad = kernel_and_reference(zs, zt, chunks, W, ts, tt, merge=merge)
        assert rel_error(loss.cpu(), ref) <= 1e-5, merge
        assert rel_error(grad.cpu(), ref_grad) <= 1e-5, merge


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_batched_shape(device, reduction):
    zs, zt, chunks, W, ts, tt = make_case(device=device)
    B = 2
    loss, grad, ref, ref_grad = kernel_and_reference(
        zs.reshape(B, -1, zs.shape[-1]), zt.reshape(B, -1, zt.shape[-1]), chunks, W, ts, tt, merge="first",
        temperature=1.5, reduction=reduction,
    )  # fmt: skip
    assert loss.shape == ref.shape
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=1e-6)
    assert grad.shape == zs.reshape(B, -1, zs.shape[-1]).shape
    assert rel_error(grad.cpu(), ref_grad) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    zs, zt, chunks, W, ts, tt = make_case(device=device)
    wide_s = torch.randn(zs.shape[0], zs.shape[1] + 5, device=device)
    wide_s[:, 2 : 2 + zs.shape[1]] = zs
    zs_view = wide_s[:, 2 : 2 + zs.shape[1]]
    zt_view = zt.t().contiguous().t()
    assert not zs_view.is_contiguous() and not zt_view.is_contiguous()
    loss, grad, ref, ref_grad = kernel_and_reference(zs_view, zt_view, chunks, W, ts, tt, merge="mean")
    assert rel_error(loss.cpu(), ref) <= 1e-5 and rel_error(grad.cpu(), ref_grad) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_teacher_wider_than_projection(device):
    # A padded teacher lm_head: the extra columns are unmapped (q = 0 there).
    zs, zt, chunks, W, ts, tt = make_case(device=device)
    zt_wide = torch.cat([zt, torch.randn(zt.shape[0], 9, device=device)], dim=1)
    loss, grad, ref, ref_grad = kernel_and_reference(zs, zt_wide, chunks, W, ts, tt, merge="first")
    assert rel_error(loss.cpu(), ref) <= 1e-5 and rel_error(grad.cpu(), ref_grad) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_identity_projection_is_plain_kl(device):
    V = 50
    zs = torch.randn(6, V, device=device, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(6, V, device=device, dtype=torch.float64)
    chunks = torch.tensor([[i, i + 1, i, i + 1] for i in range(6)], dtype=torch.int32)
    loss = xtoken.pkl_loss(zs, zt, chunks, xtoken.Projection.identity(V), reduction="none")
    expected = torch.nn.functional.kl_div(zs.log_softmax(-1), zt.log_softmax(-1), log_target=True,
                                          reduction="none").sum(-1)
    # Equal up to the eps inside log(q + eps) (about eps / q relative).
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_no_chunks_gives_zero_loss_and_zero_gradient(device):
    zs, zt, _, W, ts, tt = make_case(device=device)
    empty = torch.zeros(0, 4, dtype=torch.int32, device=device)
    for reduction in ("mean", "sum"):
        z = zs.clone().requires_grad_()
        loss = xtoken.pkl_loss(z, zt, empty, W, reduction=reduction)
        loss.backward()
        assert float(loss.detach()) == 0.0 and not torch.isnan(loss)
        assert torch.equal(z.grad, torch.zeros_like(z))
    assert xtoken.pkl_loss(zs, zt, empty, W, reduction="none").shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_outside_chunks_get_zero_gradient(device):
    zs, zt, chunks, W, ts, tt = make_case(device=device)
    z = zs.clone().fill_(0.5).requires_grad_()  # poison: any row the kernel forgot to write would show
    xtoken.pkl_loss(z + zs - 0.5, zt, chunks, W, merge="first").backward()
    used = torch.zeros(zs.shape[0], dtype=torch.bool)
    for s0, *_ in chunks.tolist():
        used[s0] = True
    assert torch.all(z.grad[~used.to(device)] == 0)
    assert torch.all(z.grad[used.to(device)].abs().sum(-1) > 0)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    zs, zt, chunks, W, ts, tt = make_case(V_s=3001, V_t=2777, batch=2, T_s=40, T_t=45, device=device)
    results = []
    for _ in range(2):
        z = zs.clone().requires_grad_()
        loss = xtoken.pkl_loss(z, zt, chunks, W, merge="mean", reduction="none")
        loss.sum().backward()
        results.append((loss, z.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("merge", MERGES)
def test_gradcheck_float64(merge):
    zs, zt, chunks, W, ts, tt = make_case(V_s=11, V_t=13, batch=1, T_s=7, T_t=8, dtype=torch.float64)
    zs.requires_grad_()

    def fn(z):
        return xtoken.pkl_loss(z, zt, chunks, W, merge=merge, temperature=1.3, reduction="none",
                               student_targets=ts, teacher_targets=tt)

    assert torch.autograd.gradcheck(fn, (zs,), eps=1e-6, atol=1e-7)


def test_opcheck():
    zs, zt, chunks, W, ts, tt = make_case(V_s=19, V_t=23, batch=1, T_s=9, T_t=11)
    for merge, targets in (("first", (None, None)), ("bayes", (ts, tt))):
        for requires_grad in (False, True):
            args = (zs.clone().requires_grad_(requires_grad), zt, chunks, *W.kernel_args(zt.shape[1]), 1.0, merge,
                    merge, *targets)
            torch.library.opcheck(torch.ops.xtoken.pkl_loss_fwd.default, args)
    losses, lse_s, lse_t = torch.ops.xtoken.pkl_loss_fwd(zs, zt, chunks, *W.kernel_args(zt.shape[1]), 1.0, "mean",
                                                         "mean", None, None)
    for proj_val_grad in (False, True):
        bwd_args = (torch.rand_like(losses), zs, zt, chunks, *W.kernel_args(zt.shape[1]), 1.0, "mean", "mean", None,
                    None, lse_s, lse_t, proj_val_grad)
        torch.library.opcheck(torch.ops.xtoken.pkl_loss_bwd.default, bwd_args)


def test_torch_compile_fullgraph():
    zs, zt, chunks, W, ts, tt = make_case()
    W.columns(zt.shape[1])  # build the transpose outside the graph

    def step(z):
        return xtoken.pkl_loss(z, zt, chunks, W, merge="bayes", student_targets=ts, teacher_targets=tt)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    z1, z2 = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    eager, traced = step(z1), compiled(z2)
    eager.backward()
    traced.backward()
    torch.testing.assert_close(traced, eager)
    torch.testing.assert_close(z2.grad, z1.grad)


def test_module_matches_functional():
    zs, zt, chunks, W, ts, tt = make_case()
    module = xtoken.nn.PKLLoss(W, temperature=2.0, merge="mean")
    expected = xtoken.pkl_loss(zs, zt, chunks, W, temperature=2.0, merge="mean")
    torch.testing.assert_close(module(zs, zt, chunks), expected)
    state = module.state_dict()
    assert set(state) == {"proj_idx", "proj_val"}


# ------------------------------------------------------------------------------------------ bad input


def _raw_args(zs, zt, chunks, W):
    return [zs, zt, chunks, *W.kernel_args(zt.shape[1]), 1.0, "first", "first", None, None]


@pytest.mark.parametrize(
    "bad_chunk, message",
    [
        ([0, 0, 0, 1], "s0 < s1"),  # empty student side
        ([0, 1, 3, 3], "t0 < t1"),  # empty teacher side
        ([0, 47, 0, 1], "N_s = 46"),  # past the last student row
        ([-1, 1, 0, 1], "0 <= s0"),
        ([0, 1, 0, 59], "N_t = 58"),
    ],
)
def test_bad_chunks_raise(bad_chunk, message):
    zs, zt, chunks, W, ts, tt = make_case()
    table = torch.cat([torch.tensor([bad_chunk], dtype=torch.int32), chunks[chunks[:, 0] >= 47]])
    with pytest.raises(RuntimeError, match=message):
        xtoken.pkl_loss(zs, zt, table, W)


def test_overlapping_or_unsorted_student_rows_raise():
    zs, zt, chunks, W, ts, tt = make_case()
    overlapping = torch.tensor([[0, 2, 0, 1], [1, 3, 1, 2]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="sorted and non-overlapping"):
        xtoken.pkl_loss(zs, zt, overlapping, W)
    with pytest.raises(RuntimeError, match="chunk 1 is"):
        xtoken.pkl_loss(zs, zt, chunks[[1, 0]], W)


def test_projection_indices_out_of_range_raise():
    zs, zt, chunks, W, ts, tt = make_case()
    idx = W.idx.clone()
    idx[5, 0] = zt.shape[1] + 3
    with pytest.raises(ValueError, match="teacher ids must lie"):
        xtoken.Projection(idx, W.val, teacher_vocab_size=W.teacher_vocab_size)
    args = _raw_args(zs, zt, chunks, W)
    args[3] = idx
    with pytest.raises(RuntimeError, match="projection idx"):
        torch.ops.xtoken.pkl_loss_fwd(*args)
    src = W.columns(zt.shape[1]).col_src.clone()
    src[0] = zs.shape[1]
    args = _raw_args(zs, zt, chunks, W)
    args[6] = src
    with pytest.raises(RuntimeError, match="col_src"):
        torch.ops.xtoken.pkl_loss_fwd(*args)


def test_vocab_mismatch_raises():
    zs, zt, chunks, W, ts, tt = make_case()
    with pytest.raises(RuntimeError, match="W has 97 student rows but the student logits have V_s = 96"):
        xtoken.pkl_loss(zs[:, :-1], zt, chunks, W)
    with pytest.raises(ValueError, match="teacher logits have"):
        xtoken.pkl_loss(zs, zt[:, :50], chunks, W)


def test_wrong_dtypes_raise():
    zs, zt, chunks, W, ts, tt = make_case()
    with pytest.raises(RuntimeError, match="student_logits: expected float32"):
        xtoken.pkl_loss(zs.long(), zt, chunks, W)
    with pytest.raises(RuntimeError, match="teacher_logits: expected the dtype of student_logits"):
        xtoken.pkl_loss(zs, zt.double(), chunks, W)
    with pytest.raises(TypeError, match="chunks: expected an integer"):
        xtoken.pkl_loss(zs, zt, chunks.float(), W)
    with pytest.raises(RuntimeError, match="chunks: expected an int32"):
        torch.ops.xtoken.pkl_loss_fwd(*_raw_args(zs, zt, chunks.long(), W))
    with pytest.raises(TypeError, match="projection: expected an xtoken.Projection"):
        xtoken.pkl_loss(zs, zt, chunks, W.idx)


@requires_cuda
def test_wrong_device_raises():
    zs, zt, chunks, W, ts, tt = make_case()
    with pytest.raises(RuntimeError, match="same device"):
        xtoken.pkl_loss(zs.cuda(), zt, chunks, W)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_raises(temperature):
    zs, zt, chunks, W, ts, tt = make_case()
    with pytest.raises(ValueError, match="temperature"):
        xtoken.pkl_loss(zs, zt, chunks, W, temperature=temperature)
    with pytest.raises(RuntimeError, match="temperature"):
        torch.ops.xtoken.pkl_loss_fwd(zs, zt, chunks, *W.kernel_args(zt.shape[1]), temperature, "first", "first", None,
                                          None)


def test_bad_options_raise():
    zs, zt, chunks, W, ts, tt = make_case()
    with pytest.raises(ValueError, match="merge"):
        xtoken.pkl_loss(zs, zt, chunks, W, merge="last")
    with pytest.raises(ValueError, match="reduction"):
        xtoken.pkl_loss(zs, zt, chunks, W, reduction="avg")
    with pytest.raises(RuntimeError, match="merge='bayes' needs"):
        xtoken.pkl_loss(zs, zt, chunks, W, merge="bayes")


def test_bayes_prefix_target_missing_raises():
    zs, zt, chunks, W, ts, tt = make_case()
    multi = next(k for k, (s0, s1, _, _) in enumerate(chunks.tolist()) if s1 - s0 > 1)
    ts = ts.clone()
    ts[chunks[multi, 0]] = -1
    with pytest.raises(RuntimeError, match=f"student_targets.*chunk {multi} is"):
        xtoken.pkl_loss(zs, zt, chunks, W, merge="bayes", student_targets=ts, teacher_targets=tt)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_nan_logits_give_nan_loss(device, side):
    zs, zt, chunks, W, ts, tt = make_case(device=device)
    z = zs if side == "student" else zt
    z[int(chunks[0, 0 if side == "student" else 2]), 3] = float("nan")
    loss = xtoken.pkl_loss(zs, zt, chunks, W, reduction="none")
    assert torch.isnan(loss[0]) and not torch.isnan(loss[1:]).any()
    assert torch.isnan(xtoken.pkl_loss(zs, zt, chunks, W))


# ------------------------------------------------------------------------------------------ CUDA


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("merge", MERGES)
def test_cuda_matches_cpu_kernel(dtype, merge):
    zs, zt, chunks, W, ts, tt = make_case(V_s=5003, V_t=6007, batch=3, T_s=33, T_t=41, dtype=dtype)

    def loss_fn(z, zt, chunks, ts, tt):
        return xtoken.pkl_loss(z, zt, chunks, W, merge=merge, reduction="none", student_targets=ts, teacher_targets=tt)

    out = [loss_and_grad(loss_fn, zs, zt, chunks, ts, tt, device=device) for device in ("cpu", "cuda")]
    assert rel_error(out[1][0], out[0][0].double()) <= 1e-5
    assert rel_error(out[1][1].float(), out[0][1].float()) <= (1e-5 if dtype == torch.float32 else 1e-2)


@requires_cuda
def test_cuda_compile_reduce_overhead():
    zs, zt, chunks, W, ts, tt = make_case(device="cuda")
    W = W.to("cuda")
    W.columns(zt.shape[1])

    def step(z):
        return xtoken.pkl_loss(z, zt, chunks, W)

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        z = zs.clone().requires_grad_()
        loss = compiled(z)
        loss.backward()
    z_ref = zs.clone().requires_grad_()
    step(z_ref).backward()
    torch.testing.assert_close(loss, step(zs))
    torch.testing.assert_close(z.grad, z_ref.grad)
