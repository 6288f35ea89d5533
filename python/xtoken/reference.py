"""Plain-PyTorch reference of xtoken's computations: SPEC.md made executable.

Everything here is written for clarity, not speed: loops over chunks, float64 arithmetic
(``dtype=torch.float64`` by default), and autograd for the gradients. The C++ and CUDA kernels are
tested against these functions; the benchmarks use them as a baseline.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "MERGES", "NEMO_MERGE", "REDUCTIONS", "MATCHED", "PKL_EPS", "JSD_CLAMP", "DROP_REASONS", "merge_pair", "pool",
    "log_pool", "project", "pkl_chunk_losses",
    "pkl_loss", "reduce", "matched_divergence", "sorted_l1", "hybrid_weights", "hybrid_chunk_losses", "hybrid_loss",
    "kd_chunk_losses", "kd_loss", "align_spans",
]  # fmt: skip

MERGES = ("first", "mean", "bayes", "logmean")
NEMO_MERGE = ("mean", "logmean")
"""NeMo-RL's chunk pooling (the code behind the X-Token paper's numbers): the student side is the mean of the
rows' probabilities, the teacher side the mean of the rows' log-probabilities (a geometric mean, not
renormalized). Pass it as ``merge=NEMO_MERGE``."""
REDUCTIONS = ("mean", "sum", "none")
MATCHED = ("kl", "jsd")
PKL_EPS = 1e-10
JSD_CLAMP = 1e-8
DROP_REASONS = ("no_predictor", "empty_inside", "truncated")


def merge_pair(merge) -> tuple[str, str]:
    """``(student_merge, teacher_merge)`` from one merge name (both sides) or a pair."""
    if isinstance(merge, str):
        merge = (merge, merge)
    if not (isinstance(merge, (tuple, list)) and len(merge) == 2 and all(m in MERGES for m in merge)):
        raise ValueError(f"merge: expected one of {MERGES} or a pair (student_merge, teacher_merge) of them, got "
                         f"{merge!r}")
    return merge[0], merge[1]


def pool(probs: torch.Tensor, merge: str, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Pool the probability rows ``probs [m, V]`` of one side of a chunk into one vector (SPEC §3).

    ``targets [m]`` are the realized next tokens of the rows (only read by ``merge="bayes"``).
    """
    if merge == "first":
        return probs[0]
    if merge == "mean":
        return probs.mean(dim=0)
    if merge == "bayes":
        m = probs.shape[0]
        prefix = probs[torch.arange(m - 1), targets[: m - 1]]
        return probs[m - 1] * prefix.prod()
    if merge == "logmean":
        return probs.log().mean(dim=0).exp()
    raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")


def log_pool(log_probs: torch.Tensor, merge: str, targets: torch.Tensor | None = None) -> torch.Tensor:
    """``log`` of :func:`pool` from the log-probability rows ``log_probs [m, V]``, computed in log space (so it
    never underflows to -inf where a probability is merely tiny): first ``log p_0``; mean the log-mean-exp of
    the rows; bayes ``log p_last + sum_{i<m-1} log p_i[x_i]``; logmean the mean of the rows."""
    m = log_probs.shape[0]
    if merge == "first":
        return log_probs[0]
    if merge == "mean":
        return torch.logsumexp(log_probs, dim=0) - math.log(m)
    if merge == "bayes":
        return log_probs[m - 1] + log_probs[torch.arange(m - 1), targets[: m - 1]].sum()
    if merge == "logmean":
        return log_probs.mean(dim=0)
    raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")


def project(probs: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, teacher_vocab_size: int) -> torch.Tensor:
    """q = W^T p for every row of ``probs [N, V_s]``, with W given as ELL ``idx, val [V_s, P]``."""
    q = probs.new_zeros(probs.shape[:-1] + (teacher_vocab_size,))
    for slot in range(idx.shape[1]):
        present = idx[:, slot] >= 0
        weights = val[present, slot].to(probs.dtype)  # differentiable in val (a learned W)
        q = q.index_add(-1, idx[present, slot].long(), probs[..., present] * weights)
    return q


