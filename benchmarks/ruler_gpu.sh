#!/usr/bin/env bash
# RULER on SmolLM2 on a lent GPU machine (no Ray there; nothing downloads): installs the carried
# wheels (gguf, wonderwords) and this package, rebuilds the SmolLM2 GGUF from parts (a call
# carries at most 64 MiB with the working tree, so the 98 MB file and MiniLM travel over several
# calls while the machine stays warm: each call's .gpu/ pieces are kept in $SRC, outside the
# synced tree), then runs `flashmemory eval --suite ruler --resume` into $SRC/results, so a run
# cut by the 10-minute call limit continues in the next call.
# Usage (repo root): bash benchmarks/ruler_gpu.sh LENGTH SAMPLES MODES [extra eval flags]
#   pieces only:     bash benchmarks/ruler_gpu.sh keep
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
SRC=${FM_GPU_DIR:-/tmp/fm}; mkdir -p "$SRC"
cp -r .gpu/* "$SRC/" 2>/dev/null
[ "$1" = keep ] && { ls -la "$SRC"; exit 0; }
length=$1 samples=$2 modes=$3; shift 3
gguf=$SRC/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ]; then
  cat "$SRC/smol.p1" "$SRC/smol.p2" "$SRC/smol.p3" > "$gguf" || exit 1
fi
echo "gguf md5 $(md5sum < "$gguf" | cut -c1-32)"  # a1231443440b107ff29f02bdb38c9d0a here
python3 -m pip install -q --no-deps "$SRC"/wheels/*.whl >"$OUT/install.log" 2>&1 &&
  python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/install.log" 2>&1 ||
  { tail "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
dir=$SRC/results/ruler-$length
python3 -m flashmemory eval --suite ruler --lengths "$length" --samples "$samples" \
  --modes "$modes" --model "$gguf" --indexer "$SRC/minilm" --device cuda --out "$dir" --resume \
  "$@" 2>&1 | tr '\r' '\n' | grep -v '^ruler: ' | tail -40
cp -r "$dir" "$OUT/" 2>/dev/null
ls "$dir/parts" | wc -l
