"""Compact vocabularies: a real tokenizer restricted to the ids a corpus uses, renumbered ``0..K-1``.

A model trained on a small corpus with a real tokenizer (Llama-3.2's 128,256 ids, Qwen's 151,851) needs
embedding rows only for the tokens it can meet. :class:`CompactTokenizer` is an adapter over a real
tokenizer that exposes a subset of its ids as a compact id space (kept ids in the real tokenizer's order,
so "the lowest id with these bytes" means the same in both spaces), mapping ids both ways.

:func:`compact_vocabularies` picks the two subsets of a student/teacher pair for a corpus: every token of
the corpus on either side, the tokens of the special-token roles, and the closure under what the losses
read (SPEC.md §5): every teacher token that a kept student token's W row or piece spelling references and
every student token that a kept teacher token's mirror spelling references, to a fixed point. On closed
subsets, :meth:`Projection.build` and :meth:`PieceTables.build` over the two compact adapters give W and
the piece tables of the real tokenizers restricted to the kept ids (:func:`restrict_projection`,
:func:`restrict_piece_tables`), so the losses see the real chunk structure.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import replace
from functools import cached_property
from typing import Any

import numpy as np
import torch

from .align import HFSpanTokenizer, SpanTokenizer, TokenSpans
from .pieces import PieceTables
from .projection import Projection, TokenTable
from .rules import pair_tensor, quote, spell, tokenizer_metadata
from .tokenizer import TokenizerAdapter, load_tokenizer

__all__ = ["CompactTokenizer", "compact_vocabularies", "restrict_piece_tables", "restrict_projection", "spellings"]


class CompactTokenizer(TokenizerAdapter, SpanTokenizer):
    """``base`` restricted to the ids ``ids``, renumbered ``0..K-1`` in ``base``'s id order.

    Encoding runs ``base`` and maps its ids; a text that needs a token outside the kept ids raises
    ``ValueError``. :meth:`hf_tokenizer` is ``base``'s Hugging Face form with its ids permuted (the kept ids
    first, as ``0..K-1``), so batch encoding, offsets and decoding give compact ids directly. The adapter is
    also the :class:`xtoken.align.SpanTokenizer` of that form, built once (for a real vocabulary, building
    it costs seconds, and every collator would build its own).

    Args:
        base: the real tokenizer (anything :func:`xtoken.tokenizer.load_tokenizer` takes).
        ids: the ``base`` ids to keep; they must include the tokens of ``base``'s roles.
        name: a name for messages (default: ``base``'s name with the kept count).
    """

    def __init__(self, base: Any, ids: Iterable[int], *, name: str | None = None) -> None:
        self.base = load_tokenizer(base)
        kept = np.unique(np.fromiter((int(i) for i in ids), dtype=np.int64))
        size = len(self.base)
        if kept.size == 0:
            raise ValueError("ids: expected at least one id to keep")
        if kept[0] < 0 or kept[-1] >= size:
            raise ValueError(f"ids: must lie in [0, {size}) ({self.base.name}), found {kept[0]}..{kept[-1]}")
        strings = self.base.token_strings
        holes = [int(i) for i in kept if strings[i] is None]
        if holes:
            raise ValueError(f"ids: {self.base.name} does not use the ids {holes[:5]}")
        self.ids = kept
        self._compact = np.full(size, -1, dtype=np.int64)
        self._compact[kept] = np.arange(kept.size)
        missing = {role: i for role, i in self.base.roles.items() if self._compact[i] < 0}
        if missing:
            raise ValueError(f"ids: the role tokens {missing} of {self.base.name} must be kept")
        self.roles = {role: int(self._compact[i]) for role, i in self.base.roles.items()}
        self.name = name or f"{self.base.name} ({kept.size:,} of {size:,} ids)"

    def __len__(self) -> int:
        return int(self.ids.size)

    def to_compact(self, ids: Iterable[int]) -> list[int]:
        """``base`` ids -> compact ids; an id outside the kept ones raises ``ValueError`` naming the token."""
        ids = np.asarray(list(ids), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self._compact.size):
            raise ValueError(f"ids: {self.base.name} ids lie in [0, {self._compact.size}), got "
                             f"{ids.min()}..{ids.max()}")
        compact = self._compact[ids]
        if ids.size and compact.min() < 0:
            lost = int(ids[np.argmax(compact < 0)])
            raise ValueError(
                f"{self.name}: the token {lost} {self._display(lost)} of {self.base.name} is not in the compact "
                "vocabulary (the compact ids were chosen for another corpus)"
            )
        return compact.tolist()

    def to_base(self, ids: Iterable[int]) -> list[int]:
        """Compact ids -> ``base`` ids."""
        ids = np.asarray(list(ids), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.ids.size):
            raise ValueError(f"ids: compact ids lie in [0, {self.ids.size}), got {ids.min()}..{ids.max()}")
        return self.ids[ids].tolist()

    def _display(self, base_id: int) -> str:
        surface = self.base.surface_bytes[base_id]
        return self.base.token_strings[base_id] if surface is None else quote(surface)

    @cached_property
    def token_strings(self) -> list[str | None]:
        strings = self.base.token_strings
        return [strings[i] for i in self.ids]

    @cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(int(self._compact[i]) for i in self.base.special_ids if self._compact[i] >= 0)

    @cached_property
    def surface_bytes(self) -> list[bytes | None]:
        surface = self.base.surface_bytes
        return [surface[i] for i in self.ids]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.to_compact(self.base.encode(text, add_special_tokens=add_special_tokens))

    def encode_fragments(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.to_compact(ids) for ids in self.base.encode_fragments(texts)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of compact ids: their surface bytes (special tokens by name, or left out), as UTF-8."""
        surface, strings = self.surface_bytes, self.token_strings
        parts = []
        for i in ids:
            if surface[i] is not None:
                parts.append(surface[i])
            elif not skip_special_tokens:
                parts.append(strings[i].encode("utf-8"))
        return b"".join(parts).decode("utf-8", "replace")

    def hf_tokenizer(self):
        """``base``'s Hugging Face tokenizer with permuted ids: kept id ``ids[c]`` becomes ``c``, every other
        id comes after ``K`` (a model over the compact vocabulary never produces one). Built once."""
        return self._permuted_hf

    @cached_property
    def _permuted_hf(self):
        from tokenizers import Tokenizer

        size = self._compact.size
        permutation = self._compact.copy()  # base id -> new id
        dropped = permutation < 0
        permutation[dropped] = np.arange(self.ids.size, size)
        config = json.loads(self.base.hf_tokenizer().to_str())
        model = config["model"]
        if not isinstance(model.get("vocab"), dict):
            raise ValueError(f"{self.base.name}: cannot renumber a {model.get('type')} model (a BPE, WordPiece "
                             "or WordLevel vocabulary is needed)")  # fmt: skip
        model["vocab"] = {token: int(permutation[i]) for token, i in model["vocab"].items()}
        for added in config.get("added_tokens") or []:
            added["id"] = int(permutation[added["id"]])
        self._renumber_processor(config.get("post_processor"), permutation)
        return Tokenizer.from_str(json.dumps(config))

    def _renumber_processor(self, node: dict | None, permutation: np.ndarray) -> None:
        if not node:
            return
        kind = node.get("type")
        if kind == "Sequence":
            for child in node["processors"]:
                self._renumber_processor(child, permutation)
        elif kind == "TemplateProcessing":
            for special in node["special_tokens"].values():
                special["ids"] = [int(permutation[i]) for i in special["ids"]]
        elif kind != "ByteLevel":
            raise ValueError(f"{self.base.name}: cannot renumber the special tokens of a {kind} post-processor")

    @cached_property
    def _spans(self) -> HFSpanTokenizer:
        return HFSpanTokenizer(self.hf_tokenizer(), pad_token_id=self.roles.get("pad"))

    @property
    def pad_token_id(self) -> int:
        return self._spans.pad_token_id

    def encode_spans(
        self, texts: Sequence[str], *, add_special_tokens: bool, max_length: int | None
    ) -> TokenSpans:
        return self._spans.encode_spans(texts, add_special_tokens=add_special_tokens, max_length=max_length)

    def token(self, token_id: int) -> str:
        return self._spans.token(token_id)

    def keep_encodings(self, texts: int) -> None:
        """:meth:`xtoken.align.HFSpanTokenizer.keep_encodings` of the span encoder."""
        self._spans.keep_encodings(texts)

    def __repr__(self) -> str:
        return f"CompactTokenizer({self.name!r}, {len(self)} of {len(self.base)} ids, roles={self.roles})"


def spellings(source: Any, target: Any, ids: Iterable[int]) -> dict[int, list[int]]:
    """Per ``source`` id, the ``target`` ids that spell it, by the rules of W and the piece tables
    (SPEC.md §5), with no cut-off: the lowest target token with the same surface bytes; else every piece of
    its re-encoding as running text; a special token with a role: the target token of that role; other
    special tokens and unused ids: nothing. W's row and the piece-table row of the token are subsets."""
    source, target = load_tokenizer(source), load_tokenizer(target)
    ids = sorted(set(int(i) for i in ids))
    found = spell(source, target, ids, len(source), len(target), len(target))
    spelled: dict[int, list[int]] = {s: [] for s in ids}
    spelled.update({s: [t] for s, t in found.exact.items()})
    spelled.update(found.pieces)
    spelled.update({s: [found.roles[s]] for s in ids if s in found.roles})
    return spelled


def compact_vocabularies(
    student: Any, teacher: Any, texts: Sequence[str], *, add_special_tokens: bool = True
) -> tuple[CompactTokenizer, CompactTokenizer]:
    """The (student, teacher) compact adapters for a corpus: every token of ``texts`` on either side
    (encoded with ``add_special_tokens``), both sides' role tokens (bos, eos, pad, unk), and the closure
    under :func:`spellings` (student tokens spelled in teacher tokens for W and the piece tables, teacher
    tokens spelled in student tokens for the mirror table), iterated to a fixed point."""
    student, teacher = load_tokenizer(student), load_tokenizer(teacher)
    kept: list[set[int]] = []
    for tokenizer in (student, teacher):
        encoded = tokenizer.hf_tokenizer().encode_batch(list(texts), add_special_tokens=add_special_tokens)
        kept.append({i for e in encoded for i in e.ids} | set(tokenizer.roles.values()))
    new = [set(kept[0]), set(kept[1])]
    while new[0] or new[1]:
        reached = (
            {i for ids in spellings(teacher, student, new[1]).values() for i in ids} - kept[0],
            {i for ids in spellings(student, teacher, new[0]).values() for i in ids} - kept[1],
        )
        new = [set(reached[0]), set(reached[1])]
        kept[0] |= new[0]
        kept[1] |= new[1]
    return CompactTokenizer(student, kept[0]), CompactTokenizer(teacher, kept[1])


def _check_bases(student: CompactTokenizer, teacher: CompactTokenizer, metadata: dict[str, str], what: str) -> None:
    if not (isinstance(student, CompactTokenizer) and isinstance(teacher, CompactTokenizer)):
        raise TypeError("student, teacher: expected CompactTokenizer adapters")
    for side, compact in (("student", student), ("teacher", teacher)):
        expected = metadata.get(f"{side}_vocab_hash")
        if expected is not None and expected != compact.base.vocab_hash:
            raise ValueError(
                f"{what} was not built for {compact.base.name!r}, the {side} compact vocabulary's base"
            )


def restrict_projection(
    projection: Projection, student: CompactTokenizer, teacher: CompactTokenizer
) -> Projection:
    """W of the two base tokenizers restricted to the compact ids: the rows of the kept student tokens, their
    teacher ids renumbered. An entry whose teacher token is not kept is dropped and its row renormalized
    (none on vocabularies from :func:`compact_vocabularies`); ``metadata["dropped_entries"]`` says how many.
    The vocabularies (token tables, exact matches, raw pairs) are restricted the same way, and the metadata
    names the compact adapters, so the result passes :meth:`Projection.check_tokenizers` with them."""
    _check_bases(student, teacher, projection.metadata, "projection")
    if projection.student_vocab_size < len(student.base) or projection.teacher_vocab_size < len(teacher.base):
        raise ValueError(f"projection: {projection} does not cover the base vocabularies "
                         f"({len(student.base)} x {len(teacher.base)})")  # fmt: skip
    rows = torch.from_numpy(student.ids)
    idx, val = projection.idx.cpu()[rows].long(), projection.val.cpu()[rows].double()
    to_teacher = torch.from_numpy(teacher._compact)
    present = idx >= 0
    new_idx = torch.where(present, to_teacher[idx.clamp_min(0)], -1)
    dropped = present & (new_idx < 0)
    val = torch.where(new_idx >= 0, val, 0)
    sums = val.sum(dim=1, keepdim=True)
    renormalized = dropped.any(dim=1, keepdim=True) & (sums > 0)  # other rows keep their weights bit for bit
    val = torch.where(renormalized, val / torch.where(renormalized, sums, 1), val)
    order = torch.sort((new_idx < 0).to(torch.int8), dim=1, stable=True).indices  # filled slots first, in order
    new_idx, val = new_idx.gather(1, order), val.gather(1, order)
    metadata = {
        **projection.metadata,
        **tokenizer_metadata("student", student),
        **tokenizer_metadata("teacher", teacher),
        "dropped_entries": str(int(dropped.sum())),
    }  # fmt: skip
    vocabularies = projection.vocabularies
    if vocabularies is not None:
        exact = vocabularies.exact_match[rows].long()
        exact = torch.where(exact >= 0, to_teacher[exact.clamp_min(0)], -1)
        raw = vocabularies.raw_pairs.long()
        raw_s, raw_t = torch.from_numpy(student._compact)[raw[:, 0]], to_teacher[raw[:, 1]]
        keep = (raw_s >= 0) & (raw_t >= 0)
        vocabularies = replace(
            vocabularies,
            student=_restrict_table(vocabularies.student, student.ids),
            teacher=_restrict_table(vocabularies.teacher, teacher.ids),
            exact_match=exact.to(torch.int32),
            raw_pairs=pair_tensor(raw_s[keep].numpy(), raw_t[keep].numpy()),
        )
    return Projection(new_idx.to(torch.int32), val.float(), teacher_vocab_size=len(teacher), metadata=metadata,
                      vocabularies=vocabularies)  # fmt: skip


def _restrict_table(table: TokenTable, ids: np.ndarray) -> TokenTable:
    return TokenTable([table.texts[i] for i in ids], [table.kinds[i] for i in ids])


def restrict_piece_tables(
    tables: PieceTables, student: CompactTokenizer, teacher: CompactTokenizer
) -> PieceTables:
    """The piece tables of the two base tokenizers restricted to the compact ids (rows of the kept tokens,
    pieces renumbered). A piece outside the other side's kept ids raises ``ValueError``: the compact
    vocabularies are not closed (use :func:`compact_vocabularies`)."""
    _check_bases(student, teacher, {}, "piece tables")

    def restrict(table: torch.Tensor | None, rows: CompactTokenizer, pieces: CompactTokenizer, side: str):
        if table is None:
            return None
        if table.shape[0] < len(rows.base):
            raise ValueError(
                f"{side} table: {table.shape[0]} rows do not cover {rows.base.name}'s {len(rows.base)} ids"
            )
        kept = table.cpu()[torch.from_numpy(rows.ids)].long()
        if kept.numel() and int(kept.max()) >= len(pieces.base):
            raise ValueError(f"{side} table: pieces beyond {pieces.base.name}'s {len(pieces.base)} ids")
        mapped = torch.where(kept >= 0, torch.from_numpy(pieces._compact)[kept.clamp_min(0)], -1)
        lost = (kept >= 0) & (mapped < 0)
        if bool(lost.any()):
            row, column = (int(x) for x in lost.nonzero()[0])
            raise ValueError(
                f"{side} table: the token {int(rows.ids[row])} of {rows.base.name} is spelled with "
                f"{int(kept[row, column])} of {pieces.base.name}, which the compact vocabulary does not keep"
            )
        return mapped.to(torch.int32)

    return PieceTables(restrict(tables.student, student, teacher, "student"),
                       restrict(tables.teacher, teacher, student, "teacher"))  # fmt: skip
