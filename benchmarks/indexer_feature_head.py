"""Does a chunk's position and its neighbours' scores add to a trained indexer's text score?

Issue 5 experiment. Scores every label row with one indexer, then fits a listwise head (softmax
over a row's candidates, fitted to its attention-mass shares) on features that a serving
indexer has for free: the chunk's own score (raw and standardised within the row), its
neighbours' standardised scores, its relative position and distance from the last candidate,
and whether it is the first or last candidate. The head is fitted on the training-split rows of
documents the encoder was not trained on (``--exclude``: the encoder's own label dump), and
measured on the evaluation split. Prints mass recall (and its share of the oracle's) at 5/10/20%
for the encoder alone, recency, and a linear and a small MLP head.

Usage (CPU is fine):
  python benchmarks/indexer_feature_head.py --labels LABELS --indexer CKPT [--exclude LABELS0]
      [--device cuda]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flashmemory.indexer.evaluate import against_oracle, neural_scorer
from flashmemory.indexer.train import read_labels

BUDGETS = (0.05, 0.1, 0.2)


def features(row: dict, scores: torch.Tensor) -> torch.Tensor:
    """(candidates, 11) features of each candidate; ``scores`` is over the candidates."""
    c = torch.tensor(row["candidates"])
    n = len(row["chunk_texts"])
    full = torch.full((n + 2,), -3.0)  # standardised scores of every chunk, padded both ends
    z = (scores - scores.mean()) / (scores.std() + 1e-6) if len(scores) > 1 else scores * 0
    full[c + 1] = z
    prev, nxt = full[c], full[c + 2]
    pos = c.float() / n
    first, last = c.min(), c.max()
    return torch.stack([z, prev, nxt, torch.maximum(prev, nxt), pos, pos ** 2,
                        (last - c).float() / n, 1 / (1 + (c - first).float()),
                        (c == first).float(), (c == last).float(), scores], 1)


def fit(feats: list[torch.Tensor], masses: list[torch.Tensor], hidden: int,
        steps: int = 400) -> torch.nn.Module:
    torch.manual_seed(0)
    allf = torch.cat(feats)
    mu, sd = allf.mean(0), allf.std(0) + 1e-6
    d = allf.shape[1]
    body = (torch.nn.Linear(d, 1) if hidden == 0 else
            torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(),
                                torch.nn.Linear(hidden, 1)))
    opt = torch.optim.Adam(body.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = sum(-(m / m.sum() * torch.log_softmax(body((f - mu) / sd)[:, 0], 0)).sum()
                   for f, m in zip(feats, masses, strict=True)) / len(feats)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.nn.Sequential(_Standardise(mu, sd), body).eval()


class _Standardise(torch.nn.Module):
    def __init__(self, mu: torch.Tensor, sd: torch.Tensor) -> None:
        super().__init__()
        self.mu, self.sd = mu, sd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mu) / self.sd


def line(name: str, rows: list[dict], scores: list[torch.Tensor]) -> str:
    cells = ("{:.1f} ({:.0f}%)".format(*against_oracle(rows, scores, b)) for b in BUDGETS)
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=Path, required=True)
    ap.add_argument("--indexer", required=True)
    ap.add_argument("--exclude", type=Path, help="label dump the indexer was trained on")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    seen = {r["doc_id"] for r in read_labels(args.exclude)} if args.exclude else set()
    usable = [r for r in read_labels(args.labels) if r["candidates"] and sum(r["mass"]) > 0]
    train = [r for r in usable if r["split"] == "train" and r["doc_id"] not in seen]
    test = [r for r in usable if r["split"] == "eval"]
    score = neural_scorer(args.indexer, args.device)
    s_train, s_test = [score(r) for r in train], [score(r) for r in test]
    f_train = [features(r, s) for r, s in zip(train, s_train, strict=True)]
    f_test = [features(r, s) for r, s in zip(test, s_test, strict=True)]
    masses = [torch.tensor(r["mass"], dtype=torch.float32) for r in train]
    print(f"indexer {args.indexer}: head fitted on {len(train)} training rows, "
          f"measured on {len(test)} evaluation rows")
    print("| selector | 5%: mass recall (vs oracle) | 10% | 20% |\n|---|---:|---:|---:|")
    print(line("indexer score alone", test, s_test))
    print(line("recency", test, [torch.tensor(r["candidates"], dtype=torch.float32)
                                 for r in test]))
    for name, hidden in (("linear head on the features", 0), ("MLP head (32)", 32)):
        head = fit(f_train, masses, hidden)
        with torch.no_grad():
            print(line(name, test, [head(f)[:, 0] for f in f_test]))


if __name__ == "__main__":
    main()
