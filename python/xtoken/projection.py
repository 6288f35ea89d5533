"""The projection W from student tokens to teacher tokens (SPEC.md §1, §5).

W is stored as ELL: ``idx [V_s, P]`` (int32 teacher ids, -1 = empty slot) and ``val [V_s, P]``
(float32 weights; each row sums to 1, or 0 for an unmapped row). The kernels also read W's transpose
(``col_ptr [V_t + 1]``, ``col_src``, ``col_val``), built once here, so that both ``W^T p`` and ``W g``
are gathers: no atomics, deterministic results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Projection", "ProjectionColumns"]

ROW_SUM_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ProjectionColumns:
    """W's transpose as a gather table: teacher token t is fed by student tokens
    ``col_src[col_ptr[t]:col_ptr[t+1]]`` with weights ``col_val[...]``."""

    col_ptr: torch.Tensor  # int32 [V_t + 1]
    col_src: torch.Tensor  # int32 [nnz]
    col_val: torch.Tensor  # float32 [nnz]


class Projection:
    """A sparse, row-stochastic projection W: student vocabulary -> teacher vocabulary.

    Args:
        idx: int32 ``[V_s, P]`` teacher token ids, -1 for an empty slot.
        val: float32 ``[V_s, P]`` weights; each row sums to 1 (or 0 when the row is empty).
        teacher_vocab_size: the teacher vocabulary width W is defined over (default: the largest id + 1).
            A teacher whose logits are wider (a padded lm_head) is handled by the losses, which extend W
            with empty columns.
        metadata: free-form strings (tokenizer names, hashes, build parameters), kept with W when saved.
    """

    def __init__(
        self,
        idx: torch.Tensor,
        val: torch.Tensor,
        *,
        teacher_vocab_size: int | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        idx, val = torch.as_tensor(idx), torch.as_tensor(val)
        if idx.dim() != 2 or idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"idx: expected an integer [V_s, P] tensor, got {idx.dtype} {tuple(idx.shape)}")
        if val.shape != idx.shape or not val.is_floating_point():
            raise ValueError(f"val: expected a float tensor shaped like idx {tuple(idx.shape)}, got "
                             f"{val.dtype} {tuple(val.shape)}")
        if val.device != idx.device:
            raise ValueError(f"val is on {val.device} but idx is on {idx.device}")
        idx, val = idx.to(torch.int32).contiguous(), val.to(torch.float32).contiguous()
        largest = int(idx.max()) if idx.numel() else -1
        if teacher_vocab_size is None:
            teacher_vocab_size = largest + 1
        if teacher_vocab_size < 1:
            raise ValueError("teacher_vocab_size: W maps no student token anywhere; pass teacher_vocab_size")
        if largest >= teacher_vocab_size or (idx.numel() and int(idx.min()) < -1):
            raise ValueError(f"idx: teacher ids must lie in [-1, {teacher_vocab_size}); found "
                             f"{int(idx.min())}..{largest}")
        if not bool(torch.isfinite(val).all()) or bool((val < 0).any()):
            raise ValueError("val: weights must be finite and >= 0")
        if bool(((idx < 0) & (val != 0)).any()):
            raise ValueError("val: an empty slot (idx = -1) must have weight 0")
        row_sums = val.double().sum(dim=1)
        bad = ~(((row_sums - 1).abs() <= ROW_SUM_TOLERANCE) | (row_sums == 0))
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise ValueError(f"val: every row must sum to 1 (or 0 when empty); row {row} sums to "
                             f"{float(row_sums[row]):.6g}")
        self.idx = idx
        self.val = val
        self.teacher_vocab_size = int(teacher_vocab_size)
        self.metadata = dict(metadata or {})
        self._columns: dict[int, ProjectionColumns] = {}
        self._moved: dict[torch.device, Projection] = {}

    # ------------------------------------------------------------------ shape and placement
    @property
    def student_vocab_size(self) -> int:
        return self.idx.shape[0]

    @property
    def top_k(self) -> int:
        return self.idx.shape[1]

    @property
    def device(self) -> torch.device:
        return self.idx.device

    def __repr__(self) -> str:
        return (f"Projection(V_s={self.student_vocab_size}, V_t={self.teacher_vocab_size}, "
                f"top_k={self.top_k}, nnz={self.nnz}, device={self.device})")

    @property
    def nnz(self) -> int:
        return int((self.idx >= 0).sum())

    def to(self, device: torch.device | str) -> "Projection":
        """W on ``device`` (cached, so calling this every step costs nothing after the first time)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.device:
            return self
        if device not in self._moved:
            moved = Projection.__new__(Projection)
            moved.idx = self.idx.to(device)
            moved.val = self.val.to(device)
            moved.teacher_vocab_size = self.teacher_vocab_size
            moved.metadata = self.metadata
            moved._columns = {v: ProjectionColumns(*(t.to(device) for t in (c.col_ptr, c.col_src, c.col_val)))
                              for v, c in self._columns.items()}
            moved._moved = {}
            self._moved[device] = moved
        return self._moved[device]

    # ------------------------------------------------------------------ constructors
    @classmethod
    def identity(cls, vocab_size: int, *, device: torch.device | str = "cpu") -> "Projection":
        """The identity map of a shared vocabulary (plain KD through the projection machinery)."""
        idx = torch.arange(vocab_size, dtype=torch.int32, device=device).unsqueeze(1)
        val = torch.ones(vocab_size, 1, dtype=torch.float32, device=device)
        return cls(idx, val, teacher_vocab_size=vocab_size, metadata={"kind": "identity"})

    @classmethod
    def from_dense(cls, matrix: torch.Tensor, top_k: int = 4) -> "Projection":
        """Keep the ``top_k`` largest non-negative weights of each row of a dense ``[V_s, V_t]`` matrix and
        renormalize each row to sum 1 (rows with no positive weight stay empty). For small vocabularies."""
        if matrix.dim() != 2:
            raise ValueError(f"matrix: expected [V_s, V_t], got {tuple(matrix.shape)}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not bool(torch.isfinite(matrix).all()) or bool((matrix < 0).any()):
            raise ValueError("matrix: weights must be finite and >= 0")
        k = min(top_k, matrix.shape[1])
        weights, ids = matrix.double().topk(k, dim=1)  # ties: torch.topk order, then stable by value
        present = weights > 0
        sums = (weights * present).sum(dim=1, keepdim=True)
        val = torch.where(present, weights / sums.clamp_min(1e-300), torch.zeros_like(weights))
        idx = torch.where(present, ids, torch.full_like(ids, -1))
        return cls(idx.to(torch.int32), val.to(torch.float32), teacher_vocab_size=matrix.shape[1])

    def to_dense(self) -> torch.Tensor:
        """W as a dense float32 ``[V_s, V_t]`` matrix (small vocabularies and tests only)."""
        dense = torch.zeros(self.student_vocab_size, self.teacher_vocab_size, device=self.device)
        rows = torch.arange(self.student_vocab_size, device=self.device).unsqueeze(1).expand_as(self.idx)
        present = self.idx >= 0
        dense.index_put_((rows[present].long(), self.idx[present].long()), self.val[present], accumulate=True)
        return dense

    def pad_to(self, student_vocab_size: int) -> "Projection":
        """W with empty rows appended up to ``student_vocab_size`` (a student with a padded lm_head)."""
        extra = student_vocab_size - self.student_vocab_size
        if extra < 0:
            raise ValueError(f"student_vocab_size {student_vocab_size} < W's {self.student_vocab_size} rows")
        if extra == 0:
            return self
        idx = torch.cat([self.idx, self.idx.new_full((extra, self.top_k), -1)])
        val = torch.cat([self.val, self.val.new_zeros((extra, self.top_k))])
        return Projection(idx, val, teacher_vocab_size=self.teacher_vocab_size, metadata=self.metadata)

    # ------------------------------------------------------------------ the transpose
    def columns(self, teacher_width: int | None = None) -> ProjectionColumns:
        """W's transpose for teacher logits of width ``teacher_width`` (>= teacher_vocab_size; the
        extra columns are empty). Built once per width and cached."""
        width = self.teacher_vocab_size if teacher_width is None else int(teacher_width)
        if width < self.teacher_vocab_size:
            raise ValueError(f"teacher logits have {width} columns but W maps into {self.teacher_vocab_size} "
                             "teacher tokens")
        if width not in self._columns:
            present = self.idx >= 0
            rows = torch.arange(self.student_vocab_size, device=self.device, dtype=torch.int64)
            rows = rows.unsqueeze(1).expand_as(self.idx)[present]
            cols = self.idx[present].long()
            order = torch.argsort(cols * self.student_vocab_size + rows)  # by teacher id, then student id
            counts = torch.bincount(cols, minlength=width)
            col_ptr = torch.zeros(width + 1, dtype=torch.int64, device=self.device)
            col_ptr[1:] = torch.cumsum(counts, 0)
            self._columns[width] = ProjectionColumns(
                col_ptr.to(torch.int32), rows[order].to(torch.int32).contiguous(), self.val[present][order].contiguous()
            )
        return self._columns[width]

    def kernel_args(self, teacher_width: int) -> tuple[torch.Tensor, ...]:
        """(idx, val, col_ptr, col_src, col_val): W as the xtoken ops take it."""
        cols = self.columns(teacher_width)
        return (self.idx, self.val, cols.col_ptr, cols.col_src, cols.col_val)
