"""``xtoken demo``: the uncommon-token failure of GOLD (X-Token paper, §5) and its P-KL fix, reproduced on
a toy that runs on the CPU with nothing downloaded.

1. Write a synthetic corpus of arithmetic word problems ("Q: Ann has 47 pens and gets 38 more. How many
   pens does Ann have now?\\nA: 85").
2. Train two byte-level BPE tokenizers on it: the teacher's splits numbers into single digits (Qwen's
   rule), the student's packs up to three digits into one token (Llama-3's rule), so the student's
   multi-digit numerals have no exact match in the teacher vocabulary.
3. Train a small teacher (a Llama-style causal LM built from a config) until it solves the problems.
4. Train students of one size, from one initialization, on the same batches for the same number of
   steps, under CE only, CE + GOLD, CE + P-KL and CE + H-KL (dynamic scaling, SPEC.md §4).
5. Score each model by exact match of its greedily generated answer on held-out problems (operand pairs
   never seen in training), print a table with the coverage audit and the alignment statistics, and
   save the table (JSON) and a bar plot (PNG).

Everything is seeded: one seed gives the same corpus, tokenizers, models and numbers on one machine
(same torch build and thread count).
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "METHODS",
    "SETTINGS",
    "DemoSettings",
    "ModelSize",
    "Problem",
    "make_problems",
    "train_tokenizers",
    "exact_match",
    "run_demo",
    "plot_accuracy",
]

# The split patterns of Qwen (one digit per pre-token) and Llama-3 (up to three digits per pre-token).
DIGIT_SPLITTING_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
DIGIT_PACKING_PATTERN = DIGIT_SPLITTING_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|")

METHODS = {"ce": "CE only", "gold": "CE+GOLD", "pkl": "CE+P-KL", "hkl": "CE+H-KL"}
"""Student training methods: the teacher loss name (``"ce"``: no teacher) -> the label of the table."""

_NAMES = ("Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gia", "Hugo", "Ida", "Jon", "Kim", "Leo", "Mia", "Ned")
_OBJECTS = ("apples", "pens", "coins", "books", "cards", "shells", "stamps", "marbles", "cups", "eggs")
_TEMPLATES = (
    ("+", "{n} has {a} {o} and gets {b} more. How many {o} does {n} have now?"),
    ("+", "A box holds {a} {o}. Another box holds {b} {o}. How many {o} are there in all?"),
    ("-", "{n} has {a} {o} and gives away {b}. How many {o} are left?"),
    ("-", "{n} had {a} {o} and lost {b} of them. How many {o} does {n} have now?"),
)


@dataclass(frozen=True)
class Problem:
    """A word problem: the prompt the model continues (ending in ``"A: "``) and the answer."""

    prompt: str
    answer: str

    @property
    def text(self) -> str:
        """The training text: prompt, answer and a newline (which ends generation)."""
        return f"{self.prompt}{self.answer}\n"


def make_problems(
    seed: int, train: int, test: int, operands: tuple[int, int] = (10, 99)
) -> tuple[list[Problem], list[Problem]]:
    """``train`` training and ``test`` held-out problems: additions and subtractions of two operands in
    ``operands`` (inclusive), in four phrasings. No (operation, a, b) of a test problem occurs in training,
    so test accuracy measures arithmetic, not recall."""
    low, high = operands
    pairs = [(op, a, b) for op in "+-" for a in range(low, high + 1) for b in range(low, high + 1)
             if op == "+" or a >= b]  # fmt: skip
    if test >= len(pairs) // 2:
        raise ValueError(f"test: {test} held-out problems leave too few of the {len(pairs)} operand pairs for training")
    rng = random.Random(seed)
    rng.shuffle(pairs)
    held_out, seen = pairs[:test], pairs[test:]

    def problem(op: str, a: int, b: int) -> Problem:
        template = rng.choice([t for o, t in _TEMPLATES if o == op])
        question = template.format(n=rng.choice(_NAMES), o=rng.choice(_OBJECTS), a=a, b=b)
        return Problem(f"Q: {question}\nA: ", str(a + b if op == "+" else a - b))

    return [problem(*rng.choice(seen)) for _ in range(train)], [problem(*p) for p in held_out]


# ---------------------------------------------------------------------------------------------
# Tokenizers

TEACHER_SPECIALS = {"eos": "<|endoftext|>", "pad": "<|endoftext|>"}
STUDENT_SPECIALS = {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": "<|end_of_text|>"}


def _byte_level_bpe(texts: Sequence[str], pattern: str, roles: dict[str, str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys(roles.values()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tokenizer.train_from_iterator(texts, trainer)
    if "bos" in roles:  # Llama-3 style: every text starts with BOS
        bos = roles["bos"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    return tokenizer


def train_tokenizers(texts: Sequence[str]):
    """(teacher, student) tokenizers trained on ``texts``, as xtoken tokenizer adapters: the teacher's splits
    numbers into digits and adds no BOS (like Qwen), the student's packs up to three digits and adds a BOS
    (like Llama-3). The student's vocabulary is large enough to hold every numeral of the corpus."""
    from .tokenizer import HFTokenizer

    teacher = _byte_level_bpe(texts, DIGIT_SPLITTING_PATTERN, TEACHER_SPECIALS, vocab_size=400)
    student = _byte_level_bpe(texts, DIGIT_PACKING_PATTERN, STUDENT_SPECIALS, vocab_size=1200)
    return (
        HFTokenizer(teacher, name="demo-teacher (digit-splitting BPE)", roles=TEACHER_SPECIALS),
        HFTokenizer(student, name="demo-student (digit-packing BPE)", roles=STUDENT_SPECIALS),
    )


