"""Exact span alignment (SPEC.md §2): texts -> token ids, byte spans and the chunk table the losses read.

Both tokenizers encode the same texts. Every token gets a byte span ``[a, b)`` in the UTF-8 bytes of
its text, from the tokenizer's own offsets; a chunk is the text between two consecutive byte offsets
where a token of each side ends. ``align_spans`` (the ``xtoken::align_spans`` op, C++ on the CPU and
one CUDA block per sequence on the GPU) turns the span ends into the chunk table. ``align_texts`` does
the whole path for a batch of texts; ``AlignedCollator`` is the same as a DataLoader ``collate_fn``.

Tokenizers plug in through :class:`SpanTokenizer`; :class:`HFSpanTokenizer` adapts Hugging Face fast
tokenizers (``tokenizers.Tokenizer`` or ``transformers.PreTrainedTokenizerFast``).
"""

from __future__ import annotations

import abc
import functools
import json
import os
import re
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from itertools import chain

import numpy as np
import torch

from . import checks
from . import ops as _ops  # noqa: F401  (registers the op's fake kernel)
from .reference import DROP_REASONS
from .tokenizer import TokenizerAdapter, byte_level_alphabet, load_tokenizer

__all__ = [
    "DROP_REASONS",
    "CHUNK_SHAPES",
    "TokenSpans",
    "SpanTokenizer",
    "HFSpanTokenizer",
    "KeptEncodings",
    "as_span_tokenizer",
    "SpanAlignment",
    "align_spans",
    "AlignStats",
    "AlignedBatch",
    "align_texts",
    "AlignedCollator",
]

CHUNK_SHAPES = ("1:1", "1:N", "M:1", "M:N")
PADDING_SIDES = ("right", "left")


# ---------------------------------------------------------------------------------------------
# Tokenizers: token ids and byte spans


@dataclass(frozen=True)
class TokenSpans:
    """The encoding of a batch of texts by one tokenizer, sequences back to back.

    ``ids``: int64 ``[N]``; ``spans``: int64 ``[N, 2]`` byte spans ``[a, b)`` in the UTF-8 bytes of the
    sequence's text, monotone and non-overlapping, an empty span ``(c, c)`` sitting at the end ``c`` of the
    token before it (0 for the first); ``lengths``: int64 ``[B]`` tokens per text.
    """

    ids: np.ndarray
    spans: np.ndarray
    lengths: np.ndarray


class SpanTokenizer(abc.ABC):
    """What alignment needs from a tokenizer. A tiktoken-based tokenizer would implement the same
    three members (its spans are the running sum of its tokens' byte lengths)."""

    pad_token_id: int

    @abc.abstractmethod
    def encode_spans(self, texts: Sequence[str], *, add_special_tokens: bool, max_length: int | None) -> TokenSpans:
        """Encode ``texts`` (keeping at most ``max_length`` tokens each, special tokens included)."""

    @abc.abstractmethod
    def token(self, token_id: int) -> str:
        """The token's string in the vocabulary (for display)."""


def _untrimmed(config):
    """A tokenizer config (parsed JSON) with every ``trim_offsets`` off: trimmed offsets drop the
    whitespace a token holds, and alignment needs the bytes each token really covers."""
    if isinstance(config, dict):
        return {k: (False if k == "trim_offsets" else _untrimmed(v)) for k, v in config.items()}
    if isinstance(config, list):
        return [_untrimmed(v) for v in config]
    return config


