"""Plain-PyTorch reference of xtoken's computations: SPEC.md made executable.

Everything here is written for clarity, not speed: loops over chunks, float64 arithmetic
(``dtype=torch.float64`` by default), and autograd for the gradients. The C++ and CUDA kernels are
tested against these functions; the benchmarks use them as a baseline.
"""

from __future__ import annotations

import torch

__all__ = [
    "MERGES", "REDUCTIONS", "PKL_EPS", "DROP_REASONS", "pool", "project", "pkl_chunk_losses", "pkl_loss", "reduce",
    "align_spans",
]

MERGES = ("first", "mean", "bayes")
REDUCTIONS = ("mean", "sum", "none")
PKL_EPS = 1e-10
DROP_REASONS = ("no_predictor", "empty_inside", "truncated")


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
    raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")


def project(probs: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, teacher_vocab_size: int) -> torch.Tensor:
    """q = W^T p for every row of ``probs [N, V_s]``, with W given as ELL ``idx, val [V_s, P]``."""
    q = probs.new_zeros(probs.shape[:-1] + (teacher_vocab_size,))
    for slot in range(idx.shape[1]):
        present = idx[:, slot] >= 0
        weights = val[present, slot].to(probs.dtype)
        q = q.index_add(-1, idx[present, slot].long(), probs[..., present] * weights)
    return q


def pkl_chunk_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    chunks: torch.Tensor,
    idx: torch.Tensor,
    val: torch.Tensor,
    *,
    temperature: float = 1.0,
    merge: str = "first",
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """P-KL per chunk (SPEC §4), without the tau^2 factor: a ``[K]`` tensor.

    L(k) = sum_t p_t[t] (log p_t[t] - log(q[t] + eps)),  q = W^T p_s,  terms with p_t[t] = 0 are 0.
    """
    zs = student_logits.reshape(-1, student_logits.shape[-1]).to(dtype)
    zt = teacher_logits.reshape(-1, teacher_logits.shape[-1]).to(dtype)
    ps_rows = torch.softmax(zs / temperature, dim=-1)
    pt_rows = torch.softmax(zt / temperature, dim=-1)
    losses = []
    for s0, s1, t0, t1 in chunks.tolist():
        ts = None if student_targets is None else student_targets.reshape(-1)[s0:s1]
        tt = None if teacher_targets is None else teacher_targets.reshape(-1)[t0:t1]
        p_s = pool(ps_rows[s0:s1], merge, ts)
        p_t = pool(pt_rows[t0:t1], merge, tt)
        q = project(p_s, idx, val, zt.shape[-1])
        # Where p_t is 0 the term is 0 (and must not become 0 * log 0 = NaN); elsewhere it propagates NaN.
        safe_pt = torch.where(p_t == 0, torch.ones_like(p_t), p_t)
        terms = torch.where(p_t == 0, torch.zeros_like(p_t), p_t * (safe_pt.log() - (q + PKL_EPS).log()))
        losses.append(terms.sum())
    if not losses:
        return zs.new_zeros((0,))
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
    merge: str = "first",
    reduction: str = "mean",
    student_targets: torch.Tensor | None = None,
    teacher_targets: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Reduced P-KL (SPEC §4), differentiable in ``student_logits`` through autograd."""
    losses = pkl_chunk_losses(
        student_logits, teacher_logits, chunks, idx, val, temperature=temperature, merge=merge,
        student_targets=student_targets, teacher_targets=teacher_targets, dtype=dtype,
    )  # fmt: skip
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
