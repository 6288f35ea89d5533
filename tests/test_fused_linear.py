"""Fused linear losses: hidden states and lm_head weights in, against the unfused path (``F.linear`` logits
into the same loss, plus ``F.cross_entropy``) for every loss, merge, reduction and chunk shape; a learned W;
the block plan; bf16; op registration, torch.compile and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, assert_close_ratio, rel_error, requires_cuda
from test_chain_loss import random_tables

import xtoken
from xtoken import fused_linear
from xtoken.testing import random_chunks, random_pairs, random_projection, random_targets

LOSSES = ["pkl", "gold", "hkl", "uld", "kd", "chain", "pkl_chain"]
CHAIN = ("chain", "pkl_chain")  # the chain reads targets from the piece tables' small alphabet
MERGES = ["first", "mean", "bayes", "logmean", xtoken.NEMO_MERGE, ("bayes", "first")]


class Case:
    """Random hidden states, lm_heads (with biases) and a chunk table with every chunk shape."""

    def __init__(self, loss="pkl", V_s=97, V_t=113, H_s=16, H_t=24, batch=2, T_s=23, T_t=29, dtype=torch.float32,
                 device="cpu", scale=1.0):
        if loss == "kd":
            V_t = V_s
        g = torch.Generator().manual_seed(1234)

        def rand(*shape):
            return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

        self.loss, self.dtype, self.device = loss, dtype, device
        self.hs, self.Ws, self.bs = rand(batch * T_s, H_s), rand(V_s, H_s), rand(V_s)
        self.ht, self.Wt, self.bt = rand(batch * T_t, H_t), rand(V_t, H_t), rand(V_t)
        self.chunks = random_chunks(batch, T_s, T_t, one_to_one=0.6, drop=0.15, generator=g).to(device)
        self.ts = random_targets(batch * T_s, V_s, generator=g).to(device)
        self.tt = random_targets(batch * T_t, V_t, generator=g).to(device)
        self.ce = random_targets(batch * T_s, V_s, generator=g).to(device)
        self.ce[::4] = -100
        self.W = random_projection(V_s, V_t, generator=g)
        self.pairs = random_pairs(V_s, V_t, min(40, V_s // 3), generator=g).to(device)
        self.pieces = xtoken.PieceTables(*random_tables(V_s, V_t, 4, generator=g))
        if loss in CHAIN:  # realized pieces from the tables' alphabet, so that deeper levels find members
            self.ts = torch.randint(0, 7, (batch * T_s,), generator=g).to(device)
            self.tt = torch.randint(0, 7, (batch * T_t,), generator=g).to(device)

    def mapping(self):
        return {"pkl": (self.W,), "gold": (self.pairs,), "hkl": (self.pairs,), "uld": (), "kd": (),
                "chain": (self.pieces,), "pkl_chain": (self.W, self.pieces)}[self.loss]

    def student(self, dtype=None):
        return [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in (self.hs, self.Ws, self.bs)]


def unfused(case, student, *, with_ce=False, teacher=None, **options):
    """The loss of the logits F.linear(hidden, weight, bias) of both sides, and F.cross_entropy of the student's."""
    hs, Ws, bs = student
    ht, Wt, bt = teacher or (case.ht, case.Wt, case.bt)
    zs = F.linear(hs, Ws, bs)
    with torch.no_grad():
        zt = F.linear(ht, Wt, bt).to(zs.dtype)
    loss = getattr(xtoken, f"{case.loss}_loss")(zs, zt, case.chunks, *case.mapping(), **options)
    if not with_ce:
        return loss
    reduction = options.get("reduction", "mean")
    ce = F.cross_entropy(zs.to(torch.float64 if zs.dtype == torch.float64 else torch.float32), case.ce,
                         ignore_index=-100, reduction=reduction)
    return loss, ce


def fused(case, student, *, with_ce=False, teacher=None, **options):
    hs, Ws, bs = student
    ht, Wt, bt = teacher or (case.ht, case.Wt, case.bt)
    function = getattr(xtoken, f"fused_linear_{case.loss}_loss")
    return function(hs, Ws, ht, Wt, case.chunks, *case.mapping(), student_bias=bs, teacher_bias=bt,
                    ce_targets=case.ce if with_ce else None, **options)


