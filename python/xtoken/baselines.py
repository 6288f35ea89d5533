"""Baseline implementations the benchmarks (and some tests) compare against."""

from __future__ import annotations

import torch

from .projection import Projection
from .reference import PKL_EPS

__all__ = ["nemo_style_pkl_loss", "coo_transpose"]


def coo_transpose(projection: Projection, device: torch.device | str) -> torch.Tensor:
    """W^T as a coalesced float32 COO matrix ``[V_t, V_s]``, as NeMo-RL stores its projection."""
    present = projection.idx >= 0
    rows = torch.arange(projection.student_vocab_size).unsqueeze(1).expand_as(projection.idx)[present.cpu()]
    cols = projection.idx.cpu()[present.cpu()].long()
    indices = torch.stack([cols, rows.long()])
    values = projection.val.cpu()[present.cpu()]
    shape = (projection.teacher_vocab_size, projection.student_vocab_size)
    return torch.sparse_coo_tensor(indices, values, shape, check_invariants=False).coalesce().to(device)


def nemo_style_pkl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    chunks: torch.Tensor,
    projection_t: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """P-KL computed the way NeMo-RL's X-Token code does it (``merge="first"``, no vocabulary top-k): a
    full float32 softmax of every student row, ``torch.sparse.mm`` with W^T as a COO matrix, log, KL over
    the full teacher vocabulary. ``projection_t`` is :func:`coo_transpose`'s output."""
    tau = float(temperature)
    zs = student_logits.reshape(-1, student_logits.shape[-1])
    zt = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    probs = torch.softmax(zs.float() / tau, dim=-1)
    projected = torch.sparse.mm(projection_t, probs.t()).t()  # [N_s, V_t] float32
    s_rows, t_rows = chunks[:, 0].long(), chunks[:, 2].long()
    q = projected.index_select(0, s_rows)
    log_pt = torch.log_softmax(zt.float().index_select(0, t_rows) / tau, dim=-1)
    if q.shape[1] < log_pt.shape[1]:
        q = torch.nn.functional.pad(q, (0, log_pt.shape[1] - q.shape[1]))
    kl = (log_pt.exp() * (log_pt - torch.log(q + PKL_EPS))).sum(-1)
    return tau**2 * kl.sum() / max(chunks.shape[0], 1)
