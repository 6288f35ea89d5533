"""Learned W (X-Token's best P-KL trains W's values, the sparsity fixed): the P-KL kernels' gradient in W's
values against the float64 reference, gradcheck in the values and in the row-softmax logits,
determinism, :class:`xtoken.nn.LearnedProjection`, and the trainer's learned W in checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, assert_close_ratio, rel_error, requires_cuda

import xtoken
from xtoken import reference
from xtoken.nn import LearnedProjection
from xtoken.testing import random_chunks, random_projection, random_targets

MERGES = [("first", "first"), ("mean", "logmean"), ("bayes", "mean"), ("logmean", "bayes")]
MERGE_IDS = [f"{s}-{t}" for s, t in MERGES]


def make_case(V_s=97, V_t=131, batch=2, T_s=23, T_t=29, dtype=torch.float32, device="cpu", scale=3.0, top_k=4):
    W = random_projection(V_s, V_t, top_k=top_k, exact_fraction=0.5, empty_fraction=0.05)
    zs = (torch.randn(batch * T_s, V_s, dtype=torch.float64) * scale).to(dtype).to(device)
    zt = (torch.randn(batch * T_t, V_t, dtype=torch.float64) * scale).to(dtype).to(device)
    chunks = random_chunks(batch, T_s, T_t, one_to_one=0.5, drop=0.15).to(device)
    ts = random_targets(batch * T_s, V_s).to(device)
    tt = random_targets(batch * T_t, V_t).to(device)
    return zs, zt, chunks, W, ts, tt


def op_losses(zs, zt, chunks, W, val, ts, tt, merge, temperature=1.0):
    """P-KL per chunk straight from the op, with ``val`` as W's values (the transpose gathered from it)."""
    cols = W.to(zs.device).columns(zt.shape[1])
    col_val = val.detach().reshape(-1)[cols.col_slot]
    losses, _, _ = torch.ops.xtoken.pkl_loss_fwd(
        zs, zt, chunks, W.idx.to(zs.device), val, cols.col_ptr, cols.col_src, col_val, temperature, *merge, ts, tt)
    return losses


def kernel_and_reference_grads(zs, zt, chunks, W, ts, tt, merge, val_dtype=torch.float32):
    val = W.val.to(zs.device, val_dtype).clone().requires_grad_()
    (2.0 * op_losses(zs, zt, chunks, W, val, ts, tt, merge).sum()).backward()
    val_ref = W.val.double().requires_grad_()
    ref = reference.pkl_loss(zs.double().cpu(), zt.cpu(), chunks.cpu(), W.idx, val_ref, merge=merge, reduction="none",
                             student_targets=ts.cpu(), teacher_targets=tt.cpu())
    (2.0 * ref.sum()).backward()
    return val.grad, val_ref.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("merge", MERGES, ids=MERGE_IDS)
