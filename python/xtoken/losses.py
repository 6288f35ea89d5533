"""Public functional losses. Each one flattens ``[B, T, V]`` logits to rows, checks what the kernels
cannot (Python-level types and names), calls the fused op, and reduces as SPEC.md §4 says."""

from __future__ import annotations

import torch

from . import checks
from . import ops as _ops  # noqa: F401  (registers fakes and autograd)
from .pieces import PieceTables
from .projection import Projection
from .reference import MATCHED, REDUCTIONS, hybrid_weights, merge_pair, reduce

__all__ = ["pkl_loss", "gold_loss", "hkl_loss", "uld_loss", "kd_loss", "chain_loss", "pkl_chain_loss", "project"]


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


def _check_options(temperature: float, merge, reduction: str) -> float:
    """Checks the options every loss shares (``merge`` a name or a (student, teacher) pair); returns the
    temperature as a float."""
    tau = checks.temperature(temperature)
    merge_pair(merge)
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
        zs, zt, _chunk_table(chunks, zs.device), pairs, tau, *merge_pair(merge), matched, beta, uld_topk,
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
        merge: how each side of a chunk pools its predictor rows (SPEC.md §3): ``"first"``, ``"mean"``,
            ``"bayes"`` or ``"logmean"`` (the geometric mean of the rows' probabilities, not renormalized) for
            both sides, or a pair ``(student_merge, teacher_merge)``. ``xtoken.NEMO_MERGE`` = ``("mean",
            "logmean")`` is NeMo-RL's pooling, the code behind the X-Token paper's numbers. A side pooled by
            ``"bayes"`` needs that side's targets.
        matched: the matched term D, ``"kl"`` (p_t log(p_t / p_s), logs clamped at 1e-10) or ``"jsd"`` (TRL's
            generalized JSD on probabilities clamped at 1e-8; ``beta=0`` forward KL, ``beta=1`` reverse KL).
        beta: the JSD mixing coefficient in [0, 1] (read by ``matched="jsd"`` only).
        uld_topk: the sorted-L1 term compares the top ``uld_topk`` ranks of each side (None: all).
        weights: ``(w_c, w_u)``, or ``"adaptive"``: TRL's ``w_c = C / V_t`` (V_t the teacher logit width),
            ``w_u = 1 - w_c``.
        reduction: ``"mean"`` (tau^2 * sum / K), ``"sum"`` (tau^2 * sum) or ``"none"`` (tau^2 * per chunk).
        student_targets, teacher_targets: int64 ``[N_s]`` / ``[N_t]``, the realized next token of each row
            (-1 where none); read only on a side pooled by ``"bayes"``.

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
    merge="first",
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
    merge="first",
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
    merge="first",
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
    merge="first",
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
        zs, zt, _chunk_table(chunks, zs.device), tau, *merge_pair(merge),
        _targets(student_targets, "student_targets", zs.device),
        _targets(teacher_targets, "teacher_targets", zs.device),
    )  # fmt: skip
    return reduce(losses, tau, reduction)