# ---------------------------------------------------------------------------------------------
# Models, training and the metric


@dataclass(frozen=True)
class ModelSize:
    """A Llama-style causal LM: width, depth and attention heads (the MLP is 4x wider)."""

    hidden: int
    layers: int
    heads: int = 4


@dataclass(frozen=True)
class DemoSettings:
    """Everything the demo's budget is made of (see :data:`SETTINGS`)."""

    train_problems: int
    test_problems: int
    teacher: ModelSize
    student: ModelSize
    teacher_steps: int
    student_steps: int
    batch_size: int = 32
    teacher_lr: float = 3e-3
    student_lr: float = 3e-3
    max_length: int = 64


SETTINGS = {
    "default": DemoSettings(
        train_problems=20_000, test_problems=500, teacher=ModelSize(64, 2), student=ModelSize(64, 2),
        teacher_steps=3000, student_steps=1000,
    ),
    "quick": DemoSettings(
        train_problems=2_000, test_problems=100, teacher=ModelSize(32, 1), student=ModelSize(32, 1),
        teacher_steps=150, student_steps=60,
    ),
}
"""The demo's two budgets: ``default`` (about 10 minutes on two CPU cores; the teacher solves nearly all
held-out problems) and ``quick`` (a smoke test for CI: every step runs, the numbers mean little)."""


