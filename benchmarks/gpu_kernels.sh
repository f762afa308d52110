#!/usr/bin/env bash
# Issue 4 on one GPU machine, in one call: GPU tests, a launch-config sweep, the kernel table and
# the whole-model decode table. Logs and JSON go to $OUT (or ./gpu-out). Usage (repo root):
#   bash benchmarks/gpu_kernels.sh [tests] [sweep] [kernel] [decode]   (default: all four)
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stages=${*:-tests sweep kernel decode}
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { tail "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
fm() { python3 -m flashmemory "$@"; }
for s in $stages; do
  echo "=== $s $(date -u +%H:%M:%S)"
  case $s in
    tests) python3 -m pytest -q -p no:cacheprovider tests/kernels tests/integration/test_decode_runner.py \
             2>&1 | tee "$OUT/gpu-tests.log" | tail -5
           grep -q failed "$OUT/gpu-tests.log" && { echo "GPU tests failed: benchmarks skipped"; exit 1; } ;;
    probe) python3 benchmarks/kernel_probe.py 2>&1 | tee "$OUT/probe.log" ;;
    variants) python3 benchmarks/kernel_probe.py --variants 2>&1 | tee "$OUT/variants.log" ;;
    profile) python3 benchmarks/kernel_probe.py --profile 2>&1 | tee "$OUT/profile.log" ;;
    hbmread) python3 benchmarks/hbm_read_probe.py 2>&1 | tee "$OUT/hbm-read.log" ;;
    probesweep) python3 benchmarks/kernel_probe.py --sweep 2>&1 | tee "$OUT/probe-sweep.log" ;;
    sweep) for c in "32k 0.05 1" "512k 0.1 1" "1024k 0.05 1" "128k 0.1 8"; do set -- $c
             fm bench kernel --shapes llama3-8b --contexts "$1" --budgets "$2" --batches "$3" --sweep \
               2>&1 | grep -E '^sweep|error'; done | tee "$OUT/sweep.log" ;;
    kernel) fm bench kernel --json "$OUT/kernel.json" 2>&1 | tee "$OUT/kernel.md" | grep -v '^|' ;;
    decode) fm bench decode --json "$OUT/decode.json" 2>&1 | tee "$OUT/decode.md" ;;
  esac
done