def test_float32_w_gradient_matches_reference(device, merge):
    zs, zt, chunks, W, ts, tt = make_case(device=device)
    grad, expected = kernel_and_reference_grads(zs, zt, chunks, W, ts, tt, merge)
    assert grad.dtype == torch.float32 and grad.shape == W.val.shape
    assert rel_error(grad.cpu(), expected) <= 1e-5
    torch.testing.assert_close(grad.cpu().double(), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    assert torch.all(grad.cpu()[W.idx < 0] == 0)  # empty slots


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("merge", MERGES, ids=MERGE_IDS)
def test_bf16_w_gradient_matches_reference(device, merge):
    zs, zt, chunks, W, ts, tt = make_case(dtype=torch.bfloat16, device=device)
    grad, expected = kernel_and_reference_grads(zs, zt, chunks, W, ts, tt, merge)
    assert grad.dtype == torch.float32  # W's dtype, whatever the logits'
    val_low = W.val.double().requires_grad_()
    same_dtype = reference.pkl_loss(zs.cpu(), zt.cpu(), chunks.cpu(), W.idx, val_low, merge=merge, reduction="none",
                                    student_targets=ts.cpu(), teacher_targets=tt.cpu(), dtype=torch.bfloat16)
    (2.0 * same_dtype.sum()).backward()
    assert_close_ratio(grad.cpu(), val_low.grad, expected, "W gradient")


@pytest.mark.parametrize("merge", MERGES, ids=MERGE_IDS)
def test_gradcheck_in_the_values_and_the_logits(merge):
    zs, zt, chunks, W, ts, tt = make_case(V_s=11, V_t=13, batch=1, T_s=7, T_t=8, dtype=torch.float64)
    present = W.idx >= 0  # the support: the values of empty slots stay 0 (a perturbed 0 would be a negative weight)
    values = W.val[present].double().requires_grad_()
    z = zs.clone().requires_grad_()

    def of_values(z, values):
        val = torch.zeros(W.val.shape, dtype=torch.float64).masked_scatter(present, values)
        return op_losses(z, zt, chunks, W, val, ts, tt, merge, temperature=1.3)

    assert torch.autograd.gradcheck(of_values, (z, values), eps=1e-6, atol=1e-7)
    learned = LearnedProjection(W).double()
    theta = learned.theta.detach().clone().requires_grad_()
    loss_fn = xtoken.nn.PKLLoss(learned, merge=merge, reduction="none")

    def of_theta(theta):
        return torch.func.functional_call(loss_fn, {"learned.theta": theta}, (zs, zt, chunks, ts, tt))

    assert torch.autograd.gradcheck(of_theta, (theta,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_w_gradient_over_many_chunks(device):
    # More chunks than the CPU's 32 chunk groups, so that each group sums several chunks before the groups add up.
    zs, zt, chunks, W, ts, tt = make_case(V_s=301, V_t=257, batch=4, T_s=50, T_t=55, device=device)
    assert chunks.shape[0] > 100
    grad, expected = kernel_and_reference_grads(zs, zt, chunks, W, ts, tt, ("mean", "logmean"))
    assert rel_error(grad.cpu(), expected) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_w_gradient_is_deterministic(device):
    zs, zt, chunks, W, ts, tt = make_case(V_s=3001, V_t=2777, batch=2, T_s=40, T_t=45, device=device)
    grads = []
    for threads in (1, 2, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            val = W.val.to(device).clone().requires_grad_()
            op_losses(zs, zt, chunks, W, val, ts, tt, ("mean", "logmean")).sum().backward()
        finally:
            torch.set_num_threads(previous)
        grads.append(val.grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[1], grads[2])


def test_no_w_gradient_unless_asked():
    zs, zt, chunks, W, ts, tt = make_case()
    z = zs.clone().requires_grad_()
    val = W.val.clone()
    op_losses(z, zt, chunks, W, val, ts, tt, ("first", "first")).sum().backward()
    assert val.grad is None
    losses, lse_s, lse_t = torch.ops.xtoken.pkl_loss_fwd(zs, zt, chunks, *W.kernel_args(131), 1.0, "first", "first",
                                                         None, None)
    args = (torch.ones_like(losses), zs, zt, chunks, *W.kernel_args(131), 1.0, "first", "first", None, None, lse_s,
            lse_t)
    grad_z, grad_val = torch.ops.xtoken.pkl_loss_bwd(*args, False)
    assert grad_val.numel() == 0
    grad_z_too, grad_val = torch.ops.xtoken.pkl_loss_bwd(*args, True)
    assert torch.equal(grad_z, grad_z_too) and grad_val.shape == W.val.shape


def test_no_chunks_give_a_zero_w_gradient():
    zs, zt, _, W, ts, tt = make_case()
    val = W.val.clone().requires_grad_()
    op_losses(zs, zt, torch.zeros(0, 4, dtype=torch.int32), W, val, ts, tt, ("mean", "logmean")).sum().backward()
    assert torch.equal(val.grad, torch.zeros_like(val))


# ------------------------------------------------------------------------------------------ LearnedProjection


def test_learned_projection_keeps_rows_stochastic():
    W = random_projection(200, 150, exact_fraction=0.5, empty_fraction=0.05)
    learned = LearnedProjection(W)
    torch.testing.assert_close(learned.weights(), W.val, rtol=1e-6, atol=1e-7)  # starts at W
    with torch.no_grad():
        learned.theta.add_(torch.randn_like(learned.theta) * 3)
    val = learned.weights()
    present, rows = W.idx >= 0, (W.idx >= 0).any(dim=1)
    assert torch.all(val[~present] == 0) and torch.all(val[present] > 0)
    torch.testing.assert_close(val.sum(dim=1)[rows], torch.ones(int(rows.sum())))
    assert torch.all(val[~rows] == 0)
    single = present.sum(dim=1) == 1
    assert torch.all(val[single].sum(dim=1) == 1)
    # A row with one slot (or none) gets no gradient; the gradient is finite everywhere.
    (val * torch.randn_like(val)).sum().backward()
    assert torch.isfinite(learned.theta.grad).all()
    assert torch.all(learned.theta.grad[single | ~rows] == 0)
    assert torch.all(learned.theta.grad[~present] == 0)
    # The transpose the kernels read is gathered from the current values.
    idx, current, col_ptr, col_src, col_val = learned.kernel_args(160)
    assert col_ptr.shape == (161,)
    dense = torch.zeros(200, 160)
    dense[col_src.long(), torch.repeat_interleave(torch.arange(160), (col_ptr[1:] - col_ptr[:-1]).long())] = col_val
    expected = torch.zeros(200, 160)
    expected[torch.arange(200).unsqueeze(1).expand_as(idx)[present], idx[present].long()] = current.detach()[present]
    torch.testing.assert_close(dense, expected)


def test_learned_projection_trains_and_saves(tmp_path):
    zs, zt, chunks, W, ts, tt = make_case()
    W.metadata["student_vocab_hash"] = "abc"
    learned = LearnedProjection(W)
    loss_fn = xtoken.nn.PKLLoss(learned, merge=xtoken.NEMO_MERGE)
    assert [name for name, _ in loss_fn.named_parameters()] == ["learned.theta"]
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = loss_fn(zs, zt, chunks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 1e-3
    learned.save(tmp_path / "w.safetensors")
    loaded = xtoken.Projection.load(tmp_path / "w.safetensors")
    assert loaded.metadata["student_vocab_hash"] == "abc"
    assert torch.equal(loaded.idx, W.idx)
    torch.testing.assert_close(loaded.val, learned.weights().detach())
    assert not torch.allclose(loaded.val, W.val)
    restored = LearnedProjection(W)
    restored.load_values(loaded)
    torch.testing.assert_close(restored.weights(), learned.weights(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="support"):
        restored.load_values(random_projection(97, 131))


def test_learned_projection_device_and_type_checks():
    zs, zt, chunks, W, ts, tt = make_case()
    with pytest.raises(TypeError, match="projection"):
        LearnedProjection(W.val)
    with pytest.raises(TypeError, match="LearnedProjection"):
        xtoken.pkl_loss(zs, zt, chunks, W.val)


@requires_cuda
def test_learned_projection_on_another_device_raises():
    zs, zt, chunks, W, ts, tt = make_case()
    with pytest.raises(ValueError, match="on cuda"):
        xtoken.pkl_loss(zs, zt, chunks, LearnedProjection(W).cuda())


# ------------------------------------------------------------------------------------------ trainer


def test_trainer_learns_w_and_resumes(tmp_path):
    pytest.importorskip("transformers")
    from distill_util import TEXTS, make_teachers, student_tokenizer, tiny_lm
    from transformers import TrainingArguments

    student_tok = student_tokenizer()

    def run(output_dir, steps, save_steps=None, resume=None):
        (teacher,) = make_teachers(["digits"], student_tok, loss="pkl")
        teacher.learn_projection, teacher.merge = True, xtoken.NEMO_MERGE
        args = TrainingArguments(
            output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
            lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
            data_seed=0, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
            dataloader_drop_last=True,
        )  # fmt: skip
        trainer = xtoken.DistillationTrainer(tiny_lm(len(student_tok), seed=0), args, teachers=teacher,
                                             student_tokenizer=student_tok, max_length=48, train_dataset=TEXTS)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, teacher

    straight, teacher = run(tmp_path / "straight", steps=4)
    learned = straight.learned_projections["digits"]
    groups = [g for g in straight.optimizer.param_groups if g["params"][0] is learned.theta]
    assert len(groups) == 1 and groups[0]["lr"] == 1e-2 and groups[0]["weight_decay"] == 0.0
    start = teacher.projection
    assert not torch.allclose(learned.weights().detach(), start.val)  # W moved ...
    assert torch.equal(learned.projection().idx, start.idx)  # ... on its support
    assert learned.theta.grad is None  # cleared after every step

    run(tmp_path / "interrupted", steps=2, save_steps=2)
    checkpoint = tmp_path / "interrupted" / "checkpoint-2"
    path = checkpoint / straight.projection_file("digits")
    saved = xtoken.Projection.load(path, student_tok, teacher.tokenizer)  # the vocabulary hashes check
    assert saved.metadata["teacher_vocab_hash"] == start.metadata["teacher_vocab_hash"]
    resumed, _ = run(tmp_path / "interrupted", steps=4, resume=str(checkpoint))
    torch.testing.assert_close(resumed.learned_projections["digits"].weights(), learned.weights(), rtol=0, atol=1e-5)


def test_learn_projection_needs_pkl():
    pytest.importorskip("transformers")
    from distill_util import make_teachers, student_tokenizer

    student_tok = student_tokenizer()
    (teacher,) = make_teachers(["digits"], student_tok, loss="hkl")
    teacher.learn_projection = True
    with pytest.raises(ValueError, match="learn_projection trains W's values through P-KL"):
        xtoken.distill.prepare_teachers(teacher, student_tok)
    with pytest.raises(ValueError, match="projection_lr"):
        xtoken.Teacher(teacher.model, projection_lr=0.0)


# ------------------------------------------------------------------------------------------ CUDA


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("merge", MERGES, ids=MERGE_IDS)
def test_cuda_w_gradient_matches_cpu(dtype, merge):
    zs, zt, chunks, W, ts, tt = make_case(V_s=5003, V_t=6007, batch=3, T_s=33, T_t=41, dtype=dtype)
    grads = []
    for device in ("cpu", "cuda", "cuda"):
        val = W.val.to(device).clone().requires_grad_()
        losses = op_losses(zs.to(device), zt.to(device), chunks.to(device), W, val, ts.to(device), tt.to(device),
                           merge)
        (2 * losses.sum()).backward()
        grads.append(val.grad.cpu())
    assert rel_error(grads[1], grads[0].double()) <= (1e-5 if dtype == torch.float32 else 1e-3)
    assert torch.equal(grads[1], grads[2])  # deterministic


@requires_cuda
def test_cuda_w_gradient_over_several_waves():
    # 2^20 tokens on both sides: the 512 MB wave workspace holds 128 chunks (float32 p_s and g), so 140 take two.
    V_s, V_t, K = 524_309, 524_287, 140
    W = random_projection(V_s, V_t, top_k=2)
    zs, zt = torch.randn(K, V_s) * 3, torch.randn(K, V_t) * 3
    chunks = torch.tensor([[k, k + 1, k, k + 1] for k in range(K)], dtype=torch.int32)
    grads = []
    for device in ("cpu", "cuda"):
        val = W.val.to(device).clone().requires_grad_()
        losses = op_losses(zs.to(device), zt.to(device), chunks.to(device), W, val, None, None, ("first", "first"))
        losses.sum().backward()
        grads.append(val.grad.cpu())
    assert rel_error(grads[1], grads[0].double()) <= 1e-5