def build_lm(vocab_size: int, size: ModelSize, seed: int, eos_token_id: int):
    """A fresh Llama-style causal LM (tied embeddings), initialized from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=size.hidden, intermediate_size=4 * size.hidden,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _progress_callback(label: str, steps: int, log: Callable[[str], None]):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self) -> None:
            self.start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "ce_loss" in logs:
                kd = "".join(f"  kd {v:.3f}" for k, v in logs.items() if k.startswith("kd_loss/"))
                log(f"  {label:<8} step {state.global_step:>5}/{steps}  ce {logs['ce_loss']:.3f}{kd}  "
                    f"({time.perf_counter() - self.start:.0f} s)")

    return Progress()


def train_lm(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    teachers: Sequence = (),
    steps: int,
    lr: float,
    settings: DemoSettings,
    seed: int,
    label: str,
    log: Callable[[str], None],
    work_dir: str,
):
    """Train ``model`` on ``texts`` with :class:`xtoken.DistillationTrainer` (CE alone without teachers):
    AdamW, linear warm-up over 5% of the steps, then cosine decay; batches drawn by ``seed``."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from .trainer import DistillationTrainer

    args = TrainingArguments(
        output_dir=work_dir, max_steps=steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=lr, weight_decay=0.0, warmup_steps=max(1, steps // 20), lr_scheduler_type="cosine",
        logging_steps=max(1, steps // 5), save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        seed=seed, data_seed=seed, dataloader_drop_last=True,
    )  # fmt: skip
    trainer = DistillationTrainer(
        model, args, teachers=list(teachers), student_tokenizer=tokenizer, max_length=settings.max_length,
        train_dataset=list(texts), callbacks=[_progress_callback(label, steps, log)],
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return model.eval()


@torch.no_grad()
def exact_match(model, tokenizer, problems: Sequence[Problem], batch_size: int = 100) -> list[bool]:
    """For each problem, whether the model's greedy continuation of the prompt, up to its first newline,
    is exactly the answer. Prompts are left-padded and encoded with the tokenizer's special tokens."""
    hf = tokenizer.hf_tokenizer()
    pad = tokenizer.roles["pad"]
    newline = max(len(p.answer) for p in problems) + 1
    correct = []
    model.eval()
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        encoded = [e.ids for e in hf.encode_batch([p.prompt for p in chunk], add_special_tokens=True)]
        width = max(map(len, encoded))
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=newline + 1, do_sample=False,
            pad_token_id=pad, eos_token_id=tokenizer.roles["eos"],
        )  # fmt: skip
        for problem, row in zip(chunk, output[:, width:].tolist()):
            text = hf.decode(row, skip_special_tokens=True)
            correct.append(text.split("\n", 1)[0] == problem.answer and "\n" in text)
    return correct


# ---------------------------------------------------------------------------------------------
# The whole run


@dataclass
class DemoResult:
    """What one demo run measured. ``accuracy`` maps a row label (``"teacher"`` and the
    :data:`METHODS` labels that ran) to exact-match accuracy on the held-out problems;
    ``by_answer_digits`` splits it by the number of digits of the answer."""

    seed: int
    settings: dict[str, Any]
    accuracy: dict[str, float] = field(default_factory=dict)
    by_answer_digits: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    audit: str = ""
    alignment: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        digits = sorted({d for row in self.by_answer_digits.values() for d in row})
        header = f"{'model':<10} {'exact match':>11}" + "".join(f"{d + '-digit':>10}" for d in digits) + f"{'time':>8}"
        lines = [header, "-" * len(header)]
        for label, accuracy in self.accuracy.items():
            split = self.by_answer_digits.get(label, {})
            lines.append(
                f"{label:<10} {accuracy:>11.1%}" + "".join(f"{split.get(d, float('nan')):>10.1%}" for d in digits)
                + f"{self.seconds.get(label, float('nan')):>7.0f}s"
            )
        lines += [f"{METHODS[m]:<10} skipped: {why}" for m, why in self.skipped.items()]
        return "\n".join(lines)


def _by_digits(problems: Sequence[Problem], correct: Sequence[bool]) -> dict[str, float]:
    groups: dict[str, list[bool]] = {}
    for problem, ok in zip(problems, correct):
        groups.setdefault(str(len(problem.answer)), []).append(ok)
    return {d: sum(v) / len(v) for d, v in sorted(groups.items())}


def _alignment_stats(texts: Sequence[str], student, teacher) -> str:
    from .align import align_texts

    return str(align_texts(list(texts), student, teacher).stats)


def run_demo(
    settings: DemoSettings,
    seed: int = 0,
    *,
    methods: Sequence[str] = tuple(METHODS),
    output: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo (module docstring) and return what it measured. With ``output``, the corpus, the
    tokenizers, W, ``results.json`` and ``accuracy.png`` are written there. A method whose loss this build
    of xtoken lacks is skipped and reported."""
    from .distill import Teacher, available_losses
    from .projection import Projection

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; expected some of {list(METHODS)}")
    result = DemoResult(seed=seed, settings=asdict(settings))
    clock = time.perf_counter()
    train, test = make_problems(seed, settings.train_problems, settings.test_problems)
    texts = [p.text for p in train]
    teacher_tok, student_tok = train_tokenizers(texts)
    projection = Projection.build(student_tok, teacher_tok)
    audit = projection.audit()
    result.audit = str(audit)
    result.alignment = _alignment_stats(texts[:1000], student_tok, teacher_tok)
    result.seconds["setup"] = time.perf_counter() - clock
    log(f"corpus: {len(train):,} training problems, {len(test):,} held-out; example:\n  {train[0].text!r}")
    log(f"tokenizers: teacher {len(teacher_tok)} ids (splits digits), student {len(student_tok)} ids (packs up to "
        f"3 digits); the student's {train[0].answer!r} is {len(student_tok.encode(train[0].answer))} token(s), "
        f"the teacher's {len(teacher_tok.encode(train[0].answer))}")
    log(f"coverage audit of W (student -> teacher):\n{result.audit}")
    log(f"alignment of the first 1,000 training texts:\n{result.alignment}")

    with tempfile.TemporaryDirectory() as work_dir:

        def train_model(label: str, tokenizer, size: ModelSize, model_seed: int, **kwargs):
            start = time.perf_counter()
            model = build_lm(len(tokenizer), size, model_seed, tokenizer.roles["eos"])
            train_lm(model, tokenizer, texts, settings=settings, seed=seed, label=label, log=log,
                     work_dir=work_dir, **kwargs)
            correct = exact_match(model, tokenizer, test)
            result.accuracy[label] = sum(correct) / len(correct)
            result.by_answer_digits[label] = _by_digits(test, correct)
            result.seconds[label] = time.perf_counter() - start
            log(f"  {label:<8} exact match {result.accuracy[label]:.1%} ({result.seconds[label]:.0f} s)")
            return model

        log("training the teacher")
        teacher = train_model("teacher", teacher_tok, settings.teacher, seed + 1,
                              steps=settings.teacher_steps, lr=settings.teacher_lr)
        log("training the students (same initialization, batches and steps)")
        for method in methods:
            if method != "ce" and method not in available_losses():
                result.skipped[method] = f"xtoken.{method}_loss is not in this build of xtoken"
                log(f"  {METHODS[method]:<8} skipped: {result.skipped[method]}")
                continue
            teachers = [] if method == "ce" else [Teacher(teacher, teacher_tok, projection, loss=method)]
            train_model(METHODS[method], student_tok, settings.student, seed + 2, teachers=teachers,
                        steps=settings.student_steps, lr=settings.student_lr)
    result.seconds["total"] = time.perf_counter() - clock
    log(f"\nexact-match answer accuracy on {len(test):,} held-out problems (greedy generation):\n{result.table()}")
    if output is not None:
        _save(Path(output), result, train, test, teacher_tok, student_tok, projection, log)
    return result


def _save(folder: Path, result: DemoResult, train, test, teacher_tok, student_tok, projection, log) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, problems in (("train", train), ("test", test)):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": p.text, "prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems)
    teacher_tok.hf_tokenizer().save(str(folder / "teacher_tokenizer.json"))
    student_tok.hf_tokenizer().save(str(folder / "student_tokenizer.json"))
    projection.save(folder / "W.safetensors")
    (folder / "results.json").write_text(json.dumps(asdict(result), indent=2), encoding="utf-8")
    plot_accuracy([result], folder / "accuracy.png")
    log(f"saved the corpus, tokenizers, W, results.json and accuracy.png to {folder}")


def plot_accuracy(results: Sequence[DemoResult], path: str | Path) -> None:
    """A bar plot of exact-match accuracy per model: the mean over ``results`` (one per seed), with the
    lowest and highest seed as an error bar and every seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label for r in results for label in r.accuracy))
    values = [[100 * r.accuracy[label] for r in results if label in r.accuracy] for label in labels]
    means = [sum(v) / len(v) for v in values]
    errors = [[m - min(v) for m, v in zip(means, values)], [max(v) - m for m, v in zip(means, values)]]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    colors = ["#777777" if label == "teacher" else "#c0392b" if "GOLD" in label else "#2e86c1" for label in labels]
    ax.bar(labels, means, yerr=errors if len(results) > 1 else None, capsize=4, color=colors)
    for x, v in enumerate(values):
        ax.scatter([x] * len(v), v, color="black", s=10, zorder=3)
    seeds = ", ".join(str(r.seed) for r in results)
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Held-out arithmetic, greedy answers (seed{'s' if len(results) > 1 else ''} {seeds})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