def _pooled_rows(student_logits, teacher_logits, chunks, temperature, merge, student_targets, teacher_targets,
                 dtype):
    """``(p_s, log p_s, p_t, log p_t)``: the pooled vectors of every chunk (SPEC §3) and their logs (computed in
    log space, :func:`log_pool`), in ``dtype``. ``merge`` is one name or a pair (student_merge, teacher_merge)."""
    student_merge, teacher_merge = merge_pair(merge)
    sides = []
    for logits, merge_, targets in ((student_logits, student_merge, student_targets),
                                    (teacher_logits, teacher_merge, teacher_targets)):
        z = logits.reshape(-1, logits.shape[-1]).to(dtype) / temperature
        sides.append((torch.softmax(z, dim=-1), torch.log_softmax(z, dim=-1), merge_,
                      None if targets is None else targets.reshape(-1)))
    for s0, s1, t0, t1 in chunks.tolist():
        pooled = []
        for (p_rows, log_rows, merge_, targets), (r0, r1) in zip(sides, ((s0, s1), (t0, t1))):
            x = None if targets is None else targets[r0:r1]
            log_p = log_pool(log_rows[r0:r1], merge_, x)
            pooled += [log_p.exp() if merge_ == "logmean" else pool(p_rows[r0:r1], merge_, x), log_p]
        yield tuple(pooled)


def pkl_chunk_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    chunks: torch.Tensor,
    idx: torch.Tensor,
    val: torch.Tensor,
    *,
    temperature: float = 1.0,
    merge="first",
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """P-KL per chunk (SPEC §4), without the tau^2 factor: a ``[K]`` tensor. ``merge``: one name or a pair
    (student_merge, teacher_merge). Differentiable in ``student_logits`` and in ``val`` (W's values).

    L(k) = sum_t p_t[t] (log p_t[t] - log(q[t] + eps)),  q = W^T p_s,  terms with p_t[t] = 0 are 0.
    """
    losses = []
    for p_s, _, p_t, log_pt in _pooled_rows(student_logits, teacher_logits, chunks, temperature, merge,
                                            student_targets, teacher_targets, dtype):
        q = project(p_s, idx, val, teacher_logits.shape[-1])
        # Where p_t is 0 the term is 0 (and must not become 0 * log 0 = NaN); elsewhere it propagates NaN.
        safe_log_pt = torch.where(p_t == 0, torch.zeros_like(log_pt), log_pt)
        terms = torch.where(p_t == 0, torch.zeros_like(p_t), p_t * (safe_log_pt - (q + PKL_EPS).log()))
        losses.append(terms.sum())
    if not losses:
        return student_logits.new_zeros((0,), dtype=dtype)
    return torch.stack(losses)


