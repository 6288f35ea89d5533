"""``xtoken distill``: Hugging Face models saved on disk (tiny, built here), a JSONL file, checkpoints,
resuming, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from distill_util import TEXTS, student_tokenizer, teacher_lm, teacher_tokenizers, tiny_lm
from tokenizers_util import DIGIT_PACKING_ROLES, DIGIT_SPLITTING_ROLES
from xtoken.cli import main


def _save(folder, model, tokenizer, roles):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf_tokenizer(), **{f"{r}_token": t for r, t in roles.items()})
    model.save_pretrained(folder)
    hf.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    student_tok = student_tokenizer()
    teacher_tok = teacher_tokenizers()["digits"]
    student = _save(root / "student", tiny_lm(len(student_tok), seed=0), student_tok, DIGIT_PACKING_ROLES)
    teacher = _save(root / "qwenish", teacher_lm("digits"), teacher_tok, DIGIT_SPLITTING_ROLES)
    same = _save(root / "llamaish", teacher_lm("same"), student_tok, DIGIT_PACKING_ROLES)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    bad = root / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n", encoding="utf-8")
    return {"student": student, "teacher": teacher, "same": same, "data": str(data), "bad": str(bad)}


pytestmark = pytest.mark.usefixtures("one_thread")


def _distill(disk, output, *extra):
    return main([
        "distill", "--student", disk["student"], "--teacher", f"{disk['teacher']}:0.8:pkl", "--data", disk["data"],
        "--output", str(output), "--batch-size", "4", "--max-length", "48", "--lr", "1e-3", "--save-steps", "2",
        "--logging-steps", "1", *extra,
    ])  # fmt: skip


def test_distill_saves_checkpoints_and_resumes(disk, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "run"
    assert _distill(disk, output, "--steps", "2") == 0
    printed = capsys.readouterr().out
    assert "teacher qwenish: loss pkl, weight 0.8" in printed
    assert (output / "checkpoint-2" / "trainer_state.json").is_file()
    assert (output / "projections" / "qwenish.safetensors").is_file()
    assert (output / "model.safetensors").is_file() and (output / "tokenizer.json").is_file()

    assert _distill(disk, output, "--steps", "3") == 2  # checkpoints present: resuming must be asked for
    assert "pass --resume" in capsys.readouterr().err
    assert _distill(disk, output, "--steps", "4", "--resume") == 0
    state = json.loads((output / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    steps = [entry["step"] for entry in state["log_history"] if "kd_loss/qwenish" in entry]
    assert steps == [1, 2, 3, 4]  # steps 1-2 from the first run, 3-4 after resuming
    AutoModelForCausalLM.from_pretrained(str(output), local_files_only=True)


def test_distill_with_a_same_tokenizer_teacher(disk, tmp_path, capsys):
    args = ["--teacher", f"{disk['same']}:0.2", "--steps", "1", "--kd-scaling", "1,0.5", "--fused-linear",
            "--keep-encodings", "64"]  # fmt: skip
    assert _distill(disk, tmp_path / "run", *args) == 0
    assert "teacher llamaish: loss kd, weight 0.2 (the student's tokenizer)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--teacher": "/no/such/folder:1"}, "'/no/such/folder' is not a folder"),
        ({"--teacher": "{teacher}:heavy:pkl"}, "the weight 'heavy' is not a number"),
        ({"--teacher": "{teacher}:1:kl"}, "expected DIR[:WEIGHT[:LOSS]]"),
        ({"--data": "{bad}"}, "bad.jsonl:2: expected an object with a 'text' text"),
        ({"--kd-scaling": "0.5"}, "--kd-scaling: expected 'dynamic' or W_CE,W_KD"),
        ({"--student": "{data}"}, "--student"),
    ],
)
def test_distill_reports_bad_input_in_one_line(disk, tmp_path, capsys, change, message):
    options = {"--student": disk["student"], "--teacher": disk["teacher"], "--data": disk["data"],
               "--output": str(tmp_path / "run")}
    options.update({k: v.format(**disk) for k, v in change.items()})
    assert main(["distill", *(x for kv in options.items() for x in kv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_resume_without_checkpoint(disk, tmp_path, capsys):
    assert _distill(disk, tmp_path / "empty", "--steps", "1", "--resume") == 2
    assert "--resume: no checkpoint in" in capsys.readouterr().err


def test_distill_on_conversations_with_on_policy_steps(disk, tmp_path, capsys):
    from distill_util import CHATS
    from tokenizers_util import chat_tokenizer

    student_tok, teacher_tok = chat_tokenizer("llama3"), chat_tokenizer("chatml")
    student, teacher = tmp_path / "student", tmp_path / "teacher"
    tiny_lm(len(student_tok), seed=0).save_pretrained(student)
    student_tok.save_pretrained(student)
    teacher_lm("digits").save_pretrained(teacher)  # the digit-splitting vocabulary, with a ChatML template
    teacher_tok.save_pretrained(teacher)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CHATS), encoding="utf-8")
    assert main([
        "distill", "--student", str(student), "--teacher", f"{teacher}:1:pkl", "--data", str(data),
        "--output", str(tmp_path / "run"), "--batch-size", "4", "--max-length", "96", "--steps", "2",
        "--logging-steps", "1", "--on-policy", "1", "--max-new-tokens", "6",
    ]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert printed.count("'on_policy_share': '1'") == 2 and "completion_length" in printed
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps(CHATS[0]) + "\n", encoding="utf-8")
    options = ["--student", str(student), "--teacher", str(teacher), "--output", str(tmp_path / "bad")]
    assert main(["distill", *options, "--data", str(mixed)]) == 2
    assert "mixed.jsonl:2: texts and conversations are mixed" in capsys.readouterr().err
    assert main(["distill", *options, "--data", disk["data"], "--on-policy", "1", "--steps", "1"]) == 2
    assert "on_policy: needs conversation data" in capsys.readouterr().err
