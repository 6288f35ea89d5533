"""Fused linear losses, forward+backward: ``xtoken.fused_linear_<loss>_loss`` (hidden states and lm_head weights
in, logits block by block) against the unfused path (``F.linear`` logits of both sides into the same loss), on
Llama-3.2-1B student / Qwen3-4B teacher shapes (H_s = 2,048, H_t = 2,560, V_s = 128,256, V_t = 151,936).

    python bench/bench_fused_linear.py                       # CPU: P-KL at N = 2,048 rows, float32
    python bench/bench_fused_linear.py --dtypes bfloat16     # CPU bf16 (needs a CPU with bf16 GEMMs to finish soon)
    python bench/bench_fused_linear.py --device cuda         # GPU: P-KL and KD at N = 32,768, bf16; KD also
                                                             # against Liger's LigerFusedLinearJSD when installed

Peak memory on the CPU is the resident high-water mark of one call in a fresh process. Rows are appended to
bench/results/fused_linear_<device>.csv.
"""

import argparse
import os

import torch

from xtoken.benchmark import run_fused_linear_benchmark

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--rows", type=int, default=None, help="student rows N (default 2,048 on CPU, 32,768 on GPU)")
    parser.add_argument("--dtypes", nargs="*", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--losses", nargs="*", default=None, choices=["pkl", "gold", "hkl", "uld", "kd"])
    parser.add_argument("--hidden", type=int, nargs=2, default=None, metavar=("H_S", "H_T"),
                        help="hidden sizes (default 2048 2560)")
    parser.add_argument("--block-rows", type=int, nargs="*", default=(), help="also time the fused path with these")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    here = os.path.dirname(os.path.abspath(__file__))
    csv_path = args.csv or os.path.join(here, "results", f"fused_linear_{device}.csv")
    run_fused_linear_benchmark(
        device=device, csv_path=csv_path, rows=args.rows, losses=args.losses, repeats=args.repeats,
        warmup=args.warmup, block_rows=args.block_rows, dtypes=[getattr(torch, d) for d in args.dtypes] if args.dtypes else None,
        shapes={"H_s": args.hidden[0], "H_t": args.hidden[1]} if args.hidden else None,
    )
