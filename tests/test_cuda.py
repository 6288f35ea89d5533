"""CUDA paths that the per-op tests do not reach: the validation kernels' errors, float64 (gradcheck, and the
same results as the CPU kernels), the P-KL backward's grid-stride loop, ``project`` beyond 65,535 rows, chunks
that share teacher rows, the kernels' guards during CUDA-graph capture, training steps with no host sync, and a
DistillationTrainer step in bf16. Every test skips without a GPU. (Vocabularies above 65,536 run on the GPU in
each op's own ``test_vocabularies_above_65536``, which takes every device.)"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_error, requires_cuda
from test_chain_loss import make_case as chain_case
from test_hybrid_loss import MATCHED
from test_hybrid_loss import make_case as hybrid_case
from test_kd_loss import make_case as kd_case
from test_pkl_loss import make_case as pkl_case

import xtoken
from xtoken.ops import skip_content_checks
from xtoken.testing import loss_and_grad, random_pairs, random_projection

pytestmark = requires_cuda

MERGES = ["first", "mean", "bayes"]


# ------------------------------------------------------------------------------------------ errors


def _bad_inputs():
    """name -> fn(case, device) that must raise; the case is the CPU inputs of test_pkl_loss.make_case (V_s = 97,
    V_t = 131, N_s = 46, N_t = 58) and 60 common pairs."""

    def pkl(case, d, table=None, **kw):
        zs, zt, chunks, W, ts, tt, _ = case
        return xtoken.pkl_loss(zs.to(d), zt.to(d), (chunks if table is None else table).to(d), W, **kw)

    def raw_pkl(case, d, slot, value):
        zs, zt, chunks, W, _, _, _ = case
        args = list(W.kernel_args(zt.shape[1]))
        args[slot] = args[slot].clone()
        args[slot].view(-1)[5] = value
        return torch.ops.xtoken.pkl_loss_fwd(zs.to(d), zt.to(d), chunks.to(d), *(a.to(d) for a in args), 1.0, "first",
                                             "first", None, None)

    def gold(case, d, column, value, row=3):
        zs, zt, chunks, _, _, _, pairs = case
        bad = pairs.clone()
        bad[row, column] = value
        return xtoken.gold_loss(zs.to(d), zt.to(d), chunks.to(d), bad.to(d))

    def bayes(case, d):
        zs, zt, chunks, W, ts, tt, _ = case
        multi = next(k for k, (s0, s1, _, _) in enumerate(chunks.tolist()) if s1 - s0 > 1)
        ts = ts.clone()
        ts[chunks[multi, 0]] = -1
        return pkl(case, d, merge="bayes", student_targets=ts.to(d), teacher_targets=tt.to(d))

    def project(case, d, slot, value):
        W = case[3]
        args = [a.clone() for a in W.kernel_args(131)]
        args[slot][3] = value
        return torch.ops.xtoken.project_fwd(torch.rand(4, 97).to(d), *(a.to(d) for a in args))

    chunk = lambda row: (lambda case, d: pkl(case, d, torch.tensor([row], dtype=torch.int32)))  # noqa: E731
    return {
        "empty student side": chunk([0, 0, 0, 1]),
        "empty teacher side": chunk([0, 1, 3, 3]),
        "past the last student row": chunk([0, 47, 0, 1]),
        "negative s0": chunk([-1, 1, 0, 1]),
        "past the last teacher row": chunk([0, 1, 0, 59]),
        "overlapping student rows": lambda case, d: pkl(case, d, torch.tensor([[0, 2, 0, 1], [1, 3, 1, 2]],
                                                                              dtype=torch.int32)),
        "unsorted chunks": lambda case, d: pkl(case, d, case[2][[1, 0]]),
        "projection idx": lambda case, d: raw_pkl(case, d, 0, 131 + 3),
        "projection val": lambda case, d: raw_pkl(case, d, 1, -0.5),
        "projection col_src": lambda case, d: raw_pkl(case, d, 3, 97),
        "projection col_val": lambda case, d: raw_pkl(case, d, 4, float("nan")),
        "bayes prefix target": bayes,
        "pair student id": lambda case, d: gold(case, d, 0, 97),
        "pair teacher id": lambda case, d: gold(case, d, 1, -1),
        "repeated pair id": lambda case, d: gold(case, d, 1, int(case[6][2, 1]), row=5),
        "gold chunk": lambda case, d: xtoken.gold_loss(case[0].to(d), case[1].to(d),
                                                       torch.tensor([[0, 0, 0, 1]], dtype=torch.int32).to(d),
                                                       case[6].to(d)),
        "kd chunk": lambda case, d: xtoken.kd_loss(case[0].to(d), case[1][:, :97].to(d),
                                                   torch.tensor([[0, 1, 0, 59]], dtype=torch.int32).to(d)),
        "project col_ptr": lambda case, d: project(case, d, 2, 10**6),
        "project col_val": lambda case, d: project(case, d, 4, float("inf")),
    }


BAD_INPUTS = _bad_inputs()


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gives_the_cpu_error(name):
    case = (*pkl_case(), random_pairs(97, 131, 60))
    messages = []
    for device in ("cpu", "cuda"):
        with pytest.raises(RuntimeError) as info:
            BAD_INPUTS[name](case, device)
        messages.append(str(info.value))
    assert messages[1] == messages[0]


# ------------------------------------------------------------------------------------------ float64


@pytest.mark.parametrize("merge", MERGES)
def test_float64_gradcheck_pkl(merge):
    zs, zt, chunks, W, ts, tt = pkl_case(V_s=11, V_t=13, batch=1, T_s=7, T_t=8, dtype=torch.float64, device="cuda")

    def fn(z):
        return xtoken.pkl_loss(z, zt, chunks, W, merge=merge, temperature=1.3, reduction="none", student_targets=ts,
                               teacher_targets=tt)

    assert torch.autograd.gradcheck(fn, (zs.requires_grad_(),), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("matched, beta", MATCHED)
@pytest.mark.parametrize("uld_topk", [None, 5])
def test_float64_gradcheck_hybrid(merge, matched, beta, uld_topk):
    zs, zt, chunks, pairs, ts, tt = hybrid_case(V_s=11, V_t=13, n_pairs=5, batch=1, T_s=7, T_t=8,
                                                dtype=torch.float64, device="cuda")

    def fn(z):
        return xtoken.gold_loss(z, zt, chunks, pairs, merge=merge, matched=matched, beta=beta, temperature=1.3,
                                uld_topk=uld_topk, weights=(0.6, 0.4), reduction="none", student_targets=ts,
                                teacher_targets=tt)

    assert torch.autograd.gradcheck(fn, (zs.requires_grad_(),), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("merge", MERGES)
def test_float64_gradcheck_kd(merge):
    zs, zt, chunks, ts, tt = kd_case(V=11, batch=1, T_s=7, T_t=8, dtype=torch.float64, device="cuda")

    def fn(z):
        return xtoken.kd_loss(z, zt, chunks, merge=merge, temperature=1.3, reduction="none", student_targets=ts,
                              teacher_targets=tt)

    assert torch.autograd.gradcheck(fn, (zs.requires_grad_(),), eps=1e-6, atol=1e-7)


def test_float64_gradcheck_chain():
    zs, zt, chunks, pieces, ts, tt = chain_case(V_s=13, V_t=11, batch=1, T_s=8, T_t=9, dtype=torch.float64,
                                                device="cuda")

    def fn(z):
        return xtoken.chain_loss(z, zt, chunks, pieces, temperature=1.3, reduction="none", student_targets=ts,
                                 teacher_targets=tt)

    assert torch.autograd.gradcheck(fn, (zs.requires_grad_(),), eps=1e-6, atol=1e-7)


def test_float64_chain_is_the_cpu_result():
    zs, zt, chunks, pieces, ts, tt = chain_case(V_s=701, V_t=613, batch=2, T_s=31, T_t=37, dtype=torch.float64)
    fn = (lambda z, zt, c, ts, tt: xtoken.chain_loss(z, zt, c, pieces, reduction="none", student_targets=ts,
                                                    teacher_targets=tt))
    out = [loss_and_grad(fn, zs, zt, chunks, ts, tt, device=device) for device in ("cpu", "cuda")]
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-12, atol=1e-14)


def test_float64_gradcheck_project():
    W = random_projection(13, 17)
    probs = torch.rand(4, 13, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: xtoken.project(p, W), (probs,))
    assert torch.autograd.gradgradcheck(lambda p: xtoken.project(p, W), (probs,))


@pytest.mark.parametrize("tied", [False, True], ids=["random", "tied"])
@pytest.mark.parametrize("uld_topk", [None, 20])
def test_float64_hybrid_is_the_cpu_result(tied, uld_topk):
    # float64 ranks on all 64 bits of the values, ties to the lower id, as the CPU does: the same loss and gradient
    # up to float64 rounding, including the sorted-L1 term's signs.
    zs, zt, chunks, pairs, ts, tt = hybrid_case(dtype=torch.float64)
    if tied:  # many exact ties on both sides
        zs, zt = torch.randint(-2, 3, zs.shape).double(), torch.randint(-2, 3, zt.shape).double()
    else:  # neighbours apart by less than float32 resolution, which float32 keys would tie (lower id first)
        for z in (zs, zt):
            z[:, 1::2] = z[:, 0:-1:2] + 1e-9 * torch.randint(-1, 2, z[:, 1::2].shape, dtype=torch.float64)

    def fn(z, zt, chunks, pairs):
        return xtoken.gold_loss(z, zt, chunks, pairs, uld_topk=uld_topk, weights=(0.5, 0.5), reduction="none")

    cpu = loss_and_grad(fn, zs, zt, chunks, pairs, device="cpu")
    cuda = loss_and_grad(fn, zs, zt, chunks, pairs, device="cuda")
    for got, expected in zip(cuda, cpu):
        assert rel_error(got, expected) <= 1e-12


@pytest.mark.parametrize("merge", MERGES)
def test_float64_pkl_and_kd_are_the_cpu_result(merge):
    zs, zt, chunks, W, ts, tt = pkl_case(dtype=torch.float64)
    for fn in (
        lambda z, zt, c, ts, tt: xtoken.pkl_loss(z, zt, c, W, merge=merge, reduction="none", student_targets=ts,
                                                 teacher_targets=tt),
        lambda z, zt, c, ts, tt: xtoken.kd_loss(z, zt[:, :97], c, merge=merge, reduction="none", student_targets=ts,
                                                teacher_targets=tt % 97),
    ):
        cpu = loss_and_grad(fn, zs, zt, chunks, ts, tt, device="cpu")
        cuda = loss_and_grad(fn, zs, zt, chunks, ts, tt, device="cuda")
        assert rel_error(cuda[0], cpu[0]) <= 1e-12 and rel_error(cuda[1], cpu[1]) <= 1e-12


# ------------------------------------------------------------------------------------------ launch shapes


@pytest.mark.parametrize("merge", MERGES)
def test_pkl_backward_with_more_chunks_than_resident_blocks(merge):
    # The backward runs a persistent grid of two blocks per multiprocessor; thousands of chunks make each block
    # loop over many of them (and reuse its workspace).
    zs, zt, chunks, W, ts, tt = pkl_case(V_s=301, V_t=257, batch=4, T_s=1100, T_t=1200, one_to_one=0.8)
    resident = 2 * torch.cuda.get_device_properties(0).multi_processor_count
    assert chunks.shape[0] > 4 * resident

    def fn(z, zt, c, ts, tt):
        return xtoken.pkl_loss(z, zt, c, W, merge=merge, reduction="none", student_targets=ts, teacher_targets=tt)

    cpu = loss_and_grad(fn, zs, zt, chunks, ts, tt, device="cpu")
    cuda = loss_and_grad(fn, zs, zt, chunks, ts, tt, device="cuda")
    assert rel_error(cuda[0], cpu[0]) <= 1e-5 and rel_error(cuda[1], cpu[1]) <= 1e-5


def test_project_more_than_65535_rows():
    W = random_projection(37, 41, exact_fraction=0.5)
    probs = torch.softmax(torch.randn(70_001, 37), -1)
    cpu = loss_and_grad(lambda p: xtoken.project(p, W), probs, device="cpu")
    cuda = loss_and_grad(lambda p: xtoken.project(p, W), probs, device="cuda")
    assert rel_error(cuda[0], cpu[0]) <= 1e-6 and rel_error(cuda[1], cpu[1]) <= 1e-6


@pytest.mark.parametrize("merge", MERGES)
def test_chunks_sharing_teacher_rows(merge):
    # Several chunks pool the same teacher rows (each block writes their logsumexps, with the same values).
    zs, zt, _, W, ts, tt = pkl_case()
    chunks = torch.tensor([[i, i + 1 + i // 2 % 2, i // 4, i // 4 + 1 + i % 3] for i in range(0, 44, 2)],
                          dtype=torch.int32)  # pairs of chunks on the same teacher rows; 1 or 2 student rows
    pairs = random_pairs(97, 131, 60)
    for fn in (
        lambda z, zt, c, ts, tt: xtoken.pkl_loss(z, zt, c, W, merge=merge, reduction="none", student_targets=ts,
                                                 teacher_targets=tt),
        lambda z, zt, c, ts, tt: xtoken.gold_loss(z, zt, c, pairs.to(z.device), merge=merge, uld_topk=30,
                                                  reduction="none", student_targets=ts, teacher_targets=tt),
        lambda z, zt, c, ts, tt: xtoken.kd_loss(z, zt[:, :97], c, merge=merge, reduction="none", student_targets=ts,
                                                teacher_targets=tt % 97),
    ):
        cpu = loss_and_grad(fn, zs, zt, chunks, ts, tt, device="cpu")
        cuda = loss_and_grad(fn, zs, zt, chunks, ts, tt, device="cuda")
        assert rel_error(cuda[0], cpu[0]) <= 1e-5 and rel_error(cuda[1], cpu[1]) <= 1e-5


# ------------------------------------------------------------------------------------------ graph capture


def _capture(step, after_warm_up=lambda: None):
    """step() once on a side stream with the content checks skipped (a warm-up that must not raise on the bad
    inputs), then captured into a CUDA graph (where the checks are always skipped)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), skip_content_checks():
        step()
    torch.cuda.current_stream().wait_stream(stream)
    after_warm_up()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


