"""Class 7 of issue 12: values that were accepted silently and computed something the caller did not ask for.
Each must now raise an error of the stated type naming the argument (or, in the CLI, the flag or file)."""

from __future__ import annotations

import os

import pytest
import torch
import tokenizers_util as tu
from reliability_util import LOSSES, case
from safetensors.torch import load_file, save_file

import xtoken
from xtoken import Projection
from xtoken.cli import main


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_float_or_bool_bayes_targets_raise(name, dtype):
    zs, zt, chunks, W, ts, tt = case()
    with pytest.raises(TypeError, match=f"student_targets: expected an integer tensor of token ids.*{dtype}"):
        LOSSES[name][0](zs, zt, chunks, W, merge="bayes", student_targets=ts.to(dtype), teacher_targets=tt)
    with pytest.raises(TypeError, match="teacher_targets: expected an integer tensor"):
        LOSSES[name][0](zs, zt, chunks, W, merge="bayes", student_targets=ts, teacher_targets=tt.to(dtype).tolist())


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("value", [True, False, "1.0", None, 1 + 0j])
def test_temperature_must_be_a_real_number(name, value):
    zs, zt, chunks, W, _, _ = case()
    with pytest.raises(TypeError, match="temperature: expected a real number"):
        LOSSES[name][0](zs, zt, chunks, W, temperature=value)
    with pytest.raises(TypeError, match="temperature: expected a real number"):
        xtoken.nn.KDLoss(temperature=value)


@pytest.mark.parametrize("weights", [(-1.0, 1.0), (1.0, -0.5), (float("nan"), 1.0), (True, 1.0)])
def test_hybrid_weights_must_be_non_negative_numbers(weights):
    zs, zt, chunks, W, _, _ = case()
    with pytest.raises((ValueError, TypeError), match=r"weights\[[01]\]"):
        xtoken.gold_loss(zs, zt, chunks, W.common_pairs("relaxed"), weights=weights)
    with pytest.raises((ValueError, TypeError), match=r"weights\[[01]\]"):
        xtoken.nn.HKLLoss(W, weights=weights)


@pytest.mark.parametrize("bad", [True, 3.0, 2.5, "3"])
def test_counts_must_be_integers(bad):
    zs, zt, chunks, W, _, _ = case()
    with pytest.raises(TypeError, match="teacher_vocab_size: expected an integer"):
        Projection(W.idx, W.val, teacher_vocab_size=bad)
    with pytest.raises(TypeError, match="uld_topk: expected an integer"):
        xtoken.uld_loss(zs, zt, chunks, uld_topk=bad)


@pytest.fixture(scope="module")
def tokenizers():
    return tu.digit_packing_bpe(), tu.digit_splitting_bpe()


@pytest.mark.parametrize("bad", [True, 8.0, "8"])
def test_max_length_must_be_an_integer(tokenizers, bad):
    student, teacher = tokenizers
    with pytest.raises(TypeError, match="max_length: expected an integer"):
        xtoken.align_texts(["a 12"], student, teacher, max_length=bad)
    with pytest.raises(TypeError, match="max_length: expected an integer"):
        xtoken.AlignedCollator(student, teacher, max_length=bad)
    with pytest.raises(TypeError, match="max_length: expected an integer"):
        xtoken.DistillationCollator(student, [teacher], max_length=bad)
    with pytest.raises(TypeError, match="add_special_tokens: expected a bool"):
        xtoken.align_texts(["a 12"], student, teacher, add_special_tokens="no")


def _saved_W(tmp_path):
    student, teacher = tu.digit_packing_bpe(), tu.digit_splitting_bpe()
    path = tmp_path / "W.safetensors"
    Projection.build(student, teacher).save(path)
    return path


@pytest.mark.parametrize("damage", ["past_end", "decreasing", "not_from_zero", "kinds"])
def test_a_W_file_with_bad_text_offsets_raises(tmp_path, damage):
    from safetensors import safe_open

    path = _saved_W(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    offsets = tensors["teacher_text_offsets"]
    if damage == "past_end":
        offsets[-1] += 5
    elif damage == "decreasing":
        offsets[3], offsets[4] = offsets[4].clone(), offsets[3].clone()
    elif damage == "not_from_zero":
        offsets[0] = 1
    else:
        tensors["teacher_kind"] = tensors["teacher_kind"][:-1].clone()
    save_file(tensors, str(path), metadata=metadata)
    expected = "teacher_kind: .* kinds for" if damage == "kinds" else "teacher_text_offsets: expected offsets from 0"
    with pytest.raises(ValueError, match=f"W.safetensors: not a valid W: {expected}"):
        Projection.load(path)


def test_projection_build_does_not_overwrite_without_force(tmp_path, capsys):
    student = tu.save_pretrained(tu.digit_packing_bpe(), tmp_path / "student", tu.DIGIT_PACKING_ROLES)
    teacher = tu.save_pretrained(tu.digit_splitting_bpe(), tmp_path / "teacher", tu.DIGIT_SPLITTING_ROLES)
    out = tmp_path / "W.safetensors"
    out.write_bytes(b"precious")
    args = ["projection", "build", "--student", str(student), "--teacher", str(teacher), "-o", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == f"error: --output: {out} exists; pass --force to overwrite it\n"
    assert out.read_bytes() == b"precious"
    assert main([*args, "--force"]) == 0
    assert Projection.load(out).student_vocab_size > 0


def _fake_run(tmp_path, weights):
    """An --output folder holding one checkpoint with the given weights, and the other distill inputs (the
    checkpoint is checked before any model is loaded, so plain folders stand in for the models)."""
    checkpoint = tmp_path / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2, "log_history": []}')
    save_file(weights, str(checkpoint / "model.safetensors"))
    (tmp_path / "student").mkdir()
    (tmp_path / "teacher").mkdir()
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "1 + 2 = 3"}\n')
    return ["distill", "--student", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--data",
            str(data), "--output", str(tmp_path / "run"), "--resume"]


def test_distill_refuses_to_resume_from_non_finite_weights(tmp_path, capsys):
    pytest.importorskip("transformers")
    weights = {"lm_head.weight": torch.full((3, 2), float("nan")), "embed.weight": torch.ones(3, 2)}
    args = _fake_run(tmp_path, weights)
    final = tmp_path / "run" / "model.safetensors"
    final.write_bytes(b"the final model")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: ") and "the weight lm_head.weight holds NaN or inf" in err
    assert err.count("\n") == 1
    assert final.read_bytes() == b"the final model"
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-2", "model.safetensors"]
