"""Building W and the common pairs from two tokenizers (SPEC.md §5), the audit, and safetensors I/O."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import tokenizers_util as tu
import torch
from xtoken import Projection
from xtoken.audit import AUDIT_CLASSES
from xtoken.projection import TokenTable
from xtoken.tokenizer import HFTokenizer, TiktokenTokenizer

HAS_TIKTOKEN = importlib.util.find_spec("tiktoken") is not None
THREE_PIECES = (0.9 / 0.999, 0.09 / 0.999, 0.009 / 0.999)  # 0.9009, 0.0901, 0.0090


def packing() -> HFTokenizer:
    return HFTokenizer(tu.digit_packing_bpe(), name="digit-packing", roles=tu.DIGIT_PACKING_ROLES)


def splitting() -> HFTokenizer:
    return HFTokenizer(tu.digit_splitting_bpe(), name="digit-splitting", roles=tu.DIGIT_SPLITTING_ROLES)


def sentencepiece(style: str = "metaspace") -> HFTokenizer:
    return HFTokenizer(
        tu.sentencepiece_bpe(style), name=f"sentencepiece-{style}", roles=tu.SENTENCEPIECE_ROLES
    )


@pytest.fixture(scope="module")
def student():
    return packing()


@pytest.fixture(scope="module")
def teacher():
    return splitting()


@pytest.fixture(scope="module")
def W(student, teacher):
    return Projection.build(student, teacher)


def pairs_set(pairs: torch.Tensor) -> set[tuple[int, int]]:
    return set(map(tuple, pairs.tolist()))


def assert_one_to_one(pairs: torch.Tensor) -> None:
    assert pairs.dtype == torch.int32 and pairs.dim() == 2 and pairs.shape[1] == 2
    assert len(set(pairs[:, 0].tolist())) == len(pairs) == len(set(pairs[:, 1].tolist()))
    assert bool((pairs[1:, 0] > pairs[:-1, 0]).all())  # sorted by student id


# ------------------------------------------------------------------------------------------------ rows of W
def test_rows_sum_to_one_or_are_empty_only_for_unmapped_specials(W, student):
    sums = W.val.double().sum(dim=1)
    empty = (W.idx < 0).all(dim=1)
    assert bool(((sums - 1).abs()[~empty] < 1e-6).all())
    assert bool((sums[empty] == 0).all())
    unmapped = set(empty.nonzero().flatten().tolist())
    assert unmapped <= student.special_ids
    assert W.student_vocab_size == len(student) and W.top_k == 4


def test_exact_matches_are_one_hot(W, student, teacher):
    exact = W.vocabularies.exact_match
    matched = (exact >= 0).nonzero().flatten().tolist()
    assert len(matched) > 300
    for s in matched:
        t = int(exact[s])
        assert W.row(s) == [(t, 1.0)]
        assert student.surface_bytes[s] == teacher.surface_bytes[t]
        assert t == min(i for i, b in enumerate(teacher.surface_bytes) if b == student.surface_bytes[s])
    assert len(matched) == sum(1 for b in student.surface_bytes if b and b in set(teacher.surface_bytes))


def test_three_digit_numeral_decomposes_with_paper_weights(W, student, teacher):
    s = student.get_vocab()["201"]
    assert W.vocabularies.exact_match[s] == -1
    row = W.row(s)
    assert [teacher.token_strings[t] for t, _ in row] == ["2", "0", "1"]
    np.testing.assert_allclose([w for _, w in row], THREE_PIECES, rtol=1e-6)
    assert [round(w, 4) for _, w in row] == [0.9009, 0.0901, 0.009]


def test_decomposition_pieces_spell_the_student_token(W, student, teacher):
    """A decomposed row lists the teacher's pieces in order; with at most 4 distinct pieces their bytes
    concatenate to the student token's bytes (no normalization in these tokenizers)."""
    checked = 0
    for s, t in enumerate(W.vocabularies.exact_match.tolist()):
        text = student.surface_bytes[s]
        if t >= 0 or text is None:
            continue
        pieces = (
            teacher.encode_fragments([text.decode("utf-8", "surrogateescape")])[0] if _valid(text) else None
        )
        if pieces is None or len(pieces) > 4 or len(set(pieces)) < len(pieces):
            continue
        row = W.row(s)
        assert [t for t, _ in row] == pieces
        assert b"".join(teacher.surface_bytes[t] for t, _ in row) == text
        checked += 1
    assert checked >= 10


