"""Piece tables for the chain loss (SPEC.md §4, chain KL): every token of one vocabulary as the ordered
list of its pieces in the other vocabulary.

``student [V_s, L]`` holds, per student token, the teacher tokens that spell it ("85" -> "8", "5"), and
``teacher [V_t, L]`` the mirror image, per teacher token the student tokens that spell it. They come from
the same passes as W (SPEC.md §5): a token with an exact match in the other vocabulary is that one piece;
any other token is re-encoded by the other tokenizer as running text (no special tokens, no dummy-prefix
space; bytes that are not valid UTF-8 on their own become the other side's token for that byte); a special
token with a role (bos, eos, pad, unk) is the other side's token of that role; other special tokens, unused
ids and padding columns have no pieces. -1 pads a row.

Only the first ``L`` pieces are kept. That is exact for the chain loss, which reads piece ``i`` only at its
level ``i < L`` (where -1 means "the token ends here").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .rules import logit_width, spell
from .tokenizer import TokenizerAdapter, load_tokenizer

__all__ = ["PieceTables", "DEFAULT_MAX_PIECES"]

DEFAULT_MAX_PIECES = 8


def _piece_table(source: TokenizerAdapter, target: TokenizerAdapter, width: int, target_width: int,
                 max_pieces: int) -> torch.Tensor:
    """int32 ``[width, max_pieces]``: each ``source`` token spelled in ``target`` tokens (below
    ``target_width``), -1 padded."""
    n_source, n_target = min(width, len(source)), min(target_width, len(target))
    spelled = spell(source, target, range(n_source), n_source, n_target, max_pieces)
    table = np.full((width, max_pieces), -1, dtype=np.int32)
    for s, t in spelled.exact.items():
        table[s, 0] = t
    for s, token_pieces in spelled.pieces.items():
        table[s, : len(token_pieces)] = token_pieces
    for s, t in spelled.roles.items():
        table[s] = -1
        table[s, 0] = t
    return torch.from_numpy(table)


def _lexicographic_order(table: torch.Tensor) -> torch.Tensor:
    """The row order that sorts ``table`` lexicographically (stable: equal rows keep their id order)."""
    order = torch.arange(table.shape[0], device=table.device)
    for column in reversed(range(table.shape[1])):
        order = order[torch.sort(table[order, column], stable=True).indices]
    return order


class PieceTables:
    """The two piece tables of a student/teacher pair (module docstring).

    Args:
        student: int32 ``[V_s, L]``, per student token its teacher pieces (ids in ``[0, V_t)``), -1 padded.
        teacher: int32 ``[V_t, L']``, per teacher token its student pieces, -1 padded; ``None`` leaves M:1
            chunks to the first level only.
    """

    def __init__(self, student: torch.Tensor, teacher: torch.Tensor | None = None) -> None:
        self.student = self._checked(student, "student")
        self.teacher = None if teacher is None else self._checked(teacher, "teacher")
        if self.teacher is not None and self.teacher.device != self.student.device:
            raise ValueError(f"teacher table is on {self.teacher.device} but student table on {self.student.device}")
        self._moved: dict[torch.device, PieceTables] = {}
        self._sorted: dict[tuple[int, int], tuple[torch.Tensor | None, ...]] = {}

    @staticmethod
    def _checked(table: Any, name: str) -> torch.Tensor:
        table = torch.as_tensor(table)
        if table.dim() != 2 or table.dtype not in (torch.int32, torch.int64) or table.shape[1] < 1:
            raise ValueError(f"{name}: expected an integer [V, L] piece table with L >= 1, got "
                             f"{table.dtype} {tuple(table.shape)}")
        if table.numel() and int(table.min()) < -1:
            raise ValueError(f"{name}: piece ids must be >= 0, or -1 for no piece; found {int(table.min())}")
        return table.to(torch.int32).contiguous()

    @property
    def student_vocab_size(self) -> int:
        return self.student.shape[0]

    @property
    def device(self) -> torch.device:
        return self.student.device

    def __repr__(self) -> str:
        mirror = "none" if self.teacher is None else f"[{self.teacher.shape[0]}, {self.teacher.shape[1]}]"
        return (f"PieceTables(student=[{self.student.shape[0]}, {self.student.shape[1]}], teacher={mirror}, "
                f"device={self.device})")

    def to(self, device: torch.device | str) -> "PieceTables":
        """The tables on ``device`` (cached)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.device:
            return self
        if device not in self._moved:
            self._moved[device] = PieceTables(
                self.student.to(device), None if self.teacher is None else self.teacher.to(device)
            )
        return self._moved[device]

    def kernel_args(self, student_width: int, teacher_width: int) -> tuple[torch.Tensor | None, ...]:
        """(student pieces, student order, teacher pieces, teacher order): the tables padded to the logit widths,
        in the sorted layout the chain ops read (rows sorted lexicographically, -1 first; ``order[r]`` is the
        token of sorted row r). Cached per width."""
        key = (int(student_width), int(teacher_width))
        if key not in self._sorted:
            tables = self.pad_to(*key)
            args = []
            for table in (tables.student, tables.teacher):
                if table is None:
                    args += [None, None]
                    continue
                if table.shape[0] != (key[0] if table is tables.student else key[1]):
                    raise ValueError(f"piece table of {table.shape[0]} rows is wider than the logits ({key})")
                order = _lexicographic_order(table)
                args += [table[order].contiguous(), order.to(torch.int32)]
            self._sorted[key] = tuple(args)
        return self._sorted[key]

    def pad_to(self, student_vocab_size: int | None = None, teacher_vocab_size: int | None = None) -> "PieceTables":
        """Tables with rows of no pieces appended up to the logit widths (padded lm_heads)."""

        def padded(table: torch.Tensor | None, rows: int | None) -> torch.Tensor | None:
            if table is None or rows is None or rows <= table.shape[0]:
                return table
            return torch.cat([table, table.new_full((rows - table.shape[0], table.shape[1]), -1)])

        return PieceTables(padded(self.student, student_vocab_size), padded(self.teacher, teacher_vocab_size))

    @classmethod
    def build(
        cls,
        student_tokenizer: Any,
        teacher_tokenizer: Any,
        *,
        max_pieces: int = DEFAULT_MAX_PIECES,
        mirror: bool = True,
        student_vocab_size: int | None = None,
        teacher_vocab_size: int | None = None,
    ) -> "PieceTables":
        """Both tables from two tokenizers (anything :func:`xtoken.tokenizer.load_tokenizer` takes).

        Args:
            max_pieces: L, the pieces kept per token (the chain loss reads up to L levels per chunk).
            mirror: also build the teacher table (re-encodes the teacher vocabulary with the student
                tokenizer), which the chain loss reads for M:1 chunks.
            student_vocab_size, teacher_vocab_size: the logit widths (default: the tokenizers' sizes).
        """
        if not (isinstance(max_pieces, int) and not isinstance(max_pieces, bool) and max_pieces >= 1):
            raise ValueError(f"max_pieces: expected an int >= 1, got {max_pieces!r}")
        student, teacher = load_tokenizer(student_tokenizer), load_tokenizer(teacher_tokenizer)
        v_s = logit_width(student, student_vocab_size, "student_vocab_size")
        v_t = logit_width(teacher, teacher_vocab_size, "teacher_vocab_size")
        student_table = _piece_table(student, teacher, v_s, v_t, max_pieces)
        teacher_table = _piece_table(teacher, student, v_t, v_s, max_pieces) if mirror else None
        return cls(student_table, teacher_table)
