"""The projection W from student tokens to teacher tokens (SPEC.md §1, §5).

W is stored as ELL: ``idx [V_s, P]`` (int32 teacher ids, -1 = empty slot) and ``val [V_s, P]``
(float32 weights; each row sums to 1, or 0 for an unmapped row). The kernels also read W's transpose
(``col_ptr [V_t + 1]``, ``col_src``, ``col_val``), built once here, so that both ``W^T p`` and ``W g``
are gathers: no atomics, deterministic results.

:meth:`Projection.build` makes W from two tokenizers with the string rules of :mod:`xtoken.rules` (exact
pass, decomposition pass, special-token roles; SPEC.md §5) row by row, never as a dense matrix. A built W
keeps what the common pairs and the coverage audit (:mod:`xtoken.audit`) need (:class:`Vocabularies`), and
saves it with W in one safetensors file.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from . import checks, rules
from .audit import AuditRow, ProjectionAudit, coverage_audit
from .tokenizer import TokenizerAdapter, load_tokenizer

__all__ = ["AuditRow", "Projection", "ProjectionAudit", "ProjectionColumns", "TokenTable", "Vocabularies"]

FORMAT = "xtoken-projection-1"
PAIR_KINDS = ("exact", "raw", "relaxed")
RELAXED_THRESHOLD = 0.6

ROW_SUM_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ProjectionColumns:
    """W's transpose as a gather table: teacher token t is fed by student tokens
    ``col_src[col_ptr[t]:col_ptr[t+1]]`` with weights ``col_val[...]``, which are the entries
    ``col_slot[...]`` of W's flattened ``val`` (so a learned W's transpose is one gather of its values)."""

    col_ptr: torch.Tensor  # int32 [V_t + 1]
    col_src: torch.Tensor  # int32 [nnz]
    col_val: torch.Tensor  # float32 [nnz]
    col_slot: torch.Tensor  # int64 [nnz]: col_val = val.reshape(-1)[col_slot]


class TokenTable:
    """One vocabulary as W remembers it: per id, the token's text (its surface bytes; for a special
    token, its name in UTF-8) and its kind (regular, special, or an id the tokenizer does not use).
    It lets a saved W show rows and audit coverage without the tokenizers."""

    REGULAR, SPECIAL, UNUSED = 0, 1, 2

    def __init__(self, texts: Sequence[bytes], kinds: Sequence[int]) -> None:
        if len(texts) != len(kinds):
            raise ValueError(f"TokenTable: {len(texts)} texts but {len(kinds)} kinds")
        if any(k not in (self.REGULAR, self.SPECIAL, self.UNUSED) for k in set(kinds)):
            raise ValueError("TokenTable: kinds must be 0 (regular), 1 (special) or 2 (unused)")
        self.texts = list(texts)
        self.kinds = list(kinds)

    @classmethod
    def from_tokenizer(cls, tokenizer: TokenizerAdapter, size: int) -> "TokenTable":
        """The first ``size`` ids of ``tokenizer``."""
        surface, strings = tokenizer.surface_bytes, tokenizer.token_strings
        texts, kinds = [], []
        for i in range(size):
            if surface[i] is not None:
                texts.append(surface[i])
                kinds.append(cls.REGULAR)
            elif strings[i] is not None:
                texts.append(strings[i].encode("utf-8", "surrogatepass"))
                kinds.append(cls.SPECIAL)
            else:
                texts.append(b"")
                kinds.append(cls.UNUSED)
        return cls(texts, kinds)

    def __len__(self) -> int:
        return len(self.texts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenTable) and self.texts == other.texts and self.kinds == other.kinds

    def display(self, token_id: int) -> str:
        """The token as a quoted string (``"201"``, ``" the"``, ``"\\xe6"`` for a lone byte); a special
        token as its bare name."""
        if self.kinds[token_id] == self.SPECIAL:
            return self.texts[token_id].decode("utf-8", "replace")
        if self.kinds[token_id] == self.UNUSED:
            return "(unused id)"
        return rules.quote(self.texts[token_id])

    def find(self, text: str) -> list[int]:
        """Ids whose surface text (or special-token name) is ``text``."""
        wanted = text.encode("utf-8", "surrogateescape")
        return [i for i, (t, k) in enumerate(zip(self.texts, self.kinds)) if t == wanted and k != self.UNUSED]

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(t) for t in self.texts], dtype=torch.int64)
        offsets = torch.zeros(len(self.texts) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        flat = torch.from_numpy(np.frombuffer(b"".join(self.texts), dtype=np.uint8).copy())
        return {
            f"{prefix}_text": flat,
            f"{prefix}_text_offsets": offsets,
            f"{prefix}_kind": torch.tensor(self.kinds, dtype=torch.uint8),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> "TokenTable":
        """The table saved by :meth:`to_tensors`; raises ``ValueError`` on a missing entry or on offsets that
        do not run from 0 to the end of the text without decreasing."""
        names = [f"{prefix}_text", f"{prefix}_text_offsets", f"{prefix}_kind"]
        missing = [name for name in names if name not in tensors]
        if missing:
            raise ValueError(f"the {prefix} token table lacks {', '.join(missing)}")
        flat = tensors[names[0]].numpy().tobytes()
        offsets = tensors[names[1]].tolist()
        if (not offsets or offsets[0] != 0 or offsets[-1] != len(flat)
                or any(b < a for a, b in itertools.pairwise(offsets))):
            raise ValueError(
                f"{names[1]}: expected offsets from 0 to the text's {len(flat)} bytes that never decrease"
            )
        kinds = tensors[names[2]].tolist()
        if len(kinds) != len(offsets) - 1:
            raise ValueError(f"{names[2]}: {len(kinds)} kinds for {len(offsets) - 1} tokens")
        return cls([flat[a:b] for a, b in itertools.pairwise(offsets)], kinds)


@dataclass(frozen=True)
class Vocabularies:
    """What a built W keeps of its two tokenizers (and saves with W).

    Attributes:
        student, teacher: the two token tables (up to the logit widths).
        exact_match: int32 ``[V_s]``: per student row, the teacher id the exact pass matched (the lowest
            one with the same surface bytes), -1 where none.
        raw_pairs: int32 ``[C, 2]``: the "raw" common pairs, equal vocabulary strings (TRL's rule), sorted
            by student id.
    """

    student: TokenTable
    teacher: TokenTable
    exact_match: torch.Tensor
    raw_pairs: torch.Tensor


def check_output_path(path) -> None:
    """Raise before any long work if ``path`` cannot be written as a file: its folder must exist, and ``path``
    must not be a folder."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a folder; give the path of the file to write")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{path}: the folder {folder} is not writable")


