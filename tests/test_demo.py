"""The built-in demo: its corpus and tokenizers have the properties the experiment rests on, and
``xtoken demo --quick`` runs end to end (the CI run of the main job)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from xtoken.cli import main
from xtoken.demo import DEFAULT_METHODS, METHODS, make_problems, train_tokenizers


def _operands(problem):
    numbers = [int(w.strip(".?")) for w in problem.prompt.split() if w.strip(".?").isdigit()]
    op = "-" if "gives away" in problem.prompt else "+"
    return op, numbers[0], numbers[1]


def test_problems_are_correct_deterministic_and_held_out():
    train, test = make_problems(3, 2000, 200)
    assert (train, test) == make_problems(3, 2000, 200)
    assert train != make_problems(4, 2000, 200)[0]
    for problem in train + test:
        op, a, b = _operands(problem)
        assert int(problem.answer) == (a + b if op == "+" else a - b)
        assert problem.prompt.startswith("Q: ") and problem.prompt.endswith("\nA: ")
        assert problem.text == f"{problem.prompt}{problem.answer}\n"
    assert not {_operands(p) for p in test} & {_operands(p) for p in train}
    assert len({_operands(p) for p in test}) == len(test)
    with pytest.raises(ValueError, match="too few"):
        make_problems(0, 10, 10_000)


def test_tokenizers_split_and_pack_digits():
    train, _ = make_problems(0, 3000, 10)
    teacher, student = train_tokenizers([p.text for p in train])
    answers = {p.answer for p in train}
    for answer in answers:
        assert len(teacher.encode(answer)) == len(answer)  # one token per digit
        assert len(student.encode(answer)) == 1  # the whole numeral in one token
    bos = student.roles["bos"]
    assert student.encode(train[0].text, add_special_tokens=True)[0] == bos
    assert "bos" not in teacher.roles


def test_demo_quick_runs(tmp_path, capsys):
    assert main(["demo", "--quick", "--output", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "recommendation: pkl" in printed  # the audit: no 2- or 3-digit numeral has an exact match
    assert "1:N" in printed and "exact-match answer accuracy" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    ran = [METHODS[m] for m in DEFAULT_METHODS]
    assert list(results["accuracy"]) == ["teacher", *ran]
    assert "trainer (Teacher(loss='auto')): pkl+chain" in printed
    diagnosed = [METHODS[m] for m in DEFAULT_METHODS if not m.startswith("control-")]
    assert list(results["lone_digit"]) == list(results["repdigit"]) == diagnosed
    assert all(0 <= a <= 1 for a in results["accuracy"].values())
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    assert (tmp_path / "W.safetensors").is_file() and (tmp_path / "train.jsonl").is_file()


def test_schedule_does_not_change_results():
    """With two workers the teacher trains in a worker beside the CE-only students and the taught students
    start costliest first: every model's answers equal the one-process run's."""
    from xtoken.demo import DemoSettings, ModelSize, _train_all, method_variants, prepare

    settings = DemoSettings(train_problems=300, test_problems=20, teacher=ModelSize(16, 1), student=ModelSize(16, 1),
                            teacher_steps=20, student_steps=10, batch_size=8)  # fmt: skip
    data = prepare(settings, 5)
    variants = method_variants(["pkl", "control-ce", "chain", "ce"])
    (_, teacher_one, _), students_one = _train_all(data, variants, 1, log=lambda m: None)
    (teacher_model, teacher_two, _), students_two = _train_all(data, variants, 2, log=lambda m: None)
    assert teacher_model is not None and teacher_two == teacher_one
    assert [answers for answers, _ in students_two] == [answers for answers, _ in students_one]
    # the students answer differently, so answers returned in the wrong order would not pass
    assert len({tuple(a.text for a in answers) for answers, _ in students_one}) >= 3
    with pytest.raises(ValueError, match="workers"):
        _train_all(data, variants, 0, log=lambda m: None)


def test_shared_teacher_gives_the_teachers_logits():
    """_SharedTeacher: the teacher's forward once per batch and process, its lm_head on the kept hidden states
    after; the logits equal the plain forward's bit for bit, a pickled copy (a worker's job) reads the same
    states, and another set of jobs (a new key) starts afresh."""
    import pickle

    import torch
    from xtoken import demo

    teacher = demo.build_lm(50, demo.ModelSize(16, 1), 3, 0).eval()
    shared = demo._SharedTeacher(teacher)
    ids = torch.randint(0, 50, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    demo._KEPT_HIDDEN_STATES.clear()
    with torch.no_grad():
        plain = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
        first = shared(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert len(demo._KEPT_HIDDEN_STATES[shared.key]) == 1
        copy = pickle.loads(pickle.dumps(shared))
        calls = []
        copy.model.model.register_forward_hook(lambda *args: calls.append(1))
        again = copy(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert calls == []  # read from the kept states, not computed
        other = copy(input_ids=ids.flip(0), attention_mask=mask.flip(0), use_cache=False).logits
        assert calls == [1] and len(demo._KEPT_HIDDEN_STATES[shared.key]) == 2
        fresh = demo._SharedTeacher(teacher)
        fresh(input_ids=ids, attention_mask=mask, use_cache=False)
        assert list(demo._KEPT_HIDDEN_STATES) == [fresh.key]
    assert torch.equal(first, plain) and torch.equal(again, plain)
    assert torch.equal(other, teacher(input_ids=ids.flip(0), attention_mask=mask.flip(0)).logits.detach())
    assert shared.config is teacher.config and shared.get_output_embeddings() is teacher.get_output_embeddings()
    demo._KEPT_HIDDEN_STATES.clear()