def _valid(text: bytes) -> bool:
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_repeated_pieces_add_up_and_top_k_keeps_the_earliest():
    from xtoken.rules import piece_weights

    # "000" -> "0", "0", "0": one teacher token holds the whole row.
    assert piece_weights([5, 5, 5], 0.9, 0.1, 4) == [(5, 1.0)]
    weights = piece_weights([5, 7, 5], 0.9, 0.1, 4)
    assert [t for t, _ in weights] == [5, 7]
    np.testing.assert_allclose([w for _, w in weights], [0.909 / 0.999, 0.09 / 0.999])
    assert [t for t, _ in piece_weights([1, 2, 3, 4], 1.0, 1.0, 2)] == [1, 2]  # ties: earlier pieces stay


def test_special_tokens_map_by_role(W, student, teacher):
    bos, eos = student.roles["bos"], student.roles["eos"]
    assert W.row(eos) == [(teacher.roles["eos"], 1.0)]
    assert W.row(bos) == []  # the teacher has no bos
    assert W.row(student.get_vocab()["<|reserved_special_token_0|>"]) == []


def test_top_k_and_weights_options(student, teacher):
    s = student.get_vocab()["201"]
    first_only = Projection.build(student, teacher, top_k=1)
    assert first_only.top_k == 1 and first_only.row(s) == [(teacher.get_vocab()["2"], 1.0)]
    two_pieces = Projection.build(student, teacher, max_pieces=2)
    np.testing.assert_allclose([w for _, w in two_pieces.row(s)], [0.9 / 0.99, 0.09 / 0.99], rtol=1e-6)
    flat = Projection.build(student, teacher, gamma=1.0)
    np.testing.assert_allclose([w for _, w in flat.row(s)], [1 / 3] * 3, rtol=1e-6)
    no_decay = Projection.build(student, teacher, gamma=0.0)
    assert no_decay.row(s) == [(teacher.get_vocab()["2"], 1.0)]


@pytest.mark.parametrize("option, value, message", [
    ("top_k", 0, "top_k"), ("max_pieces", 0, "max_pieces"), ("beta", 0.0, "beta"), ("gamma", -0.1, "gamma"),
    ("beta", float("nan"), "beta"), ("top_k", 2.0, "top_k"),
])  # fmt: skip
def test_bad_build_options(student, teacher, option, value, message):
    with pytest.raises(ValueError, match=message):
        Projection.build(student, teacher, **{option: value})


def test_padded_logit_widths(student, teacher):
    W = Projection.build(
        student, teacher, student_vocab_size=len(student) + 7, teacher_vocab_size=len(teacher) + 5
    )
    assert W.student_vocab_size == len(student) + 7 and W.teacher_vocab_size == len(teacher) + 5
    assert bool((W.idx[len(student) :] < 0).all()) and bool((W.val[len(student) :] == 0).all())
    plain = Projection.build(student, teacher)
    assert torch.equal(W.idx[: len(student)], plain.idx) and torch.equal(W.val[: len(student)], plain.val)
    assert torch.equal(W.common_pairs("relaxed"), plain.common_pairs("relaxed"))


def test_narrower_width_may_only_cut_special_tokens():
    teacher = splitting()  # its special tokens come first, so its last id is a regular token
    with pytest.raises(ValueError, match="would cut off the regular token"):
        Projection.build(packing(), teacher, teacher_vocab_size=len(teacher) - 1)
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_str(tu.digit_packing_bpe().to_str())
    tokenizer.add_special_tokens([AddedToken("<|image|>", special=True)])
    student = HFTokenizer(tokenizer, roles=tu.DIGIT_PACKING_ROLES)
    W = Projection.build(student, splitting(), student_vocab_size=len(student) - 1)
    assert W.student_vocab_size == len(student) - 1
    with pytest.raises(ValueError, match="student_vocab_size"):
        Projection.build(student, splitting(), student_vocab_size=0)


def test_w_is_never_dense(student, teacher):
    """The build allocates nothing of V_s x V_t elements (checked with a teacher width of 10^9 columns)."""
    W = Projection.build(student, teacher, teacher_vocab_size=10**9)
    assert W.teacher_vocab_size == 10**9 and W.idx.shape == (len(student), 4)


