#!/usr/bin/env bash
# Run by bench/device_check.sh on the GPU: the fused linear losses against the unfused path at N = 32,768 rows
# (P-KL and same-vocabulary KD, bf16), KD also against Liger's LigerFusedLinearJSD when liger-kernel is installed
# there (bench/bench_fused_linear.py). Rows go to $OUT/fused_linear_cuda.csv.
set -u
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
python3 -c "import liger_kernel" 2>/dev/null || echo "liger-kernel is not installed: KD is compared with the unfused path only"
python3 bench/bench_fused_linear.py --device cuda --dtypes bfloat16 --csv "$OUT/fused_linear_cuda.csv"
