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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xtoken", description="cross-tokenizer knowledge distillation")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_bench,):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
