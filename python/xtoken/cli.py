"""The ``xtoken`` command line. Each command adds its parser in an ``_add_<command>`` function."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="microbenchmarks of the fused losses against their baselines")
    p.add_argument("op", choices=["pkl"], help="which loss to benchmark")
    p.add_argument("--quick", action="store_true", help="small shapes, finishes in well under a minute on a CPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--csv", default=None, help="append the result rows to this CSV file")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from .benchmark import run_pkl_benchmark

    run_pkl_benchmark(quick=args.quick, device=args.device, csv_path=args.csv)
    return 0


def _add_align(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("align", help="show the chunks of two tokenizations of a text, side by side")
    p.add_argument("text", nargs="+", help="the text(s) to align")
    p.add_argument("--student", required=True, help="llama3.2, qwen, a tokenizer.json or a directory holding one")
    p.add_argument("--teacher", required=True, help="as --student")
    p.add_argument("--max-length", type=int, default=None, help="keep at most this many tokens per side")
    p.add_argument("--no-special-tokens", action="store_true", help="do not add BOS/EOS")
    p.set_defaults(func=_run_align)


def _run_align(args: argparse.Namespace) -> int:
    from .align import align_texts, as_span_tokenizer
    from .pretrained import load_tokenizer

    student = as_span_tokenizer(load_tokenizer(args.student))
    teacher = as_span_tokenizer(load_tokenizer(args.teacher))
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
    for add in (_add_bench, _add_align):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
