"""The reproduction study behind the README's "Demo" section: does the toy of ``xtoken demo`` reproduce
the X-Token paper's finding (GOLD hurts numerals when the teacher splits digits; P-KL fixes it)?

Runs the demo's default budget once per seed (each seed draws its own corpus, tokenizers, teacher and
student initialization) with every method of ``xtoken.demo.METHODS``: the two controls (students on the
teacher's tokenizer, CE only and CE + same-tokenizer KD), CE only, GOLD, H-KL, P-KL (``first``, NeMo's merge,
learned W), the chain KL and P-KL + chain. ``--methods`` runs a subset (one command per variant). It writes,
next to this file:

- ``results.md``: exact-match accuracy per method, mean, spread (lowest-highest seed) and every seed,
  split by the number of digits of the answer too, and two diagnostics of the students' multi-digit
  answers: the share begun with a lone digit, and with a wrong repeated-digit numeral ("88" for 80);
- ``results.json``: every run's :class:`xtoken.demo.DemoResult`;
- ``accuracy.png``: the bar plot (mean, lowest-highest seed, each seed as a dot).

The metric (exact match of the greedy answer on held-out operand pairs) and the budget are the demo's;
nothing is tuned per method.

    PYTHONPATH=python python bench/quality/run_study.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import torch

from xtoken.demo import METHODS, SETTINGS, DemoResult, plot_accuracy, run_demo

HERE = Path(__file__).parent


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=HERE).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def summarize(results: list[DemoResult]) -> str:
    """The study's Markdown table: per model, mean and spread over seeds, then each seed."""
    labels = list(dict.fromkeys(label for r in results for label in r.accuracy))
    digits = sorted({d for r in results for split in r.by_answer_digits.values() for d in split})
    seeds = ", ".join(str(r.seed) for r in results)
    header = ["model", "exact match, mean", "lowest-highest", f"per seed ({seeds})",
              *(f"{d}-digit answers, mean" for d in digits), "lone digit, mean", "repdigit, mean"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in labels:
        values = [100 * r.accuracy[label] for r in results if label in r.accuracy]
        cells = []
        for d in digits:
            by_digits = [100 * r.by_answer_digits[label][d] for r in results if d in r.by_answer_digits.get(label, {})]
            cells.append(f"{statistics.mean(by_digits):.1f}" if by_digits else "-")
        for diagnostic in (lambda r: r.lone_digit, lambda r: r.repdigit):
            shares = [100 * diagnostic(r)[label] for r in results if label in diagnostic(r)]
            cells.append(f"{statistics.mean(shares):.1f}" if shares else "-")
        lines.append(
            f"| {label} | {statistics.mean(values):.1f} | {min(values):.1f}-{max(values):.1f} | "
            + " / ".join(f"{v:.1f}" for v in values) + " | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2, help="students trained at once (default 2)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="student methods (default: all)")
    parser.add_argument("--output", default=str(HERE), help="folder for results.md/json and accuracy.png")
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    settings = SETTINGS["default"]
    start = time.perf_counter()
    results = []
    for seed in args.seeds:
        print(f"=== seed {seed}")
        results.append(run_demo(settings, seed, methods=args.methods, workers=args.workers))
    minutes = (time.perf_counter() - start) / 60
    table = summarize(results)
    held_out = settings.test_problems
    report = (
        f"# xtoken demo: reproduction study\n\n"
        f"Exact-match accuracy (%) of the greedy answer on {held_out} held-out problems per seed; "
        f"seeds {', '.join(map(str, args.seeds))}; the demo's default budget ({asdict(settings)}).\n"
        f"Commit {_commit()}, torch {torch.__version__}, {args.workers} worker(s), {minutes:.0f} min in all.\n\n"
        f"{table}\n"
    )
    (output / "results.md").write_text(report, encoding="utf-8")
    (output / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2), encoding="utf-8")
    plot_accuracy(results, output / "accuracy.png")
    print(report)


if __name__ == "__main__":
    main()
