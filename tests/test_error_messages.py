"""Class 9 of issue 12: errors that did not name the problem (a reshape failure, a KeyError, an OverflowError,
a SafetensorError after a whole build, a traceback from the CLI). Each bad input must raise the stated type
with a message naming the argument, file, line or flag; the CLI prints exactly one line and exits with 2."""

from __future__ import annotations

import json

import pytest
import torch
import tokenizers_util as tu
from reliability_util import LOSSES, case
from safetensors.torch import load_file, save_file

import xtoken
from xtoken import Projection
from xtoken.cli import main


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_empty_vocabulary(name):
    zs, zt, chunks, W, _, _ = case()
    with pytest.raises(ValueError, match=r"student_logits: the vocabulary dimension is empty \(shape \(9, 0\)\)"):
        LOSSES[name][0](zs[:, :0], zt, chunks, W)
    with pytest.raises(ValueError, match=r"teacher_logits: the vocabulary dimension is empty"):
        LOSSES[name][0](zs, zt[:, :0], chunks, W)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("chunks", ["0 1 0 1", b"0101", None, {"s0": 0}, [[0, 1, 0, "x"]]])
def test_chunks_of_the_wrong_kind(name, chunks):
    zs, zt, _, W, _, _ = case()
    with pytest.raises(TypeError, match=r"chunks: expected an integer \[K, 4\] table \(s0, s1, t0, t1\)"):
        LOSSES[name][0](zs, zt, chunks, W)


def test_bad_sizes_name_the_argument():
    with pytest.raises(ValueError, match=r"vocab_size: expected an integer in \[1, 2147483647\], got -3"):
        Projection.identity(-3)
    W = Projection.identity(3)
    with pytest.raises(ValueError, match="teacher_vocab_size: expected an integer in"):
        Projection(W.idx, W.val, teacher_vocab_size=10**15)
    with pytest.raises(ValueError, match="top_k: expected an integer >= 1, got 0"):
        Projection.from_dense(torch.eye(3), top_k=0)


@pytest.mark.parametrize("tau", [10**400, -(10**400)])
def test_a_temperature_too_large_for_a_float(tau):
    zs, zt, chunks, W, _, _ = case()
    with pytest.raises(ValueError, match=r"temperature: -?10+\.\.\. \(40[12] digits\) is too large for a float"):
        xtoken.pkl_loss(zs, zt, chunks, W, temperature=tau)


def test_save_into_a_missing_folder(tmp_path):
    W = Projection.identity(3)
    with pytest.raises(FileNotFoundError, match=r"W.safetensors: the folder .*missing does not exist"):
        W.save(tmp_path / "missing" / "W.safetensors")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        W.save(tmp_path)


def test_load_of_a_folder_a_missing_file_or_an_incomplete_file(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder, not a W file"):
        Projection.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors: no such file"):
        Projection.load(tmp_path / "nothing.safetensors")
    path = tmp_path / "W.safetensors"
    Projection.build(tu.digit_packing_bpe(), tu.digit_splitting_bpe()).save(path)
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={"format": "xtoken-projection-1"})
    with pytest.raises(ValueError, match="W.safetensors: the metadata lacks an integer teacher_vocab_size"):
        Projection.load(path)
    del tensors["student_kind"]
    save_file(tensors, str(path), metadata={"format": "xtoken-projection-1", "teacher_vocab_size": "300"})
    with pytest.raises(ValueError, match="W.safetensors: not a valid W: the student token table lacks student_kind"):
        Projection.load(path)


@pytest.fixture(scope="module")
def tokenizers():
    return tu.digit_packing_bpe(), tu.digit_splitting_bpe()


@pytest.mark.parametrize("texts, error, message", [
    (None, TypeError, "texts: expected a sequence of str, got NoneType"),
    ("one text", TypeError, "texts: expected a sequence of str, got str"),
    (["fine", 3], TypeError, r"texts\[1\]: expected a str, got int"),
    (["ok", "a\ud800b"], ValueError, r"texts\[1\]: character 1 is the lone surrogate U\+D800"),
    (["a\udcffb"], ValueError, r"texts\[0\]: character 1 is the byte 0xff, which is not valid UTF-8"),
])  # fmt: skip
def test_align_texts_names_the_bad_text(tokenizers, texts, error, message):
    with pytest.raises(error, match=message):
        xtoken.align_texts(texts, *tokenizers)


def test_collator_names_the_example_without_text(tokenizers):
    collate = xtoken.AlignedCollator(*tokenizers)
    with pytest.raises(TypeError, match=r"example 1: expected a text or a mapping with a 'text' text, got dict "
                                        r"with keys \['body'\]"):
        collate(["fine", {"body": "no text"}])