def loss_and_grads(fn, case, dtype=None, *, with_ce=False, weights=(2.0, 3.0), **options):
    """The loss(es) of ``fn`` and the gradients of ``w0 * sum(loss) [+ w1 * sum(ce)]`` in (hidden, weight, bias)."""
    student = case.student(dtype)
    out = fn(case, student, with_ce=with_ce, **options)
    outs = out if with_ce else (out,)
    sum(w * o.sum() for w, o in zip(weights, outs)).backward()
    return [o.detach() for o in outs], [t.grad for t in student]


def assert_fused_matches(case, *, tol=1e-5, **options):
    got, got_grads = loss_and_grads(fused, case, **options)
    ref, ref_grads = loss_and_grads(unfused, case, **{k: v for k, v in options.items() if k != "block_rows"})
    for name, a, b in zip(["loss", "ce"], got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_error(a.cpu(), b.cpu()) <= tol, f"{name}: {rel_error(a.cpu(), b.cpu()):.2e}"
    for name, a, b in zip(["hidden", "weight", "bias"], got_grads, ref_grads):
        assert a.dtype == b.dtype, name
        assert rel_error(a.cpu(), b.cpu()) <= tol, f"grad {name}: {rel_error(a.cpu(), b.cpu()):.2e}"


def loss_options(loss, merge, case):
    options = dict(merge="first" if loss == "chain" else merge, temperature=1.5)
    if "bayes" in merge or loss in CHAIN:
        options.update(student_targets=case.ts, teacher_targets=case.tt)
    if loss in ("gold", "hkl"):
        options.update(matched="jsd", beta=0.3, uld_topk=50)
    return options


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "loss, merge", [(loss, merge) for loss in LOSSES for merge in (["first"] if loss == "chain" else MERGES)],
)
def test_float32_matches_unfused(device, loss, merge):
    case = Case(loss, device=device)
    assert_fused_matches(case, block_rows=8, **loss_options(loss, merge, case))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_with_cross_entropy(loss, reduction):
    case = Case(loss)
    assert_fused_matches(case, block_rows=6, reduction=reduction, with_ce=True, **loss_options(loss, "mean", case))


@pytest.mark.parametrize("slab", [1, 32, 96, 4096])
def test_cpu_logits_slabs_cover_the_vocabulary(monkeypatch, slab):
    # The CPU float32 path forms a block's logits slab by slab of the vocabulary: 97 and 113 rows in slabs of
    # 32 leave a partial last slab, 96 leaves one row, 1 is every row alone, 4,096 is one slab. A wrong column
    # offset or a dropped slab changes the loss and every gradient.
    monkeypatch.setattr(fused_linear, "_VOCAB_SLAB", slab)
    hidden, weight, bias = torch.randn(7, 16), torch.randn(97, 16), torch.randn(97)
    torch.testing.assert_close(fused_linear._logits(hidden, weight, bias), F.linear(hidden, weight, bias))
    assert fused_linear._logits(hidden, weight, None).is_contiguous()
    case = Case("pkl")
    assert_fused_matches(case, block_rows=8, with_ce=True, **loss_options("pkl", "mean", case))


@pytest.mark.parametrize("loss", ["pkl", "chain"])
@pytest.mark.parametrize("block_rows", [1, 5, 64, 10_000])
def test_any_block_size_gives_the_same_result(loss, block_rows):
    # 1: every chunk alone (M:N chunks exceed the block); 10,000: a single block. The chain reads the teacher
    # row after a 1:1 or 1:N chunk, which its block must hold.
    case = Case(loss)
    assert_fused_matches(case, block_rows=block_rows, with_ce=True, **loss_options(loss, "mean", case))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_learned_projection_gets_the_gradient_of_the_unfused_path(reduction):
    # W's values are trained through P-KL: their gradient is summed over the blocks (and the CE gives none).
    case = Case("pkl", dtype=torch.float64)
    grads = []
    for fn, options in ((fused, dict(block_rows=5)), (unfused, {})):
        learned = xtoken.nn.LearnedProjection(case.W).double()
        student = case.student()
        hs, Ws, bs = student
        if fn is fused:
            loss, ce = xtoken.fused_linear_pkl_loss(hs, Ws, case.ht, case.Wt, case.chunks, learned, student_bias=bs,
                                                    teacher_bias=case.bt, ce_targets=case.ce, merge=xtoken.NEMO_MERGE,
                                                    reduction=reduction, **options)
        else:
            zs = F.linear(hs, Ws, bs)
            loss = xtoken.pkl_loss(zs, F.linear(case.ht, case.Wt, case.bt), case.chunks, learned,
                                   merge=xtoken.NEMO_MERGE, reduction=reduction)
            ce = F.cross_entropy(zs, case.ce, ignore_index=-100, reduction=reduction)
        (2.0 * loss.sum() + 3.0 * ce.sum()).backward()
        grads.append([learned.theta.grad, *(t.grad for t in student)])
    assert grads[0][0].abs().sum() > 0
    for name, a, b in zip(["theta", "hidden", "weight", "bias"], *grads):
        assert rel_error(a, b) <= 1e-12, f"grad {name}: {rel_error(a, b):.2e}"


