"""Chain KL (SPEC.md §4): the reference against a brute-force reading of the formulas, the piece tables, and
the fused op against the reference."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, assert_close_ratio, rel_error, requires_cuda

import xtoken
from xtoken import reference
from xtoken.testing import loss_and_grad, random_chunks

EPS = reference.PKL_EPS


def brute_level(cond_logits, table, prefix, plain_logits, target_is_plain):
    """One level, token by token, straight from the docstring of reference.chain_chunk_losses."""
    p = torch.softmax(cond_logits.double(), 0).tolist()
    q = torch.softmax(plain_logits.double(), 0).tolist()
    rows = table.tolist()
    members = [v for v, row in enumerate(rows) if all(row[r] == x for r, x in enumerate(prefix))]
    if not members:
        return 0.0
    depth = len(prefix)
    bucket = {v: rows[v][depth] if rows[v][depth] >= 0 else "end" for v in members}
    pieces = {b for b in bucket.values() if b != "end"}
    mass = sum(p[v] for v in members)
    cond = {c: 0.0 for c in [*pieces, "end"]}
    for v in members:
        cond[bucket[v]] += p[v] / mass
    plain = {c: q[c] for c in pieces}
    plain["end"] = sum(q[u] for u in range(len(q)) if u not in pieces)
    target, model = (plain, cond) if target_is_plain else (cond, plain)
    return sum(target[c] * (math.log(target[c]) - math.log(model[c] + EPS)) for c in target if target[c] > 0)


def brute_chain(zs, zt, chunks, sp, tp, ts, tt, tau):
    losses = [0.0] * chunks.shape[0]
    levels = reference.chain_levels(chunks, zs.shape[0], zt.shape[0], sp.shape[1],
                                    None if tp is None else tp.shape[1], ts, tt)
    for k, side, cond_row, plain_row, prefix in levels:
        if side == "teacher":
            losses[k] += brute_level(zs[cond_row] / tau, sp, prefix, zt[plain_row] / tau, True)
        else:
            losses[k] += brute_level(zt[cond_row] / tau, tp, prefix, zs[plain_row] / tau, False)
    return torch.tensor(losses, dtype=torch.float64)


def random_tables(V_s, V_t, L, generator=None):
    """Piece tables shaped like real ones: short spellings over a small alphabet of leading pieces, so prefixes
    are shared (several tokens start with the same piece) and some tokens end where others go on."""
    g = generator
    lengths = torch.randint(0, L + 1, (V_s,), generator=g)
    sp = torch.randint(0, min(V_t, 5), (V_s, L), generator=g, dtype=torch.int32)
    sp[:, 1:] = torch.randint(0, V_t, (V_s, L - 1), generator=g, dtype=torch.int32) % 7
    sp[torch.arange(L)[None, :] >= lengths[:, None]] = -1
    lengths_t = torch.randint(0, L + 1, (V_t,), generator=g)
    tp = torch.randint(0, min(V_s, 5), (V_t, L), generator=g, dtype=torch.int32)
    tp[:, 1:] = torch.randint(0, V_s, (V_t, L - 1), generator=g, dtype=torch.int32) % 7
    tp[torch.arange(L)[None, :] >= lengths_t[:, None]] = -1
    return sp, tp


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("mirror", [True, False])
def test_reference_matches_brute_force(tau, mirror):
    g = torch.Generator().manual_seed(3)
    B, T_s, T_t, V_s, V_t, L = 2, 7, 9, 23, 17, 3
    zs = torch.randn(B * T_s, V_s, dtype=torch.float64, generator=g) * 2
    zt = torch.randn(B * T_t, V_t, dtype=torch.float64, generator=g) * 2
    chunks = random_chunks(B, T_s, T_t, one_to_one=0.4, drop=0.0, generator=g)
    sp, tp = random_tables(V_s, V_t, L, generator=g)
    # Realized pieces from the small alphabet the tables use, so deeper levels find members.
    ts = torch.randint(0, 7, (B * T_s,), generator=g)
    tt = torch.randint(0, 7, (B * T_t,), generator=g)
    tp = tp if mirror else None
    got = reference.chain_chunk_losses(zs, zt, chunks, sp, tp, temperature=tau, student_targets=ts,
                                       teacher_targets=tt)
    want = brute_chain(zs, zt, chunks, sp, tp, ts, tt, tau)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert bool((want > 0).any())


def test_reference_gradcheck():
    g = torch.Generator().manual_seed(5)
    B, T_s, T_t, V_s, V_t, L = 1, 6, 8, 11, 9, 3
    zs = torch.randn(B * T_s, V_s, dtype=torch.float64, generator=g).requires_grad_()
    zt = torch.randn(B * T_t, V_t, dtype=torch.float64, generator=g)
    chunks = random_chunks(B, T_s, T_t, one_to_one=0.3, drop=0.0, generator=g)
    sp, tp = random_tables(V_s, V_t, L, generator=g)
    ts = torch.randint(0, 7, (B * T_s,), generator=g)
    tt = torch.randint(0, 7, (B * T_t,), generator=g)
    torch.autograd.gradcheck(
        lambda z: reference.chain_loss(z, zt, chunks, sp, tp, student_targets=ts, teacher_targets=tt,
                                       temperature=1.5), (zs,))


# ------------------------------------------------------------------------------------------ the fused op


def make_case(V_s=97, V_t=83, batch=2, T_s=23, T_t=29, L=4, dtype=torch.float32, device="cpu", scale=3.0,
              one_to_one=0.5, mirror=True):
    zs = (torch.randn(batch * T_s, V_s, dtype=torch.float64) * scale).to(dtype).to(device)
    zt = (torch.randn(batch * T_t, V_t, dtype=torch.float64) * scale).to(dtype).to(device)
    chunks = random_chunks(batch, T_s, T_t, one_to_one=one_to_one, drop=0.15).to(device)
    sp, tp = random_tables(V_s, V_t, L)
    pieces = xtoken.PieceTables(sp, tp if mirror else None)
    # Realized pieces from the tables' small alphabet, so that deeper levels find members.
    ts = torch.randint(0, 7, (batch * T_s,)).to(device)
    tt = torch.randint(0, 7, (batch * T_t,)).to(device)
    return zs, zt, chunks, pieces, ts, tt


def kernel_and_reference(zs, zt, chunks, pieces, ts, tt, *, grad_scale=2.0, reduction="none", temperature=1.0):
    zk = zs.detach().clone().requires_grad_()
    loss = xtoken.chain_loss(zk, zt, chunks, pieces, temperature=temperature, reduction=reduction,
                             student_targets=ts, teacher_targets=tt)
    (grad_scale * loss.sum()).backward()
    zr = zs.detach().double().cpu().requires_grad_()
    ref = reference.chain_loss(zr, zt.cpu(), chunks.cpu(), pieces.student, pieces.teacher, temperature=temperature,
                               reduction=reduction, student_targets=ts.cpu(), teacher_targets=tt.cpu())
    (grad_scale * ref.sum()).backward()
    return loss.detach(), zk.grad, ref.detach(), zr.grad


def test_levels_reach_every_kind():
    zs, zt, chunks, pieces, ts, tt = make_case()
    levels = reference.chain_levels(chunks, zs.shape[0], zt.shape[0], 4, 4, ts, tt)
    depths = {(side, len(prefix)) for _, side, _, _, prefix in levels}
    assert {("teacher", 0), ("teacher", 1), ("teacher", 2), ("student", 0), ("student", 1)} <= depths


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("mirror", [True, False])
def test_float32_matches_reference(device, temperature, mirror):
    zs, zt, chunks, pieces, ts, tt = make_case(device=device, mirror=mirror)
    loss, grad, ref, ref_grad = kernel_and_reference(zs, zt, chunks, pieces, ts, tt, temperature=temperature)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert rel_error(loss.cpu(), ref) <= 1e-5 and rel_error(grad.cpu(), ref_grad) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_reference(device, dtype):
    zs, zt, chunks, pieces, ts, tt = make_case(dtype=dtype, device=device)
    loss, grad, ref, ref_grad = kernel_and_reference(zs, zt, chunks, pieces, ts, tt)
    assert grad.dtype == dtype
    assert rel_error(loss.cpu(), ref) <= 1e-5
    z_low = zs.detach().cpu().requires_grad_()
    same_dtype = reference.chain_loss(z_low, zt.cpu(), chunks.cpu(), pieces.student, pieces.teacher, reduction="none",
                                      student_targets=ts.cpu(), teacher_targets=tt.cpu(), dtype=dtype)
    (2.0 * same_dtype.sum()).backward()
    assert_close_ratio(loss.cpu(), same_dtype.detach(), ref, "loss")
    assert_close_ratio(grad.cpu(), z_low.grad, ref_grad, "gradient")


@pytest.mark.parametrize("device", DEVICES)
def test_vocabularies_above_65536(device):
    zs, zt, chunks, pieces, ts, tt = make_case(V_s=70_001, V_t=66_003, batch=1, T_s=7, T_t=9, device=device,
                                               scale=20.0)
    loss, grad, ref, ref_grad = kernel_and_reference(zs, zt, chunks, pieces, ts, tt)
    assert torch.isfinite(loss).all()
    assert rel_error(loss.cpu(), ref) <= 1e-5 and rel_error(grad.cpu(), ref_grad) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_batched_shape(device, reduction):
    zs, zt, chunks, pieces, ts, tt = make_case(device=device)
    B = 2
    loss, grad, ref, ref_grad = kernel_and_reference(zs.reshape(B, -1, zs.shape[-1]), zt.reshape(B, -1, zt.shape[-1]),
                                                     chunks, pieces, ts, tt, temperature=1.5, reduction=reduction)
    assert loss.shape == ref.shape and grad.shape == (B, zs.shape[0] // B, zs.shape[1])
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=1e-6)
    assert rel_error(grad.cpu(), ref_grad) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    zs, zt, chunks, pieces, ts, tt = make_case(device=device)
    zt_view = zt.t().contiguous().t()
    zs_view = torch.cat([zs, zs], dim=1)[:, : zs.shape[1]]
    assert not zs_view.is_contiguous() and not zt_view.is_contiguous()
    loss, grad, ref, ref_grad = kernel_and_reference(zs_view, zt_view, chunks, pieces, ts, tt)
    assert rel_error(loss.cpu(), ref) <= 1e-5 and rel_error(grad.cpu(), ref_grad) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_no_chunks_gives_zero_loss_and_zero_gradient(device):
    zs, zt, _, pieces, ts, tt = make_case(device=device)
    z = zs.clone().requires_grad_()
    loss = xtoken.chain_loss(z, zt, torch.zeros(0, 4, dtype=torch.int32, device=device), pieces, student_targets=ts,
                             teacher_targets=tt)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("device", DEVICES)
def test_rows_outside_levels_get_zero_gradient_and_deterministic(device):
    zs, zt, chunks, pieces, ts, tt = make_case(device=device)
    grads, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            z = zs.clone().requires_grad_()
            xtoken.chain_loss(z, zt, chunks, pieces, student_targets=ts, teacher_targets=tt).backward()
            grads.append(z.grad)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1])
    levels = reference.chain_levels(chunks.cpu(), zs.shape[0], zt.shape[0], 4, 4, ts.cpu(), tt.cpu())
    read = torch.zeros(zs.shape[0], dtype=torch.bool)
    for _, side, cond_row, plain_row, _ in levels:
        read[cond_row if side == "teacher" else plain_row] = True
    assert torch.all(grads[0][~read.to(device)] == 0)
    assert bool((grads[0][read.to(device)].abs().sum(dim=1) > 0).any())


def test_gradcheck_float64():
    zs, zt, chunks, pieces, ts, tt = make_case(V_s=13, V_t=11, batch=1, T_s=8, T_t=9, dtype=torch.float64)
    zs.requires_grad_()

    def fn(z):
        return xtoken.chain_loss(z, zt, chunks, pieces, temperature=1.3, reduction="none", student_targets=ts,
                                 teacher_targets=tt)

    assert torch.autograd.gradcheck(fn, (zs,), eps=1e-6, atol=1e-7)


def test_opcheck():
    zs, zt, chunks, pieces, ts, tt = make_case(V_s=19, V_t=17, batch=1, T_s=9, T_t=11)
    for mirror in (True, False):
        tables = xtoken.PieceTables(pieces.student, pieces.teacher if mirror else None)
        args = tables.kernel_args(zs.shape[1], zt.shape[1])
        for requires_grad in (False, True):
            torch.library.opcheck(torch.ops.xtoken.chain_loss_fwd.default,
                                  (zs.clone().requires_grad_(requires_grad), zt, chunks, *args, 1.0, ts, tt))
        losses, lse_s, lse_t = torch.ops.xtoken.chain_loss_fwd(zs, zt, chunks, *args, 1.0, ts, tt)
        torch.library.opcheck(torch.ops.xtoken.chain_loss_bwd.default,
                              (torch.rand_like(losses), zs, zt, chunks, *args, 1.0, ts, tt, lse_s, lse_t))


def test_torch_compile_fullgraph():
    zs, zt, chunks, pieces, ts, tt = make_case()
    pieces.kernel_args(zs.shape[1], zt.shape[1])  # the tables' sorted form is built once, outside the graph

    def step(z):
        return xtoken.chain_loss(z, zt, chunks, pieces, student_targets=ts, teacher_targets=tt)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    z1, z2 = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    eager, traced = step(z1), compiled(z2)
    eager.backward()
    traced.backward()
    torch.testing.assert_close(traced, eager)
    torch.testing.assert_close(z2.grad, z1.grad)


def test_module_matches_functional_and_moves():
    zs, zt, chunks, pieces, ts, tt = make_case()
    module = xtoken.nn.ChainLoss(pieces, temperature=2.0)
    expected = xtoken.chain_loss(zs, zt, chunks, pieces, temperature=2.0, student_targets=ts, teacher_targets=tt)
    torch.testing.assert_close(module(zs, zt, chunks, ts, tt), expected)
    state = module.state_dict()
    assert torch.equal(state["student_pieces"], pieces.student) and torch.equal(state["teacher_pieces"], pieces.teacher)
    module.to(torch.float64)  # buffers are integer tables: unchanged
    torch.testing.assert_close(module(zs, zt, chunks, ts, tt), expected)


def test_bad_inputs_raise():
    zs, zt, chunks, pieces, ts, tt = make_case()
    with pytest.raises(ValueError, match="needs student_targets and teacher_targets"):
        xtoken.chain_loss(zs, zt, chunks, pieces)
    with pytest.raises(TypeError, match="pieces: expected an xtoken.PieceTables"):
        xtoken.chain_loss(zs, zt, chunks, pieces.student, student_targets=ts, teacher_targets=tt)
    with pytest.raises(RuntimeError, match="student pieces: the table has 97 rows but the student logits have V = 96"):
        args = pieces.kernel_args(97, 83)
        torch.ops.xtoken.chain_loss_fwd(zs[:, :-1], zt, chunks, *args, 1.0, ts, tt)
    unsorted = list(pieces.kernel_args(97, 83))
    unsorted[0] = unsorted[0].flip(0).contiguous()
    with pytest.raises(RuntimeError, match="student pieces: the rows must be sorted lexicographically"):
        torch.ops.xtoken.chain_loss_fwd(zs, zt, chunks, *unsorted, 1.0, ts, tt)
    bad_ids = list(pieces.kernel_args(97, 83))
    bad_ids[2] = bad_ids[2].clone()
    bad_ids[2][-1, 0] = 97
    with pytest.raises(RuntimeError, match=r"teacher pieces .*must lie in \[-1, 97\)"):
        torch.ops.xtoken.chain_loss_fwd(zs, zt, chunks, *bad_ids, 1.0, ts, tt)
    with pytest.raises(RuntimeError, match="an int64 \\[46\\] tensor"):
        torch.ops.xtoken.chain_loss_fwd(zs, zt, chunks, *pieces.kernel_args(97, 83), 1.0, ts[:-1], tt)
    with pytest.raises(ValueError, match="merge"):
        xtoken.chain_loss(zs, zt, chunks, pieces, merge="mean", student_targets=ts, teacher_targets=tt)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_logits_give_nan_loss(device):
    zs, zt, chunks, pieces, ts, tt = make_case(device=device, one_to_one=1.0)
    zt[int(chunks[0, 2]), 3] = float("nan")
    loss = xtoken.chain_loss(zs, zt, chunks, pieces, reduction="none", student_targets=ts, teacher_targets=tt)
    assert torch.isnan(loss[0]) and not torch.isnan(loss[2:]).any()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_in_a_conditioned_row_gives_nan_loss(device):
    # Level 0 conditions a chunk's whole student row (a teacher-side chunk) or teacher row (an M:1 chunk): a NaN
    # anywhere in it reaches that chunk's loss, through the row's max, and no other chunk's.
    zs, zt, chunks, pieces, ts, tt = make_case(device=device, one_to_one=1.0)
    s0 = int(chunks[0, 0])
    zs[s0, 60] = float("nan")
    loss = xtoken.chain_loss(zs, zt, chunks, pieces, reduction="none", student_targets=ts, teacher_targets=tt)
    uses_row = (chunks[:, 0] <= s0) & (s0 < chunks[:, 1])
    assert torch.isnan(loss[uses_row]).all() and not torch.isnan(loss[~uses_row]).any()


@pytest.mark.parametrize("device", DEVICES)
def test_masked_logits_match_reference(device):
    # Logits masked to -inf (tokens a model may not emit) on both sides, one student row masked everywhere but
    # one token: the whole-row and range passes skip them alike, finite values, gradients match the reference.
    zs, zt, chunks, pieces, ts, tt = make_case(device=device, mirror=True)
    zs[:, ::3] = float("-inf")
    zt[:, 1::4] = float("-inf")
    zs[int(chunks[0, 0]), 1:] = float("-inf")
    loss, grad, ref, ref_grad = kernel_and_reference(zs, zt, chunks, pieces, ts, tt)
    assert torch.isfinite(loss).all() and not torch.isnan(grad).any()
    assert rel_error(loss.cpu(), ref) <= 1e-5 and rel_error(grad.cpu(), ref_grad) <= 1e-5


# ------------------------------------------------------------------------------------------ piece tables


def test_piece_tables_from_the_demo_tokenizers():
    from xtoken.demo import make_problems, train_tokenizers

    train, _ = make_problems(0, 3000, 10)
    teacher, student = train_tokenizers([p.text for p in train])
    tables = xtoken.PieceTables.build(student, teacher)
    (s85,) = [i for i in range(len(student)) if student.surface_bytes[i] == b"85"]
    spelled = [t for t in tables.student[s85].tolist() if t >= 0]
    assert [teacher.surface_bytes[t] for t in spelled] == [b"8", b"5"]
    eos = student.roles["eos"]
    assert tables.student[eos].tolist()[:2] == [teacher.roles["eos"], -1]
    # Mirror: the teacher's "8" is the student's "8", one piece.
    (t8,) = [i for i in range(len(teacher)) if teacher.surface_bytes[i] == b"8"]
    assert [student.surface_bytes[s] for s in tables.teacher[t8].tolist() if s >= 0] == [b"8"]
    # The sorted layout puts the numerals beginning with "1" (1, 10-19, 100-198) in one range.
    (t1,) = [i for i in range(len(teacher)) if teacher.surface_bytes[i] == b"1"]
    sorted_pieces, order, _, _ = tables.kernel_args(len(student), len(teacher))
    rows = (sorted_pieces[:, 0] == t1).nonzero().flatten()
    assert int(rows.max() - rows.min() + 1) == rows.numel() >= 100
    assert {student.surface_bytes[int(s)][:1] for s in order[rows]} == {b"1"}


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_kernel(dtype):
    zs, zt, chunks, pieces, ts, tt = make_case(V_s=5003, V_t=4099, batch=3, T_s=33, T_t=41, dtype=dtype)
    def fn(z, zt, chunks, ts, tt):
        return xtoken.chain_loss(z, zt, chunks, pieces, reduction="none", student_targets=ts, teacher_targets=tt)

    out = [loss_and_grad(fn, zs, zt, chunks, ts, tt, device=device) for device in ("cpu", "cuda")]
    assert rel_error(out[1][0], out[0][0].double()) <= 1e-5
    assert rel_error(out[1][1].float(), out[0][1].float()) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_pkl_chain_selects_per_chunk_shape():
    from xtoken.testing import random_projection

    zs, zt, chunks, pieces, ts, tt = make_case()
    W = random_projection(zs.shape[1], zt.shape[1])
    kw = dict(student_targets=ts, teacher_targets=tt, temperature=1.5)
    z1, z2 = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    both = xtoken.pkl_chain_loss(z1, zt, chunks, W, pieces, reduction="none", **kw)
    one = (chunks[:, 1] - chunks[:, 0] == 1) & (chunks[:, 3] - chunks[:, 2] == 1)
    assert bool(one.any()) and not bool(one.all())
    pkl = xtoken.pkl_loss(z2, zt, chunks, W, reduction="none", **kw)
    chain = xtoken.chain_loss(z2, zt, chunks, pieces, reduction="none", **kw)
    expected = torch.where(one, pkl, chain)
    torch.testing.assert_close(both, expected)
    (2 * both.sum()).backward()
    (2 * expected.sum()).backward()
    torch.testing.assert_close(z1.grad, z2.grad)
    mean = xtoken.pkl_chain_loss(zs, zt, chunks, W, pieces, **kw)
    torch.testing.assert_close(mean, expected.sum() / chunks.shape[0])