@pytest.mark.parametrize("loss", ["pkl", "gold", "kd", "chain"])
def test_graph_capture_gives_nan_for_invalid_chunks(loss):
    zs, zt, chunks, W, ts, tt = pkl_case(device="cuda")
    pairs = random_pairs(97, 131, 60).cuda()
    pieces = chain_case(V_s=97, V_t=131)[3]
    small_ts, small_tt = ts % 7, tt % 7  # the chain's realized pieces from the tables' small alphabet
    pieces.kernel_args(97, 131)
    fn = {
        "pkl": lambda z, c: xtoken.pkl_loss(z, zt, c, W, merge="mean", reduction="none"),
        "gold": lambda z, c: xtoken.gold_loss(z, zt, c, pairs, uld_topk=16, reduction="none"),
        "kd": lambda z, c: xtoken.kd_loss(z, zt[:, :97], c, reduction="none"),
        "chain": lambda z, c: xtoken.chain_loss(z, zt, c, pieces, reduction="none", student_targets=small_ts,
                                                teacher_targets=small_tt),
    }[loss]
    K, N_s = chunks.shape[0], zs.shape[0]
    bad = chunks.clone()
    bad[2, 3] = zt.shape[0] + 3  # teacher rows past the end
    bad[K - 1, 1] = N_s + 5  # the last chunk's student rows past the end: its NaN rows stop at N_s
    invalid = torch.zeros(K, dtype=torch.bool)
    invalid[[2, K - 1]] = True
    rows = torch.zeros(N_s, dtype=torch.bool)
    for s0, s1, _, _ in bad[invalid].tolist():
        rows[s0:min(s1, N_s)] = True
    z = zs.clone().requires_grad_()

    def step():
        out = fn(z, bad)
        (2.0 * out.sum()).backward()
        return out

    def drop_grad():
        z.grad = None  # the captured backward allocates and writes it

    graph, out = _capture(step, drop_grad)
    graph.replay()
    torch.cuda.synchronize()
    expected, expected_grad = loss_and_grad(fn, zs, chunks[~invalid.cuda()])
    loss_values, grad = out.cpu(), z.grad.cpu()
    assert loss_values[invalid].isnan().all() and grad[rows].isnan().all()
    assert rel_error(loss_values[~invalid], expected) <= 1e-5
    assert rel_error(grad[~rows], expected_grad[~rows]) <= 1e-5  # gap rows 0, other chunks exact


