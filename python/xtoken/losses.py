"""Public functional losses. Each one flattens ``[B, T, V]`` logits to rows, checks what the kernels
cannot (Python-level types and names), calls the fused op, and reduces as SPEC.md §4 says."""

from __future__ import annotations

import torch

from . import ops as _ops  # noqa: F401  (registers fakes and autograd)
from .projection import Projection
from .reference import MERGES, REDUCTIONS, reduce

__all__ = ["pkl_loss", "project"]


def _rows(logits: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(logits).__name__}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"{name}: expected [N, V] or [B, T, V] logits, got shape {tuple(logits.shape)}")
    return logits.reshape(-1, logits.shape[-1])


def _chunk_table(chunks, device: torch.device) -> torch.Tensor:
    chunks = torch.as_tensor(chunks, device=device)
    if chunks.dtype.is_floating_point or chunks.dtype == torch.bool:
        raise TypeError(f"chunks: expected an integer [K, 4] table, got {chunks.dtype}")
    if chunks.numel() == 0:
        chunks = chunks.reshape(0, 4)
    if chunks.dtype != torch.int32:
        chunks = chunks.to(torch.int32)
    return chunks


def _targets(targets, name: str, device: torch.device) -> torch.Tensor | None:
    if targets is None:
        return None
    return torch.as_tensor(targets, device=device).reshape(-1).to(torch.int64)


def _check_options(temperature: float, merge: str, reduction: str) -> None:
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if merge not in MERGES:
        raise ValueError(f"merge: expected one of {MERGES}, got {merge!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


def pkl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    chunks: torch.Tensor,
    projection: Projection,
    *,
    temperature: float = 1.0,
    merge: str = "first",
    reduction: str = "mean",
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Projection KL (X-Token P-KL, SPEC.md §4), fused: logsumexp, chunk pooling, ``q = W^T p_s``
    and KL over the full teacher vocabulary in one pass per chunk, never materializing ``[N, V]``.

    Args:
        student_logits: ``[N_s, V_s]`` or ``[B, T_s, V_s]`` (rows flattened ``b * T_s + j``), float32,
            bfloat16 or float16. The loss is differentiable in these.
        teacher_logits: ``[N_t, V_t]`` or ``[B, T_t, V_t]``, same dtype. Receives no gradient.
        chunks: int32 ``[K, 4]`` rows ``(s0, s1, t0, t1)``: student predictor rows ``[s0, s1)`` and teacher
            predictor rows ``[t0, t1)``; student rows sorted and disjoint (as ``align_texts`` makes them).
        projection: the :class:`Projection` W with ``V_s`` rows.
        temperature: tau > 0; ``p = softmax(z / tau)`` and the loss is multiplied by tau^2.
        merge: ``"first"``, ``"mean"`` or ``"bayes"`` (SPEC.md §3); ``"bayes"`` needs the targets.
        reduction: ``"mean"`` (tau^2 * sum / K), ``"sum"`` (tau^2 * sum) or ``"none"`` (tau^2 * per chunk).
        student_targets, teacher_targets: int64 ``[N_s]`` / ``[N_t]``, the realized next token of each row
            (-1 where none); read by ``merge="bayes"`` only.

    Returns:
        A float32 scalar (float64 for float64 logits), or ``[K]`` for ``reduction="none"``.
        K = 0 gives 0 with zero gradients.

    Equivalent to :func:`xtoken.reference.pkl_loss`.
    """
    _check_options(temperature, merge, reduction)
    zs = _rows(student_logits, "student_logits")
    zt = _rows(teacher_logits, "teacher_logits")
    if not isinstance(projection, Projection):
        raise TypeError(f"projection: expected an xtoken.Projection, got {type(projection).__name__}")
    W = projection.to(zs.device)
    table = _chunk_table(chunks, zs.device)
    losses, _, _ = torch.ops.xtoken.pkl_loss_fwd(
        zs, zt, table, *W.kernel_args(zt.shape[1]), float(temperature), merge,
        _targets(student_targets, "student_targets", zs.device),
        _targets(teacher_targets, "teacher_targets", zs.device),
    )  # fmt: skip
    return reduce(losses, temperature, reduction)


def project(probs: torch.Tensor, projection: Projection) -> torch.Tensor:
    """``q = W^T p`` for every row of ``probs`` (``[..., V_s]`` -> ``[..., V_t]``), differentiable in
    ``probs``. Accumulates in float32; returns ``probs``' dtype.

    Equivalent to :func:`xtoken.reference.project`.
    """
    if not isinstance(projection, Projection):
        raise TypeError(f"projection: expected an xtoken.Projection, got {type(projection).__name__}")
    W = projection.to(probs.device)
    rows = probs.reshape(-1, probs.shape[-1])
    out = torch.ops.xtoken.project_fwd(rows, *W.kernel_args(W.teacher_vocab_size))
    return out.reshape(probs.shape[:-1] + (W.teacher_vocab_size,))
