"""Thin wrappers over ``torch.ops.xtoken.*``: fake (meta) kernels and autograd formulas.

Every op is registered in C++ (csrc/xtoken.cpp); this module makes each one traceable by
``torch.compile`` (a fake kernel gives output shapes without running it) and differentiable (the
backward of a forward op calls its registered backward op, so autograd stays inside the library).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import _C  # noqa: F401  (loads the library; its static initializers register the ops)
from . import checks

__all__ = [
    "built_with_cuda", "cuda_kernels_registered", "cuda_architectures", "OP_NAMES", "content_check_mode",
    "set_content_check_mode", "skip_content_checks", "content_checks_skipped",
]  # fmt: skip

OP_NAMES = (
    "project_fwd", "project_bwd", "pkl_loss_fwd", "pkl_loss_bwd", "hybrid_loss_fwd", "hybrid_loss_bwd", "kd_loss_fwd",
    "kd_loss_bwd", "chain_loss_fwd", "chain_loss_bwd", "align_spans",
)  # fmt: skip


def built_with_cuda() -> bool:
    """Whether this build of the extension compiled the CUDA kernels."""
    return bool(torch.ops.xtoken.built_with_cuda())


def cuda_kernels_registered() -> dict[str, bool]:
    """For every op, whether a CUDA kernel is registered with the dispatcher."""
    return {
        name: torch._C._dispatch_has_kernel_for_dispatch_key(f"xtoken::{name}", "CUDA") for name in OP_NAMES
    }


def cuda_architectures() -> list[str]:
    """The CUDA targets this build compiled: machine code ``sm_XX`` and PTX ``compute_XX`` (empty without CUDA)."""
    return [target for target in _C.cuda_architectures().split(",") if target]


# ---------------------------------------------------------------------------------------------
# When the ops check the contents of their inputs (SPEC.md §6). CPU inputs are always checked. On CUDA the
# checks of one op call cost one host sync; they are skipped during CUDA-graph capture and inside a skip scope
# (the kernels still guard every index: an invalid chunk gives NaN instead of an error), unless the mode is
# "always".


def content_check_mode() -> str:
    """The process-wide mode: ``"auto"`` (default) or ``"always"`` (every call checks; for debugging)."""
    return _C.content_check_mode()


def set_content_check_mode(mode: str) -> str:
    """Set the process-wide mode, ``"auto"`` or ``"always"`` (also ``XTOKEN_CONTENT_CHECKS=always`` at start);
    returns the previous one. ``"always"`` makes every op call check its CUDA inputs (one host sync each),
    skip scopes included."""
    return _C.set_content_check_mode(mode)


@contextlib.contextmanager
def skip_content_checks(skip: bool = True) -> Iterator[None]:
    """Ops called on this thread inside the block skip the content checks of CUDA inputs (no host sync), unless
    the mode is ``"always"``. Shape, dtype and device checks always run. The nn modules and the trainer use it
    after their first call; autograd's backward of every xtoken op uses it (the forward checked the same
    inputs). ``skip=False`` checks inside the block even within an outer skip scope."""
    previous = _C.set_skip_content_checks(skip)
    try:
        yield
    finally:
        _C.set_skip_content_checks(previous)


def content_checks_skipped() -> bool:
    """Whether an op called now on this thread skips the content checks of CUDA inputs (outside a graph
    capture, where they are always skipped)."""
    return _C.skip_content_checks() and content_check_mode() != "always"


def _fake(op: str):
    """``register_fake`` for ``xtoken::op``, with the check every real kernel makes first: all tensor arguments
    on one device. The dispatcher runs the fake kernel whenever any argument is a meta tensor, so without
    it a meta tensor mixed with real ones would give an uninitialized result instead of an error."""
    names = [a.name for a in getattr(torch.ops.xtoken, op).default._schema.arguments]

    def register(shapes):
        def fake(*args, **kwargs):
            values = {**dict(zip(names, args)), **kwargs}
            checks.same_device({n: v for n, v in values.items() if isinstance(v, torch.Tensor)}, op)
            return shapes(*args, **kwargs)

        torch.library.register_fake(f"xtoken::{op}", fake)
        return shapes

    return register


def _no_double_backward(op: str) -> None:
    """An autograd formula for the backward op ``xtoken::op`` that raises: differentiating a loss's gradient
    (``create_graph=True``, then a backward through the gradient: a gradient penalty, a Hessian-vector
    product) would otherwise silently drop the second-order term."""
    loss = op.removesuffix("_bwd")

    def backward(ctx, *grads):
        raise RuntimeError(
            f"xtoken::{op}: double backward is not supported: the fused {loss} has no formula for the gradient "
            "of its gradient, so a second-order term (gradient penalty, Hessian-vector product) through it would "
            f"be wrong. Use xtoken.reference.{loss} (plain PyTorch, float64) for second-order terms, or detach "
            "the loss from the part that is differentiated twice"
        )

    torch.library.register_autograd(f"xtoken::{op}", backward, setup_context=lambda ctx, inputs, output: None)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_loss_fakes(student_logits, teacher_logits, loss_shape):
    acc = _accumulate_dtype(student_logits.dtype)
    return (
        student_logits.new_empty(loss_shape, dtype=acc),
        student_logits.new_empty((student_logits.shape[0], 2), dtype=acc),
        teacher_logits.new_empty((teacher_logits.shape[0], 2), dtype=acc),
    )


# ---------------------------------------------------------------------------------------------
# project: q = W^T p


@_fake("project_fwd")
def _project_fwd_fake(probs, proj_idx, proj_val, proj_col_ptr, proj_col_src, proj_col_val):
    return probs.new_empty((probs.shape[0], proj_col_ptr.shape[0] - 1))


@_fake("project_bwd")
def _project_bwd_fake(grad_q, proj_idx, proj_val, proj_col_ptr, proj_col_src, proj_col_val):
    return grad_q.new_empty((grad_q.shape[0], proj_idx.shape[0]))


def _project_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:])


def _project_backward(ctx, grad_q):
    with skip_content_checks():  # the forward checked W
        grad = torch.ops.xtoken.project_bwd(grad_q, *ctx.saved_tensors)
    return grad, None, None, None, None, None


torch.library.register_autograd("xtoken::project_fwd", _project_backward, setup_context=_project_setup)


def _project_bwd_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:])


def _project_bwd_backward(ctx, grad):
    # project_bwd is the transpose of project_fwd, and both are linear.
    with skip_content_checks():
        return torch.ops.xtoken.project_fwd(grad, *ctx.saved_tensors), None, None, None, None, None


torch.library.register_autograd("xtoken::project_bwd", _project_bwd_backward, setup_context=_project_bwd_setup)


# ---------------------------------------------------------------------------------------------
# pkl_loss: per-chunk P-KL, gradient into the student logits and, for a learned W, into W's values


@_fake("pkl_loss_fwd")
def _pkl_fwd_fake(
    student_logits,
    teacher_logits,
    chunks,
    proj_idx,
    proj_val,
    proj_col_ptr,
    proj_col_src,
    proj_col_val,
    temperature,
    student_merge,
    teacher_merge,
    student_targets,
    teacher_targets,
):
    return _chunk_loss_fakes(student_logits, teacher_logits, (chunks.shape[0],))


@_fake("pkl_loss_bwd")
def _pkl_bwd_fake(grad_losses, student_logits, teacher_logits, chunks, proj_idx, proj_val, *args):
    proj_val_grad = args[-1]
    return (
        torch.empty_like(student_logits, memory_format=torch.contiguous_format),
        proj_val.new_empty(proj_val.shape if proj_val_grad else (0,)),
    )


def _pkl_setup(ctx, inputs, output):
    (zs, zt, chunks, idx, val, col_ptr, col_src, col_val, temperature, student_merge, teacher_merge, ts, tt) = inputs
    _, lse_s, lse_t = output
    ctx.mark_non_differentiable(lse_s, lse_t)
    ctx.options = (temperature, student_merge, teacher_merge)
    ctx.save_for_backward(zs, zt, chunks, idx, val, col_ptr, col_src, col_val, ts, tt, lse_s, lse_t)


def _pkl_backward(ctx, grad_losses, _grad_lse_s, _grad_lse_t):
    zs, zt, chunks, idx, val, col_ptr, col_src, col_val, ts, tt, lse_s, lse_t = ctx.saved_tensors
    val_grad = ctx.needs_input_grad[4]  # W's values (a learned W); col_val is derived from them
    with skip_content_checks():  # the forward checked the same saved inputs
        grad, grad_val = torch.ops.xtoken.pkl_loss_bwd(
            grad_losses, zs, zt, chunks, idx, val, col_ptr, col_src, col_val,
            *ctx.options, ts, tt, lse_s, lse_t, val_grad,
        )  # fmt: skip
    return (grad, None, None, None, grad_val if val_grad else None) + (None,) * 8


torch.library.register_autograd("xtoken::pkl_loss_fwd", _pkl_backward, setup_context=_pkl_setup)
_no_double_backward("pkl_loss_bwd")


# ---------------------------------------------------------------------------------------------
# hybrid_loss: per-chunk (matched, sorted-L1) terms, gradient into the student logits only


@_fake("hybrid_loss_fwd")
def _hybrid_fwd_fake(student_logits, teacher_logits, chunks, pairs, temperature, student_merge, teacher_merge, matched,
                     beta, uld_topk, student_targets, teacher_targets):
    return _chunk_loss_fakes(student_logits, teacher_logits, (chunks.shape[0], 2))


@_fake("hybrid_loss_bwd")
def _hybrid_bwd_fake(grad_losses, student_logits, *args):
    return torch.empty_like(student_logits, memory_format=torch.contiguous_format)


def _hybrid_setup(ctx, inputs, output):
    zs, zt, chunks, pairs, temperature, student_merge, teacher_merge, matched, beta, uld_topk, ts, tt = inputs
    _, lse_s, lse_t = output
    ctx.mark_non_differentiable(lse_s, lse_t)
    ctx.options = (temperature, student_merge, teacher_merge, matched, beta, uld_topk)
    ctx.save_for_backward(zs, zt, chunks, pairs, ts, tt, lse_s, lse_t)


def _hybrid_backward(ctx, grad_losses, _grad_lse_s, _grad_lse_t):
    zs, zt, chunks, pairs, ts, tt, lse_s, lse_t = ctx.saved_tensors
    with skip_content_checks():  # the forward checked the same saved inputs
        grad = torch.ops.xtoken.hybrid_loss_bwd(grad_losses, zs, zt, chunks, pairs, *ctx.options, ts, tt, lse_s,
                                                lse_t)
    return (grad,) + (None,) * 11


torch.library.register_autograd("xtoken::hybrid_loss_fwd", _hybrid_backward, setup_context=_hybrid_setup)
_no_double_backward("hybrid_loss_bwd")


# ---------------------------------------------------------------------------------------------
# kd_loss: per-chunk same-vocabulary KL, gradient into the student logits only


@_fake("kd_loss_fwd")
def _kd_fwd_fake(student_logits, teacher_logits, chunks, temperature, student_merge, teacher_merge, student_targets,
                 teacher_targets):
    return _chunk_loss_fakes(student_logits, teacher_logits, (chunks.shape[0],))


@_fake("kd_loss_bwd")
def _kd_bwd_fake(grad_losses, student_logits, *args):
    return torch.empty_like(student_logits, memory_format=torch.contiguous_format)


def _kd_setup(ctx, inputs, output):
    zs, zt, chunks, temperature, student_merge, teacher_merge, ts, tt = inputs
    _, lse_s, lse_t = output
    ctx.mark_non_differentiable(lse_s, lse_t)
    ctx.options = (temperature, student_merge, teacher_merge)
    ctx.save_for_backward(zs, zt, chunks, ts, tt, lse_s, lse_t)


def _kd_backward(ctx, grad_losses, _grad_lse_s, _grad_lse_t):
    zs, zt, chunks, ts, tt, lse_s, lse_t = ctx.saved_tensors
    with skip_content_checks():  # the forward checked the same saved inputs
        grad = torch.ops.xtoken.kd_loss_bwd(grad_losses, zs, zt, chunks, *ctx.options, ts, tt, lse_s, lse_t)
    return (grad,) + (None,) * 7


torch.library.register_autograd("xtoken::kd_loss_fwd", _kd_backward, setup_context=_kd_setup)
_no_double_backward("kd_loss_bwd")


# ---------------------------------------------------------------------------------------------
# chain_loss: per-chunk chain KL, gradient into the student logits only


@_fake("chain_loss_fwd")
def _chain_fwd_fake(student_logits, teacher_logits, chunks, student_pieces, student_order, teacher_pieces,
                    teacher_order, temperature, student_targets, teacher_targets):
    return _chunk_loss_fakes(student_logits, teacher_logits, (chunks.shape[0],))


@_fake("chain_loss_bwd")
def _chain_bwd_fake(grad_losses, student_logits, *args):
    return torch.empty_like(student_logits, memory_format=torch.contiguous_format)


def _chain_setup(ctx, inputs, output):
    _, lse_s, lse_t = output
    ctx.mark_non_differentiable(lse_s, lse_t)
    ctx.temperature = inputs[7]
    ctx.save_for_backward(*inputs[:7], *inputs[8:], lse_s, lse_t)


def _chain_backward(ctx, grad_losses, _grad_lse_s, _grad_lse_t):
    zs, zt, chunks, sp, so, tp, to, ts, tt, lse_s, lse_t = ctx.saved_tensors
    with skip_content_checks():  # the forward checked the same saved inputs
        grad = torch.ops.xtoken.chain_loss_bwd(grad_losses, zs, zt, chunks, sp, so, tp, to, ctx.temperature, ts, tt,
                                               lse_s, lse_t)
    return (grad,) + (None,) * 9


torch.library.register_autograd("xtoken::chain_loss_fwd", _chain_backward, setup_context=_chain_setup)
_no_double_backward("chain_loss_bwd")


# ---------------------------------------------------------------------------------------------
# align_spans: chunk tables from token end offsets (integer outputs, no autograd)


@_fake("align_spans")
def _align_spans_fake(student_ends, student_lengths, student_left_padded, teacher_ends, teacher_lengths,
                      teacher_left_padded):
    batch = student_ends.shape[0]
    capacity = torch.sym_min(student_ends.shape[1], teacher_ends.shape[1])
    return (
        student_ends.new_empty((batch, capacity, 4)),
        student_ends.new_empty((batch,)),
        student_ends.new_empty((batch, 2, 3)),
    )
