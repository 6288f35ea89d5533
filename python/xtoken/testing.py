"""Random but realistic inputs for the losses, shared by the tests and the benchmarks (so both always
exercise the same shapes of data)."""

from __future__ import annotations

import torch

from .projection import Projection

__all__ = [
    "random_projection", "random_chunks", "random_targets", "random_pairs", "loss_and_grad", "CHUNK_SHAPES",
]  # fmt: skip

# (student rows, teacher rows) of a chunk: 1:1, 1:N, M:1, M:N.
CHUNK_SHAPES = ((1, 1), (1, 2), (1, 3), (2, 1), (3, 1), (2, 2), (2, 3), (3, 2))


def random_projection(
    student_vocab: int,
    teacher_vocab: int,
    *,
    top_k: int = 4,
    exact_fraction: float = 0.85,
    empty_fraction: float = 0.01,
    generator: torch.Generator | None = None,
) -> Projection:
    """A W shaped like a real one: most rows one-hot (exact matches), the rest split over 2..top_k
    teacher tokens with decaying weights (the decomposition pass), a few rows empty."""
    g = generator
    V_s = student_vocab
    idx = torch.full((V_s, top_k), -1, dtype=torch.int32)
    val = torch.zeros((V_s, top_k), dtype=torch.float32)
    kind = torch.rand(V_s, generator=g)
    pieces = torch.randint(2, top_k + 1, (V_s,), generator=g) if top_k >= 2 else torch.ones(V_s, dtype=torch.long)
    pieces = torch.where(kind < exact_fraction, torch.ones_like(pieces), pieces)
    pieces = torch.where(kind > 1 - empty_fraction, torch.zeros_like(pieces), pieces)
    # Distinct teacher ids per row: a random offset plus a random stride keeps them apart.
    base = torch.randint(0, teacher_vocab, (V_s,), generator=g)
    step = torch.randint(1, max(2, teacher_vocab // top_k), (V_s,), generator=g)
    decay = torch.tensor([0.9 * 0.1**i for i in range(top_k)], dtype=torch.float64)
    for j in range(top_k):
        present = pieces > j
        ids = (base + j * step) % teacher_vocab
        idx[:, j] = torch.where(present, ids.to(torch.int32), idx[:, j])
        val[:, j] = torch.where(present, decay[j].float(), val[:, j])
    sums = val.double().sum(dim=1, keepdim=True)
    val = torch.where(sums > 0, val.double() / sums.clamp_min(1e-300), 0.0).float()
    return Projection(idx, val, teacher_vocab_size=teacher_vocab)


def random_chunks(
    batch: int,
    student_len: int,
    teacher_len: int,
    *,
    one_to_one: float = 0.9,
    drop: float = 0.05,
    shapes: tuple[tuple[int, int], ...] = CHUNK_SHAPES,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A chunk table over ``batch`` sequences of ``student_len`` / ``teacher_len`` predictor rows (rows
    flattened ``b * len + j``): student rows sorted and disjoint, about ``one_to_one`` of the chunks 1:1,
    the rest drawn from ``shapes``, and a fraction ``drop`` left out (as alignment drops chunks)."""
    g = generator
    rows = []
    multi = [s for s in shapes if s != (1, 1)] or [(1, 1)]
    for b in range(batch):
        s, t = 0, 0
        while True:
            if torch.rand((), generator=g) < one_to_one:
                m, n = 1, 1
            else:
                m, n = multi[int(torch.randint(0, len(multi), (), generator=g))]
            if s + m > student_len or t + n > teacher_len:
                break
            if torch.rand((), generator=g) >= drop:
                rows.append((b * student_len + s, b * student_len + s + m, b * teacher_len + t, b * teacher_len + t + n))
            s, t = s + m, t + n
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 4)


def random_targets(rows: int, vocab: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Realized next tokens of ``rows`` rows (int64, in [0, vocab))."""
    return torch.randint(0, vocab, (rows,), generator=generator, dtype=torch.int64)


def random_pairs(student_vocab: int, teacher_vocab: int, count: int, *,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` one-to-one common pairs (int32 ``[count, 2]``, sorted by student id): distinct random student
    ids matched with distinct random teacher ids."""
    students = torch.randperm(student_vocab, generator=generator)[:count].sort().values
    teachers = torch.randperm(teacher_vocab, generator=generator)[:count]
    return torch.stack([students, teachers], dim=1).to(torch.int32)


def loss_and_grad(loss_fn, logits: torch.Tensor, *inputs, device=None, dtype: torch.dtype | None = None,
                  grad_scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``loss_fn(z, *inputs)`` and its gradient in ``z``, for ``z`` a fresh leaf copy of ``logits`` on ``device``
    in ``dtype`` (each default: unchanged); tensors in ``inputs`` are moved to ``device``. The loss is summed
    and scaled by ``grad_scale`` (an incoming gradient that is not 1). Returns both on the CPU, detached.

    ``logits`` itself is never made to require gradients, so the same tensor serves several devices or dtypes
    in a row (``logits.to(device)`` is ``logits`` itself when nothing changes, and a non-leaf copy otherwise)."""
    z = logits.detach().to(device=device, dtype=dtype).requires_grad_()
    moved = (t.to(device) if isinstance(t, torch.Tensor) and device is not None else t for t in inputs)
    loss = loss_fn(z, *moved)
    (grad_scale * loss.sum()).backward()
    return loss.detach().cpu(), z.grad.cpu()
