"""Baseline implementations the benchmarks (and some tests) compare against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .projection import Projection
from .reference import PKL_EPS

__all__ = [
    "nemo_style_pkl_loss", "coo_transpose", "GoldBatch", "gold_batch", "trl_chunks", "trl_uld_loss", "trl_gold_loss",
    "xtoken_gold_as_trl",
]  # fmt: skip


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


# ------------------------------------------------------------------------------------------ TRL GOLD


@dataclass
class GoldBatch:
    """A batch laid out as TRL's GOLD trainer hands it to ``ULDLoss``: right-padded ``[B, T]`` ids with
    labels -100 outside the completion, completion-relative UTF-8 byte offsets ``[B, T, 2]`` ((0, 0) on the
    prompt and padding, (len, len) on the appended EOS), and logits ``[B, T, V]`` for every position."""

    student_input_ids: torch.Tensor
    teacher_input_ids: torch.Tensor
    student_labels: torch.Tensor
    teacher_labels: torch.Tensor
    student_byte_offsets: torch.Tensor
    teacher_byte_offsets: torch.Tensor
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor

    def targets(self, side: str) -> torch.Tensor:
        """The realized next token of every flattened row (``b * T + j`` -> ``input_ids[b, j + 1]``, -1 for
        the last position): what ``merge="bayes"`` reads."""
        ids = self.student_input_ids if side == "student" else self.teacher_input_ids
        return torch.cat([ids[:, 1:], ids.new_full((ids.shape[0], 1), -1)], dim=1).reshape(-1)


def _encode_sequence(tokenizer, prompt: str, completion: str, bos: bool) -> tuple[list[int], list[tuple[int, int]], int]:
    prompt_ids = ([tokenizer.roles["bos"]] if bos and "bos" in tokenizer.roles else []) + tokenizer.encode(prompt)
    completion_ids = tokenizer.encode(completion)
    # Byte-level tokens tile the text, so each token's span is the running sum of its surface bytes.
    offsets, end = [], 0
    for token in completion_ids:
        start, end = end, end + len(tokenizer.surface_bytes[token] or b"")
        offsets.append((start, end))
    ids = prompt_ids + completion_ids + [tokenizer.roles["eos"]]
    spans = [(0, 0)] * len(prompt_ids) + offsets + [(end, end)]
    return ids, spans, len(prompt_ids)


def gold_batch(
    student_tokenizer,
    teacher_tokenizer,
    prompts: list[str],
    completions: list[str],
    *,
    student_vocab_size: int,
    teacher_vocab_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    realized_boost: float = 6.0,
    generator: torch.Generator | None = None,
) -> GoldBatch:
    """Encode ``prompts[b] + completions[b]`` with both tokenizers (a BOS on the student side, an EOS on both)
    the way GOLD's off-policy path does, and draw logits: Gaussian (std 2) with ``realized_boost`` added to
    each position's realized next token, so that the model-like probabilities of realized tokens are
    not vanishingly small."""
    from .tokenizer import load_tokenizer

    sides = []
    for tokenizer, bos, vocab in ((student_tokenizer, True, student_vocab_size),
                                  (teacher_tokenizer, False, teacher_vocab_size)):
        tok = load_tokenizer(tokenizer)
        encoded = [_encode_sequence(tok, p, c, bos) for p, c in zip(prompts, completions, strict=True)]
        T = max(len(ids) for ids, _, _ in encoded)
        B = len(encoded)
        ids = torch.full((B, T), tok.roles.get("pad", tok.roles["eos"]), dtype=torch.int64)
        labels = torch.full((B, T), -100, dtype=torch.int64)
        spans = torch.zeros((B, T, 2), dtype=torch.int64)
        for b, (seq, offs, n_prompt) in enumerate(encoded):
            ids[b, : len(seq)] = torch.tensor(seq)
            labels[b, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
            spans[b, : len(seq)] = torch.tensor(offs)
        logits = torch.randn(B, T, vocab, generator=generator) * 2
        next_ids = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
        logits.scatter_add_(2, next_ids.unsqueeze(2), torch.full((B, T, 1), realized_boost))
        sides.append((ids, labels, spans, logits.to(dtype)))
    (s_ids, s_labels, s_spans, zs), (t_ids, t_labels, t_spans, zt) = sides
    dev = torch.device(device)
    return GoldBatch(s_ids.to(dev), t_ids.to(dev), s_labels.to(dev), t_labels.to(dev), s_spans.to(dev),
                     t_spans.to(dev), zs.to(dev), zt.to(dev))


def trl_chunks(batch: GoldBatch, *, skip_eos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk table (SPEC.md §1) of TRL's extended-ULD alignment with ``uld_token_merge_strategy="bayesian"``,
    and each chunk's share of TRL's loss: ``1 / (G_b * B)`` for a chunk of sequence b with G_b groups (TRL
    averages over the groups of a sequence, then over the sequences).

    The groups are TRL's own (``ULDLoss._align_by_byte_offsets`` on the completion spans, EOS skipped, groups
    with an empty side dropped, the first group dropped when a completion starts at position 0); group
    position i of a completion starting at ``start`` is predicted by row ``start - 1 + i``.
    """
    from trl.experimental.gold.gold_trainer import ULDLoss

    B, T_s = batch.student_labels.shape
    T_t = batch.teacher_labels.shape[1]
    rows: list[tuple[int, int, int, int]] = []
    shares: list[float] = []
    for b in range(B):
        spans = []
        for labels, offsets in ((batch.student_labels[b], batch.student_byte_offsets[b]),
                                (batch.teacher_labels[b], batch.teacher_byte_offsets[b])):
            valid = (labels != -100).nonzero().flatten().tolist()
            start, size = (valid[0], len(valid) - int(skip_eos)) if valid else (0, 0)
            spans.append((start, size, offsets[start : start + size].tolist()))
        (s_start, s_size, s_offs), (t_start, t_size, t_offs) = spans
        if s_size <= 0 or t_size <= 0:
            continue
        s_groups, t_groups = ULDLoss._align_by_byte_offsets(s_offs, t_offs)
        pairs = [(sg, tg) for sg, tg in zip(s_groups, t_groups) if sg and tg]
        if s_start == 0 or t_start == 0:
            pairs = pairs[1:]
        for sg, tg in pairs:
            rows.append((b * T_s + s_start - 1 + sg[0], b * T_s + s_start + sg[-1],
                         b * T_t + t_start - 1 + tg[0], b * T_t + t_start + tg[-1]))
            shares.append(1.0 / (len(pairs) * B))
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 4), torch.tensor(shares, dtype=torch.float64)


