"""Small tokenizers trained on the fly, for tests (no downloads; deterministic; well under a second each).

- :func:`digit_splitting_bpe`: byte-level BPE that splits numbers into single digits (like Qwen).
- :func:`digit_packing_bpe`: byte-level BPE that packs up to three digits per token (like Llama-3).
- :func:`sentencepiece_bpe`: SentencePiece-style BPE (``▁`` for a space) with ``<0xHH>`` byte fallback,
  in the Metaspace form or the Llama-2 form (a ``Prepend("▁")`` normalizer).
- :func:`to_tiktoken`: the same byte-level vocabulary as a ``tiktoken.Encoding``.
- :func:`save_pretrained`: a folder with ``tokenizer.json`` and ``tokenizer_config.json`` (roles).

Each trainer is cached; treat the returned ``tokenizers.Tokenizer`` as read-only.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# The split patterns of Qwen (one digit per pre-token) and Llama-3 (up to three digits per pre-token).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = QWEN_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")

DIGIT_SPLITTING_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
DIGIT_SPLITTING_ROLES = {"eos": "<|endoftext|>", "pad": "<|endoftext|>"}
DIGIT_PACKING_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>")
DIGIT_PACKING_ROLES = {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>"}
SENTENCEPIECE_SPECIALS = ("<unk>", "<s>", "</s>")
SENTENCEPIECE_ROLES = {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "In 201 there were 42 cats, 7 dogs and 365 birds; by 2024 only 99 remained!",
    'She said: "Hello, world" (and then left) -- at 10:30 on 12/05.',
    "Prices rose 15% to $3.50 per item, i.e. 0.25 more than in 1999.",
    "def main():\n    return [x * 2 for x in range(100)]\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 20 30 100 200 201 300 999 1000 2048.",
    "Café crème, naïve façade, über-cool, jalapeño: déjà vu.",
    "日本語のテキストと中文文本 mixed with English words.",
    "Tabs\tand  double  spaces, new\nlines\n\nand punctuation: ! ? ; # & * @ ^ ~ ` | < > { } [ ] _ + = ' \\",
    "international interactions intervened; running, jumping, singing and dancing.",
    "Emoji 😀 and 🎉 appear here, with the thin space\u2009and a zero width joiner\u200d.",
]
CORPUS = [sentence for _ in range(20) for sentence in _SENTENCES]
"""The training corpus (also handy as sample text in tests)."""


def _byte_level_bpe(split_pattern: str, special_tokens: tuple[str, ...], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


@functools.cache
def digit_splitting_bpe() -> Tokenizer:
    """Byte-level BPE whose pre-tokenizer isolates every digit (Qwen's rule); roles: DIGIT_SPLITTING_ROLES."""
    return _byte_level_bpe(QWEN_SPLIT, DIGIT_SPLITTING_SPECIALS, vocab_size=700)


@functools.cache
def digit_packing_bpe() -> Tokenizer:
    """Byte-level BPE whose pre-tokenizer packs up to three digits (Llama-3's rule).
    Roles: DIGIT_PACKING_ROLES."""
    return _byte_level_bpe(LLAMA3_SPLIT, DIGIT_PACKING_SPECIALS, vocab_size=600)


@functools.cache
def sentencepiece_bpe(style: str = "metaspace") -> Tokenizer:
    """SentencePiece-style BPE with byte fallback: ids 0-2 are ``<unk> <s> </s>``, ids 3-258 the byte tokens
    ``<0x00>``..``<0xFF>``, then the trained pieces (``▁`` marks a space). ``style="metaspace"`` uses a
    Metaspace pre-tokenizer; ``style="llama2"`` the Llama-2 form: a ``Prepend("▁")`` + ``Replace(" ", "▁")``
    normalizer and no pre-tokenizer. Roles: SENTENCEPIECE_ROLES."""
    if style not in ("metaspace", "llama2"):
        raise ValueError(f"style: expected 'metaspace' or 'llama2', got {style!r}")
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=list(SENTENCEPIECE_SPECIALS), show_progress=False
    )
    trained.train_from_iterator(CORPUS, trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = {token: i for i, token in enumerate(SENTENCEPIECE_SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(SENTENCEPIECE_SPECIALS) + b for b in range(256)})
    for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(merge) for merge in model["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if style == "metaspace":
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first", split=True
        )
    else:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])  # fmt: skip
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SENTENCEPIECE_SPECIALS]
    )
    return tokenizer


def to_tiktoken(tokenizer: Tokenizer, split_pattern: str, name: str = "test-tiktoken"):
    """A byte-level HF BPE as a ``tiktoken.Encoding`` with the same ids: a token's rank is its id (trained
    merges get increasing ids, so ranks follow the merge order), special tokens keep their ids."""
    import tiktoken
    from xtoken.tokenizer import byte_level_alphabet

    char_to_byte = {c: b for b, c in byte_level_alphabet().items()}
    added = tokenizer.get_added_tokens_decoder()
    ranks = {
        bytes(char_to_byte[c] for c in token): i
        for token, i in tokenizer.get_vocab(with_added_tokens=False).items()
        if i not in added
    }
    specials = {token.content: i for i, token in added.items()}
    return tiktoken.Encoding(name, pat_str=split_pattern, mergeable_ranks=ranks, special_tokens=specials)


def save_pretrained(tokenizer: Tokenizer, folder: Path, roles: dict[str, str]) -> Path:
    """Write ``folder/tokenizer.json`` and a ``tokenizer_config.json`` naming the role tokens; return
    ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {f"{role}_token": token for role, token in roles.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


# Chat templates as models ship them (written here, not taken from the package): Llama-3's header template with
# BOS (it trims contents, like the original), ChatML as Qwen writes it (no BOS), and a Llama-2 style [INST]
# template for the SentencePiece tokenizer (plain-text markers, BOS, EOS after each answer).
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
INST_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- endfor %}"
)
LLAMA3_CHAT_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@functools.cache
def chat_tokenizer(kind: str):
    """A transformers fast tokenizer with a chat template, built on the tokenizers above: ``"llama3"`` (the
    digit-packing BPE with Llama-3's header tokens added; eos = <|eot_id|>), ``"chatml"`` (the digit-splitting BPE;
    eos = <|im_end|>) or ``"sentencepiece"`` (the INST template). Treat it as read-only."""
    from transformers import PreTrainedTokenizerFast

    if kind == "llama3":
        tokenizer = Tokenizer.from_str(digit_packing_bpe().to_str())
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_CHAT_SPECIALS])
        roles = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>")
        template = LLAMA3_TEMPLATE
    elif kind == "chatml":
        tokenizer = digit_splitting_bpe()
        roles, template = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), CHATML_TEMPLATE
    elif kind == "sentencepiece":
        tokenizer = sentencepiece_bpe()
        roles, template = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"), INST_TEMPLATE
    else:
        raise ValueError(f"kind: expected 'llama3', 'chatml' or 'sentencepiece', got {kind!r}")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=template, **roles)
