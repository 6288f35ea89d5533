"""Public functional losses. Each one flattens ``[B, T, V]`` logits to rows, checks what the kernels
cannot (Python-level types and names), calls the fused op, and reduces as SPEC.md §4 says."""

from __future__ import annotations

import torch

from . import checks
from . import ops as _ops  # noqa: F401  (registers fakes and autograd)
from .projection import Projection
from .reference import MATCHED, MERGES, REDUCTIONS, hybrid_weights, reduce

__all__ = ["pkl_loss", "gold_loss", "hkl_loss", "uld_loss", "kd_loss", "project"]


def _rows(logits: torch.Tensor, name: str) -> torch.Tensor:
    return checks.logit_rows(logits, name)


def _logits(student_logits, teacher_logits) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logits as rows, checked to be on one device (before W or a table is moved to the student's)."""
    zs = _rows(student_logits, "student_logits")
    zt = _rows(teacher_logits, "teacher_logits")
    checks.same_device({"student_logits": zs, "teacher_logits": zt})
    return zs, zt


def _chunk_table(chunks, device: torch.device) -> torch.Tensor:
    return checks.index_table(chunks, "chunks", 4, device, "(s0, s1, t0, t1)")


def _targets(targets, name: str, device: torch.device) -> torch.Tensor | None:
    return checks.targets(targets, name, device)


def _check_options(temperature: float, merge: str, reduction: str) -> float:
    """Checks the options every loss shares; returns the temperature as a float."""
    tau = checks.temperature(temperature)
    if not isinstance(merge, str) or merge not in MERGES:
        raise ValueError(f"merge: expected one of {MERGES}, got {merge!r}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return tau


def _check_hybrid_options(matched: str, beta: float, uld_topk: int | None, weights):
    """Checks the hybrid options; returns (beta, uld_topk, weights) as the op and the reduction take them."""
    if not isinstance(matched, str) or matched not in MATCHED:
        raise ValueError(f"matched: expected one of {MATCHED}, got {matched!r}")
    beta = checks.real(beta, "beta")
    if not 0 <= beta <= 1:
        raise ValueError(f"beta: expected a number in [0, 1], got {beta!r}")
    if uld_topk is not None:
        uld_topk = checks.count(uld_topk, "uld_topk", minimum=1)
    if isinstance(weights, str):
        if weights != "adaptive":
            raise ValueError(f"weights: expected 'adaptive' or a pair (w_c, w_u), got {weights!r}")
        return beta, uld_topk, weights
    if isinstance(weights, torch.Tensor) or not hasattr(weights, "__len__") or len(weights) != 2:
        raise ValueError(f"weights: expected 'adaptive' or a pair of numbers (w_c, w_u), got {weights!r}")
    w_c, w_u = (checks.real(w, f"weights[{i}]", minimum=0) for i, w in enumerate(weights))
    return beta, uld_topk, (w_c, w_u)


def _pair_table(pairs, device: torch.device, kind: str) -> torch.Tensor:
    """``pairs`` as the int32 ``[C, 2]`` table the op takes; a Projection gives its ``kind`` common pairs."""
    if isinstance(pairs, Projection):
        pairs = pairs.common_pairs(kind)
    return checks.index_table(pairs, "pairs", 2, device, "of (student id, teacher id)")


def _hybrid_loss(student_logits, teacher_logits, chunks, pairs, *, temperature, merge, matched, beta, uld_topk,
                 weights, reduction, student_targets, teacher_targets) -> torch.Tensor:
    tau = _check_options(temperature, merge, reduction)
    beta, uld_topk, weights = _check_hybrid_options(matched, beta, uld_topk, weights)
    zs, zt = _logits(student_logits, teacher_logits)
    terms, _, _ = torch.ops.xtoken.hybrid_loss_fwd(
        zs, zt, _chunk_table(chunks, zs.device), pairs, tau, merge, matched, beta, uld_topk,
        _targets(student_targets, "student_targets", zs.device),
        _targets(teacher_targets, "teacher_targets", zs.device),
    )  # fmt: skip
    w_c, w_u = hybrid_weights(weights, pairs.shape[0], zt.shape[1])
    return reduce(w_c * terms[:, 0] + w_u * terms[:, 1], tau, reduction)


_HYBRID_ARGS = """
    Args:
        student_logits: ``[N_s, V_s]`` or ``[B, T_s, V_s]`` (rows flattened ``b * T_s + j``), float32,
            bfloat16 or float16. The loss is differentiable in these.
        teacher_logits: ``[N_t, V_t]`` or ``[B, T_t, V_t]``, same dtype. Receives no gradient.
        chunks: int32 ``[K, 4]`` rows ``(s0, s1, t0, t1)`` (see :func:`pkl_loss`).
        pairs: the common pairs, an integer ``[C, 2]`` table of (student id, teacher id), each id at most
            once per column, or a :class:`Projection` ({kind} pairs; computed on every call, so prefer
            the table or the module in a training loop).
        temperature: tau > 0; ``p = softmax(z / tau)`` and the loss is multiplied by tau^2.
        merge: ``"first"``, ``"mean"`` or ``"bayes"`` (SPEC.md §3); ``"bayes"`` needs the targets.
        matched: the matched term D, ``"kl"`` (p_t log(p_t / p_s), logs clamped at 1e-10) or ``"jsd"`` (TRL's
            generalized JSD on probabilities clamped at 1e-8; ``beta=0`` forward KL, ``beta=1`` reverse KL).
        beta: the JSD mixing coefficient in [0, 1] (read by ``matched="jsd"`` only).
        uld_topk: the sorted-L1 term compares the top ``uld_topk`` ranks of each side (None: all).
        weights: ``(w_c, w_u)``, or ``"adaptive"``: TRL's ``w_c = C / V_t`` (V_t the teacher logit width),
            ``w_u = 1 - w_c``.
        reduction: ``"mean"`` (tau^2 * sum / K), ``"sum"`` (tau^2 * sum) or ``"none"`` (tau^2 * per chunk).
        student_targets, teacher_targets: int64 ``[N_s]`` / ``[N_t]``, the realized next token of each row
            (-1 where none); read by ``merge="bayes"`` only.

    Returns:
        A float32 scalar (float64 for float64 logits), or ``[K]`` for ``reduction="none"``.
        K = 0 gives 0 with zero gradients.

    Equivalent to :func:`xtoken.reference.hybrid_loss`.
"""


def gold_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    chunks: torch.Tensor,
    pairs,
    *,
    temperature: float = 1.0,
    merge: str = "first",
    matched: str = "kl",
    beta: float = 0.5,
    uld_topk: int | None = 8192,
    weights="adaptive",
    reduction: str = "mean",
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """GOLD's hybrid loss (SPEC.md §4), fused: per chunk, ``w_c * sum_n D(p_t[t_n], p_s[s_n])`` over the common
    pairs plus ``w_u * sum_{r<R} |a_r - b_r|`` over the uncommon tokens of each side ranked by probability.
    Each side's top R is selected (not the whole vocabulary sorted); ties rank the lower token id first.
    """
    device = _rows(student_logits, "student_logits").device
    return _hybrid_loss(
        student_logits, teacher_logits, chunks, _pair_table(pairs, device, "exact"), temperature=temperature,
        merge=merge, matched=matched, beta=beta, uld_topk=uld_topk, weights=weights, reduction=reduction,
        student_targets=student_targets, teacher_targets=teacher_targets,
    )  # fmt: skip


def hkl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    chunks: torch.Tensor,
    pairs,
    *,
    temperature: float = 1.0,
    merge: str = "first",
    matched: str = "kl",
    beta: float = 0.5,
    uld_topk: int | None = 8192,
    weights="adaptive",
    reduction: str = "mean",
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """X-Token's H-KL (SPEC.md §4): the hybrid loss of :func:`gold_loss` over the relaxed common pairs of W
    (each student token whose largest weight is >= 0.6, paired with that teacher token)."""
    device = _rows(student_logits, "student_logits").device
    return _hybrid_loss(
        student_logits, teacher_logits, chunks, _pair_table(pairs, device, "relaxed"), temperature=temperature,
        merge=merge, matched=matched, beta=beta, uld_topk=uld_topk, weights=weights, reduction=reduction,
        student_targets=student_targets, teacher_targets=teacher_targets,
    )  # fmt: skip


if gold_loss.__doc__ is not None:  # None under python -OO
    gold_loss.__doc__ += _HYBRID_ARGS.format(kind="exact")
    hkl_loss.__doc__ += _HYBRID_ARGS.format(kind="relaxed")


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    chunks: torch.Tensor,
    *,
    temperature: float = 1.0,
    merge: str = "first",
    uld_topk: int | None = 8192,
    reduction: str = "mean",
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """ULD (SPEC.md §4): per chunk ``sum_{r<R} |a_r - b_r|`` over both full vocabularies ranked by probability
    (the hybrid loss with no common pairs). Arguments as for :func:`gold_loss`.

    Equivalent to :func:`xtoken.reference.hybrid_loss` with no pairs.
    """
    device = _rows(student_logits, "student_logits").device
    return _hybrid_loss(
        student_logits, teacher_logits, chunks, torch.zeros(0, 2, dtype=torch.int32, device=device),
        temperature=temperature, merge=merge, matched="kl", beta=0.5, uld_topk=uld_topk, weights=(0.0, 1.0),
        reduction=reduction, student_targets=student_targets, teacher_targets=teacher_targets,
    )  # fmt: skip


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    chunks: torch.Tensor,
    *,
    temperature: float = 1.0,
    merge: str = "first",
    reduction: str = "mean",
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same-vocabulary KD (SPEC.md §4): per chunk the exact ``KL(p_t || p_s)`` of the pooled vectors, fused
    (log-probabilities read off the logits; no projection, no eps). The student and teacher logits must
    have the same width. Arguments as for :func:`pkl_loss`, without the projection.

    Equivalent to :func:`xtoken.reference.kd_loss`.
    """
    tau = _check_options(temperature, merge, reduction)
    zs, zt = _logits(student_logits, teacher_logits)
    losses, _, _ = torch.ops.xtoken.kd_loss_fwd(
        zs, zt, _chunk_table(chunks, zs.device), tau, merge,
        _targets(student_targets, "student_targets", zs.device),
        _targets(teacher_targets, "teacher_targets", zs.device),
    )  # fmt: skip
    return reduce(losses, tau, reduction)


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
    tau = _check_options(temperature, merge, reduction)
    zs, zt = _logits(student_logits, teacher_logits)
    if not isinstance(projection, Projection):
        raise TypeError(f"projection: expected an xtoken.Projection, got {type(projection).__name__}")
    W = projection.to(zs.device)
    table = _chunk_table(chunks, zs.device)
    losses, _, _ = torch.ops.xtoken.pkl_loss_fwd(
        zs, zt, table, *W.kernel_args(zt.shape[1]), tau, merge,
        _targets(student_targets, "student_targets", zs.device),
        _targets(teacher_targets, "teacher_targets", zs.device),
    )  # fmt: skip
    return reduce(losses, tau, reduction)


def project(probs: torch.Tensor, projection: Projection) -> torch.Tensor:
    """``q = W^T p`` for every row of ``probs`` (``[..., V_s]`` -> ``[..., V_t]``), differentiable in
    ``probs``. Accumulates in float32; returns ``probs``' dtype.

    Equivalent to :func:`xtoken.reference.project`.
    """
    if not isinstance(projection, Projection):
        raise TypeError(f"projection: expected an xtoken.Projection, got {type(projection).__name__}")
    if not isinstance(probs, torch.Tensor) or probs.dim() == 0:
        raise TypeError(f"probs: expected a [..., V_s] tensor, got {type(probs).__name__}")
    W = projection.to(probs.device)
    rows = probs.reshape(-1, probs.shape[-1])
    out = torch.ops.xtoken.project_fwd(rows, *W.kernel_args(W.teacher_vocab_size))
    return out.reshape(probs.shape[:-1] + (W.teacher_vocab_size,))
