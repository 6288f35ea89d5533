"""Alignment speed: the align_spans op alone, and align_texts against tokenization alone.

For each kind of text, prints:
  1. align_spans on the CPU, one thread: tokens (both sides) per second.
  2. align_texts end to end (tokenization included), given the plain Hugging Face tokenizers as a new user
     would, over the time the two tokenizers alone take to batch-encode the same texts
     (``Tokenizer.encode_batch`` on each, nothing else).
  3. The cost of the span wrappers: building both (what a call paid before wrappers were cached per
     tokenizer object) and the first align_texts call with fresh wrappers (which work out the surface bytes
     of the ids they meet).

Uses the real Llama-3.2 / Qwen pair when the packages that ship them are installed, else two byte-level
BPE tokenizers trained here. Texts: ``english`` (prose with numbers, some code and a little non-ASCII text)
and ``multilingual`` (half the words accented Latin, Greek, Cyrillic, CJK, Korean, Arabic, Devanagari or emoji).

    PYTHONPATH=python python bench/bench_align.py [--batch 64] [--repeats 15] [--csv bench/results/align_cpu.csv]
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import subprocess
import time

import torch

from xtoken.align import _WRAPPERS, align_spans, align_texts, as_span_tokenizer

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no will can more out other about "
    "model training data token teacher student distillation loss batch sequence vocabulary chunk alignment"
).split()
EXTRA = ["café", "naïve", "déjà vu", "中文", "日本語", "😀", "👍🏽", "€", "—", "Straße", "Ελληνικά"]
MULTILINGUAL = (
    "café naïve déjà façade jalapeño über Straße Ελληνικά γλώσσα русский язык 中文 文本 分词器 日本語 テキスト "
    "한국어 문장 العربية النص हिन्दी पाठ 😀 👍🏽 🎉 👨‍👩‍👧 € — “quoted”"
).split()


def make_texts(count: int, words: int, seed: int = 0, multilingual: bool = False) -> list[str]:
    """``count`` texts of ``words`` words; ``multilingual``: every other word, on average, from MULTILINGUAL."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        out = []
        for i in range(words):
            r = rng.random()
            if r < 0.08:
                out.append(str(rng.choice([rng.randint(0, 99), rng.randint(100, 9999), rng.randint(10**4, 10**7)])))
            elif r < 0.11:
                out.append(rng.choice(EXTRA))
            elif multilingual and rng.random() < 0.5:
                out.append(rng.choice(MULTILINGUAL))
            else:
                out.append(rng.choice(WORDS))
            if rng.random() < 0.07:
                out[-1] += rng.choice([".", ",", ";", ":", "!", "?", "\n\n", " (1.5%)", "'s"])
        texts.append(" ".join(out))
    return texts