# ---------------------------------------------------------------------------------------------- common pairs
def test_exact_pairs_are_the_exact_matches_made_one_to_one(W):
    pairs = W.common_pairs("exact")
    assert_one_to_one(pairs)
    exact = W.vocabularies.exact_match
    expected = {}
    for s, t in enumerate(exact.tolist()):
        if t >= 0:
            expected.setdefault(t, s)  # the lowest student id wins
    assert pairs_set(pairs) == {(s, t) for t, s in expected.items()}


def test_relaxed_pairs_are_one_to_one_and_contain_the_exact_pairs(W):
    relaxed = W.common_pairs("relaxed")
    assert_one_to_one(relaxed)
    assert pairs_set(W.common_pairs("exact")) <= pairs_set(relaxed)
    for s, t in relaxed.tolist():
        assert max(w for _, w in W.row(s)) >= 0.6 and W.row(s)[0][0] == t
    assert len(W.common_pairs("relaxed", threshold=0.95)) <= len(relaxed)


def test_raw_pairs_follow_trls_rule(W):
    student_vocab = tu.digit_packing_bpe().get_vocab(with_added_tokens=True)
    mapping = {}
    for token, teacher_id in tu.digit_splitting_bpe().get_vocab(with_added_tokens=True).items():
        if token in student_vocab:
            mapping[teacher_id] = student_vocab[token]
    raw = W.common_pairs("raw")
    assert_one_to_one(raw)
    assert pairs_set(raw) == {(s, t) for t, s in mapping.items()}


def test_relaxed_collisions_on_a_hand_made_projection():
    # rows: 0 -> t0 (0.7), 1 -> t0 (0.9), 2 -> t0 (0.9), 3 -> t1 (0.5: below the threshold),
    #       4 -> tie between t3 and t2 (0.5 each; threshold 0.5 picks the lower id t2), 5 empty
    idx = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 2], [3, 2], [-1, -1]], dtype=torch.int32)
    val = torch.tensor([[0.7, 0.3], [0.9, 0.1], [0.9, 0.1], [0.5, 0.5], [0.5, 0.5], [0, 0]])
    W = Projection(idx, val, teacher_vocab_size=4)
    assert W.common_pairs("relaxed").tolist() == [[1, 0]]
    assert W.common_pairs("relaxed", threshold=0.5).tolist() == [[1, 0], [3, 1], [4, 2]]
    with pytest.raises(ValueError, match="needs a W built from tokenizers"):
        W.common_pairs("exact")
    with pytest.raises(ValueError, match="kind"):
        W.common_pairs("fuzzy")
    with pytest.raises(ValueError, match="threshold"):
        W.common_pairs("relaxed", threshold=0)
    with pytest.raises(ValueError, match="needs a W built from tokenizers"):
        W.audit()


def test_sentencepiece_student_against_byte_level_teacher():
    student, teacher = sentencepiece(), splitting()
    W = Projection.build(student, teacher)
    sv, tv = student.get_vocab(), teacher.get_vocab()
    assert W.row(sv["▁the"]) == [(tv["Ġthe"], 1.0)]
    assert W.row(sv["<0xE2>"]) == [(tv["â"], 1.0)]  # byte fallback token <-> the byte-level byte token
    assert W.row(sv["<s>"]) == [] and W.row(sv["</s>"]) == [(tv["<|endoftext|>"], 1.0)]
    assert W.row(sv["<unk>"]) == []
    raw = pairs_set(W.common_pairs("raw"))
    assert (sv["ing"], tv["ing"]) in raw and (sv["▁the"], tv["Ġthe"]) not in raw  # raw strings differ


@pytest.mark.parametrize("style", ["metaspace", "llama2"])
def test_sentencepiece_teacher_decomposes_without_a_dummy_space(style):
    student, teacher = splitting(), sentencepiece(style)
    W = Projection.build(student, teacher)
    for s, t in enumerate(W.vocabularies.exact_match.tolist()):
        text = student.surface_bytes[s]
        if t < 0 and text and not text.startswith(b" ") and _valid(text):
            first = teacher.surface_bytes[W.row(s)[0][0]]
            assert text.startswith(first), (text, first)