_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class HFSpanTokenizer(SpanTokenizer):
    """A Hugging Face fast tokenizer with byte spans.

    Spans come from the tokenizer's character offsets (with ``trim_offsets`` off), turned into UTF-8
    byte offsets. Where consecutive tokens share a character (byte-level or byte-fallback pieces of one
    character, or a SentencePiece dummy ``▁`` prefixed to the first word), the shared bytes are given
    out in token order by each token's *surface length* (the bytes the token stands for: byte-level
    characters map to one byte each, ``<0xHH>`` to one byte, ``▁`` to a space). A dummy prefix shows up
    as exactly one byte too many in such a group whose first token starts with a space; that token
    gets one byte fewer (a lone dummy ``▁`` gets an empty span).

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` or an object with a ``backend_tokenizer`` (a
            ``PreTrainedTokenizerFast``). It is never modified: it encodes as it is when its offsets are
            untrimmed and it neither pads nor truncates, else through a private copy that does neither.
        pad_token_id: the id written into padding positions (default: the tokenizer's pad token, else 0;
            padding is masked by the attention mask either way).
    """

    def __init__(self, tokenizer, pad_token_id: int | None = None) -> None:
        from tokenizers import Tokenizer

        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if not isinstance(backend, Tokenizer):
            raise TypeError(
                "tokenizer: expected a tokenizers.Tokenizer or a Hugging Face fast tokenizer, got "
                f"{type(tokenizer).__name__}"
            )
        trims = b'"trim_offsets":true' in _component_json(backend.post_processor)
        self._tokenizer = _private_copy(backend) if trims or _pads_or_truncates(backend) else backend
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None and backend.padding is not None:
            pad_token_id = backend.padding["pad_id"]
        self.pad_token_id = int(pad_token_id or 0)
        self._byte_level = b"ByteLevel" in _component_json(backend.pre_tokenizer) + _component_json(backend.decoder)
        self._added = frozenset(backend.get_added_tokens_decoder())
        self._surface_length = np.full(0, -1, dtype=np.int64)  # per id, -1 until met (see _surfaces)
        self._leading_space = np.zeros(0, dtype=bool)
        self._kept: OrderedDict = OrderedDict()  # (text, add_special_tokens, max_length) -> (ids, spans)
        self._keep = 0

    def keep_encodings(self, texts: int) -> None:
        """Keep the encodings of up to ``texts`` distinct texts, the least recently used dropped first (0, the
        default: none), so that training that sees a small corpus for several epochs encodes each text once.
        A batch then costs a lookup per text and a concatenation; its result is the same."""
        self._keep = _check_kept_texts(texts)
        while len(self._kept) > texts:
            self._kept.popitem(last=False)

    def _surfaces(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The surface lengths of ``ids`` and whether each starts with a space. Worked out the first time an id
        is met, for all new ids of a batch at once: the vocabulary is never read as a whole."""
        if ids.size and int(ids.max()) >= self._surface_length.size:
            size = max(int(ids.max()) + 1, self._tokenizer.get_vocab_size(with_added_tokens=True))
            grown, grown_from = np.full(size, -1, dtype=np.int64), self._surface_length.size
            grown[:grown_from] = self._surface_length
            self._surface_length = grown
            self._leading_space = np.concatenate([self._leading_space, np.zeros(size - grown_from, dtype=bool)])
        new = ids[self._surface_length[ids] < 0]
        if new.size:
            new = np.unique(new)
            pieces = [self._tokenizer.id_to_token(i) or "" for i in new.tolist()]
            added = np.fromiter((i in self._added for i in new.tolist()), dtype=bool, count=new.size)
            self._surface_length[new], self._leading_space[new] = _surface_of(pieces, added, self._byte_level)
        return self._surface_length[ids], self._leading_space[ids]

    def token(self, token_id: int) -> str:
        return self._tokenizer.id_to_token(token_id) or f"<{token_id}>"

    def encode_spans(self, texts: Sequence[str], *, add_special_tokens: bool, max_length: int | None) -> TokenSpans:
        if not self._keep or not texts:
            return self._encode_spans(texts, add_special_tokens=add_special_tokens, max_length=max_length)
        return _encode_kept(self._encode_spans, self._kept, self._keep, texts, add_special_tokens, max_length)

    def _encode_spans(self, texts: Sequence[str], *, add_special_tokens: bool, max_length: int | None) -> TokenSpans:
        if _pads_or_truncates(self._tokenizer):  # someone set the shared tokenizer to pad or truncate since
            self._tokenizer = _private_copy(self._tokenizer)
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
        total = int(lengths.sum())
        ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int64, count=total)
        offsets = np.fromiter(
            chain.from_iterable(chain.from_iterable(e.offsets for e in encodings)), dtype=np.int64, count=2 * total
        ).reshape(total, 2)
        sequence = np.repeat(np.arange(len(texts)), lengths)
        byte_offsets = _char_to_byte_offsets(texts, offsets, sequence)
        spans = _share_bytes(byte_offsets, sequence, *self._surfaces(ids))
        if max_length is not None:
            # Truncated after the spans are found, so a kept piece of a character split by the cut
            # still gets its own bytes only.
            inserted = np.fromiter(
                chain.from_iterable(e.special_tokens_mask for e in encodings), dtype=bool, count=total
            )
            keep = _truncation(inserted, sequence, lengths, max_length)
            ids, spans, sequence = ids[keep], spans[keep], sequence[keep]
            lengths = np.bincount(sequence, minlength=len(texts)).astype(np.int64)
        return TokenSpans(ids=ids, spans=_place_empty(spans, sequence), lengths=lengths)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokenizer"] = self._tokenizer.to_str()
        state["_kept"] = OrderedDict()  # a copy starts with none kept
        return state

    def __setstate__(self, state):
        from tokenizers import Tokenizer

        state["_tokenizer"] = Tokenizer.from_str(state["_tokenizer"])
        self.__dict__.update(state)


class KeptEncodings(SpanTokenizer):
    """``tokenizer`` (any :class:`SpanTokenizer`) with the encodings of up to ``texts`` distinct texts kept,
    the least recently used dropped first, so that training that sees a corpus for several epochs encodes each
    text once: a batch then costs a lookup per text and a concatenation, and encodes as ``tokenizer`` does.
    The wrapped tokenizer is not modified. A pickled copy (a DataLoader worker's) starts with nothing kept."""

    def __init__(self, tokenizer: SpanTokenizer, texts: int) -> None:
        if not isinstance(tokenizer, SpanTokenizer):
            raise TypeError(
                f"tokenizer: expected an xtoken.align.SpanTokenizer, got {type(tokenizer).__name__}"
            )
        self.tokenizer = tokenizer
        self._keep = _check_kept_texts(texts)
        self._kept: OrderedDict = OrderedDict()

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def token(self, token_id: int) -> str:
        return self.tokenizer.token(token_id)

    def encode_spans(
        self, texts: Sequence[str], *, add_special_tokens: bool, max_length: int | None
    ) -> TokenSpans:
        encode = self.tokenizer.encode_spans
        if not self._keep or not texts:
            return encode(texts, add_special_tokens=add_special_tokens, max_length=max_length)
        return _encode_kept(encode, self._kept, self._keep, texts, add_special_tokens, max_length)

    def __getstate__(self):
        return {**self.__dict__, "_kept": OrderedDict()}

    def __repr__(self) -> str:
        return f"KeptEncodings({self.tokenizer!r}, {self._keep})"


def _check_kept_texts(texts: int, name: str = "texts") -> int:
    if not isinstance(texts, int) or isinstance(texts, bool) or texts < 0:
        raise ValueError(f"{name}: expected an integer >= 0, got {texts!r}")
    return texts


def _encode_kept(encode, kept: OrderedDict, keep: int, texts: Sequence[str], add_special_tokens: bool,
                 max_length: int | None) -> TokenSpans:
    """``encode``'s spans of ``texts`` through ``kept`` ((text, add_special_tokens, max_length) -> (ids,
    spans), least recently used first, at most ``keep`` entries once done): the texts not kept are encoded in
    one call."""
    keys = [(text, bool(add_special_tokens), max_length) for text in texts]
    new = list(dict.fromkeys(key for key in keys if key not in kept))
    if new:
        encoded = encode([key[0] for key in new], add_special_tokens=add_special_tokens,
                         max_length=max_length)  # fmt: skip
        ends = np.cumsum(encoded.lengths)
        for key, end, length in zip(new, ends.tolist(), encoded.lengths.tolist()):
            kept[key] = (encoded.ids[end - length : end].copy(), encoded.spans[end - length : end].copy())
    found = []
    for key in keys:
        kept.move_to_end(key)
        found.append(kept[key])
    while len(kept) > keep:
        kept.popitem(last=False)
    lengths = np.fromiter((len(ids) for ids, _ in found), dtype=np.int64, count=len(found))
    return TokenSpans(ids=np.concatenate([ids for ids, _ in found]),
                      spans=np.concatenate([spans for _, spans in found]), lengths=lengths)


def as_span_tokenizer(tokenizer) -> SpanTokenizer:
    """A :class:`SpanTokenizer` for ``tokenizer``: itself if it is one; for an xtoken tokenizer adapter (or
    a name or path that :func:`xtoken.tokenizer.load_tokenizer` takes) an :class:`HFSpanTokenizer` over
    its Hugging Face form; else an :class:`HFSpanTokenizer` over ``tokenizer``.

    The wrapper of a tokenizer object is built once and cached while the object lives (and built again when
    its vocabulary size or pad token changes), so that passing the same Hugging Face tokenizer to
    :func:`align_texts` batch after batch costs nothing. A plain ``tokenizers.Tokenizer`` is held by its own
    wrapper, so the cache keeps the most recent :data:`WRAPPER_CACHE_SIZE` wrappers."""
    if isinstance(tokenizer, SpanTokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    key = _wrapper_key(tokenizer)
    cached = _WRAPPERS.get(id(tokenizer))
    if cached is not None and cached[0]() is tokenizer and cached[1] == key:
        return cached[2]
    if isinstance(tokenizer, TokenizerAdapter):
        wrapper = HFSpanTokenizer(tokenizer.hf_tokenizer(), pad_token_id=tokenizer.roles.get("pad"))
    else:
        wrapper = HFSpanTokenizer(tokenizer)
    try:
        ref = weakref.ref(tokenizer, functools.partial(_forget_wrapper, id(tokenizer)))
    except TypeError:  # an object without weak references stays alive in the cache instead
        ref = functools.partial(_same, tokenizer)
    _WRAPPERS.pop(id(tokenizer), None)
    while len(_WRAPPERS) >= WRAPPER_CACHE_SIZE:
        del _WRAPPERS[next(iter(_WRAPPERS))]
    _WRAPPERS[id(tokenizer)] = (ref, key, wrapper)
    return wrapper


WRAPPER_CACHE_SIZE = 32
_WRAPPERS: dict[int, tuple] = {}
"""id(tokenizer) -> (a reference to the tokenizer, its :func:`_wrapper_key`, its span tokenizer)."""


def _forget_wrapper(key: int, ref, wrappers: dict = _WRAPPERS) -> None:
    """The weak-reference callback of a dead tokenizer (``wrappers`` bound early: it may run at shutdown)."""
    if wrappers.get(key, (None,))[0] is ref:
        del wrappers[key]


def _same(obj):
    return obj


def _wrapper_key(tokenizer) -> tuple:
    """What a cached wrapper depends on that a user may change: the vocabulary size and the pad token."""
    if isinstance(tokenizer, TokenizerAdapter):
        return len(tokenizer), tokenizer.roles.get("pad")
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    size = backend.get_vocab_size(with_added_tokens=True) if hasattr(backend, "get_vocab_size") else None
    return size, getattr(tokenizer, "pad_token_id", None)


def _component_json(component) -> bytes:
    """A tokenizer component (pre-tokenizer, decoder, post-processor) as JSON; empty for none."""
    return b"" if component is None else component.__getstate__()


def _pads_or_truncates(tokenizer) -> bool:
    return tokenizer.padding is not None or tokenizer.truncation is not None


def _private_copy(tokenizer):
    """A copy of a ``tokenizers.Tokenizer`` that neither pads nor truncates, with every ``trim_offsets`` off."""
    from tokenizers import Tokenizer

    config = json.loads(tokenizer.to_str())
    config["truncation"] = config["padding"] = None
    return Tokenizer.from_str(json.dumps(_untrimmed(config)))


_BYTE_LEVEL_CHARS = np.zeros(0x145, dtype=bool)  # code point -> in the byte-level alphabet (the last entry: beyond)
_BYTE_LEVEL_CHARS[[ord(c) for c in byte_level_alphabet().values()]] = True


def _run_sums(values: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """``values[start[k]:end[k]].sum()`` for every k."""
    total = np.zeros(values.size + 1, dtype=np.int64)
    np.cumsum(values, out=total[1:])
    return total[end] - total[start]


def _surface_of(pieces: list[str], added: np.ndarray, byte_level: bool) -> tuple[np.ndarray, np.ndarray]:
    """For vocabulary strings: the number of bytes each token stands for, and whether the first is a space.
    Added tokens stand for their own text; byte-level characters for one byte each; SentencePiece's ``▁`` for
    a space and ``<0xHH>`` for the byte HH. Vectorized over the code points of all the strings."""
    code_points = np.frombuffer("".join(pieces).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    utf8_width = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    if byte_level:
        width = np.where(_BYTE_LEVEL_CHARS[np.minimum(code_points, _BYTE_LEVEL_CHARS.size - 1)], 1, utf8_width)
        spaces = [ord(" "), ord(byte_level_alphabet()[ord(" ")])]
    else:
        width = np.where(code_points == ord("▁"), 1, utf8_width)
        spaces = [ord(" "), ord("▁")]
    piece_length = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    end = np.cumsum(piece_length)
    start = end - piece_length
    length = np.where(added, _run_sums(utf8_width, start, end), _run_sums(width, start, end))
    first = np.full(len(pieces), -1, dtype=np.int64)
    first[piece_length > 0] = code_points[start[piece_length > 0]]
    leading_space = np.where(added, first == ord(" "), np.isin(first, spaces))
    if not byte_level:
        for k in np.flatnonzero((piece_length == 6) & ~added):
            if _BYTE_FALLBACK.fullmatch(pieces[k]):
                length[k], leading_space[k] = 1, pieces[k][3:5] == "20"
    return length, leading_space


def _char_to_byte_offsets(texts: Sequence[str], offsets: np.ndarray, sequence: np.ndarray) -> np.ndarray:
    """Character offsets of tokens (each in the text of its sequence) -> UTF-8 byte offsets."""
    joined = "".join(texts)
    if joined.isascii():
        return offsets
    code_points = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    byte_at = np.zeros(code_points.size + 1, dtype=np.int64)  # byte offset of each character in `joined`
    np.cumsum(widths, out=byte_at[1:])
    char_base = np.zeros(len(texts), dtype=np.int64)
    np.cumsum([len(t) for t in texts[:-1]], out=char_base[1:])
    base = char_base[sequence][:, None]
    return byte_at[base + offsets] - byte_at[base]


def _share_bytes(
    byte_offsets: np.ndarray, sequence: np.ndarray, surface_length: np.ndarray, leading_space: np.ndarray
) -> np.ndarray:
    """Byte spans that no two tokens share, from the tokenizer's (possibly shared) byte offsets.

    A *group* is a run of non-empty tokens each of which overlaps the next. The group's bytes
    ``[A, Z)`` (first start, last end) are given out in order by surface length, the last token taking
    the rest; one byte too many with a leading space is a dummy prefix, taken off the first token.
    Tokens in no group keep their offsets.
    """
    start, end = byte_offsets[:, 0].copy(), byte_offsets[:, 1].copy()
    nonempty = np.flatnonzero(end > start)
    if nonempty.size < 2:
        return np.stack([start, end], axis=1)
    a, z = start[nonempty], end[nonempty]
    overlaps = (sequence[nonempty[1:]] == sequence[nonempty[:-1]]) & (a[1:] < z[:-1])
    if not overlaps.any():
        return np.stack([start, end], axis=1)
    in_group = np.zeros(nonempty.size, dtype=bool)
    in_group[:-1] |= overlaps
    in_group[1:] |= overlaps
    first = in_group & ~np.concatenate(([False], overlaps))
    last = in_group & ~np.concatenate((overlaps, [False]))
    members = nonempty[in_group]
    first_member = np.flatnonzero(first[in_group])  # index in `members` of each group's first token
    group = np.cumsum(first[in_group]) - 1
    lo, hi = start[nonempty[first]], end[nonempty[last]]
    length = surface_length[members].copy()
    total = np.bincount(group, weights=length, minlength=lo.size).astype(np.int64)
    dummy = (total == hi - lo + 1) & leading_space[nonempty[first]]
    length[first_member[dummy]] -= 1
    before = np.cumsum(length) - length
    before -= before[first_member][group]
    start[members] = np.minimum(lo[group] + before, hi[group])
    end[members] = np.minimum(lo[group] + before + length, hi[group])
    end[nonempty[last]] = hi
    return np.stack([start, end], axis=1)


def _truncation(inserted: np.ndarray, sequence: np.ndarray, lengths: np.ndarray, max_length: int) -> np.ndarray:
    """Which tokens Hugging Face truncation (right side) keeps: every token the tokenizer inserted and
    the first ``max_length`` minus that many tokens of the text."""
    added = np.bincount(sequence, weights=inserted, minlength=lengths.size).astype(np.int64)
    if added.size and added.max() > max_length:
        raise ValueError(f"max_length = {max_length} leaves no room for the {added.max()} special tokens added")
    counted = np.zeros(sequence.size + 1, dtype=np.int64)  # text tokens before each flat index
    np.cumsum(~inserted, out=counted[1:])
    first = np.cumsum(lengths) - lengths
    rank = counted[:-1] - counted[first][sequence]  # among the text tokens of the sequence
    return inserted | (rank < (max_length - added)[sequence])


def _place_empty(spans: np.ndarray, sequence: np.ndarray) -> np.ndarray:
    """Monotone spans: every end at least the end before it in the sequence (a safety net for
    overlapping offsets outside groups), and every empty span at the end of the token before it."""
    start, end = spans[:, 0].copy(), spans[:, 1].copy()
    end[end <= start] = 0
    if end.size:
        shift = sequence * (int(end.max()) + 1)
        end = np.maximum.accumulate(end + shift) - shift
    previous = np.concatenate(([0], end[:-1]))
    previous[np.concatenate(([True], sequence[1:] != sequence[:-1]))] = 0
    return np.stack([np.clip(start, previous, end), end], axis=1)


# ---------------------------------------------------------------------------------------------
# The op: span ends -> chunk table


def _padding_side(value: str, name: str) -> bool:
    if value not in PADDING_SIDES:
        raise ValueError(f"{name}: expected 'right' or 'left', got {value!r}")
    return value == "left"


@dataclass(frozen=True)
class SpanAlignment:
    """The outputs of ``xtoken::align_spans``, still on the inputs' device.

    ``chunks``: int32 ``[B, C, 4]``, C = min(T_s, T_t): the first ``counts[b]`` rows of sequence b are its
    chunks ``(s0, s1, t0, t1)`` over flattened predictor rows, the rest -1. ``counts``: int32 ``[B]``, -1 for
    a sequence with invalid ends or lengths. ``dropped``: int32 ``[B, 2, 3]``, non-empty tokens of each side
    (student, teacher) in no kept chunk, by reason (``DROP_REASONS``).
    """

    chunks: torch.Tensor
    counts: torch.Tensor
    dropped: torch.Tensor
    inputs: tuple = field(repr=False, compare=False)

    def table(self) -> torch.Tensor:
        """The int32 ``[K, 4]`` chunk table the losses read, sequence by sequence. This is the one point that
        waits for the device (K is data-dependent); raises ``ValueError`` on a sequence with invalid input."""
        counts = self.counts.cpu()
        invalid = torch.nonzero(counts < 0)
        if invalid.numel():
            raise ValueError(_explain_invalid(self.inputs, int(invalid[0, 0])))
        if self.chunks.is_cuda:
            keep = torch.arange(self.chunks.shape[1], device=self.chunks.device) < self.counts[:, None]
            return self.chunks[keep]
        # On the CPU, numpy: this small copy is not worth waking torch's thread pool (whose spinning
        # threads would then compete with the tokenizers' own).
        keep = np.arange(self.chunks.shape[1]) < counts.numpy()[:, None]
        return torch.from_numpy(self.chunks.numpy()[keep])


def _explain_invalid(inputs: tuple, b: int) -> str:
    for side, (ends, lengths, left) in zip(("student", "teacher"), inputs):
        total = ends.shape[1]
        n = int(lengths[b])
        if not 0 <= n <= total:
            return f"{side}_lengths[{b}] = {n} is outside [0, {total}] (the padded length)"
        real = (ends[b, total - n :] if left else ends[b, :n]).cpu().tolist()
        for j, (prev, end) in enumerate(zip([0] + real, real)):
            if end < prev:
                return (
                    f"{side}_ends: sequence {b} decreases at token {j} (end {end} after {prev}); the ends must "
                    "never decrease over a sequence's tokens (an empty token repeats the end before it)"
                )
    return f"sequence {b}: invalid input"


def align_spans(
    student_ends: torch.Tensor,
    student_lengths: torch.Tensor,
    teacher_ends: torch.Tensor,
    teacher_lengths: torch.Tensor,
    *,
    student_padding_side: str = "right",
    teacher_padding_side: str = "right",
) -> SpanAlignment:
    """Chunks from the span ends of both tokenizations of the same texts (SPEC.md §2); never syncs.

    Args:
        student_ends, teacher_ends: int32 ``[B, T]``, where each token's byte span ends. Over the real tokens
            of a sequence they never decrease; a token is empty (a BOS, EOS or chat marker not in the text)
            when its end equals the end before it (0 for the first token). Padding positions are not read.
        student_lengths, teacher_lengths: integer ``[B]``, real tokens per sequence.
        student_padding_side, teacher_padding_side: where each side's padding is, ``"right"`` or ``"left"``.

    Returns:
        A :class:`SpanAlignment`; ``.table()`` gives the ``[K, 4]`` chunk table.
    """
    sides = []
    for name, ends, lengths, padding_side in (
        ("student", student_ends, student_lengths, student_padding_side),
        ("teacher", teacher_ends, teacher_lengths, teacher_padding_side),
    ):
        left = _padding_side(padding_side, f"{name}_padding_side")
        if not isinstance(ends, torch.Tensor):
            raise TypeError(f"{name}_ends: expected an integer [B, T] tensor, got {type(ends).__name__}")
        lengths = torch.as_tensor(lengths, device=ends.device)
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise TypeError(f"{name}_lengths: expected an integer tensor, got {lengths.dtype}")
        ends = checks.int32_index(ends, f"{name}_ends")
        sides.append((ends, checks.int32_index(lengths, f"{name}_lengths"), left))
    (se, sl, sleft), (te, tl, tleft) = sides
    chunks, counts, dropped = torch.ops.xtoken.align_spans(se, sl, sleft, te, tl, tleft)
    return SpanAlignment(chunks, counts, dropped, inputs=tuple(sides))


# ---------------------------------------------------------------------------------------------
# Texts -> aligned batch


@dataclass(frozen=True)
class AlignStats:
    """Chunk counts by shape (student tokens : teacher tokens) and the non-empty tokens of each side
    that no chunk holds, by reason (``DROP_REASONS``)."""

    shapes: dict[str, int]
    student_tokens: int
    teacher_tokens: int
    student_dropped: dict[str, int]
    teacher_dropped: dict[str, int]

    @property
    def chunks(self) -> int:
        return sum(self.shapes.values())

    @property
    def one_to_one_share(self) -> float:
        return self.shapes["1:1"] / max(self.chunks, 1)

    @classmethod
    def compute(cls, chunks: torch.Tensor, dropped: torch.Tensor) -> AlignStats:
        """From a ``[K, 4]`` chunk table and the ``[B, 2, 3]`` dropped counts of ``align_spans``."""
        table = chunks.cpu().numpy().astype(np.int64)
        s, t = table[:, 1] - table[:, 0], table[:, 3] - table[:, 2]
        masks = (s == 1) & (t == 1), (s == 1) & (t > 1), (s > 1) & (t == 1), (s > 1) & (t > 1)
        per_reason = dropped.cpu().numpy().astype(np.int64).sum(0).tolist()
        return cls(
            shapes={shape: int(m.sum()) for shape, m in zip(CHUNK_SHAPES, masks)},
            student_tokens=int(s.sum()) + sum(per_reason[0]),
            teacher_tokens=int(t.sum()) + sum(per_reason[1]),
            student_dropped=dict(zip(DROP_REASONS, per_reason[0])),
            teacher_dropped=dict(zip(DROP_REASONS, per_reason[1])),
        )

    def __str__(self) -> str:
        shapes = ", ".join(f"{k} {v}" for k, v in self.shapes.items())
        lines = [f"chunks: {self.chunks} ({shapes}; 1:1 share {self.one_to_one_share:.1%})"]
        for side, tokens, dropped in (
            ("student", self.student_tokens, self.student_dropped),
            ("teacher", self.teacher_tokens, self.teacher_dropped),
        ):
            reasons = ", ".join(f"{k} {v}" for k, v in dropped.items())
            lines.append(f"{side}: {tokens} tokens with text, dropped {sum(dropped.values())} ({reasons})")
        return "\n".join(lines)


@dataclass(frozen=True)
class AlignedBatch:
    """Both tokenizations of a batch of texts and their chunks.

    ``*_input_ids``, ``*_attention_mask``: int64 ``[B, T]``; ``*_spans``: int32 ``[B, T, 2]`` byte spans in
    the UTF-8 bytes of each text (0 in padding); ``chunks``: int32 ``[K, 4]`` over flattened rows
    ``b * T + j``; ``chunk_counts``: int32 ``[B]`` chunks per text (in order in ``chunks``);
    ``*_targets``: int64 ``[B * T]``, the realized next token of each row, -1 where none (the last real
    token and padding); ``stats``: :class:`AlignStats`; ``student_labels``: int64 ``[B, T]``, the student's CE
    labels as Hugging Face models take them (the input ids, -100 where the CE does not train: padding, and for
    :func:`xtoken.align_conversations` the template and untrained messages).
    """

    student_input_ids: torch.Tensor
    student_attention_mask: torch.Tensor
    student_spans: torch.Tensor
    student_targets: torch.Tensor
    teacher_input_ids: torch.Tensor
    teacher_attention_mask: torch.Tensor
    teacher_spans: torch.Tensor
    teacher_targets: torch.Tensor
    chunks: torch.Tensor
    chunk_counts: torch.Tensor
    stats: AlignStats
    student_labels: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> AlignedBatch:
        """The batch with every tensor on ``device``."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return AlignedBatch(**{
            name: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for name, v in values.items()
        })  # fmt: skip


@dataclass(frozen=True)
class _Padded:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    spans: torch.Tensor
    ends: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor


def _pad(encoded: TokenSpans, pad_token_id: int, left: bool) -> _Padded:
    lengths = encoded.lengths
    batch = lengths.size
    width = int(lengths.max()) if batch else 0
    sequence = np.repeat(np.arange(batch), lengths)
    first = np.cumsum(lengths) - lengths  # flat index of each sequence's first token
    column = np.arange(sequence.size) - first[sequence]
    if left:
        column += (width - lengths)[sequence]
    row = sequence * width + column
    input_ids = np.full(batch * width, pad_token_id, dtype=np.int64)
    input_ids[row] = encoded.ids
    mask = np.zeros(batch * width, dtype=np.int64)
    mask[row] = 1
    spans = np.zeros((batch * width, 2), dtype=np.int32)
    spans[row] = encoded.spans
    targets = np.full(batch * width, -1, dtype=np.int64)
    has_next = np.flatnonzero(sequence[:-1] == sequence[1:])
    targets[row[has_next]] = encoded.ids[has_next + 1]
    return _Padded(
        input_ids=torch.from_numpy(input_ids).view(batch, width),
        attention_mask=torch.from_numpy(mask).view(batch, width),
        spans=torch.from_numpy(spans).view(batch, width, 2),
        ends=torch.from_numpy(np.ascontiguousarray(spans[:, 1])).view(batch, width),
        targets=torch.from_numpy(targets),
        lengths=torch.from_numpy(lengths.astype(np.int32)),
    )


def _max_length(max_length) -> int | None:
    return None if max_length is None else checks.count(max_length, "max_length", minimum=1)


def example_texts(examples: Sequence, text_key: str) -> list[str]:
    """The texts of a batch of examples, each a text or a mapping holding one under ``text_key``."""
    texts = []
    for i, example in enumerate(examples):
        text = example if isinstance(example, str) else example.get(text_key) if hasattr(example, "get") else None
        if not isinstance(text, str):
            raise TypeError(
                f"example {i}: expected a text or a mapping with a {text_key!r} text, got {type(example).__name__}"
                + (f" with keys {sorted(map(str, example))}" if hasattr(example, "keys") else "")
            )
        texts.append(text)
    return texts


def align_texts(
    texts: Sequence[str],
    student_tokenizer,
    teacher_tokenizer,
    *,
    max_length: int | None = None,
    add_special_tokens: bool = True,
    padding_side: str = "right",
) -> AlignedBatch:
    """Tokenize ``texts`` with both tokenizers and align them exactly (SPEC.md §2).

    Args:
        texts: the batch of texts.
        student_tokenizer, teacher_tokenizer: Hugging Face fast tokenizers (``tokenizers.Tokenizer`` or
            ``PreTrainedTokenizerFast``) or :class:`SpanTokenizer` objects. Wrap a tokenizer once with
            :func:`as_span_tokenizer` when aligning many batches (the wrapper reads the vocabulary).
        max_length: keep at most this many tokens per text on each side (special tokens included).
            Chunks after the last byte that both sides reach are dropped as ``truncated``.
        add_special_tokens: let each tokenizer add its BOS/EOS (they get empty spans, never targets).
        padding_side: ``"right"`` or ``"left"``, for both sides.

    Returns:
        An :class:`AlignedBatch` (on the CPU).
    """
    texts = checks.texts(texts)
    max_length = _max_length(max_length)
    if not isinstance(add_special_tokens, (bool, np.bool_)):
        raise TypeError(f"add_special_tokens: expected a bool, got {type(add_special_tokens).__name__}")
    left = _padding_side(padding_side, "padding_side")
    padded = []
    for tokenizer in (as_span_tokenizer(student_tokenizer), as_span_tokenizer(teacher_tokenizer)):
        encoded = tokenizer.encode_spans(texts, add_special_tokens=add_special_tokens, max_length=max_length)
        padded.append(_pad(encoded, tokenizer.pad_token_id, left))
    student, teacher = padded
    alignment = align_spans(
        student.ends, student.lengths, teacher.ends, teacher.lengths,
        student_padding_side=padding_side, teacher_padding_side=padding_side,
    )  # fmt: skip
    chunks = alignment.table()
    return AlignedBatch(
        student_input_ids=student.input_ids,
        student_attention_mask=student.attention_mask,
        student_spans=student.spans,
        student_targets=student.targets,
        teacher_input_ids=teacher.input_ids,
        teacher_attention_mask=teacher.attention_mask,
        teacher_spans=teacher.spans,
        teacher_targets=teacher.targets,
        chunks=chunks,
        chunk_counts=alignment.counts,
        stats=AlignStats.compute(chunks, alignment.dropped),
        student_labels=student.input_ids.masked_fill(student.attention_mask == 0, -100),
    )


class AlignedCollator:
    """``align_texts`` as a DataLoader ``collate_fn``. Picklable, so it works in worker processes.

    Each example is a text, or a mapping holding one under ``text_key``. The other arguments are those
    of :func:`align_texts`.
    """

    def __init__(
        self,
        student_tokenizer,
        teacher_tokenizer,
        max_length: int | None = None,
        *,
        add_special_tokens: bool = True,
        padding_side: str = "right",
        text_key: str = "text",
    ) -> None:
        _padding_side(padding_side, "padding_side")
        self.student = as_span_tokenizer(student_tokenizer)
        self.teacher = as_span_tokenizer(teacher_tokenizer)
        self.max_length = _max_length(max_length)
        self.add_special_tokens = add_special_tokens
        self.padding_side = padding_side
        self.text_key = text_key

    def __call__(self, examples: Sequence) -> AlignedBatch:
        texts = example_texts(examples, self.text_key)
        return align_texts(
            texts, self.student, self.teacher, max_length=self.max_length,
            add_special_tokens=self.add_special_tokens, padding_side=self.padding_side,
        )  # fmt: skip