def pkl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    chunks: torch.Tensor,
    projection,
    *,
    temperature: float = 1.0,
    merge="first",
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
        projection: the :class:`Projection` W with ``V_s`` rows, or a :class:`xtoken.nn.LearnedProjection` (W's
            values trainable on its fixed support: the loss is then differentiable in them too).
        temperature: tau > 0; ``p = softmax(z / tau)`` and the loss is multiplied by tau^2.
        merge: how each side of a chunk pools its predictor rows (SPEC.md §3): ``"first"``, ``"mean"``,
            ``"bayes"`` or ``"logmean"`` (the geometric mean of the rows' probabilities, not renormalized) for
            both sides, or a pair ``(student_merge, teacher_merge)``. ``xtoken.NEMO_MERGE`` = ``("mean",
            "logmean")`` is NeMo-RL's pooling, the code behind the X-Token paper's numbers. A side pooled by
            ``"bayes"`` needs that side's targets.
        reduction: ``"mean"`` (tau^2 * sum / K), ``"sum"`` (tau^2 * sum) or ``"none"`` (tau^2 * per chunk).
        student_targets, teacher_targets: int64 ``[N_s]`` / ``[N_t]``, the realized next token of each row
            (-1 where none); read only on a side pooled by ``"bayes"``.

    Returns:
        A float32 scalar (float64 for float64 logits), or ``[K]`` for ``reduction="none"``.
        K = 0 gives 0 with zero gradients.

    Equivalent to :func:`xtoken.reference.pkl_loss`.
    """
    tau = _check_options(temperature, merge, reduction)
    zs, zt = _logits(student_logits, teacher_logits)
    table = _chunk_table(chunks, zs.device)
    losses, _, _ = torch.ops.xtoken.pkl_loss_fwd(
        zs, zt, table, *_projection_args(projection, zs.device, zt.shape[1]), tau, *merge_pair(merge),
        _targets(student_targets, "student_targets", zs.device),
        _targets(teacher_targets, "teacher_targets", zs.device),
    )  # fmt: skip
    return reduce(losses, tau, reduction)


def chain_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    chunks: torch.Tensor,
    pieces: PieceTables,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
    merge: str = "first",
) -> torch.Tensor:
    """Chain KL (SPEC.md §4), fused: per chunk, the KL between the teacher's and the student's conditional
    distributions of the next piece along the realized pieces, so a student token that the teacher spells in
    several pieces ("85" -> "8", "5") learns the teacher's whole spelling, not only its first piece.

    On a 1:1 or 1:N chunk, level i (i = 0..n) conditions the student's distribution (row s0) on the teacher's
    realized pieces ``x_0..x_{i-1}`` and marginalizes it onto the next piece (or "the student token ends
    here"): among the student tokens spelled ``x_0..x_{i-1}...``, their mass by piece i. The teacher's row
    t0 + i gives the same distribution directly (its mass on those pieces; the rest is "ends here"); level n
    reads the teacher row after the chunk, so it tells the student where its token ends. An M:1 chunk runs the
    mirror image along the student's pieces (the teacher's one row conditioned on them), an M:N chunk its
    first level. Each level is a KL (teacher || student) with ``log(model + 1e-10)``; the chunk's loss is their
    sum. See :func:`xtoken.reference.chain_chunk_losses` for the formulas.

    Args:
        student_logits, teacher_logits: as for :func:`pkl_loss`.
        chunks: int32 ``[K, 4]`` rows ``(s0, s1, t0, t1)`` as alignment makes them (the level after a 1:N chunk
            reads teacher row t1, which alignment guarantees is the row after the chunk's last piece).
        pieces: the :class:`PieceTables` of the two tokenizers (``PieceTables.build``).
        temperature: tau > 0; the loss is multiplied by tau^2.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``, as for :func:`pkl_loss`.
        student_targets, teacher_targets: int64 ``[N_s]`` / ``[N_t]``, the realized next token of each row
            (required: they are the pieces the levels condition on).
        merge: accepted for a uniform signature; only ``"first"`` (the chain reads each row itself).

    Returns:
        A float32 scalar (float64 for float64 logits), or ``[K]`` for ``reduction="none"``.

    Equivalent to :func:`xtoken.reference.chain_loss`.
    """
    tau = _check_options(temperature, merge, reduction)
    if merge != "first":
        raise ValueError(f"merge: the chain loss reads every row of a chunk itself; expected 'first', got {merge!r}")
    if not isinstance(pieces, PieceTables):
        raise TypeError(f"pieces: expected an xtoken.PieceTables, got {type(pieces).__name__}")
    if student_targets is None or teacher_targets is None:
        raise ValueError("chain_loss needs student_targets and teacher_targets (the realized pieces it conditions on)")
    zs, zt = _logits(student_logits, teacher_logits)
    tables = pieces.to(zs.device)
    losses, _, _ = torch.ops.xtoken.chain_loss_fwd(
        zs, zt, _chunk_table(chunks, zs.device), *tables.kernel_args(zs.shape[1], zt.shape[1]), tau,
        _targets(student_targets, "student_targets", zs.device),
        _targets(teacher_targets, "teacher_targets", zs.device),
    )  # fmt: skip
    return reduce(losses, tau, reduction)


def pkl_chain_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    chunks: torch.Tensor,
    projection: Projection,
    pieces: PieceTables,
    *,
    temperature: float = 1.0,
    merge: str = "first",
    reduction: str = "mean",
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """P-KL (:func:`pkl_loss`) on the 1:1 chunks and the chain KL (:func:`chain_loss`) on the others: the
    X-Token loss where the tokenizations agree, the chain where one side spells what the other packs. Both
    losses run on every chunk and the per-chunk results are selected on the device (no host sync), so this
    costs about the two losses together. ``merge`` is P-KL's."""
    _check_options(temperature, merge, reduction)
    zs = _rows(student_logits, "student_logits")
    table = _chunk_table(chunks, zs.device)
    targets = dict(student_targets=student_targets, teacher_targets=teacher_targets)
    pkl = pkl_loss(student_logits, teacher_logits, table, projection, temperature=temperature, merge=merge,
                   reduction="none", **targets)
    chain = chain_loss(student_logits, teacher_logits, table, pieces, temperature=temperature, reduction="none",
                       **targets)
    one_to_one = (table[:, 1] - table[:, 0] == 1) & (table[:, 3] - table[:, 2] == 1)
    per_chunk = torch.where(one_to_one, pkl, chain)
    if reduction == "none":
        return per_chunk
    total = per_chunk.sum()
    return total if reduction == "sum" else total / max(table.shape[0], 1)


def _projection_args(projection, device: torch.device, teacher_width: int) -> tuple[torch.Tensor, ...]:
    """W as the P-KL op takes it: a :class:`Projection` (moved to ``device``, cached) or a learned W's current
    values (which must already be on ``device``: it holds parameters)."""
    if isinstance(projection, Projection):
        return projection.to(device).kernel_args(teacher_width)
    from .nn import LearnedProjection  # nn imports this module

    if isinstance(projection, LearnedProjection):
        if projection.device != device:
            raise ValueError(f"projection: the LearnedProjection is on {projection.device} but the logits are on "
                             f"{device}; move it with .to(device)")
        return projection.kernel_args(teacher_width)
    raise TypeError(f"projection: expected an xtoken.Projection or xtoken.nn.LearnedProjection, got "
                    f"{type(projection).__name__}")


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
