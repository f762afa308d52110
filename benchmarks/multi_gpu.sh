#!/usr/bin/env bash
# Issue 10 on a machine with 2+ GPUs, in one device call: install the Ray wheels and the project,
# the multi-GPU end-to-end tests, the NCCL point-to-point baseline, and the served TTFT split with
# prefill and decode on separate GPUs. Logs go to $OUT (or ./gpu-out). Usage (repo root, with
# .gpu/raywhl from ../shared/tools/device-wheels.sh, .gpu/tok a tokenizer directory and, for mode
# lsa, .gpu/minilm a sentence-transformers directory):
#   bash benchmarks/multi_gpu.sh [tests] [pair] [serve LENGTHS MODES]   (default: all, 32K-512K)
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
SITE=/tmp/fm-site  # the Ray wheels, installed once per machine (kept between calls while warm)
if [ ! -d "$SITE/ray" ]; then
  python3 -m pip install -q --no-deps --no-compile --target "$SITE" .gpu/raywhl/*.whl \
    >"$OUT/install.log" 2>&1 || { tail "$OUT/install.log"; exit 1; }
fi
export PYTHONPATH=$SITE PATH=$SITE/bin:$PATH
python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/install.log" 2>&1 \
  || { tail "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
nvidia-smi topo -m | head -4
indexer=minilm; [ -d .gpu/minilm ] && indexer=.gpu/minilm
[ $# -eq 0 ] && set -- tests pair serve 32768,131072,524288 full,random
while [ $# -gt 0 ]; do
  echo "=== $1 $(date -u +%H:%M:%S)"
  case $1 in
    tests) timeout 330 python3 -m pytest -q -p no:cacheprovider -W ignore tests/e2e/test_multi_gpu.py \
             2>&1 | tee "$OUT/multi-gpu-tests.log" | tail -15 ;;
    pair) timeout 90 python3 benchmarks/nccl_pair.py --repeats 20 2>&1 | tee "$OUT/nccl-pair.log" ;;
    serve) timeout "${SERVE_TIMEOUT:-540}" python3 benchmarks/serve_gpu.py --tokenizer .gpu/tok --layouts split \
             --lengths "$2" --modes "$3" --indexer "$indexer" --max-tokens 16 \
             2>&1 | tee -a "$OUT/serve-split.log" | grep -v -i "warn\|^\s*$\|Field(" ; shift 2 ;;
    *) echo "unknown stage $1"; exit 2 ;;
  esac
  shift
done
