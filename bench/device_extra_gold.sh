#!/usr/bin/env bash
# Run by bench/device_check.sh on the GPU: xtoken's GOLD loss against TRL's on the same inputs (bench/bench_gold.py),
# float32 and bfloat16 logits. Rows go to $OUT/gold_loss_cuda.csv.
set -u
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
python3 bench/bench_gold.py --device cuda --dtypes float32 bfloat16 --csv "$OUT/gold_loss_cuda.csv"
