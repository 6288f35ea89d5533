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
    "kd_chunk_losses", "kd_loss", "chain_levels", "chain_chunk_losses", "chain_loss", "align_spans",
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


# ------------------------------------------------------------------------------------------ chain KL


def chain_levels(chunks: torch.Tensor, num_student_rows: int, num_teacher_rows: int, student_pieces_len: int,
                 teacher_pieces_len: int | None, student_targets: torch.Tensor | None,
                 teacher_targets: torch.Tensor | None) -> list[tuple[int, str, int, int, list[int]]]:
    """The levels of the chain loss (SPEC §4, chain KL): ``(chunk, side, conditioned row, plain row, prefix)``
    per level, where ``side`` is ``"teacher"`` for a level along the teacher's pieces (the student row is
    conditioned on the realized teacher prefix and compared with a teacher row) and ``"student"`` for a
    level along the student's pieces of an M:1 chunk (the teacher row is conditioned on the realized student
    prefix and compared with a student row).

    - 1:1 and 1:N chunks: levels i = 0..n along the teacher's n pieces, all on the student row s0; level i
      reads teacher row t0 + i (t1 for i = n, the level "after the chunk", left out when t1 = N_t).
    - M:1 chunks: levels j = 0..m-1 along the student's m pieces, all on the teacher row t0; level j reads
      student row s0 + j. Without a teacher piece table, as M:N.
    - M:N chunks: level 0 of the first kind (student row s0, teacher row t0, no prefix).
    A level's depth (its prefix length) must be below the piece tables' length L; deeper levels are left out.
    """
    levels = []
    tt = None if teacher_targets is None else teacher_targets.reshape(-1).tolist()
    ts = None if student_targets is None else student_targets.reshape(-1).tolist()
    for k, (s0, s1, t0, t1) in enumerate(chunks.tolist()):
        m, n = s1 - s0, t1 - t0
        if m == 1:
            for i in range(min(n + 1, student_pieces_len)):
                row = t0 + i
                if row >= num_teacher_rows:
                    break
                levels.append((k, "teacher", s0, row, [] if i == 0 else tt[t0 : t0 + i]))
        elif n == 1 and teacher_pieces_len is not None:
            for j in range(min(m, teacher_pieces_len)):
                levels.append((k, "student", t0, s0 + j, [] if j == 0 else ts[s0 : s0 + j]))
        else:
            levels.append((k, "teacher", s0, t0, []))
    return levels


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    """log x, -inf where x = 0, with finite gradients everywhere (the -inf entries get none)."""
    positive = x > 0
    return torch.where(positive, torch.log(torch.where(positive, x, torch.ones_like(x))), float("-inf"))


def _chain_level_terms(cond_logits: torch.Tensor, table: torch.Tensor, prefixes: list[list[int]],
                       plain_logits: torch.Tensor, target_is_plain: bool) -> torch.Tensor:
    """The KL of each level of one kind (``[P]``): ``cond_logits [P, V_c]`` (already divided by tau) conditioned
    through ``table [V_c, L]`` on ``prefixes``, against ``plain_logits [P, V_p]``; the target is the plain
    side when ``target_is_plain`` (teacher-side levels), the conditioned side otherwise."""
    P, V_c = cond_logits.shape
    V_p = plain_logits.shape[1]
    device = cond_logits.device
    table = table.to(device).long()
    depth = torch.tensor([len(x) for x in prefixes], dtype=torch.long, device=device)
    member = torch.ones(P, V_c, dtype=torch.bool, device=device)
    for r in range(table.shape[1]):
        wanted = torch.tensor([x[r] if r < len(x) else -1 for x in prefixes], dtype=torch.long, device=device)
        member &= (depth[:, None] <= r) | (table[:, r][None, :] == wanted[:, None])
    piece = table.t()[depth]  # [P, V_c]: piece `depth` of every token (-1: the token ends there)
    end, outside = V_p, V_p + 1
    bucket = torch.where(piece >= 0, piece, end)
    bucket = torch.where(member, bucket, outside)
    counts = torch.zeros(P, V_p + 2, dtype=torch.long, device=device).scatter_add_(1, bucket, member.long())
    masked = cond_logits.masked_fill(~member, float("-inf"))
    shift = masked.amax(dim=1, keepdim=True).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    weights = torch.exp(masked - shift)
    sums = torch.zeros(P, V_p + 2, dtype=cond_logits.dtype, device=device).scatter_add(1, bucket, weights)
    sums = sums[:, : V_p + 1]
    total = sums.sum(dim=1, keepdim=True)
    log_cond = _safe_log(sums) - torch.log(torch.where(total > 0, total, torch.ones_like(total)))
    present = counts[:, :V_p] > 0
    plain = torch.softmax(plain_logits, dim=1)
    log_plain = torch.cat([
        torch.log_softmax(plain_logits, dim=1).masked_fill(~present, float("-inf")),
        _safe_log((plain * ~present).sum(dim=1, keepdim=True)),
    ], dim=1)  # fmt: skip
    log_target, log_model = (log_plain, log_cond) if target_is_plain else (log_cond, log_plain)
    target = log_target.exp()
    zero = target == 0  # a NaN target propagates
    safe_log_target = torch.where(zero, torch.zeros_like(log_target), log_target)
    terms = torch.where(zero, torch.zeros_like(target), target * (safe_log_target - torch.log(log_model.exp() + PKL_EPS)))
    has_members = member.any(dim=1)
    return torch.where(has_members, terms.sum(dim=1), torch.zeros_like(terms[:, 0]))


