#!/usr/bin/env bash
# Issue 5 pipeline on the CPU machine: corpus -> labels (SmolLM2) -> trained indexer -> recall.
# Usage (repo root, venv active): bash benchmarks/indexer_pipeline.sh OUT_DIR [TRAIN_PER_FAMILY]
# Real text needs Debian's python3-doc (apt-get install python3-doc); without it, synthetic only.
set -euo pipefail
out=${1:?output directory}; n=${2:-30}
mkdir -p "$out"
text=()
[ -d /usr/share/doc/python3-doc/html ] && text=(--text-dir /usr/share/doc/python3-doc/html --text-docs "$n")
flashmemory indexer build-corpus --out "$out/corpus.parquet" --families retrieve,aggregate \
  --per-family "$n" --chars 7000 --seed 1 "${text[@]}"
flashmemory indexer build-corpus --out "$out/heldout.parquet" --families multihop \
  --per-family "$n" --chars 7000 --seed 2
flashmemory indexer dump --corpus "$out/corpus.parquet" --out "$out/labels" --steps 64
flashmemory indexer dump --corpus "$out/heldout.parquet" --out "$out/labels" --steps 64
flashmemory indexer train --labels "$out/labels" --out "$out/indexer" --epochs 2 \
  --max-positives 3 --top-p 0.5
flashmemory indexer evaluate --labels "$out/labels" --split eval \
  --indexers minilm,"$out/indexer" --json "$out/eval-heldout.json"
flashmemory indexer evaluate --labels "$out/labels" --split train \
  --indexers minilm,"$out/indexer" --json "$out/eval-train.json"