def test_graph_capture_clamps_projection_column_ranges():
    zs, zt, chunks, W, ts, tt = pkl_case(device="cuda")
    idx, val, col_ptr, col_src, col_val = (t.cuda() for t in W.kernel_args(131))
    bad_ptr = col_ptr.clone()
    bad_ptr[7], bad_ptr[60] = 2**31 - 1, -5  # past the end of the transpose, and before its start
    probs = torch.softmax(torch.randn(6, 97, device="cuda"), -1)
    good = torch.ops.xtoken.project_fwd(probs, idx, val, col_ptr, col_src, col_val)
    graph, (q, pkl) = _capture(lambda: (
        torch.ops.xtoken.project_fwd(probs, idx, val, bad_ptr, col_src, col_val),
        torch.ops.xtoken.pkl_loss_fwd(zs, zt, chunks, idx, val, bad_ptr, col_src, col_val, 1.0, "first", "first", None, None)[0],
    ))  # fmt: skip
    graph.replay()
    torch.cuda.synchronize()  # an out-of-bounds read would surface here as an illegal memory access
    touched = torch.zeros(131, dtype=torch.bool, device="cuda")
    touched[[6, 7, 59, 60]] = True  # the columns that end or start at a bad offset
    torch.testing.assert_close(q[:, ~touched], good[:, ~touched])
    assert torch.all(q[:, [7, 59]] == 0)  # empty after clamping
    assert pkl.shape == (chunks.shape[0],)


