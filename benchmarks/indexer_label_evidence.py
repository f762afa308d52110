"""How well does each label aggregation point at the evidence? (issue 5, run 9)

For every row of a label dump whose gold answer lies in a candidate chunk
(``indexer.retrieval_heads.evidence``), and for each mass aggregation (peak, mean, retrieval),
prints the share of the evidence chunks that the oracle's top ``budget`` of chunks keeps, and the
evidence chunks' share of the row's candidate mass. A label that ranks the evidence higher is a
better proxy for what selection must keep. ``--mass retrieval`` needs ``flashmemory indexer heads``
run on the dump first.

Usage: python benchmarks/indexer_label_evidence.py --labels DIR [--budget 0.1]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from flashmemory.indexer import retrieval_heads
from flashmemory.indexer.train import MASSES, read_labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--labels", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=0.1)
    args = ap.parse_args()
    print("| split | mass | rows | evidence chunks in the oracle's top "
          f"{args.budget:.0%} | evidence share of the mass |\n|---|---|---:|---:|---:|")
    for split in ("train", "eval"):
        for mass in MASSES:
            kept = total = rows = 0
            share = 0.0
            for r in read_labels(args.labels, split, mass):
                ev = retrieval_heads.evidence(r)
                if not ev or sum(r["mass"]) <= 0:
                    continue
                m = torch.tensor(r["mass"])
                k = math.ceil(args.budget * len(r["chunk_texts"]))
                top = set(torch.argsort(m, descending=True)[:k].tolist())
                kept += len(top & set(ev))
                total += len(ev)
                share += float(m[ev].sum() / m.sum())
                rows += 1
            if rows:
                print(f"| {split} | {mass} | {rows} | {100 * kept / total:.1f}% | "
                      f"{100 * share / rows:.1f}% |")


if __name__ == "__main__":
    main()
