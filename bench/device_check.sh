#!/usr/bin/env bash
# One call on the lent H200: build the extension there, run the CUDA tests, compute-sanitizer on a small
# case, the GPU benchmarks, and print a summary last. Logs and CSVs go to $OUT (default bench/results/device).
#   run it as:  bash bench/device_check.sh
set -u
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/python:${PYTHONPATH:-} PYTHONWARNINGS=ignore
export XTOKEN_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16}
declare -A STATUS
step() {  # step NAME LOGFILE COMMAND...
  local name=$1 log=$2; shift 2
  local t0=$SECONDS
  echo "=== $name"
  "$@" >"$OUT/$log" 2>&1
  local rc=$?
  STATUS[$name]="rc=$rc $((SECONDS - t0))s"
  tail -n 15 "$OUT/$log"
  return $rc
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -n 2
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step build build.log python3 setup.py build_ext --inplace || { echo "build failed"; cat "$OUT/build.log" | grep -E "error" | head -20; }
step tests tests.log python3 -m pytest tests -q -x -p no:cacheprovider -k "cuda or CUDA" -rs
step tests_all tests_all.log python3 -m pytest tests -q -p no:cacheprovider
step memcheck memcheck.log compute-sanitizer --tool memcheck --error-exitcode 9 python3 bench/sanitizer_case.py
step racecheck racecheck.log compute-sanitizer --tool racecheck --error-exitcode 9 python3 bench/sanitizer_case.py
step bench_pkl bench_pkl.log python3 bench/bench_pkl_loss.py --device cuda --no-reference --csv "$OUT/pkl_loss_cuda.csv"
for extra in bench/device_extra_*.sh; do
  [ -e "$extra" ] && step "$(basename "$extra" .sh)" "$(basename "$extra" .sh).log" bash "$extra"
done

echo
echo "================ summary ================"
cat "$OUT/env.txt" | head -n 3
for k in "${!STATUS[@]}"; do printf '%-22s %s\n' "$k" "${STATUS[$k]}"; done | sort
grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 1 | sed 's/^/cuda tests: /'
grep -E "passed|failed|error" "$OUT/tests_all.log" | tail -n 1 | sed 's/^/all tests:  /'
grep -E "ERROR SUMMARY|failures:" "$OUT/memcheck.log" | sed 's/^/memcheck:   /'
grep -E "RACECHECK SUMMARY|ERROR SUMMARY" "$OUT/racecheck.log" | sed 's/^/racecheck:  /'
grep -E "^ +[0-9]+ |agreement" "$OUT/bench_pkl.log"
python3 - "$OUT/pkl_loss_cuda.csv" <<'PY'
import csv, sys
try:
    rows = list(csv.DictReader(open(sys.argv[1])))
except OSError:
    sys.exit(0)
for r in rows:
    extra = dict(kv.split("=", 1) for kv in r["extra"].split(";") if "=" in kv)
    print(f"{r['impl']:>8} {r['dtype']:>9} {r['shape']:<40} {float(r['median_ms']):8.3f} ms  "
          f"{extra.get('achieved_TBps', '-'):>5} TB/s  {extra.get('pct_of_4.3TBps', '-'):>3}%  peak {float(r['peak_extra_mb']):.0f} MB")
PY
