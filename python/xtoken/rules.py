"""W's string rules (SPEC.md §5) on tokenizer adapters: the exact pass, the decomposition pass, the
special-token roles, the decomposition weights, and the raw (TRL) pairs.
:meth:`xtoken.projection.Projection.build` and :func:`xtoken.compact.restrict_projection` build W
from them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .tokenizer import ROLES, TokenizerAdapter

def quote(text: bytes) -> str:
    """``text`` in double quotes, with escapes for control characters, quotes, backslashes and bytes that
    are not valid UTF-8 (``\\xNN``)."""
    out = []
    for c in text.decode("utf-8", "surrogateescape"):
        if "\udc80" <= c <= "\udcff":
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        elif c in '"\\':
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        else:
            out.append(c.encode("unicode_escape").decode("ascii"))
    return '"' + "".join(out) + '"'


DECOMPOSITION_BATCH = 4096


def check_build_options(top_k: int, beta: float, gamma: float, max_pieces: int) -> None:
    if not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k: expected an integer >= 1, got {top_k!r}")
    if not (isinstance(max_pieces, int) and max_pieces >= 1):
        raise ValueError(f"max_pieces: expected an integer >= 1, got {max_pieces!r}")
    if not (isinstance(beta, (int, float)) and 0 < beta < float("inf")):
        raise ValueError(f"beta: expected a finite number > 0, got {beta!r}")
    if not (isinstance(gamma, (int, float)) and 0 <= gamma < float("inf")):
        raise ValueError(f"gamma: expected a finite number >= 0, got {gamma!r}")


def logit_width(tokenizer: TokenizerAdapter, width: int | None, name: str) -> int:
    """The logit width W covers: by default the tokenizer's size; a smaller width may cut off special tokens
    only."""
    if width is None:
        return len(tokenizer)
    if not (isinstance(width, int) and width >= 1):
        raise ValueError(f"{name}: expected an integer >= 1, got {width!r}")
    surface = tokenizer.surface_bytes
    cut = next((i for i in range(width, len(tokenizer)) if surface[i] is not None), None)
    if cut is not None:
        raise ValueError(
            f"{name}={width} is smaller than {tokenizer.name}'s {len(tokenizer)} ids and would cut "
            f"off the regular token {cut} {quote(surface[cut])}; only trailing special tokens may "
            "lie beyond the logit width"
        )
    return width


def lowest_id_by_bytes(surface: Sequence[bytes | None]) -> dict[bytes, int]:
    by_bytes: dict[bytes, int] = {}
    for i, text in enumerate(surface):
        if text:
            by_bytes.setdefault(text, i)
    return by_bytes


def text_runs(text: bytes) -> list[str | int]:
    """``text`` as maximal runs of valid UTF-8 (``str``) and the bytes that are not valid UTF-8 on their
    own (``int``), in order."""
    runs: list[str | int] = []
    for part in re.split("([\udc80-\udcff])", text.decode("utf-8", "surrogateescape")):
        if len(part) == 1 and "\udc80" <= part <= "\udcff":
            runs.append(ord(part) - 0xDC00)
        elif part:
            runs.append(part)
    return runs


def decompose(
    texts: list[bytes],
    teacher: TokenizerAdapter,
    teacher_by_bytes: dict[bytes, int],
    n_t: int,
    max_pieces: int,
    progress: bool,
) -> list[list[int]]:
    """Per student token text, its first ``max_pieces`` teacher pieces. Valid UTF-8 runs are encoded by the
    teacher in batches (a run the teacher encodes to nothing falls back to its bytes); a byte that is not
    valid UTF-8 on its own becomes the teacher's token for that byte."""
    from tqdm import tqdm

    runs = [text_runs(text) for text in texts]
    fragments = [run for token_runs in runs for run in token_runs if isinstance(run, str)]
    encoded: list[list[int]] = []
    with tqdm(total=len(fragments), desc="decomposition pass", unit="token", disable=not progress) as bar:
        for start in range(0, len(fragments), DECOMPOSITION_BATCH):
            batch = fragments[start : start + DECOMPOSITION_BATCH]
            encoded.extend(teacher.encode_fragments(batch))
            bar.update(len(batch))
    next_encoding = iter(encoded)

    def byte_pieces(data: bytes) -> list[int]:
        return [teacher_by_bytes[b] for b in (bytes([x]) for x in data) if b in teacher_by_bytes]

    decompositions = []
    for token_runs in runs:
        pieces: list[int] = []
        for run in token_runs:
            if isinstance(run, str):
                pieces += next(next_encoding) or byte_pieces(run.encode("utf-8"))
            else:
                pieces += byte_pieces(bytes([run]))
        decompositions.append([t for t in pieces if t < n_t][:max_pieces])
    return decompositions