def trl_uld_loss(student_tokenizer, teacher_tokenizer, *, beta: float = 0.0, merge: str = "bayesian",
                 hybrid: bool = True, device: torch.device | str | None = None):
    """TRL's ``ULDLoss`` (``trl.experimental.gold``) in GOLD's extended, hybrid configuration with adaptive
    weights, temperatures 1, no cross-entropy and EOS skipped on both sides (TRL's defaults otherwise)."""
    from types import SimpleNamespace

    from trl.experimental.gold.gold_trainer import ULDLoss

    from .tokenizer import load_tokenizer

    config = SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
        uld_teacher_temperature=1.0, uld_skip_student_eos=True, uld_skip_teacher_eos=True, use_extended_uld=True,
        uld_token_merge_strategy=merge, uld_use_hybrid_loss=hybrid, uld_hybrid_matched_weight=None,
        uld_hybrid_unmatched_weight=None, beta=beta,
    )  # fmt: skip
    return ULDLoss(config, load_tokenizer(student_tokenizer), load_tokenizer(teacher_tokenizer), device=device)


def trl_gold_loss(uld, batch: GoldBatch, student_logits: torch.Tensor) -> torch.Tensor:
    """TRL's GOLD distillation loss of ``student_logits`` (``[B, T_s, V_s]``) on ``batch``."""
    return uld(student_logits, batch.teacher_logits, batch.student_labels, batch.teacher_labels,
               batch.student_input_ids, batch.teacher_input_ids, batch.student_byte_offsets,
               batch.teacher_byte_offsets)


def xtoken_gold_as_trl(student_logits: torch.Tensor, batch: GoldBatch, chunks: torch.Tensor, shares: torch.Tensor,
                       pairs: torch.Tensor) -> torch.Tensor:
    """:func:`xtoken.gold_loss` in the configuration that reproduces :func:`trl_uld_loss` (bayesian merge,
    beta = 0): ``merge="bayes"``, ``matched="jsd"`` with ``beta=0``, all ranks (``uld_topk=None``), adaptive
    weights, the raw common pairs (``Projection.common_pairs("raw")``) and TRL's normalisation (each chunk
    weighted by its share from :func:`trl_chunks`)."""
    from .losses import gold_loss

    losses = gold_loss(
        student_logits, batch.teacher_logits, chunks.to(student_logits.device), pairs.to(student_logits.device),
        merge="bayes", matched="jsd", beta=0.0, uld_topk=None, weights="adaptive", reduction="none",
        student_targets=batch.targets("student"), teacher_targets=batch.targets("teacher"),
    )  # fmt: skip
    return (losses * shares.to(losses)).sum()