# ------------------------------------------------------------------------------------------ no host sync per step


def test_modules_train_without_host_syncs():
    zs, zt, chunks, W, ts, tt = pkl_case(device="cuda")
    pairs = random_pairs(97, 131, 60)
    cases = [
        (xtoken.nn.PKLLoss(W, merge="bayes"), zt),
        (xtoken.nn.GOLDLoss(pairs, merge="bayes", uld_topk=16), zt),
        (xtoken.nn.ULDLoss(merge="bayes", uld_topk=None), zt),
        (xtoken.nn.KDLoss(merge="bayes"), zt[:, :97].contiguous()),
    ]
    for module, teacher in cases:
        module.cuda()
        tt_module = tt % teacher.shape[1]
        module(zs.clone().requires_grad_(), teacher, chunks, ts, tt_module).backward()  # checks; W to the GPU
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host sync now raises
        try:
            for _ in range(2):
                z = zs.clone().requires_grad_()
                module(z, teacher, chunks, ts, tt_module).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0, type(module).__name__


# ------------------------------------------------------------------------------------------ the trainer


def test_trainer_steps_with_bf16_student_and_teachers(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("xtoken.trainer", reason="the trainer needs transformers >= 5.19")
    from distill_util import TEXTS, make_teachers, student_tokenizer, tiny_lm
    from transformers import TrainingArguments

    student_tok = student_tokenizer()
    teachers = make_teachers(["digits", "sentencepiece", "same"], student_tok)
    for teacher in teachers:
        teacher.dtype = torch.bfloat16
    student = tiny_lm(len(student_tok), seed=0).to(torch.bfloat16)
    before = [p.detach().clone() for p in student.parameters()]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             logging_steps=1, report_to=[], disable_tqdm=True, save_strategy="no")
    trainer = xtoken.DistillationTrainer(student, args, teachers=teachers, student_tokenizer=student_tok,
                                         max_length=48, train_dataset=TEXTS)
    assert trainer.args.device.type == "cuda"
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        for teacher in teachers:
            value = entry[f"kd_loss/{teacher.name}"]
            assert value == value and 0 <= value < float("inf"), (teacher.name, value)
        assert entry["loss"] == entry["loss"] and entry["ce_loss"] > 0
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.parameters())
    assert any(not torch.equal(p.detach().cpu(), b.cpu()) for p, b in zip(trainer.model.parameters(), before))
