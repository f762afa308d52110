"""Selection quality of indexers against dumped lookahead labels (``flashmemory indexer evaluate``).

For every label row (one decode window of one document) each selector scores the candidate
chunks from the lookahead query; at a budget b it keeps the top ceil(b x chunks) candidates (the
sink and recency tail are resident on top, as in decode). Measures, averaged over rows:
  mass recall   share of the window's attention mass (over candidates) inside the kept set
  recall        share of the positive chunks (the top-p label) inside the kept set
  precision     share of the kept chunks that are positives
Selectors: ``oracle`` (the mass itself: the ceiling), ``recency`` (latest candidates first),
``random`` (seeded), and any sentence-transformers indexer (``minilm`` zero-shot, or a trained
checkpoint directory), scored exactly as ``NeuralIndexer`` scores them in serving.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Scorer = Callable[[dict[str, Any]], torch.Tensor]  # row -> (len(candidates),) scores


@dataclass(frozen=True)
class RowScore:
    mass_recall: float
    recall: float
    precision: float


def score_row(row: dict[str, Any], scores: torch.Tensor, budget: float) -> RowScore | None:
    """Measures of keeping the top ceil(budget x chunks) candidates by ``scores``."""
    cands, mass = row["candidates"], torch.tensor(row["mass"], dtype=torch.float64)
    if not cands or float(mass.sum()) <= 0:
        return None
    k = min(len(cands), math.ceil(budget * len(row["chunk_texts"]) - 1e-9))
    kept = torch.argsort(scores, descending=True, stable=True)[:k]
    pos = set(row["positives"])
    hits = sum(1 for i in kept.tolist() if cands[i] in pos)
    return RowScore(float(mass[kept].sum() / mass.sum()), hits / max(1, len(pos)),
                    hits / max(1, k))


def oracle_scorer(row: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(row["mass"])


def recency_scorer(row: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(row["candidates"], dtype=torch.float32)


def random_scorer(seed: int = 0) -> Scorer:
    def score(row: dict[str, Any]) -> torch.Tensor:
        key = f"{seed}/{row['doc_id']}/{row['window']}".encode()
        g = torch.Generator().manual_seed(zlib.crc32(key))
        return torch.rand(len(row["candidates"]), generator=g)

    return score


def neural_scorer(name: str, device: str = "cpu") -> Scorer:
    """Scores of a sentence-transformers indexer, computed as in serving (windows, overlap)."""
    from flashmemory.indexer.neural import NeuralIndexer

    idx = NeuralIndexer(name, device=device)

    def score(row: dict[str, Any]) -> torch.Tensor:
        key = f"{row['doc_id']}/{row['window']}"
        idx.add_request(key, row["chunk_texts"])
        try:
            return idx.chunk_scores(key, row["query"])[torch.tensor(row["candidates"])]
        finally:
            idx.forget(key)

    return score


def evaluate(rows: list[dict[str, Any]], scorers: dict[str, Scorer],
             budgets: tuple[float, ...] = (0.05, 0.1, 0.2)) -> list[dict[str, Any]]:
    """One result row per (selector, budget, family), plus family 'all'."""
    out = []
    for name, scorer in scorers.items():
        acc: dict[tuple[float, str], list[RowScore]] = defaultdict(list)
        for row in rows:
            if not row["candidates"]:
                continue
            scores = scorer(row)
            for b in budgets:
                s = score_row(row, scores, b)
                if s is not None:
                    acc[(b, row["family"])].append(s)
                    acc[(b, "all")].append(s)
        for (b, fam), vals in sorted(acc.items()):
            out.append(dict(selector=name, budget=b, family=fam, rows=len(vals),
                            mass_recall=100 * sum(v.mass_recall for v in vals) / len(vals),
                            recall=100 * sum(v.recall for v in vals) / len(vals),
                            precision=100 * sum(v.precision for v in vals) / len(vals)))
    return out


def baseline_scorers(seed: int = 0) -> dict[str, Scorer]:
    return {"oracle": oracle_scorer, "recency": recency_scorer, "random": random_scorer(seed)}

