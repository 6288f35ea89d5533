"""P-KL forward+backward: the xtoken kernel vs the float64 reference vs a NeMo-RL-style baseline.

    python bench/bench_pkl_loss.py                  # V_s=128,256, V_t=151,936, N in {256, 1024}, fp32 + bf16
    python bench/bench_pkl_loss.py --quick          # small shapes
    python bench/bench_pkl_loss.py --device cuda

Rows are appended to bench/results/pkl_loss_<device>.csv.
"""

import argparse
import os

import torch

from xtoken.benchmark import run_pkl_benchmark

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--sizes", type=int, nargs="*", default=None, help="row counts N")
    parser.add_argument("--dtypes", nargs="*", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) float64 reference")
    parser.add_argument("--reference-max-rows", type=int, default=256,
                        help="run the reference only up to this many rows (default 256)")
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    here = os.path.dirname(os.path.abspath(__file__))
    csv_path = args.csv or os.path.join(here, "results", f"pkl_loss_{device}.csv")
    run_pkl_benchmark(quick=args.quick, device=device, csv_path=csv_path, sizes=args.sizes,
                      dtypes=[getattr(torch, d) for d in args.dtypes] if args.dtypes else None,
                      with_reference=not args.no_reference, reference_max_rows=args.reference_max_rows)