def tokenizers_pair():
    try:
        from xtoken.tokenizer import load_tokenizer

        return "llama3.2 / qwen", load_tokenizer("llama3.2").hf_tokenizer(), load_tokenizer("qwen").hf_tokenizer()
    except (FileNotFoundError, ImportError):
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

        pair = []
        for digits in (r"\p{N}{1,3}", r"\p{N}"):
            t = Tokenizer(models.BPE())
            pattern = rf"""[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|{digits}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
            t.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])  # fmt: skip
            t.train_from_iterator(make_texts(200, 100, seed=1), trainers.BpeTrainer(vocab_size=2000, show_progress=False))
            pair.append(t)
        return "trained byte-level BPE pair", *pair


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median and (max - min) / median over ``repeats`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return median, (max(times) - min(times)) / median


def timed_pair(first, second, repeats: int) -> tuple[float, float, float, float]:
    """``timed`` for two functions run alternately."""
    first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    stats = []
    for t in times:
        median = statistics.median(t)
        stats += [median, (max(t) - min(t)) / median]
    return tuple(stats)


def wrapper_costs(student_tok, teacher_tok, texts: list[str], repeats: int) -> tuple[float, float]:
    """Median seconds to build both span wrappers, and of a first align_texts call with fresh ones."""
    builds, firsts = [], []
    for _ in range(repeats):
        _WRAPPERS.clear()
        start = time.perf_counter()
        as_span_tokenizer(student_tok), as_span_tokenizer(teacher_tok)
        builds.append(time.perf_counter() - start)
        _WRAPPERS.clear()
        start = time.perf_counter()
        align_texts(texts, student_tok, teacher_tok)
        firsts.append(time.perf_counter() - start)
    return statistics.median(builds), statistics.median(firsts)


def run_case(kind: str, name: str, student_tok, teacher_tok, args) -> list:
    texts = make_texts(args.batch, args.words, multilingual=kind == "multilingual")
    build_time, first_time = wrapper_costs(student_tok, teacher_tok, texts, max(3, args.repeats // 5))

    # 1. End to end against tokenization alone, timed alternately so that both see the same machine state.
    def tokenize():
        student_tok.encode_batch(texts, add_special_tokens=True)
        teacher_tok.encode_batch(texts, add_special_tokens=True)

    tok_time, tok_spread, e2e_time, e2e_spread = timed_pair(
        tokenize, lambda: align_texts(texts, student_tok, teacher_tok), args.repeats
    )
    ratio = e2e_time / tok_time

    # 2. The op alone, on the span ends of the same batch, one thread.
    batch = align_texts(texts, student_tok, teacher_tok)
    ends = [getattr(batch, f"{s}_spans")[..., 1].contiguous() for s in ("student", "teacher")]
    lengths = [getattr(batch, f"{s}_attention_mask").sum(1).int() for s in ("student", "teacher")]
    tokens = int(lengths[0].sum() + lengths[1].sum())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    op_time, op_spread = timed(lambda: torch.ops.xtoken.align_spans(ends[0], lengths[0], False, ends[1], lengths[1], False),
                               args.repeats * 5)  # fmt: skip
    torch.set_num_threads(threads)
    op_rate = tokens / op_time
    check = align_spans(ends[0], lengths[0], ends[1], lengths[1]).table()
    assert torch.equal(check, batch.chunks)

    print(f"[{kind}] tokenizers: {name}; {args.batch} texts x {args.words} words; {tokens} tokens (both sides)")
    print(f"align_spans (CPU, 1 thread): {op_time * 1e3:.3f} ms (spread {op_spread:.0%}) = "
          f"{op_rate / 1e6:.1f} M tokens/s per core")  # fmt: skip
    print(f"tokenization alone: {tok_time * 1e3:.1f} ms (spread {tok_spread:.0%}); align_texts: "
          f"{e2e_time * 1e3:.1f} ms (spread {e2e_spread:.0%}); ratio {ratio:.2f}x")  # fmt: skip
    print(f"span wrappers: built in {build_time * 1e3:.1f} ms; first align_texts with fresh wrappers "
          f"{first_time * 1e3:.1f} ms")  # fmt: skip
    print(batch.stats)
    return [kind, args.batch, args.words, tokens, round(op_rate), round(tok_time * 1e3, 2), round(e2e_time * 1e3, 2),
            round(ratio, 3), round(build_time * 1e3, 2), round(first_time * 1e3, 2)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="texts per batch")
    parser.add_argument("--words", type=int, default=400, help="words per text")
    parser.add_argument("--repeats", type=int, default=15)
    kinds = ["english", "multilingual"]
    parser.add_argument("--texts", nargs="+", default=kinds, choices=kinds, help="the kinds of text (default: both)")
    parser.add_argument("--csv", default=None, help="append the results to this CSV file")
    args = parser.parse_args()

    name, student_tok, teacher_tok = tokenizers_pair()
    rows = [run_case(kind, name, student_tok, teacher_tok, args) for kind in args.texts]
    if args.csv:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["commit", "torch", "device", "tokenizers", "texts", "batch", "words", "tokens",
                            "op_tokens_per_s_1thread", "tokenize_ms", "align_texts_ms", "ratio", "wrapper_build_ms",
                            "first_call_ms"])  # fmt: skip
            for row in rows:
                w.writerow([commit, torch.__version__, "cpu", name, *row])


if __name__ == "__main__":
    main()
