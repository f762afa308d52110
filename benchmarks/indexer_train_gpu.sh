#!/usr/bin/env bash
# Issue 5 on a lent GPU machine: train indexer variants on a carried label dump and evaluate them
# on its held-out split, in one call. Carry .gpu/minilm (the base model's directory) and
# .gpu/labels (a label dump made by `flashmemory indexer dump`), and .gpu/dswhl: wheels of
# `datasets` and its two dependencies the device lacks (dill, multiprocess), fetched here with
#   pip download --no-deps --python-version 3.12 --only-binary=:all: -d .gpu/dswhl datasets dill multiprocess
# LABELS (default .gpu/labels) names the dump; several dumps of the same held-out rows can be
# compared in one call by running the script once per dump.
# Usage (repo root):
#   [LABELS=.gpu/other] bash benchmarks/indexer_train_gpu.sh "name:train flags" ...
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
SRC=${FM_GPU_DIR:-/tmp/fm}; mkdir -p "$SRC"
LABELS=${LABELS:-.gpu/labels}
python3 -m pip install -q --no-deps .gpu/dswhl/*.whl >"$OUT/install.log" 2>&1 &&
  python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/install.log" 2>&1 ||
  { tail "$OUT/install.log"; exit 1; }
python3 -c 'import datasets, sentence_transformers as s; print("sentence-transformers", s.__version__)' ||
  exit 1
names=.gpu/minilm
for spec in "$@"; do
  name=${spec%%:*}; flags=${spec#*:}
  echo "=== train $name: $flags $(date -u +%H:%M:%S)"
  # shellcheck disable=SC2086
  python3 -m flashmemory indexer train --labels "$LABELS" --out "$SRC/$name" --base .gpu/minilm \
    --device cuda $flags >"$OUT/train-$name.log" 2>&1 || { tail -5 "$OUT/train-$name.log"; continue; }
  grep -E '"train_loss"|"examples"|"threshold"' "$OUT/train-$name.log" | tr -d '\n'; echo
  cp "$SRC/$name/flashmemory_indexer.json" "$OUT/meta-$name.json"
  names="$names,$SRC/$name"
done
echo "=== evaluate $(date -u +%H:%M:%S)"
python3 -m flashmemory indexer evaluate --labels "$LABELS" --split eval --indexers "$names" \
  --device cuda --json "$OUT/eval-$(basename "$LABELS").json" 2>&1 | grep -v Warn | grep '|' | grep -E 'all|selector'
