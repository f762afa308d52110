#!/usr/bin/env bash
# Issue 5 with longer documents, in one GPU call: builds training (retrieve, aggregate, vartrack)
# and held-out (multihop) corpora of CHARS characters, dumps their labels with SmolLM2 on the
# GPU, trains the indexer by listwise distillation and evaluates it against zero-shot MiniLM.
# The SmolLM2 GGUF arrives in pieces over earlier calls (as in benchmarks/ruler_gpu.sh:
# `bash benchmarks/ruler_gpu.sh keep` with .gpu/smol.p2, then with .gpu/smol.p1, .gpu/smol.p3,
# .gpu/wheels and .gpu/dswhl carried); this call carries .gpu/minilm.
# Each dump stops after DUMP_S seconds (default 150; a dump writes a part file every 8 documents
# and resumes), so that training and evaluation fit the call with the documents dumped so far.
# Usage (repo root): bash benchmarks/indexer_long_gpu.sh CHARS TRAIN_PER_FAMILY HELDOUT [EPOCHS]
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
SRC=${FM_GPU_DIR:-/tmp/fm}; mkdir -p "$SRC"
cp -r .gpu/* "$SRC/" 2>/dev/null
chars=$1 per=$2 held=$3 epochs=${4:-3}
gguf=$SRC/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$gguf" ] || cat "$SRC/smol.p1" "$SRC/smol.p2" "$SRC/smol.p3" > "$gguf" || exit 1
echo "gguf md5 $(md5sum < "$gguf" | cut -c1-32)"
python3 -m pip install -q --no-deps "$SRC"/wheels/*.whl "$SRC"/dswhl/*.whl >"$OUT/install.log" 2>&1 &&
  python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/install.log" 2>&1 ||
  { tail "$OUT/install.log"; exit 1; }
fm() { python3 -m flashmemory "$@"; }
w=$SRC/long-$chars; mkdir -p "$w"
fm indexer build-corpus --out "$w/train.parquet" --families retrieve,aggregate,vartrack \
  --per-family "$per" --chars "$chars" --seed 11 || exit 1
fm indexer build-corpus --out "$w/heldout.parquet" --families multihop --per-family "$held" \
  --chars "$chars" --seed 12 || exit 1
for c in heldout train; do
  echo "=== dump $c $(date -u +%H:%M:%S)"
  timeout "${DUMP_S:-150}" python3 -m flashmemory indexer dump --corpus "$w/$c.parquet" \
    --out "$w/labels" --steps 64 --max-prompt-tokens 8000 --model "$gguf" --device cuda 2>&1 \
    | tr '\r' '\n' | grep -v '^dump: ' | tail -3
done
echo "=== train $(date -u +%H:%M:%S)"
fm indexer train --labels "$w/labels" --out "$w/kl$epochs" --base "$SRC/minilm" --device cuda \
  --loss kl --epochs "$epochs" --lr 5e-5 >"$OUT/train.log" 2>&1 || { tail -5 "$OUT/train.log"; exit 1; }
cp "$w/kl$epochs/flashmemory_indexer.json" "$OUT/meta-kl$epochs.json"
echo "=== evaluate $(date -u +%H:%M:%S)"
fm indexer evaluate --labels "$w/labels" --split eval --indexers "$SRC/minilm,$w/kl$epochs" \
  --device cuda --json "$OUT/eval.json" 2>&1 | grep '|' | grep -E 'all|selector'
python3 - "$w/labels" <<'EOF'
import sys, statistics, pyarrow.parquet as pq
rows = pq.read_table(sys.argv[1]).to_pylist()
print("rows", len(rows), "chunks per row: mean", statistics.mean(len(r["chunk_texts"]) for r in rows))
EOF
