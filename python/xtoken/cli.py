"""The ``xtoken`` command line. Each command adds its parser in an ``_add_<command>`` function."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="microbenchmarks of the fused losses against their baselines")
    p.add_argument("op", choices=["pkl", "gold"], help="which loss to benchmark (gold: against TRL's GOLD)")
    p.add_argument("--quick", action="store_true",
                   help="pkl only: small shapes, finishes in well under a minute on a CPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--csv", default=None, help="append the result rows to this CSV file")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from .benchmark import run_gold_benchmark, run_pkl_benchmark

    if args.op == "gold":
        if args.quick:
            print("xtoken bench: --quick applies to pkl only (gold runs at its fixed, realistic shapes)",
                  file=sys.stderr)
            return 2
        run_gold_benchmark(device=args.device, csv_path=args.csv)
    else:
        run_pkl_benchmark(quick=args.quick, device=args.device, csv_path=args.csv)
    return 0


def _add_projection(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "projection", help="build, audit and inspect the projection W between two vocabularies"
    )
    actions = p.add_subparsers(dest="action", required=True)

    build = actions.add_parser("build", help="build W from a student and a teacher tokenizer (SPEC.md §5)")
    tokenizer_help = (
        "a tokenizer.json, a folder holding one, a tiktoken BPE rank file (with --{}-pattern), or a "
        "built-in name: llama3.2, qwen, qwen3.6"
    )
    build.add_argument("--student", required=True, help=tokenizer_help.format("student"))
    build.add_argument("--teacher", required=True, help=tokenizer_help.format("teacher"))
    build.add_argument("-o", "--output", required=True, help="the safetensors file to write")
    build.add_argument("--student-pattern", help="split regex of a tiktoken student rank file")
    build.add_argument("--teacher-pattern", help="split regex of a tiktoken teacher rank file")
    build.add_argument(
        "--student-vocab-size", type=int, help="student logit width (default: the tokenizer's size)"
    )
    build.add_argument(
        "--teacher-vocab-size", type=int, help="teacher logit width (default: the tokenizer's size)"
    )
    build.add_argument("--top-k", type=int, default=4, help="teacher tokens kept per row (default 4)")
    build.add_argument(
        "--beta", type=float, default=0.9, help="weight of the first decomposition piece (default 0.9)"
    )
    build.add_argument("--gamma", type=float, default=0.1, help="decay per further piece (default 0.1)")
    build.add_argument(
        "--max-pieces", type=int, default=4, help="decomposition pieces that count (default 4)"
    )
    build.set_defaults(func=_clean_errors(_run_projection_build))

    audit = actions.add_parser("audit", help="print the coverage table of a saved W and the recommended loss")
    audit.add_argument("path", help="a W saved by `xtoken projection build`")
    audit.add_argument("--threshold", type=float, default=0.6, help="relaxed-pair threshold (default 0.6)")
    audit.set_defaults(func=_clean_errors(_run_projection_audit))

    show = actions.add_parser("show", help="print a student token's row of W")
    show.add_argument("path", help="a W saved by `xtoken projection build`")
    show.add_argument("token", help="the student token's text (e.g. 201, ' the') or, with --id, its id")
    show.add_argument("--id", action="store_true", help="TOKEN is a student token id")
    show.set_defaults(func=_clean_errors(_run_projection_show))


def _clean_errors(run):
    """``run`` with bad input (a missing file, a wrong tokenizer, a missing package) reported in one line."""

    def run_reporting_errors(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (ValueError, OSError, ImportError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run_reporting_errors


def _run_projection_build(args: argparse.Namespace) -> int:
    import time

    from .projection import Projection
    from .tokenizer import load_tokenizer

    start = time.perf_counter()
    student = load_tokenizer(args.student, pattern=args.student_pattern)
    teacher = load_tokenizer(args.teacher, pattern=args.teacher_pattern)
    projection = Projection.build(
        student, teacher, top_k=args.top_k, beta=args.beta, gamma=args.gamma, max_pieces=args.max_pieces,
        student_vocab_size=args.student_vocab_size, teacher_vocab_size=args.teacher_vocab_size, progress=True,
    )  # fmt: skip
    projection.save(args.output)
    print(f"{projection!r} built in {time.perf_counter() - start:.1f} s, saved to {args.output}")
    print(f"student {student.name} ({len(student):,} ids), teacher {teacher.name} ({len(teacher):,} ids)")
    counts = ", ".join(
        f"{kind} {len(projection.common_pairs(kind)):,}" for kind in ("exact", "raw", "relaxed")
    )
    print(f"common pairs: {counts}")
    return 0


def _run_projection_audit(args: argparse.Namespace) -> int:
    from .projection import Projection

    print(Projection.load(args.path).audit(args.threshold))
    return 0


def _run_projection_show(args: argparse.Namespace) -> int:
    from .projection import Projection

    projection = Projection.load(args.path)
    if projection.vocabularies is None:
        print(
            f"error: {args.path} has no vocabularies (it was not built by `xtoken projection build`)",
            file=sys.stderr,
        )
        return 2
    student, teacher = projection.vocabularies.student, projection.vocabularies.teacher
    if args.id:
        if not args.token.isdigit() or int(args.token) >= len(student):
            print(
                f"error: --id expects a student token id below {len(student)}, got {args.token!r}",
                file=sys.stderr,
            )
            return 2
        ids = [int(args.token)]
    else:
        ids = student.find(args.token)
        if not ids:
            print(f"error: no student token has the text {args.token!r}", file=sys.stderr)
            return 1
    for s in ids:
        row = projection.row(s)
        print(
            f"student token {s} {student.display(s)}: "
            + (f"{len(row)} teacher token(s)" if row else "empty row")
        )
        for t, weight in row:
            print(f"  {teacher.display(t):<24} {weight:.4f}  (id {t})")
    return 0


def _add_align(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("align", help="show the chunks of two tokenizations of a text, side by side")
    p.add_argument("text", nargs="+", help="the text(s) to align")
    p.add_argument("--student", required=True, help="llama3.2, qwen, qwen3.6, a tokenizer.json or a folder holding one")
    p.add_argument("--teacher", required=True, help="as --student")
    p.add_argument("--max-length", type=int, default=None, help="keep at most this many tokens per side")
    p.add_argument("--no-special-tokens", action="store_true", help="do not add BOS/EOS")
    p.set_defaults(func=_run_align)


def _run_align(args: argparse.Namespace) -> int:
    from .align import align_texts, as_span_tokenizer

    student = as_span_tokenizer(args.student)
    teacher = as_span_tokenizer(args.teacher)
    batch = align_texts(args.text, student, teacher, max_length=args.max_length,
                        add_special_tokens=not args.no_special_tokens)

    def pieces(data: bytes, spans, row0: int, row1: int) -> str:
        # Predictor rows [row0, row1) of the flattened batch hold the targets at rows + 1.
        flat = spans.reshape(-1, 2)
        return " ".join(
            repr(data[a:z].decode("utf-8", errors="backslashreplace"))
            for a, z in flat[row0 + 1 : row1 + 1].tolist()
        )

    first = 0
    for b, text in enumerate(args.text):
        data = text.encode()
        count = int(batch.chunk_counts[b])
        rows = []
        for k, (s0, s1, t0, t1) in enumerate(batch.chunks[first : first + count].tolist()):
            rows.append((k, f"{s1 - s0}:{t1 - t0}", pieces(data, batch.student_spans, s0, s1),
                         pieces(data, batch.teacher_spans, t0, t1)))
        first += count
        width = max([len(r[2]) for r in rows] + [len("student")])
        print(f"text {b} ({len(data)} bytes)")
        print(f"{'chunk':>5}  {'shape':<5}  {'student':<{width}} | teacher")
        for k, shape, left, right in rows:
            print(f"{k:>5}  {shape:<5}  {left:<{width}} | {right}")
    print(batch.stats)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xtoken", description="cross-tokenizer knowledge distillation")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_bench, _add_projection, _add_align):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