def piece_weights(pieces: list[int], beta: float, gamma: float, top_k: int) -> list[tuple[int, float]]:
    """(teacher id, weight) for a decomposition: piece i gets beta * gamma**i, repeats add up, the top_k
    largest stay (earlier pieces win ties) and are renormalized to sum 1."""
    weights: dict[int, float] = {}
    for i, t in enumerate(pieces):
        weights[t] = weights.get(t, 0.0) + beta * gamma**i
    kept = sorted((item for item in weights.items() if item[1] > 0), key=lambda item: -item[1])[:top_k]
    total = sum(w for _, w in kept)
    return [(t, w / total) for t, w in kept]


def role_matches(student: TokenizerAdapter, teacher: TokenizerAdapter, n_s: int, n_t: int) -> dict[int, int]:
    """Student special token -> teacher token of the same role (bos, eos, pad, unk; the first role wins)."""
    matches: dict[int, int] = {}
    for role in ROLES:
        s, t = student.roles.get(role), teacher.roles.get(role)
        if s is not None and t is not None and s < n_s and t < n_t and s in student.special_ids:
            matches.setdefault(s, t)
    return matches


def raw_pairs(student: TokenizerAdapter, teacher: TokenizerAdapter, n_s: int, n_t: int) -> torch.Tensor:
    """TRL's vocabulary mapping: teacher and student tokens with the same ``get_vocab()`` string."""
    student_vocab = student.get_vocab()
    pairs = sorted(
        (student_vocab[token], t)
        for token, t in teacher.get_vocab().items()
        if token in student_vocab and student_vocab[token] < n_s and t < n_t
    )
    return pair_tensor(
        np.array([s for s, _ in pairs], dtype=np.int64), np.array([t for _, t in pairs], dtype=np.int64)
    )


def pair_tensor(students: np.ndarray, teachers: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack([students, teachers], axis=1).astype(np.int32).reshape(-1, 2))


def tokenizer_metadata(side: str, tokenizer: TokenizerAdapter) -> dict[str, str]:
    return {
        f"{side}_tokenizer": tokenizer.name,
        f"{side}_vocab_hash": tokenizer.vocab_hash,
        f"{side}_tokenizer_size": str(len(tokenizer)),
        f"{side}_roles": json.dumps(tokenizer.roles, sort_keys=True),
    }


@dataclass(frozen=True)
class Spellings:
    """Source tokens spelled in target tokens by W's rules: ``exact[s]``, the lowest target token with the
    same surface bytes; ``pieces[s]``, the first pieces of the re-encoding of any other token with text;
    ``roles[s]``, the target token of a special token's role (it overrides the other two). A token with no
    text is in none of them."""

    exact: dict[int, int]
    pieces: dict[int, list[int]]
    roles: dict[int, int]


def spell(
    source: TokenizerAdapter,
    target: TokenizerAdapter,
    ids: Iterable[int],
    n_source: int,
    n_target: int,
    max_pieces: int,
    progress: bool = False,
) -> Spellings:
    """:class:`Spellings` of the source ``ids`` (below ``n_source``) in the first ``n_target`` target
    tokens, at most ``max_pieces`` pieces each: the exact pass, the decomposition pass and the roles of
    SPEC.md §5."""
    by_bytes = lowest_id_by_bytes(target.surface_bytes[:n_target])
    surface = source.surface_bytes
    exact: dict[int, int] = {}
    unmatched = []
    for s in ids:
        if surface[s]:
            t = by_bytes.get(surface[s])
            if t is None:
                unmatched.append(s)
            else:
                exact[s] = t
    decomposed = decompose([surface[s] for s in unmatched], target, by_bytes, n_target, max_pieces, progress)
    roles = role_matches(source, target, n_source, n_target)
    return Spellings(exact, dict(zip(unmatched, decomposed)), roles)


def fill_rows(
    student: TokenizerAdapter,
    teacher: TokenizerAdapter,
    v_s: int,
    n_s: int,
    n_t: int,
    *,
    top_k: int,
    beta: float,
    gamma: float,
    max_pieces: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W's rows ``(idx [v_s, top_k], val [v_s, top_k], exact [v_s])`` over the first ``n_s`` student and
    ``n_t`` teacher ids (:meth:`xtoken.projection.Projection.build` documents the three passes);
    ``exact[s]`` is the exact pass's teacher id of student token ``s`` (-1: none)."""
    spelled = spell(student, teacher, range(n_s), n_s, n_t, max_pieces, progress)
    exact = np.full(v_s, -1, dtype=np.int32)
    idx = np.full((v_s, top_k), -1, dtype=np.int32)
    val = np.zeros((v_s, top_k), dtype=np.float32)
    for s, t in spelled.exact.items():
        exact[s] = idx[s, 0] = t
        val[s, 0] = 1.0
    for s, token_pieces in spelled.pieces.items():
        for slot, (t, weight) in enumerate(piece_weights(token_pieces, beta, gamma, top_k)):
            idx[s, slot], val[s, slot] = t, weight
    for s, t in spelled.roles.items():
        idx[s, 0], val[s, 0] = t, 1.0
    return idx, val, exact