# ------------------------------------------------------------------------------------------------ the CLI
def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
def tokenizer_files(tmp_path):
    student = tu.save_pretrained(tu.digit_packing_bpe(), tmp_path / "student", tu.DIGIT_PACKING_ROLES)
    teacher = tu.save_pretrained(tu.digit_splitting_bpe(), tmp_path / "teacher", tu.DIGIT_SPLITTING_ROLES)
    return str(student), str(teacher)


def test_cli_align_errors(tokenizer_files, tmp_path, capsys):
    student, teacher = tokenizer_files
    assert main(["align", "--student", str(tmp_path / "nope"), "--teacher", teacher, "a"]) == 2
    _one_line_error(capsys, "--student: ", "nope")
    assert main(["align", "--student", student, "--teacher", teacher, "--max-length", "0", "a"]) == 2
    _one_line_error(capsys, "--max-length", "expected an integer >= 1, got 0")
    assert main(["align", "--student", student, "--teacher", teacher, "ok", "ab\udcffc"]) == 2
    _one_line_error(capsys, "text[1]: character 2 is the byte 0xff, which is not valid UTF-8")


def test_cli_projection_errors(tokenizer_files, tmp_path, capsys):
    student, teacher = tokenizer_files
    out = tmp_path / "missing" / "W.safetensors"
    assert main(["projection", "build", "--student", student, "--teacher", teacher, "-o", str(out)]) == 2
    _one_line_error(capsys, "--output: ", "does not exist")
    assert main(["projection", "build", "--student", student, "--teacher", teacher, "-o", "x", "--top-k", "0"]) == 2
    _one_line_error(capsys, "--top-k", "expected an integer >= 1")
    W = tmp_path / "W.safetensors"
    save_file({"idx": torch.zeros(2, 1, dtype=torch.int32), "val": torch.ones(2, 1)}, str(W),
              metadata={"format": "xtoken-projection-1"})
    assert main(["projection", "audit", str(W)]) == 2
    _one_line_error(capsys, "W.safetensors: the metadata lacks an integer teacher_vocab_size")
    assert main(["projection", "audit", str(tmp_path)]) == 2
    _one_line_error(capsys, "is a folder")


def _distill_args(tmp_path, *extra):
    (tmp_path / "student").mkdir(exist_ok=True)
    (tmp_path / "teacher").mkdir(exist_ok=True)
    data = tmp_path / "data.jsonl"
    if not data.exists():
        data.write_text('{"text": "1 + 2 = 3"}\n')
    return ["distill", "--student", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--data",
            str(data), "--output", str(tmp_path / "run"), *extra]


@pytest.mark.parametrize("flag, value", [("--grad-accum", "0"), ("--batch-size", "-1"), ("--max-length", "x"),
                                         ("--lr", "nan"), ("--temperature", "0"), ("--save-steps", "0")])
def test_cli_distill_flag_errors(tmp_path, capsys, flag, value):
    assert main(_distill_args(tmp_path, flag, value)) == 2
    _one_line_error(capsys, f"argument {flag}: ")


def test_cli_distill_data_errors(tmp_path, capsys):
    pytest.importorskip("transformers")
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert main(_distill_args(tmp_path)) == 2
    _one_line_error(capsys, "data.jsonl:2: not valid UTF-8 (byte 0xe9 at column 14)")


def _checkpoint(tmp_path):
    folder = tmp_path / "run" / "checkpoint-3"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    save_file({"w": torch.ones(4, 4)}, str(folder / "model.safetensors"))
    return folder


def test_cli_distill_resume_from_a_truncated_or_garbled_checkpoint(tmp_path, capsys):
    pytest.importorskip("transformers")
    folder = _checkpoint(tmp_path)
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert main(_distill_args(tmp_path, "--resume")) == 2
    _one_line_error(capsys, "--resume: ", "model.safetensors: truncated or not a safetensors file")

    (folder / "model.safetensors").write_bytes(weights)
    torch.save({"state": torch.ones(100)}, folder / "optimizer.pt")
    optimizer = (folder / "optimizer.pt").read_bytes()
    (folder / "optimizer.pt").write_bytes(optimizer[:-40])
    assert main(_distill_args(tmp_path, "--resume")) == 2
    _one_line_error(capsys, "--resume: ", "optimizer.pt: truncated or unreadable")

    (folder / "optimizer.pt").write_bytes(optimizer)
    (folder / "trainer_state.json").write_text("{garbage")
    assert main(_distill_args(tmp_path, "--resume")) == 2
    _one_line_error(capsys, "--resume: ", "trainer_state.json: not valid JSON")

    (folder / "trainer_state.json").unlink()
    assert main(_distill_args(tmp_path, "--resume")) == 2
    _one_line_error(capsys, "trainer_state.json is missing")
