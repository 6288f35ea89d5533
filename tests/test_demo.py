"""The built-in demo: its corpus and tokenizers have the properties the experiment rests on, and
``xtoken demo --quick`` runs end to end (the CI run of the main job)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from xtoken.cli import main
from xtoken.demo import METHODS, make_problems, train_tokenizers


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
    ran = list(METHODS.values())
    assert list(results["accuracy"]) == ["teacher", *ran]
    diagnosed = [label for key, label in METHODS.items() if not key.startswith("control-")]
    assert list(results["lone_digit"]) == list(results["repdigit"]) == diagnosed
    assert all(0 <= a <= 1 for a in results["accuracy"].values())
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    assert (tmp_path / "W.safetensors").is_file() and (tmp_path / "train.jsonl").is_file()