def test_invalid_utf8_tokens_decompose_byte_by_byte():
    student, teacher = splitting(), sentencepiece()
    W = Projection.build(student, teacher)
    partial = [s for s, b in enumerate(student.surface_bytes) if b and len(b) > 1 and not _valid(b)]
    assert partial, "the trained byte-level vocabulary has a token that is part of a character"
    for s in partial:
        text = student.surface_bytes[s]
        pieces = [teacher.surface_bytes[t] for t, _ in W.row(s)]
        if len(pieces) == 4:
            assert text.startswith(b"".join(pieces))
        else:
            assert b"".join(pieces) == text
            assert any(len(piece) == 1 and piece[0] >= 0x80 for piece in pieces)


@pytest.mark.skipif(not HAS_TIKTOKEN, reason="needs tiktoken")
def test_tiktoken_teacher_gives_the_same_w():
    teacher = TiktokenTokenizer(
        tu.to_tiktoken(tu.digit_splitting_bpe(), tu.QWEN_SPLIT), roles=tu.DIGIT_SPLITTING_ROLES
    )
    a, b = Projection.build(packing(), splitting()), Projection.build(packing(), teacher)
    assert torch.equal(a.idx, b.idx) and torch.equal(a.val, b.val)
    for kind in ("exact", "raw", "relaxed"):
        assert torch.equal(a.common_pairs(kind), b.common_pairs(kind))


# ------------------------------------------------------------------------------------------------ audit
def test_audit_counts_and_recommends_pkl_for_a_digit_packing_student(W, student):
    audit = W.audit()
    assert [row.name for row in audit.rows] == list(AUDIT_CLASSES)
    assert audit.total.tokens == len(student)
    two, three = audit["numeral, 2 digits"], audit["numeral, 3 digits"]
    assert two.tokens > 0 and three.tokens > 0 and two.exact == three.exact == 0
    assert two.mapped == two.tokens and three.mapped == three.tokens
    assert audit["numeral, 1 digit"].exact == audit["numeral, 1 digit"].tokens == 10
    assert audit["special"].tokens == 3 and audit["special"].mapped == 1
    assert audit.total.exact == len(W.common_pairs("exact"))
    assert audit.total.relaxed == len(W.common_pairs("relaxed"))
    assert audit.recommendation == "pkl" and "have no exact teacher match" in audit.reason
    printed = str(audit)
    assert "numeral, 3 digits" in printed and "recommendation: pkl" in printed
    with pytest.raises(KeyError):
        audit["emoji"]


def test_audit_recommends_hkl_for_a_digit_splitting_student():
    audit = Projection.build(splitting(), packing()).audit()
    assert audit["numeral, 2 digits"].tokens == audit["numeral, 3 digits"].tokens == 0
    assert audit.recommendation == "hkl"


# ------------------------------------------------------------------------------------------------ save / load
def test_save_load_round_trip_is_bit_exact(W, student, teacher, tmp_path):
    path = tmp_path / "W.safetensors"
    W.save(path)
    loaded = Projection.load(path, student, teacher)
    assert torch.equal(loaded.idx, W.idx) and torch.equal(loaded.val, W.val)
    assert loaded.teacher_vocab_size == W.teacher_vocab_size
    assert loaded.metadata == W.metadata
    assert loaded.vocabularies.student == W.vocabularies.student
    assert loaded.vocabularies.teacher == W.vocabularies.teacher
    for kind in ("exact", "raw", "relaxed"):
        assert torch.equal(loaded.common_pairs(kind), W.common_pairs(kind))
    assert str(loaded.audit()) == str(W.audit())
    assert W.metadata["student_tokenizer"] == "digit-packing" and W.metadata["top_k"] == "4"
    assert W.metadata["student_vocab_hash"] == student.vocab_hash


def test_load_with_a_mismatched_tokenizer_raises(W, student, tmp_path):
    path = tmp_path / "W.safetensors"
    W.save(path)
    with pytest.raises(ValueError, match="teacher tokenizer .* is not the one W was built for"):
        Projection.load(path, student, sentencepiece())
    with pytest.raises(ValueError, match="student tokenizer"):
        Projection.load(path, student_tokenizer=splitting())