def test_three_dimensional_hidden_states():
    case = Case("gold", batch=2)
    got, got_grads = loss_and_grads(fused, case, block_rows=7)
    hs, Ws, bs = case.student()
    loss = xtoken.fused_linear_gold_loss(hs.reshape(2, -1, hs.shape[1]), Ws, case.ht.reshape(2, -1, case.ht.shape[1]),
                                         case.Wt, case.chunks, case.pairs, student_bias=bs, teacher_bias=case.bt,
                                         block_rows=7)
    (2.0 * loss).backward()
    torch.testing.assert_close(loss.detach(), got[0])
    torch.testing.assert_close(hs.grad, got_grads[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["pkl", "gold", "kd"])
def test_bfloat16_error_within_twice_the_unfused_error(device, loss):
    # Reference: the unfused path on float64 copies. The fused bf16 result must be as close to it as the unfused
    # bf16 path (logits in bf16 from F.linear, as a bf16 model computes them), within the error-ratio rule.
    case = Case(loss, device=device, dtype=torch.bfloat16, V_s=301, V_t=257, H_s=32, H_t=48)
    options = dict(merge="mean", reduction="sum")
    ref, ref_grads = loss_and_grads(unfused, case, torch.float64, with_ce=True, **options)
    low, low_grads = loss_and_grads(unfused, case, with_ce=True, **options)
    got, got_grads = loss_and_grads(fused, case, with_ce=True, block_rows=8, **options)
    for name, a, b, r in zip(["loss", "ce"], got, low, ref):
        assert a.dtype == torch.float32
        assert_close_ratio(a.cpu(), b.cpu(), r.cpu(), name)
    for name, a, b, r in zip(["hidden", "weight", "bias"], got_grads, low_grads, ref_grads):
        assert a.dtype == torch.bfloat16
        assert_close_ratio(a.cpu(), b.cpu(), r.cpu(), f"grad {name}")


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_gemms_with_and_without_native_instructions(monkeypatch, native, dtype):
    # Without bf16/fp16 GEMM instructions the CPU path computes the block products slab by slab in float32
    # (products exact, float32 sums): the logits are F.linear's up to its rounding, dz @ W is float32-exact;
    # with them, ATen's GEMMs. Either way the fused loss is as accurate as the unfused path.
    monkeypatch.setattr(fused_linear, "_native_cpu_gemm", lambda _dtype: native)
    monkeypatch.setattr(fused_linear, "_VOCAB_SLAB", 64)  # 301 and 257 rows: several slabs, a partial last one
    g = torch.Generator().manual_seed(5)
    hidden, weight, bias, dz = (torch.randn(*shape, generator=g).to(dtype) for shape in ((9, 32), (301, 32), (301,),
                                                                                         (9, 301)))
    logits = fused_linear._logits(hidden, weight, bias)
    assert logits.dtype == dtype and logits.is_contiguous()
    exact = F.linear(hidden.double(), weight.double(), bias.double())
    assert rel_error(logits.double(), exact) <= 2 * rel_error(F.linear(hidden, weight, bias).double(), exact) + 1e-6
    product = fused_linear._row_gemm(dz, weight)
    assert rel_error(product.double(), dz.double() @ weight.double()) <= (1e-2 if native else 1e-6)
    for accumulator, tol in ((torch.zeros(301, 32), 1e-6), (torch.zeros(301, 32, dtype=dtype), 1e-2)):
        for _ in range(2):  # two blocks
            fused_linear._addmm_into(accumulator, dz.t(), hidden)
        assert rel_error(accumulator.double(), 2 * dz.double().t() @ hidden.double()) <= tol
    case = Case("pkl", dtype=dtype, V_s=301, V_t=257, H_s=32, H_t=48)
    ref, ref_grads = loss_and_grads(unfused, case, torch.float64, with_ce=True, merge="mean", reduction="sum")
    low, low_grads = loss_and_grads(unfused, case, with_ce=True, merge="mean", reduction="sum")
    got, got_grads = loss_and_grads(fused, case, with_ce=True, block_rows=8, merge="mean", reduction="sum")
    for name, a, b, r in [*zip(["loss", "ce"], got, low, ref), *zip(["hidden", "weight", "bias"], got_grads,
                                                                       low_grads, ref_grads)]:
        assert_close_ratio(a, b, r, name)


def test_bfloat16_weight_gradient_accumulated_in_its_own_dtype():
    case = Case("pkl", dtype=torch.bfloat16, V_s=301, V_t=257, H_s=32, H_t=48)
    ref, ref_grads = loss_and_grads(unfused, case, torch.float64, merge="mean")
    low, low_grads = loss_and_grads(unfused, case, merge="mean")
    got, got_grads = loss_and_grads(fused, case, merge="mean", block_rows=16, accum_dtype=torch.bfloat16)
    assert_close_ratio(got_grads[1].cpu(), low_grads[1].cpu(), ref_grads[1].cpu(), "grad weight", ratio=3.0)


def test_autocast_computes_the_logits_in_its_dtype_as_f_linear():
    case = Case("kd", V_s=301, H_s=32, H_t=48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_grads = loss_and_grads(fused, case, with_ce=True, block_rows=8)
        low, low_grads = loss_and_grads(unfused, case, with_ce=True)
    exact, _ = loss_and_grads(unfused, case, with_ce=True)
    assert got_grads[1].dtype == torch.float32  # the float32 weight's gradient
    for a, b, e in zip(got, low, exact):
        assert rel_error(a, b) < 0.1 * rel_error(b, e)  # bf16 logits like F.linear's, not float32 ones
    assert all(rel_error(a, b) < 1e-2 for a, b in zip(got_grads, low_grads))


def test_teacher_in_another_dtype_and_without_gradient():
    case = Case("pkl")
    teacher = (case.ht.to(torch.bfloat16).requires_grad_(), case.Wt.to(torch.bfloat16).requires_grad_(),
               case.bt.to(torch.bfloat16))
    got, got_grads = loss_and_grads(fused, case, teacher=teacher, block_rows=8)
    ref, ref_grads = loss_and_grads(unfused, case, teacher=teacher)
    assert rel_error(got[0], ref[0]) <= 1e-5
    assert all(rel_error(a, b) <= 1e-5 for a, b in zip(got_grads, ref_grads))
    assert teacher[0].grad is None and teacher[1].grad is None


def test_padded_heads():
    # lm_heads wider than the tokenizers: W padded with empty student rows, teacher logits wider than W.
    case = Case("pkl", V_s=97, V_t=113)
    g = torch.Generator().manual_seed(5)
    case.Ws, case.bs = torch.cat([case.Ws, torch.randn(7, case.Ws.shape[1], generator=g)]), torch.cat(
        [case.bs, torch.randn(7, generator=g)])
    case.Wt, case.bt = torch.cat([case.Wt, torch.randn(5, case.Wt.shape[1], generator=g)]), torch.cat(
        [case.bt, torch.randn(5, generator=g)])
    case.W = case.W.pad_to(104)
    assert_fused_matches(case, block_rows=8, merge="first")


@pytest.mark.parametrize("loss", LOSSES)
def test_no_chunks(loss):
    case = Case(loss)
    case.chunks = case.chunks[:0]
    student = case.student()
    targets = dict(student_targets=case.ts, teacher_targets=case.tt) if loss in CHAIN else {}
    out = fused(case, student, block_rows=8, **targets)
    out.backward()
    assert float(out.detach()) == 0.0 and all(torch.equal(t.grad, torch.zeros_like(t)) for t in student)
    # With CE, the CE alone.
    assert_fused_matches(case, block_rows=8, with_ce=True, **targets)


def test_rows_outside_chunks_get_no_gradient_and_results_are_deterministic():
    case = Case("hkl")
    runs = [loss_and_grads(fused, case, block_rows=8, merge="bayes", student_targets=case.ts,
                           teacher_targets=case.tt) for _ in range(2)]
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)
    used = torch.zeros(case.hs.shape[0], dtype=torch.bool)
    for s0, s1, _, _ in case.chunks.tolist():
        used[s0:s1] = True
    assert torch.all(runs[0][1][0][~used] == 0) and torch.any(runs[0][1][0][used] != 0)


def test_gradcheck_float64():
    case = Case("gold", V_s=11, V_t=13, H_s=5, H_t=6, batch=1, T_s=7, T_t=8, dtype=torch.float64)
    # gradcheck runs one backward per output element: reduction="none". "sum" precomputes its gradients for one
    # backward; it is compared with the unfused path, in float64.
    assert_fused_matches(case, tol=1e-12, reduction="sum", with_ce=True, block_rows=2, merge="mean", uld_topk=None)

    def fn(hs, Ws, bs):
        return xtoken.fused_linear_gold_loss(hs, Ws, case.ht, case.Wt, case.chunks, case.pairs, student_bias=bs,
                                             temperature=1.3, merge="mean", uld_topk=None, reduction="none",
                                             block_rows=2, ce_targets=case.ce)

    assert torch.autograd.gradcheck(fn, tuple(case.student()), eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The block plan


def test_plan_keeps_every_chunk_in_one_block_and_covers_every_row_once():
    chunks = random_chunks(3, 40, 47, one_to_one=0.5, drop=0.1).numpy().astype(np.int64)
    N_s, N_t = 120, 141
    ce_rows = np.zeros(N_s, dtype=bool)
    ce_rows[::3] = True
    for block_rows in (1, 4, 16):
        plan = fused_linear.plan_blocks(chunks, N_s, N_t, 50, 60, block_rows, ce_rows)
        assert len(plan) > 1
        seen, k = [], 0
        for student, teacher, first, local in plan:
            assert first == k
            k += len(local)
            seen.append(student)
            assert np.all(np.diff(student) > 0) and np.all(np.diff(teacher) > 0)
            for (s0, s1, t0, t1), (a0, a1, b0, b1) in zip(chunks[first : first + len(local)], local):
                assert np.array_equal(student[a0:a1], np.arange(s0, s1))
                assert np.array_equal(teacher[b0:b1], np.arange(t0, t1))
            # About block_rows rows per side, one chunk more at most.
            longest = max((c[1] - c[0]) + (c[3] - c[2]) for c in chunks)
            assert len(student) * 50 + len(teacher) * 60 < (block_rows + longest) * 110
        assert k == len(chunks)
        rows = np.concatenate(seen)
        needed = ce_rows.copy()
        for s0, s1, _, _ in chunks:
            needed[s0:s1] = True
        assert np.array_equal(rows, np.flatnonzero(needed))


def test_plan_keeps_the_teacher_row_after_a_chunk():
    # A kernel that reads the teacher row t1 finds it at local t1 (or at the local row count for t1 = N_t).
    chunks = np.array([[0, 1, 0, 2], [1, 2, 2, 3], [4, 6, 7, 9], [6, 7, 9, 10]], dtype=np.int64)
    for block_rows in (1, 2, 100):
        for student, teacher, first, local in fused_linear.plan_blocks(chunks, 7, 10, 10, 10, block_rows,
                                                                        teacher_rows_after=1):
            for (s0, s1, t0, t1), (a0, a1, b0, b1) in zip(chunks[first : first + len(local)], local):
                if t1 < 10:
                    assert teacher[b1] == t1
                else:
                    assert b1 == len(teacher)


def test_default_block_rows():
    assert fused_linear.default_block_rows(2048, 128_256, 151_936, 2048) == 192  # 204.8 rounded to 32s
    assert fused_linear.default_block_rows(4096, 128_256, 151_936, 2048) == 416
    assert fused_linear.default_block_rows(32_768, 128_256, 151_936, 2048) == 512
    assert fused_linear.default_block_rows(100, 97, 113, 16) == 64


# ---------------------------------------------------------------------------------------------
# Registration, modules, bad inputs


def _op_args(case, kernel_options, ce, reduction, needs_grad, term_weights=(1.0,), targets=(None, None)):
    hs, Ws, bs = case.student()
    return (hs.detach().requires_grad_(any(needs_grad)), Ws, bs, case.ht, case.Wt, case.bt, case.chunks,
            *kernel_options, *targets, ce, list(term_weights), reduction, 8, torch.float32, needs_grad, None, None)


@pytest.mark.parametrize("kernel", ["pkl_loss", "learned_pkl_loss", "hybrid_loss", "kd_loss", "chain_loss"])
def test_opcheck(kernel):
    case = Case("kd" if kernel == "kd_loss" else "pkl")
    targets = (None, None)
    if kernel == "learned_pkl_loss":  # W's values receive a gradient
        idx, val, *columns = xtoken.nn.LearnedProjection(case.W).kernel_args(case.Wt.shape[0])
        kernel_options = (idx, val.detach().requires_grad_(), *columns, 1.0, "mean", "logmean")
    else:
        kernel_options = {
            "pkl_loss": (*case.W.kernel_args(case.Wt.shape[0]), 1.0, "first", "first"),
            "hybrid_loss": (case.pairs, 1.0, "mean", "logmean", "kl", 0.5, 20),
            "kd_loss": (1.0, "first", "mean"),
            "chain_loss": (*case.pieces.kernel_args(case.Ws.shape[0], case.Wt.shape[0]), 1.0),
        }[kernel]
    if kernel == "chain_loss":
        targets = (torch.randint(0, 7, case.ts.shape), torch.randint(0, 7, case.tt.shape))
    weights = (0.4, 0.6) if kernel == "hybrid_loss" else (1.0,)
    learned = kernel == "learned_pkl_loss"
    op = getattr(torch.ops.xtoken, f"fused_linear_{kernel.removeprefix('learned_')}").default
    for ce in (None, case.ce):
        def args(reduction, grads):
            return _op_args(case, kernel_options, ce, reduction, [grads] * 3 + [grads and learned], weights, targets)

        torch.library.opcheck(op, args("none", True))
        torch.library.opcheck(op, args("sum", False))
        # With gradients precomputed in the forward, the eager backward scales those outputs in place, which
        # the AOT-dispatch test sees as a difference; torch.compile is tested end to end below.
        torch.library.opcheck(op, args("mean", True),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph_training_step():
    case = Case("pkl")

    def step(hs, Ws, bs):
        loss, ce = xtoken.fused_linear_pkl_loss(hs, Ws, case.ht, case.Wt, case.chunks, case.W, student_bias=bs,
                                                teacher_bias=case.bt, ce_targets=case.ce, reduction="sum",
                                                block_rows=8)
        return ce + (ce / loss).detach() * loss  # dynamic scaling, as the trainer does

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    eager_args, traced_args = case.student(), case.student()
    eager, traced = step(*eager_args), compiled(*traced_args)
    eager.backward()
    traced.backward()
    torch.testing.assert_close(traced, eager)
    for a, b in zip(traced_args, eager_args):
        torch.testing.assert_close(a.grad, b.grad)


def test_second_backward_of_a_reduced_loss_raises():
    case = Case("kd")
    student = case.student()
    loss = fused(case, student, block_rows=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


def test_under_no_grad_nothing_is_precomputed():
    case = Case("pkl")
    with torch.no_grad():
        loss = fused(case, case.student(), block_rows=8)
    torch.testing.assert_close(loss, unfused(case, case.student()).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_modules_match_functional(loss):
    case = Case(loss)
    modules = {
        "pkl": lambda: xtoken.nn.FusedLinearPKLLoss(case.W, temperature=2.0, block_rows=8),
        "gold": lambda: xtoken.nn.FusedLinearGOLDLoss(case.pairs, temperature=2.0, block_rows=8),
        "hkl": lambda: xtoken.nn.FusedLinearHKLLoss(case.pairs, temperature=2.0, block_rows=8),
        "uld": lambda: xtoken.nn.FusedLinearULDLoss(temperature=2.0, block_rows=8),
        "kd": lambda: xtoken.nn.FusedLinearKDLoss(temperature=2.0, block_rows=8),
        "chain": lambda: xtoken.nn.FusedLinearChainLoss(case.pieces, temperature=2.0, block_rows=8),
    }
    if loss not in modules:
        pytest.skip(f"{loss} has no module (nor has its unfused form)")
    module = modules[loss]()
    hs, Ws, bs = case.student()
    targets = (case.ts, case.tt) if loss in CHAIN else ()
    got = module(hs, Ws, case.ht, case.Wt, case.chunks, *targets, student_bias=bs, teacher_bias=case.bt,
                 ce_targets=case.ce)
    expected = fused(case, case.student(), with_ce=True, temperature=2.0, block_rows=8,
                     **dict(zip(["student_targets", "teacher_targets"], targets)))
    torch.testing.assert_close(got, expected)


def test_bad_inputs_raise():
    case = Case("pkl")
    hs, Ws, bs = case.student()

    def call(**overrides):
        args = dict(student_hidden=hs, student_weight=Ws, teacher_hidden=case.ht, teacher_weight=case.Wt,
                    chunks=case.chunks, projection=case.W)
        kwargs = {k: overrides.pop(k) for k in list(overrides) if k not in args}
        args.update(overrides)
        return xtoken.fused_linear_pkl_loss(*args.values(), **kwargs)

    with pytest.raises(ValueError, match="student_weight: hidden size 15 does not match student_hidden's 16"):
        call(student_weight=Ws[:, :15])
    with pytest.raises(ValueError, match=r"teacher_weight: expected the lm_head weight \[V, H\]"):
        call(teacher_weight=case.Wt[0])
    with pytest.raises(ValueError, match="student_weight: expected the dtype and device of student_hidden"):
        call(student_weight=Ws.double())
    with pytest.raises(ValueError, match=r"student_bias: expected None or a \[97\] tensor"):
        call(student_bias=bs[:-1])
    with pytest.raises(ValueError, match="student_hidden: expected floating"):
        call(student_hidden=hs.long())
    with pytest.raises(ValueError, match=r"chunks: row 0 = \(0, 1, 0, 59\) is empty or outside the N_s = 46"):
        call(chunks=torch.tensor([[0, 1, 0, 59]], dtype=torch.int32))
    with pytest.raises(ValueError, match="chunks: student rows must be sorted and disjoint"):
        call(chunks=torch.tensor([[0, 2, 0, 1], [1, 3, 1, 2]], dtype=torch.int32))
    with pytest.raises(ValueError, match="ce_targets: expected ids below the student vocabulary V_s = 97"):
        call(ce_targets=torch.full((46,), 97))
    with pytest.raises(ValueError, match="ce_targets: expected one target per student row"):
        call(ce_targets=torch.zeros(45, dtype=torch.long))
    with pytest.raises(ValueError, match="block_rows: expected an integer >= 1, got 0"):
        call(block_rows=0)
    with pytest.raises(TypeError, match="block_rows: expected an integer"):
        call(block_rows=2.0)
    with pytest.raises(RuntimeError, match="merge='bayes' needs"):
        call(merge="bayes")
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=0.0)
    with pytest.raises(RuntimeError, match="share one vocabulary"):
        xtoken.fused_linear_kd_loss(hs, Ws, case.ht, case.Wt, case.chunks)
    with pytest.raises(ValueError, match="merge: expected"):
        call(merge=("mean", "median"))
    with pytest.raises(TypeError, match="projection: expected an xtoken.Projection or xtoken.nn.LearnedProjection"):
        call(projection=case.W.val)
    with pytest.raises(ValueError, match="needs student_targets and teacher_targets"):
        xtoken.fused_linear_chain_loss(hs, Ws, case.ht, case.Wt, case.chunks, case.pieces)
    with pytest.raises(ValueError, match="merge: the chain loss reads every row of a chunk itself"):
        xtoken.fused_linear_chain_loss(hs, Ws, case.ht, case.Wt, case.chunks, case.pieces, merge="mean",
                                       student_targets=case.ts, teacher_targets=case.tt)
    with pytest.raises(TypeError, match="pieces: expected an xtoken.PieceTables"):
        xtoken.fused_linear_chain_loss(hs, Ws, case.ht, case.Wt, case.chunks, case.W, student_targets=case.ts,
                                       teacher_targets=case.tt)


@requires_cuda
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(loss, dtype):
    cpu, cuda = Case(loss, dtype=dtype), Case(loss, dtype=dtype, device="cuda")
    options = dict(with_ce=True, block_rows=8, **loss_options(loss, "bayes", cpu))
    cuda_options = dict(with_ce=True, block_rows=8, **loss_options(loss, "bayes", cuda))
    got, got_grads = loss_and_grads(fused, cuda, **cuda_options)
    ref, ref_grads = loss_and_grads(fused, cpu, **options)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(got + got_grads, ref + ref_grads):
        assert a.is_cuda and rel_error(a.cpu(), b) <= tol


@requires_cuda
def test_cuda_bfloat16_error_within_twice_the_unfused_error():
    test_bfloat16_error_within_twice_the_unfused_error("cuda", "pkl")