def _tensor(value, name: str, expected: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__} ({e})") from None


def _check_rows(idx: torch.Tensor, val: torch.Tensor, teacher_vocab_size: int) -> None:
    """W's rows (int32 idx, float32 val) as SPEC.md §1 defines them: teacher ids in [-1, V_t), weights finite
    and >= 0, 0 in empty slots, every row summing to 1 (or 0 when empty)."""
    if idx.numel() and (int(idx.max()) >= teacher_vocab_size or int(idx.min()) < -1):
        raise ValueError(f"idx: teacher ids must lie in [-1, {teacher_vocab_size}); found "
                         f"{int(idx.min())}..{int(idx.max())}")
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


class Projection:
    """A sparse, row-stochastic projection W: student vocabulary -> teacher vocabulary.

    Args:
        idx: int32 ``[V_s, P]`` teacher token ids, -1 for an empty slot.
        val: float32 ``[V_s, P]`` weights; each row sums to 1 (or 0 when the row is empty).
        teacher_vocab_size: the teacher vocabulary width W is defined over (default: the largest id + 1).
            A teacher whose logits are wider (a padded lm_head) is handled by the losses, which extend W
            with empty columns.
        metadata: free-form strings (tokenizer names, hashes, build parameters), kept with W when saved.
        vocabularies: what the common pairs and the audit need of the two tokenizers (set by :meth:`build`
            and :meth:`load`; None for a W made from tensors alone).
    """

    def __init__(
        self,
        idx: torch.Tensor,
        val: torch.Tensor,
        *,
        teacher_vocab_size: int | None = None,
        metadata: dict[str, str] | None = None,
        vocabularies: Vocabularies | None = None,
    ) -> None:
        idx = checks.int32_index(_tensor(idx, "idx", "an integer [V_s, P] tensor"), "idx")
        val = _tensor(val, "val", "a float tensor shaped like idx")
        if idx.dim() != 2:
            raise ValueError(f"idx: expected an integer [V_s, P] tensor, got {idx.dtype} {tuple(idx.shape)}")
        if val.shape != idx.shape or not val.is_floating_point():
            raise ValueError(f"val: expected a float tensor shaped like idx {tuple(idx.shape)}, got "
                             f"{val.dtype} {tuple(val.shape)}")
        if val.device != idx.device:
            raise ValueError(f"val is on {val.device} but idx is on {idx.device}")
        if teacher_vocab_size is None:
            teacher_vocab_size = int(idx.max()) + 1 if idx.numel() else 0
            if teacher_vocab_size < 1:
                raise ValueError("teacher_vocab_size: W maps no student token anywhere; pass teacher_vocab_size")
        self._teacher_vocab_size = checks.count(teacher_vocab_size, "teacher_vocab_size", minimum=1,
                                                maximum=checks.INT32_MAX)
        # Copies: W never shares memory with the caller's tensors, so editing those cannot change it.
        self._idx = idx.to(torch.int32).clone(memory_format=torch.contiguous_format)
        self._val = val.to(torch.float32).clone(memory_format=torch.contiguous_format)
        _check_rows(self._idx, self._val, self._teacher_vocab_size)
        self._versions = self._tensor_versions()
        self.metadata = dict(metadata or {})
        if vocabularies is not None:
            self._check_vocabularies(vocabularies)
        self.vocabularies = vocabularies
        self._columns: dict[int, ProjectionColumns] = {}
        self._moved: dict[torch.device, Projection] = {}

    def _check_vocabularies(self, vocabularies: Vocabularies) -> None:
        v_s, v_t = self.student_vocab_size, self.teacher_vocab_size
        if len(vocabularies.student) > v_s or len(vocabularies.teacher) > v_t:
            raise ValueError(
                f"vocabularies: token tables of {len(vocabularies.student)} and {len(vocabularies.teacher)} "
                f"ids do not fit W's {v_s} x {v_t}"
            )
        exact = vocabularies.exact_match
        if exact.dtype != torch.int32 or exact.shape != (v_s,) or (
            exact.numel() and (int(exact.max()) >= v_t or int(exact.min()) < -1)
        ):
            raise ValueError(
                f"vocabularies.exact_match: expected int32 [{v_s}] teacher ids in [-1, {v_t}), got "
                f"{exact.dtype} {tuple(exact.shape)}"
            )
        raw = vocabularies.raw_pairs
        if raw.dtype != torch.int32 or raw.dim() != 2 or raw.shape[1] != 2:
            raise ValueError(
                f"vocabularies.raw_pairs: expected int32 [C, 2], got {raw.dtype} {tuple(raw.shape)}"
            )
        if raw.numel() and not (
            0 <= int(raw.min()) and int(raw[:, 0].max()) < v_s and int(raw[:, 1].max()) < v_t
        ):
            raise ValueError(f"vocabularies.raw_pairs: pairs must lie in [0, {v_s}) x [0, {v_t})")

    # ------------------------------------------------------------------ the rows, kept consistent
    @property
    def idx(self) -> torch.Tensor:
        """int32 ``[V_s, P]`` teacher ids (-1 = empty slot). Editing it in place is allowed: the next use
        re-validates W and rebuilds its transpose."""
        return self._idx

    @property
    def val(self) -> torch.Tensor:
        """float32 ``[V_s, P]`` weights (see :attr:`idx` on editing in place)."""
        return self._val

    @property
    def teacher_vocab_size(self) -> int:
        return self._teacher_vocab_size

    def _tensor_versions(self) -> tuple[int, int]:
        return (self._idx._version, self._val._version)

    def _refresh(self) -> None:
        """After an in-place edit of idx or val: validate the rows again and drop every cached form of W
        (its transposes and its copies on other devices), so the kernels never read a stale W. A compiled
        graph (``torch.compile``) keeps the W it was traced with: rebuild it after editing W."""
        if torch.compiler.is_compiling():
            return
        if self._tensor_versions() != self._versions:
            _check_rows(self._idx, self._val, self._teacher_vocab_size)
            self._columns.clear()
            self._moved.clear()
            self._versions = self._tensor_versions()

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
        self._refresh()
        if device == self.device:
            return self
        if device not in self._moved:
            moved = Projection.__new__(Projection)
            moved._idx = self.idx.to(device)
            moved._val = self.val.to(device)
            moved._versions = moved._tensor_versions()
            moved._teacher_vocab_size = self.teacher_vocab_size
            moved.metadata = self.metadata
            moved.vocabularies = self.vocabularies
            moved._columns = {
                v: ProjectionColumns(*(t.to(device) for t in (c.col_ptr, c.col_src, c.col_val, c.col_slot)))
                for v, c in self._columns.items()
            }
            moved._moved = {}
            self._moved[device] = moved
        return self._moved[device]

    # ------------------------------------------------------------------ constructors
    @classmethod
    def identity(cls, vocab_size: int, *, device: torch.device | str = "cpu") -> "Projection":
        """The identity map of a shared vocabulary (plain KD through the projection machinery)."""
        vocab_size = checks.count(vocab_size, "vocab_size", minimum=1, maximum=checks.INT32_MAX)
        idx = torch.arange(vocab_size, dtype=torch.int32, device=device).unsqueeze(1)
        val = torch.ones(vocab_size, 1, dtype=torch.float32, device=device)
        return cls(idx, val, teacher_vocab_size=vocab_size, metadata={"kind": "identity"})

    @classmethod
    def from_dense(cls, matrix: torch.Tensor, top_k: int = 4) -> "Projection":
        """Keep the ``top_k`` largest non-negative weights of each row of a dense ``[V_s, V_t]`` matrix and
        renormalize each row to sum 1 (rows with no positive weight stay empty). For small vocabularies."""
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
            raise ValueError(f"matrix: expected a [V_s, V_t] tensor, got {getattr(matrix, 'shape', type(matrix))}")
        top_k = checks.count(top_k, "top_k", minimum=1)
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
        self._refresh()
        dense = torch.zeros(self.student_vocab_size, self.teacher_vocab_size, device=self.device)
        rows = torch.arange(self.student_vocab_size, device=self.device).unsqueeze(1).expand_as(self.idx)
        present = self.idx >= 0
        dense.index_put_((rows[present].long(), self.idx[present].long()), self.val[present], accumulate=True)
        return dense

    def pad_to(self, student_vocab_size: int) -> "Projection":
        """W with empty rows appended up to ``student_vocab_size`` (a student with a padded lm_head)."""
        student_vocab_size = checks.count(student_vocab_size, "student_vocab_size", minimum=1,
                                          maximum=checks.INT32_MAX)
        extra = student_vocab_size - self.student_vocab_size
        if extra < 0:
            raise ValueError(f"student_vocab_size {student_vocab_size} < W's {self.student_vocab_size} rows")
        if extra == 0:
            return self
        idx = torch.cat([self.idx, self.idx.new_full((extra, self.top_k), -1)])
        val = torch.cat([self.val, self.val.new_zeros((extra, self.top_k))])
        vocabularies = self.vocabularies
        if vocabularies is not None:
            exact = torch.cat([vocabularies.exact_match, vocabularies.exact_match.new_full((extra,), -1)])
            vocabularies = replace(vocabularies, exact_match=exact)
        return Projection(idx, val, teacher_vocab_size=self.teacher_vocab_size, metadata=self.metadata,
                          vocabularies=vocabularies)

    # ------------------------------------------------------------------ the transpose
    def columns(self, teacher_width: int | None = None) -> ProjectionColumns:
        """W's transpose for teacher logits of width ``teacher_width`` (>= teacher_vocab_size; the
        extra columns are empty). Built once per width and cached."""
        self._refresh()
        width = self.teacher_vocab_size if teacher_width is None else checks.count(
            teacher_width, "teacher_width", minimum=1, maximum=checks.INT32_MAX)
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
            col_slot = present.reshape(-1).nonzero().reshape(-1)[order]
            self._columns[width] = ProjectionColumns(
                col_ptr.to(torch.int32), rows[order].to(torch.int32).contiguous(), self.val.reshape(-1)[col_slot],
                col_slot,
            )
        return self._columns[width]

    def kernel_args(self, teacher_width: int) -> tuple[torch.Tensor, ...]:
        """(idx, val, col_ptr, col_src, col_val): W as the xtoken ops take it."""
        cols = self.columns(teacher_width)
        return (self.idx, self.val, cols.col_ptr, cols.col_src, cols.col_val)

    # ------------------------------------------------------------------ building from two tokenizers
    @classmethod
    def build(
        cls,
        student_tokenizer: Any,
        teacher_tokenizer: Any,
        *,
        top_k: int = 4,
        beta: float = 0.9,
        gamma: float = 0.1,
        max_pieces: int = 4,
        student_vocab_size: int | None = None,
        teacher_vocab_size: int | None = None,
        progress: bool = False,
    ) -> "Projection":
        """W from two tokenizers (SPEC.md §5), built row by row (never as a dense matrix).

        1. Exact pass: a student token whose surface bytes equal a teacher token's gets that teacher token
           (the lowest id among equals) with weight 1.
        2. Decomposition pass: any other student token is re-encoded by the teacher as running text (no
           special tokens, no dummy-prefix space; bytes that are not valid UTF-8 on their own become the
           teacher's token for that byte); piece i of the first ``max_pieces`` gets ``beta * gamma**i``
           (repeated pieces add up), the ``top_k`` largest are kept (earlier pieces win ties) and the row is
           renormalized. So "201" -> "2", "0", "1" gets 0.9009, 0.0901, 0.0090.
        3. Special tokens: a student special token with a role (bos, eos, pad, unk; the first of these it
           holds) maps to the teacher token with the same role, weight 1. Other special tokens keep an empty
           row.

        Args:
            student_tokenizer, teacher_tokenizer: anything :func:`xtoken.tokenizer.load_tokenizer` takes: an
                adapter, a ``tokenizers.Tokenizer``, a transformers fast tokenizer, a ``tiktoken.Encoding``,
                a tokenizer.json path or folder, or a built-in name such as ``"llama3.2"`` or ``"qwen"``.
            top_k: P, the teacher tokens kept per row.
            beta, gamma: the decomposition weights (beta > 0, gamma >= 0).
            max_pieces: L, how many leading pieces of a decomposition count.
            student_vocab_size, teacher_vocab_size: the logit widths W covers (default: the tokenizers'
                sizes). A larger width (a padded lm_head) adds empty rows or columns; a smaller one may only
                cut off trailing special tokens.
            progress: show a progress bar over the decomposition pass.
        """
        rules.check_build_options(top_k, beta, gamma, max_pieces)
        student, teacher = load_tokenizer(student_tokenizer), load_tokenizer(teacher_tokenizer)
        v_s = rules.logit_width(student, student_vocab_size, "student_vocab_size")
        v_t = rules.logit_width(teacher, teacher_vocab_size, "teacher_vocab_size")
        n_s, n_t = min(v_s, len(student)), min(v_t, len(teacher))

        idx, val, exact = rules.fill_rows(student, teacher, v_s, n_s, n_t, top_k=top_k, beta=beta, gamma=gamma,
                                          max_pieces=max_pieces, progress=progress)
        vocabularies = Vocabularies(
            TokenTable.from_tokenizer(student, n_s), TokenTable.from_tokenizer(teacher, n_t),
            torch.from_numpy(exact), rules.raw_pairs(student, teacher, n_s, n_t),
        )  # fmt: skip
        metadata = {
            **rules.tokenizer_metadata("student", student),
            **rules.tokenizer_metadata("teacher", teacher),
            "top_k": str(top_k),
            "beta": repr(float(beta)),
            "gamma": repr(float(gamma)),
            "max_pieces": str(max_pieces),
        }
        return cls(
            torch.from_numpy(idx),
            torch.from_numpy(val),
            teacher_vocab_size=v_t,
            metadata=metadata,
            vocabularies=vocabularies,
        )

    # ------------------------------------------------------------------ common pairs
    def row(self, student_id: int) -> list[tuple[int, float]]:
        """Student token ``student_id``'s row of W: (teacher id, weight) per filled slot, in slot order."""
        if not 0 <= student_id < self.student_vocab_size:
            raise IndexError(f"student_id {student_id} is outside W's {self.student_vocab_size} rows")
        ids, weights = self.idx[student_id].tolist(), self.val[student_id].tolist()
        return [(t, w) for t, w in zip(ids, weights) if t >= 0]

    def common_pairs(self, kind: str = "relaxed", threshold: float = RELAXED_THRESHOLD) -> torch.Tensor:
        """One-to-one common pairs ``(s, t)`` as int32 ``[C, 2]``, sorted by student id (SPEC.md §5).

        - ``"exact"``: the exact-pass matches, one per teacher token (the lowest student id wins): GOLD's
          pairs.
        - ``"raw"``: equal vocabulary strings of the two ``get_vocab()``s (TRL's rule, for parity with TRL).
        - ``"relaxed"``: every student token whose largest weight is >= ``threshold``, paired with that
          teacher token (the lowest id among equal weights); when several claim one teacher token, the
          highest weight wins, then an exact-pass match, then the lowest student id. H-KL's pairs.

        ``"exact"`` and ``"raw"`` need a W from :meth:`build` or :meth:`load`; ``"relaxed"`` works on any W.
        """
        if kind not in PAIR_KINDS:
            raise ValueError(f"kind: expected one of {PAIR_KINDS}, got {kind!r}")
        if kind == "relaxed":
            return self._relaxed_pairs(threshold)
        vocabularies = self._require_vocabularies(f"common_pairs({kind!r})")
        if kind == "raw":
            return vocabularies.raw_pairs.clone()
        exact = vocabularies.exact_match.numpy()
        students = np.flatnonzero(exact >= 0)
        _, first = np.unique(exact[students], return_index=True)  # students ascend: the first is the lowest
        students = students[np.sort(first)]
        return rules.pair_tensor(students, exact[students])

    def _relaxed_pairs(self, threshold: float) -> torch.Tensor:
        if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
            raise ValueError(f"threshold: expected a number in (0, 1], got {threshold!r}")
        idx, val = self.idx.cpu().numpy(), self.val.cpu().numpy()
        present = idx >= 0
        best = np.where(present, val, -np.inf).max(axis=1, initial=-np.inf)
        top = np.where(present & (val == best[:, None]), idx, np.iinfo(np.int32).max).min(
            axis=1, initial=np.iinfo(np.int32).max
        )
        students = np.flatnonzero(best >= threshold)
        teachers, weights = top[students], best[students]
        if self.vocabularies is None:
            exact = np.zeros(len(students), dtype=bool)
        else:
            exact = self.vocabularies.exact_match.numpy()[students] == teachers
        order = np.lexsort((students, ~exact, -weights, teachers))  # by teacher, then the claim's rank
        sorted_teachers = teachers[order]
        winners = np.sort(order[np.r_[True, sorted_teachers[1:] != sorted_teachers[:-1]]])
        return rules.pair_tensor(students[winners], teachers[winners])

    def _require_vocabularies(self, what: str) -> Vocabularies:
        if self.vocabularies is None:
            raise ValueError(
                f"{what} needs a W built from tokenizers (Projection.build, or Projection.load of a "
                "W saved after build); this W was made from tensors alone"
            )
        return self.vocabularies

    # ------------------------------------------------------------------ coverage audit
    def audit(self, threshold: float = RELAXED_THRESHOLD) -> "ProjectionAudit":
        """Coverage of the student vocabulary by token class: how many tokens of each class are in the exact
        pairs, in the relaxed pairs (at ``threshold``) and mapped by W, with a loss recommendation."""
        return coverage_audit(self, threshold)

    # ------------------------------------------------------------------ saving and loading
    def save(self, path: str | Any) -> None:
        """Save W (and, for a built W, its vocabularies) as one safetensors file, with the metadata."""
        from safetensors.torch import save_file

        check_output_path(path)
        self._refresh()
        tensors = {"idx": self.idx.cpu().contiguous(), "val": self.val.cpu().contiguous()}
        if self.vocabularies is not None:
            tensors["exact_match"] = self.vocabularies.exact_match.contiguous()
            tensors["raw_pairs"] = self.vocabularies.raw_pairs.contiguous()
            tensors.update(self.vocabularies.student.to_tensors("student"))
            tensors.update(self.vocabularies.teacher.to_tensors("teacher"))
        metadata = {**self.metadata, "format": FORMAT, "teacher_vocab_size": str(self.teacher_vocab_size)}
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(
        cls, path: str | Any, student_tokenizer: Any = None, teacher_tokenizer: Any = None
    ) -> "Projection":
        """Load a W saved by :meth:`save`. Given tokenizers are checked against the vocabulary hashes W was
        built with (:meth:`check_tokenizers`): a mismatch raises ``ValueError``."""
        from safetensors import SafetensorError, safe_open

        if os.path.isdir(path):
            raise IsADirectoryError(f"{path}: is a folder, not a W file (a .safetensors file saved by Projection.save)")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
        if metadata.pop("format", None) != FORMAT or not {"idx", "val"} <= tensors.keys():
            raise ValueError(
                f"{path}: not an xtoken projection (expected format {FORMAT!r} with 'idx' and 'val')"
            )
        try:
            teacher_vocab_size = int(metadata.pop("teacher_vocab_size"))
        except (KeyError, ValueError):
            raise ValueError(f"{path}: the metadata lacks an integer teacher_vocab_size") from None
        try:
            vocabularies = None
            if "exact_match" in tensors:
                if "raw_pairs" not in tensors:
                    raise ValueError("the vocabularies lack raw_pairs")
                vocabularies = Vocabularies(
                    TokenTable.from_tensors(tensors, "student"),
                    TokenTable.from_tensors(tensors, "teacher"),
                    tensors["exact_match"],
                    tensors["raw_pairs"],
                )
            projection = cls(
                tensors["idx"],
                tensors["val"],
                teacher_vocab_size=teacher_vocab_size,
                metadata=metadata,
                vocabularies=vocabularies,
            )
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a valid W: {e}") from None
        projection.check_tokenizers(student_tokenizer, teacher_tokenizer)
        return projection

    def check_tokenizers(self, student_tokenizer: Any = None, teacher_tokenizer: Any = None) -> None:
        """Raise ``ValueError`` unless the given tokenizers have the vocabularies W was built for."""
        for side, tokenizer in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
            if tokenizer is None:
                continue
            expected = self.metadata.get(f"{side}_vocab_hash")
            if expected is None:
                raise ValueError(
                    f"W records no {side} vocabulary hash (it was not built by Projection.build), so "
                    f"the {side} tokenizer cannot be checked"
                )
            adapter = load_tokenizer(tokenizer)
            if adapter.vocab_hash != expected:
                built_for = self.metadata.get(f"{side}_tokenizer")
                size = self.metadata.get(f"{side}_tokenizer_size")
                raise ValueError(
                    f"the {side} tokenizer {adapter.name!r} ({len(adapter)} ids, vocabulary hash "
                    f"{adapter.vocab_hash[:16]}) is not the one W was built for: {built_for!r} ({size} ids, "
                    f"vocabulary hash {expected[:16]})"
                )
