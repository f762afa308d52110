"""Selection quality of indexers against dumped lookahead labels (``flashmemory indexer evaluate``).

For every label row (one decode window of one document) each selector scores the candidate
chunks from the lookahead query; at a budget b it keeps the top ceil(b x chunks) candidates (the
sink and recency tail are resident on top, as in decode). Measures, averaged over rows:
  mass recall   share of the window's attention mass (over candidates) inside the kept set
  recall        share of the positive chunks (the top-p label) inside the kept set
  precision     share of the kept chunks that are positives
Selectors: ``oracle`` (the mass itself: the ceiling), ``recency`` (latest candidates first),
``random`` (seeded), ``quest`` (the backbone's own query against per-chunk key bounds, recorded
by the dump: the baseline that needs the backbone), and any sentence-transformers indexer
(``minilm`` zero-shot, or a trained checkpoint directory), scored as ``NeuralIndexer`` scores
them in serving.
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
    kept: float  # kept candidates over all prompt chunks


@dataclass(frozen=True)
class Adaptive:
    """Threshold selection: keep candidates scoring >= threshold, between floor and ceiling
    (fractions of the prompt chunks), as ``LSAConfig(threshold=..., min_budget=..., budget=...)``
    does in decode."""

    threshold: float
    floor: float = 0.02
    ceiling: float = 0.2


def _measure(row: dict[str, Any], kept: torch.Tensor, mass: torch.Tensor) -> RowScore:
    pos = set(row["positives"])
    hits = sum(1 for i in kept.tolist() if row["candidates"][i] in pos)
    k = len(kept)
    return RowScore(float(mass[kept].sum() / mass.sum()), hits / max(1, len(pos)),
                    hits / max(1, k), k / len(row["chunk_texts"]))


def score_row(row: dict[str, Any], scores: torch.Tensor,
              budget: float | Adaptive) -> RowScore | None:
    """Measures of keeping the top ceil(budget x chunks) candidates by ``scores`` (or, adaptive,
    those above the threshold within the floor and the ceiling)."""
    cands, mass = row["candidates"], torch.tensor(row["mass"], dtype=torch.float64)
    if not cands or float(mass.sum()) <= 0:
        return None
    n = len(row["chunk_texts"])
    order = torch.argsort(scores, descending=True, stable=True)
    if isinstance(budget, Adaptive):
        lo = math.ceil(budget.floor * n - 1e-9)
        hi = math.ceil(budget.ceiling * n - 1e-9)
        above = int((scores >= budget.threshold).sum())
        k = min(len(cands), max(lo, min(hi, above)))
    else:
        k = min(len(cands), math.ceil(budget * n - 1e-9))
    return _measure(row, order[:k], mass)


def against_oracle(rows: list[dict[str, Any]], scores: list[torch.Tensor],
                   budget: float) -> tuple[float, float]:
    """(mean mass recall %, its share of the oracle's %) of ``scores`` (one per row) at
    ``budget``; rows without candidates or mass must be left out beforehand."""
    got = sum(score_row(r, s, budget).mass_recall for r, s in zip(rows, scores, strict=True))
    best = sum(score_row(r, oracle_scorer(r), budget).mass_recall for r in rows)
    return 100 * got / len(rows), 100 * got / best


def oracle_scorer(row: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(row["mass"])


def quest_scorer(row: dict[str, Any]) -> torch.Tensor:
    """Quest-style baseline, recorded at dump time (it needs the backbone's query and keys)."""
    if row.get("quest") is None:
        raise ValueError(f"row {row['doc_id']}/{row['window']} has no Quest scores: re-dump")
    return torch.tensor(row["quest"])


def recency_scorer(row: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(row["candidates"], dtype=torch.float32)


def random_scorer(seed: int = 0) -> Scorer:
    def score(row: dict[str, Any]) -> torch.Tensor:
        key = f"{seed}/{row['doc_id']}/{row['window']}".encode()
        g = torch.Generator().manual_seed(zlib.crc32(key))
        return torch.rand(len(row["candidates"]), generator=g)

    return score


def neural_scorer(name: str, device: str = "cpu") -> Scorer:
    """Scores of a sentence-transformers indexer, computed as in serving (windows, overlap, the
    checkpoint's head if it has one)."""
    from flashmemory.indexer.neural import NeuralIndexer

    return indexer_scorer(NeuralIndexer(name, device=device))


def indexer_scorer(idx: Any, head: bool = True) -> Scorer:
    """Scores of a loaded ``NeuralIndexer``; ``head=False``: its text scores alone."""

    def score(row: dict[str, Any]) -> torch.Tensor:
        key = f"{row['doc_id']}/{row['window']}"
        idx.add_request(key, row["chunk_texts"])
        try:
            return idx.candidate_scores(key, row["query"], row["candidates"],
                                        len(row["chunk_texts"]), head)
        finally:
            idx.forget(key)

    return score


def evaluate(rows: list[dict[str, Any]], scorers: dict[str, Scorer],
             budgets: tuple[float, ...] = (0.05, 0.1, 0.2),
             adaptive: dict[str, Adaptive] | None = None) -> list[dict[str, Any]]:
    """One result row per (selector, budget, family), plus family 'all'; ``adaptive`` adds a
    threshold row for the named selectors."""
    out = []
    for name, scorer in scorers.items():
        modes: list[float | Adaptive] = list(budgets)
        if adaptive and name in adaptive:
            modes.append(adaptive[name])
        acc: dict[tuple[int, str], list[RowScore]] = defaultdict(list)
        for row in rows:
            if not row["candidates"]:
                continue
            scores = scorer(row)
            for m, mode in enumerate(modes):
                s = score_row(row, scores, mode)
                if s is not None:
                    acc[(m, row["family"])].append(s)
                    acc[(m, "all")].append(s)
        for (m, fam), vals in sorted(acc.items()):
            mode = modes[m]
            label = mode if isinstance(mode, float) else (
                f"adaptive (>= {mode.threshold:.3f}, {mode.floor:g}-{mode.ceiling:g})")
            out.append(dict(selector=name, budget=label, family=fam, rows=len(vals),
                            kept_pct=100 * _mean(v.kept for v in vals),
                            mass_recall=100 * _mean(v.mass_recall for v in vals),
                            recall=100 * _mean(v.recall for v in vals),
                            precision=100 * _mean(v.precision for v in vals)))
    return out


def _mean(xs: Any) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def baseline_scorers(seed: int = 0, quest: bool = True) -> dict[str, Scorer]:
    out = {"oracle": oracle_scorer, "recency": recency_scorer, "random": random_scorer(seed)}
    return {**out, "quest": quest_scorer} if quest else out