def chain_chunk_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    chunks: torch.Tensor,
    student_pieces: torch.Tensor,
    teacher_pieces: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Chain KL per chunk (SPEC §4), without tau^2: a ``[K]`` tensor, the sum of the chunk's level KLs.

    A level compares the distribution of one side's row, conditioned on the other side's realized prefix
    ``x_0..x_{i-1}`` and marginalized onto the next piece, with the other side's row. With ``D`` the piece
    table of the conditioned side, ``S = {v : D[v, r] = x_r for r < i}`` (the level is 0 when S is empty),
    ``bucket(v) = D[v, i]`` or "ends here" (``D[v, i] = -1``) and ``C`` the pieces that occur:

        cond(c)  = sum_{v in S, bucket(v) = c} p(v) / sum_{v in S} p(v)          c in C and "ends here"
        plain(c) = p'(c) for c in C,  plain("ends here") = sum_{u not in C} p'(u)
        L_level  = sum_c target(c) (log target(c) - log(model(c) + eps))

    where target/model are plain/cond on the teacher-side levels and cond/plain on the student-side levels
    (:func:`chain_levels`). ``student_pieces [V_s, L]`` spell student tokens in teacher ids,
    ``teacher_pieces [V_t, L']`` teacher tokens in student ids (:class:`xtoken.PieceTables`)."""
    zs = student_logits.reshape(-1, student_logits.shape[-1]).to(dtype) / temperature
    zt = teacher_logits.reshape(-1, teacher_logits.shape[-1]).to(dtype) / temperature
    K = chunks.shape[0]
    levels = chain_levels(chunks, zs.shape[0], zt.shape[0], student_pieces.shape[1],
                          None if teacher_pieces is None else teacher_pieces.shape[1], student_targets,
                          teacher_targets)
    losses = zs.new_zeros(K)
    for side in ("teacher", "student"):
        chosen = [level for level in levels if level[1] == side]
        if not chosen:
            continue
        chunk_ids = torch.tensor([level[0] for level in chosen], device=zs.device)
        cond_rows = torch.tensor([level[2] for level in chosen], device=zs.device)
        plain_rows = torch.tensor([level[3] for level in chosen], device=zs.device)
        prefixes = [level[4] for level in chosen]
        if side == "teacher":
            terms = _chain_level_terms(zs[cond_rows], student_pieces, prefixes, zt[plain_rows], True)
        else:
            terms = _chain_level_terms(zt[cond_rows], teacher_pieces, prefixes, zs[plain_rows], False)
        losses = losses.index_add(0, chunk_ids, terms)
    return losses


def chain_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, chunks: torch.Tensor,
               student_pieces: torch.Tensor, teacher_pieces: torch.Tensor | None = None, *,
               reduction: str = "mean", temperature: float = 1.0, **kwargs) -> torch.Tensor:
    """Reduced chain KL (SPEC §4); ``kwargs`` as for :func:`chain_chunk_losses`."""
    losses = chain_chunk_losses(student_logits, teacher_logits, chunks, student_pieces, teacher_pieces,
                                temperature=temperature, **kwargs)
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