def test_save_load_of_a_projection_without_vocabularies(tmp_path):
    W = Projection.from_dense(torch.rand(5, 7), top_k=2)
    W.save(tmp_path / "dense.safetensors")
    loaded = Projection.load(tmp_path / "dense.safetensors")
    assert torch.equal(loaded.idx, W.idx) and torch.equal(loaded.val, W.val) and loaded.vocabularies is None
    with pytest.raises(ValueError, match="no student vocabulary hash"):
        Projection.load(tmp_path / "dense.safetensors", student_tokenizer=packing())


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an xtoken projection"):
        Projection.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Projection.load(tmp_path / "junk.safetensors")


def test_pad_to_and_to_keep_the_vocabularies(W):
    padded = W.pad_to(W.student_vocab_size + 3)
    assert padded.vocabularies.exact_match.shape == (W.student_vocab_size + 3,)
    assert torch.equal(padded.common_pairs("exact"), W.common_pairs("exact"))
    assert W.to("cpu").vocabularies is W.vocabularies


def test_token_table_display_and_find():
    table = TokenTable([b"201", b" the", b"\xe6", b"a\nb", b"<|eos|>", b""], [0, 0, 0, 0, 1, 2])
    assert [table.display(i) for i in range(6)] == [
        '"201"',
        '" the"',
        '"\\xe6"',
        '"a\\nb"',
        "<|eos|>",
        "(unused id)",
    ]
    assert table.find(" the") == [1] and table.find("<|eos|>") == [4] and table.find("") == []
    assert TokenTable.from_tensors(table.to_tensors("x"), "x") == table
    with pytest.raises(ValueError, match="kinds"):
        TokenTable([b"a"], [5])


# ---------------------------------------------------------------------------------------------- command line
def test_cli_build_audit_show(tmp_path, capsys):
    from xtoken.cli import main

    student = tu.save_pretrained(tu.digit_packing_bpe(), tmp_path / "student", tu.DIGIT_PACKING_ROLES)
    teacher = tu.save_pretrained(tu.digit_splitting_bpe(), tmp_path / "teacher", tu.DIGIT_SPLITTING_ROLES)
    out = tmp_path / "W.safetensors"
    assert (
        main(["projection", "build", "--student", str(student), "--teacher", str(teacher), "-o", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "common pairs: exact" in printed and out.exists()
    W = Projection.load(out, student, teacher)
    assert torch.equal(W.idx, Projection.build(packing(), splitting()).idx)

    assert main(["projection", "audit", str(out)]) == 0
    assert str(W.audit()) in capsys.readouterr().out

    assert main(["projection", "show", str(out), "201"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith('"201": 3 teacher token(s)')
    assert [line.split()[:2] for line in lines[1:]] == [
        ['"2"', "0.9009"],
        ['"0"', "0.0901"],
        ['"1"', "0.0090"],
    ]

    assert main(["projection", "show", str(out), "<|begin_of_text|>"]) == 0
    assert "empty row" in capsys.readouterr().out
    assert main(["projection", "show", str(out), "--id", str(W.vocabularies.student.find("201")[0])]) == 0
    assert '"2"' in capsys.readouterr().out
    assert main(["projection", "show", str(out), "no such token"]) == 1
    assert "no student token" in capsys.readouterr().err
    assert main(["projection", "show", str(out), "--id", "x"]) == 2


def test_cli_build_with_options(tmp_path, capsys):
    from xtoken.cli import main

    student = tu.save_pretrained(tu.digit_packing_bpe(), tmp_path / "student", tu.DIGIT_PACKING_ROLES)
    teacher = tu.save_pretrained(tu.sentencepiece_bpe(), tmp_path / "teacher", tu.SENTENCEPIECE_ROLES)
    out = tmp_path / "W.safetensors"
    assert (
        main(
            [
                "projection",
                "build",
                "--student",
                str(student / "tokenizer.json"),
                "--teacher",
                str(teacher),
                "-o",
                str(out),
                "--top-k",
                "2",
                "--teacher-vocab-size",
                "1000",
                "--gamma",
                "0.5",
            ]
        )
        == 0
    )
    W = Projection.load(out)
    assert W.top_k == 2 and W.teacher_vocab_size == 1000 and W.metadata["gamma"] == "0.5"


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from xtoken.cli import main

    out = str(tmp_path / "W.safetensors")
    assert main(["projection", "build", "--student", "nope", "--teacher", "nope", "-o", out]) == 2
    assert "error: --student: tokenizer 'nope': no such file or folder" in capsys.readouterr().err
    assert main(["projection", "audit", str(tmp_path / "missing.safetensors")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