def reduce(chunk_losses: torch.Tensor, temperature: float, reduction: str) -> torch.Tensor:
    """SPEC §4 reduction: tau^2 * (sum / K | sum | per chunk); K = 0 gives 0."""
    scaled = chunk_losses * (temperature**2)
    if reduction == "none":
        return scaled
    if reduction == "sum":
        return scaled.sum()
    if reduction == "mean":
        return scaled.sum() / max(chunk_losses.shape[0], 1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def pkl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    chunks: torch.Tensor,
    idx: torch.Tensor,
    val: torch.Tensor,
    *,
    temperature: float = 1.0,
    merge="first",
    reduction: str = "mean",
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Reduced P-KL (SPEC §4), differentiable in ``student_logits`` and ``val`` through autograd."""
    losses = pkl_chunk_losses(
        student_logits, teacher_logits, chunks, idx, val, temperature=temperature, merge=merge,
        student_targets=student_targets, teacher_targets=teacher_targets, dtype=dtype,
    )  # fmt: skip
    return reduce(losses, temperature, reduction)


# ------------------------------------------------------------------------------------------ hybrid, ULD


def matched_divergence(p_t: torch.Tensor, p_s: torch.Tensor, matched: str, beta: float) -> torch.Tensor:
    """The matched term D(p_t, p_s) of SPEC §4, elementwise on raw (not renormalized) probabilities.

    - ``"kl"``: ``p_t (log p_t - log p_s)`` with both logs clamped at eps = 1e-10; 0 where p_t = 0.
    - ``"jsd"``: TRL's generalized JSD on ``p~ = max(p, 1e-8)``: beta = 0 gives ``p~_t (log p~_t - log p~_s)``,
      beta = 1 gives ``p~_s (log p~_s - log p~_t)``, otherwise with ``m = (1 - beta) p~_s + beta p~_t``:
      ``beta p~_t (log p~_t - log m) + (1 - beta) p~_s (log p~_s - log m)``.
    """
    if matched == "kl":
        zero = p_t == 0
        log_t = torch.where(zero, torch.ones_like(p_t), p_t).clamp_min(PKL_EPS).log()
        return torch.where(zero, torch.zeros_like(p_t), p_t * (log_t - p_s.clamp_min(PKL_EPS).log()))
    if matched == "jsd":
        pt, ps = p_t.clamp_min(JSD_CLAMP), p_s.clamp_min(JSD_CLAMP)
        if beta == 0:
            return pt * (pt.log() - ps.log())
        if beta == 1:
            return ps * (ps.log() - pt.log())
        log_m = ((1 - beta) * ps + beta * pt).log()
        return beta * pt * (pt.log() - log_m) + (1 - beta) * ps * (ps.log() - log_m)
    raise ValueError(f"matched must be one of {MATCHED}, got {matched!r}")


def sorted_l1(a: torch.Tensor, b: torch.Tensor, uld_topk: int | None) -> torch.Tensor:
    """``sum_{r < R} |a_r - b_r|`` over the two vectors sorted in descending order (ties: the lower index
    first), the shorter zero-padded, ``R = min(uld_topk, max(len(a), len(b)))`` (SPEC §4)."""
    n = max(a.shape[0], b.shape[0])
    R = n if uld_topk is None else min(uld_topk, n)
    ranked = []
    for x in (a, b):
        top = torch.sort(x, descending=True, stable=True).values[:R]
        ranked.append(torch.cat([top, top.new_zeros(R - top.shape[0])]))
    return (ranked[0] - ranked[1]).abs().sum()


def hybrid_weights(weights, num_pairs: int, teacher_vocab_size: int) -> tuple[float, float]:
    """(w_c, w_u): ``weights`` itself, or for ``"adaptive"`` TRL's ``w_c = C / V_t``, ``w_u = 1 - w_c`` with
    V_t the teacher logit width."""
    if isinstance(weights, str):
        if weights != "adaptive":
            raise ValueError(f"weights: expected 'adaptive' or a pair (w_c, w_u), got {weights!r}")
        w_c = num_pairs / teacher_vocab_size
        return w_c, 1.0 - w_c
    w_c, w_u = weights
    return float(w_c), float(w_u)


def hybrid_chunk_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    chunks: torch.Tensor,
    pairs: torch.Tensor,
    *,
    temperature: float = 1.0,
    merge="first",
    matched: str = "kl",
    beta: float = 0.5,
    uld_topk: int | None = 8192,
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The two terms of the hybrid loss per chunk (SPEC §4), unweighted and without tau^2: ``[K, 2]`` with
    column 0 = ``sum_n D(p_t[t_n], p_s[s_n])`` over the common pairs and column 1 = the sorted L1 over the
    uncommon sets. With no pairs, column 1 is ULD. ``merge``: one name or a pair (student_merge, teacher_merge)."""
    device = student_logits.device
    pairs = pairs.reshape(-1, 2).long().to(device)
    V_s, V_t = student_logits.shape[-1], teacher_logits.shape[-1]
    uncommon_s = torch.ones(V_s, dtype=torch.bool, device=device)
    uncommon_s[pairs[:, 0]] = False
    uncommon_t = torch.ones(V_t, dtype=torch.bool, device=device)
    uncommon_t[pairs[:, 1]] = False
    rows = []
    for p_s, _, p_t, _ in _pooled_rows(student_logits, teacher_logits, chunks, temperature, merge, student_targets,
                                       teacher_targets, dtype):
        term_c = matched_divergence(p_t[pairs[:, 1]], p_s[pairs[:, 0]], matched, beta).sum()
        term_u = sorted_l1(p_s[uncommon_s], p_t[uncommon_t], uld_topk)
        rows.append(torch.stack([term_c, term_u]))
    if not rows:
        return student_logits.new_zeros((0, 2), dtype=dtype)
    return torch.stack(rows)


def hybrid_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    chunks: torch.Tensor,
    pairs: torch.Tensor,
    *,
    weights="adaptive",
    reduction: str = "mean",
    temperature: float = 1.0,
    **kwargs,
) -> torch.Tensor:
    """Reduced hybrid loss ``tau^2 * (w_c term_c + w_u term_u)`` (SPEC §4); ``kwargs`` as for
    :func:`hybrid_chunk_losses`. GOLD, H-KL and (with no pairs) ULD."""
    terms = hybrid_chunk_losses(student_logits, teacher_logits, chunks, pairs, temperature=temperature, **kwargs)
    w_c, w_u = hybrid_weights(weights, pairs.reshape(-1, 2).shape[0], teacher_logits.shape[-1])
    return reduce(w_c * terms[:, 0] + w_u * terms[:, 1], temperature, reduction)


# ------------------------------------------------------------------------------------------ KD


