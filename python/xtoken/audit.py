"""The coverage audit of a W built from tokenizers (:meth:`xtoken.projection.Projection.audit`): the student
vocabulary by token class, how much of each class the exact pairs, the relaxed pairs and W cover, and the
loss X-Token's rule recommends (SPEC.md §5)."""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

__all__ = ["AUDIT_CLASSES", "AuditRow", "ProjectionAudit", "coverage_audit"]

AUDIT_CLASSES = (
    "numeral, 1 digit",
    "numeral, 2 digits",
    "numeral, 3 digits",
    "word",
    "space + word",
    "punctuation",
    "whitespace",
    "multi-byte",
    "other",
    "special",
)
_ASCII_PUNCTUATION = frozenset(string.punctuation.encode("ascii"))


def token_class(text: bytes, special: bool) -> str:
    """The audit class of a student token: ASCII digits (1-3), ASCII letters with or without one leading
    space, ASCII punctuation only, ASCII whitespace only, any non-ASCII byte, other, or special."""
    if special:
        return "special"
    if text.isdigit() and len(text) <= 3:  # bytes.isdigit / isalpha / isspace are ASCII-only
        return AUDIT_CLASSES[len(text) - 1]
    if text.isalpha():
        return "word"
    if text[:1] == b" " and text[1:].isalpha():
        return "space + word"
    if text and all(b in _ASCII_PUNCTUATION for b in text):
        return "punctuation"
    if text.isspace():
        return "whitespace"
    if any(b >= 0x80 for b in text):
        return "multi-byte"
    return "other"


@dataclass(frozen=True)
class AuditRow:
    """One token class: how many student tokens it has, and how many are in the exact pairs, in the relaxed
    pairs and mapped by W (a non-empty row)."""

    name: str
    tokens: int
    exact: int
    relaxed: int
    mapped: int


@dataclass(frozen=True)
class ProjectionAudit:
    """The coverage audit of a W (:meth:`Projection.audit`). ``str()`` gives the printed table.

    Attributes:
        rows: one :class:`AuditRow` per class, in :data:`AUDIT_CLASSES` order.
        threshold: the relaxed-pair threshold used.
        recommendation: X-Token's choice, ``"pkl"`` or ``"hkl"`` (the paper's rule, SPEC.md §5).
        reason: why, in one sentence.
    """

    rows: tuple[AuditRow, ...]
    threshold: float
    recommendation: str
    reason: str

    @property
    def teacher_loss(self) -> str:
        """The loss ``xtoken.Teacher(loss="auto")`` trains with: P-KL on the 1:1 chunks and the chain KL on
        the others (``"pkl+chain"``) where the audit recommends P-KL because the teacher spells in pieces what
        the student packs (most 2- and 3-digit numerals without an exact match), H-KL otherwise. In xtoken's
        study (README, Demo) on such a pair, P-KL and GOLD fell far below CE, the chain KL and P-KL + chain
        well above it, P-KL + chain the higher of the two on average in every run (and on every seed with the
        real Llama-3.2 / Qwen vocabularies)."""
        return "pkl+chain" if self.recommendation == "pkl" else self.recommendation

    def __getitem__(self, name: str) -> AuditRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no audit class {name!r}; the classes are {AUDIT_CLASSES}")

    @property
    def total(self) -> AuditRow:
        return AuditRow(
            "total",
            *(sum(getattr(r, f) for r in self.rows) for f in ("tokens", "exact", "relaxed", "mapped")),
        )

    def __str__(self) -> str:
        header = ("class", "tokens", "exact", f"relaxed@{self.threshold:g}", "mapped")
        lines = [f"{header[0]:<18}" + "".join(f"{h:>14}" for h in header[1:])]
        for row in (*self.rows, self.total):
            if row.name == "total":
                lines.append("-" * len(lines[0]))
            lines.append(
                f"{row.name:<18}"
                + "".join(f"{n:>14,}" for n in (row.tokens, row.exact, row.relaxed, row.mapped))
            )
        lines.append(f"recommendation: {self.recommendation} ({self.reason})")
        if self.teacher_loss != self.recommendation:
            lines.append(f"trainer (Teacher(loss='auto')): {self.teacher_loss} (P-KL on the 1:1 chunks, the "
                         "chain KL teaching the whole spelling of what the teacher splits; see the README's "
                         "demo study)")  # fmt: skip
        return "\n".join(lines)


def recommend(rows: tuple[AuditRow, ...]) -> tuple[str, str]:
    """P-KL when most 2- and 3-digit numerals have no exact pair (SPEC.md §5), H-KL otherwise."""
    numerals = [row for row in rows if row.name in ("numeral, 2 digits", "numeral, 3 digits")]
    total = sum(row.tokens for row in numerals)
    if total == 0:
        return (
            "hkl",
            "the student vocabulary has no 2- or 3-digit numeral tokens, so the exact pairs lose no numerals",
        )
    outside = total - sum(row.exact for row in numerals)
    share = f"{outside:,} of {total:,} 2- and 3-digit numerals ({outside / total:.0%})"
    if outside > total / 2:
        return "pkl", (
            f"{share} have no exact teacher match; H-KL's common-pair term would miss them, P-KL "
            "sends their mass to the teacher's digit pieces through W"
        )
    return "hkl", f"only {share} lack an exact teacher match, so H-KL's common pairs cover the numerals"


def coverage_audit(projection, threshold: float) -> ProjectionAudit:
    """:meth:`xtoken.projection.Projection.audit` of ``projection``."""
    vocabularies = projection._require_vocabularies("audit()")
    in_exact = np.zeros(projection.student_vocab_size, dtype=bool)
    in_exact[projection.common_pairs("exact")[:, 0].numpy()] = True
    in_relaxed = np.zeros(projection.student_vocab_size, dtype=bool)
    in_relaxed[projection.common_pairs("relaxed", threshold)[:, 0].numpy()] = True
    mapped = (projection.idx >= 0).any(dim=1).cpu().numpy()
    counts = {name: [0, 0, 0, 0] for name in AUDIT_CLASSES}
    table = vocabularies.student
    kinds = type(table)  # TokenTable: its kind constants
    for s, (text, kind) in enumerate(zip(table.texts, table.kinds)):
        if kind != kinds.UNUSED:
            count = counts[token_class(text, kind == kinds.SPECIAL)]
            count[0] += 1
            count[1] += in_exact[s]
            count[2] += in_relaxed[s]
            count[3] += mapped[s]
    rows = tuple(AuditRow(name, *map(int, counts[name])) for name in AUDIT_CLASSES)
    return ProjectionAudit(rows, threshold, *recommend(rows))
