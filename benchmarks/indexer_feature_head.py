"""Does a chunk's position and its neighbours' scores add to a trained indexer's text score?

Issue 5 experiment. Scores every label row with one indexer, then fits the listwise head of
``flashmemory.indexer.head`` (the one ``flashmemory indexer fit-head`` saves for serving) on
features that a serving indexer has for free. The head is fitted on the training-split rows of
documents the encoder was not trained on (``--exclude``: the encoder's own label dump), and
measured on the evaluation split. Prints mass recall (and its share of the oracle's) at 5/10/20%
for the encoder alone, recency, a linear and a small MLP head on all the features, and linear
heads on a few features only (the text score and the position: fewer weights to fit on few rows).

Usage (CPU is fine):
  python benchmarks/indexer_feature_head.py --labels LABELS --indexer CKPT [--exclude LABELS0]
      [--device cuda]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flashmemory.indexer.evaluate import against_oracle, neural_scorer
from flashmemory.indexer.head import FEATURES, fit_head, row_features
from flashmemory.indexer.train import MASSES, read_labels

BUDGETS = (0.05, 0.1, 0.2)
# linear heads on these features alone (the others are zeroed, which the head's standardisation
# turns into a constant 0 input)
SUBSETS = (("score_z", "position"), ("score_z", "position", "dist_last_log"),
           ("score_z", "position", "position_sq", "dist_last_rel", "dist_last_log"))


def only(feats: list[torch.Tensor], names: tuple[str, ...]) -> list[torch.Tensor]:
    keep = torch.tensor([f in names for f in FEATURES], dtype=torch.float32)
    return [f * keep for f in feats]


def line(name: str, rows: list[dict], scores: list[torch.Tensor]) -> str:
    cells = ("{:.1f} ({:.0f}%)".format(*against_oracle(rows, scores, b)) for b in BUDGETS)
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=Path, required=True)
    ap.add_argument("--indexer", required=True)
    ap.add_argument("--exclude", type=Path, help="label dump the indexer was trained on")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mass", choices=MASSES, default="peak",
                    help="the label mass to fit and measure (indexer.train.read_labels)")
    args = ap.parse_args()
    seen = {r["doc_id"] for r in read_labels(args.exclude)} if args.exclude else set()
    usable = [r for r in read_labels(args.labels, mass=args.mass)
              if r["candidates"] and sum(r["mass"]) > 0]
    train = [r for r in usable if r["split"] == "train" and r["doc_id"] not in seen]
    test = [r for r in usable if r["split"] == "eval"]
    score = neural_scorer(args.indexer, args.device)
    s_train, s_test = [score(r) for r in train], [score(r) for r in test]
    f_train = [row_features(r, s) for r, s in zip(train, s_train, strict=True)]
    f_test = [row_features(r, s) for r, s in zip(test, s_test, strict=True)]
    masses = [torch.tensor(r["mass"], dtype=torch.float32) for r in train]
    print(f"indexer {args.indexer}, {args.mass} mass: head fitted on {len(train)} training rows, "
          f"measured on {len(test)} evaluation rows")
    print("| selector | 5%: mass recall (vs oracle) | 10% | 20% |\n|---|---:|---:|---:|")
    print(line("indexer score alone", test, s_test))
    print(line("recency", test, [torch.tensor(r["candidates"], dtype=torch.float32)
                                 for r in test]))
    for name, hidden in (("linear head on the features", 0), ("MLP head (32)", 32)):
        head, _ = fit_head(f_train, masses, hidden)
        with torch.no_grad():
            print(line(name, test, [head(f) for f in f_test]))
    for names in SUBSETS:
        head, _ = fit_head(only(f_train, names), masses, 0)
        with torch.no_grad():
            print(line("linear head on " + " + ".join(names), test,
                       [head(f) for f in only(f_test, names)]))


if __name__ == "__main__":
    main()