def kd_chunk_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    chunks: torch.Tensor,
    *,
    temperature: float = 1.0,
    merge="first",
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Same-vocabulary KD per chunk (SPEC §4), without tau^2: ``sum_{v : p_t[v] != 0} p_t[v] (log p_t[v] -
    log p_s[v])``, the exact KL of the pooled vectors (no eps), both logs computed in log space (:func:`log_pool`).
    ``merge``: one name or a pair (student_merge, teacher_merge)."""
    losses = []
    for _, log_ps, p_t, log_pt in _pooled_rows(student_logits, teacher_logits, chunks, temperature, merge,
                                               student_targets, teacher_targets, dtype):
        zero = p_t == 0
        safe_log_t = torch.where(zero, torch.zeros_like(log_pt), log_pt)
        losses.append(torch.where(zero, torch.zeros_like(p_t), p_t * (safe_log_t - log_ps)).sum())
    if not losses:
        return student_logits.new_zeros((0,), dtype=dtype)
    return torch.stack(losses)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, chunks: torch.Tensor, *,
            reduction: str = "mean", temperature: float = 1.0, **kwargs) -> torch.Tensor:
    """Reduced KD (SPEC §4); ``kwargs`` as for :func:`kd_chunk_losses`."""
    losses = kd_chunk_losses(student_logits, teacher_logits, chunks, temperature=temperature, **kwargs)
    return reduce(losses, temperature, reduction)


def _real_tokens(ends: torch.Tensor, length: int, left_padded: bool) -> list[tuple[int, int]] | None:
    """(position, end) of the non-empty real tokens of one sequence, or None when its input is invalid."""
    total = ends.shape[0]
    if not 0 <= length <= total:
        return None
    real = ends[total - length :] if left_padded else ends[:length]
    tokens, previous = [], 0
    for position, end in enumerate(real.tolist()):
        if end < previous:
            return None
        if end > previous:
            tokens.append((position, end))
        previous = end
    return tokens


def align_spans(
    student_ends: torch.Tensor,
    student_lengths: torch.Tensor,
    student_left_padded: bool,
    teacher_ends: torch.Tensor,
    teacher_lengths: torch.Tensor,
    teacher_left_padded: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunks from token end offsets (SPEC §2), with the outputs of ``xtoken::align_spans``.

    ``*_ends [B, T]``: where each token's byte span ends; over a sequence's real tokens the ends never
    decrease, and a token is empty when its end equals the previous one (0 before the first).
    ``*_lengths [B]``: real tokens per sequence, the rest being padding on the right (or the left).

    Returns ``chunks [B, min(T_s, T_t), 4]`` (the first ``counts[b]`` rows of sequence b are its chunks
    ``(s0, s1, t0, t1)`` over flattened predictor rows ``b * T + j``, the rest -1), ``counts [B]`` (-1 for
    a sequence whose lengths or ends are invalid) and ``dropped [B, 2, 3]``: the non-empty tokens of each
    side (student, teacher) in no kept chunk, by reason (``DROP_REASONS``).
    """
    batch = student_ends.shape[0]
    sides = [
        (student_ends.cpu(), student_lengths.cpu(), student_left_padded),
        (teacher_ends.cpu(), teacher_lengths.cpu(), teacher_left_padded),
    ]
    capacity = min(student_ends.shape[1], teacher_ends.shape[1])
    chunks = torch.full((batch, capacity, 4), -1, dtype=torch.int32)
    counts = torch.full((batch,), -1, dtype=torch.int32)
    dropped = torch.zeros((batch, 2, len(DROP_REASONS)), dtype=torch.int32)
    for b in range(batch):
        tokens = [_real_tokens(ends[b], int(lengths[b]), left) for ends, lengths, left in sides]
        if tokens[0] is None or tokens[1] is None:
            continue
        # First flattened row of the sequence's real tokens, per side.
        row0 = [b * ends.shape[1] + (ends.shape[1] - int(lengths[b]) if left else 0) for ends, lengths, left in sides]
        common = sorted({end for _, end in tokens[0]} & {end for _, end in tokens[1]})
        kept = []
        for low, high in zip([0] + common[:-1], common):
            targets = [[position for position, end in side if low < end <= high] for side in tokens]
            if targets[0][0] == 0 or targets[1][0] == 0:
                reason = "no_predictor"
            elif any(t != list(range(t[0], t[-1] + 1)) for t in targets):
                reason = "empty_inside"
            else:
                # Targets [first, last] have predictor rows [first - 1, last).
                kept.append([row for s in (0, 1) for row in (row0[s] + targets[s][0] - 1, row0[s] + targets[s][-1])])
                continue
            for s in (0, 1):
                dropped[b, s, DROP_REASONS.index(reason)] += len(targets[s])
        last = common[-1] if common else 0
        for s in (0, 1):
            dropped[b, s, DROP_REASONS.index("truncated")] = sum(end > last for _, end in tokens[s])
        counts[b] = len(kept)
        if kept:
            chunks[b, : len(kept)] = torch.tensor(kept, dtype=torch.int32)
    return chunks, counts, dropped
