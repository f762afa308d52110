"""Position-aware scoring head over the text indexer (``flashmemory indexer fit-head``).

The dual encoder scores a chunk by its text alone. Where the backbone's next-64-step attention
also follows position (on long prompts it leans towards the end, beyond the recency tail), a
small listwise head over features that serving has for free recovers part of that:

  the chunk's text score (raw, and standardised over the request's candidates), its
  neighbours' standardised scores, its relative position, its distance from the last candidate
  (relative and in chunks, log-scaled) and from the first, and first / last flags.

The head is fitted from a label dump alone (the backbone is never loaded): for every row, a
softmax over its candidates' head scores is fitted to the row's attention-mass shares. It is
saved as ``score_head.pt`` inside an indexer checkpoint directory; ``NeuralIndexer`` applies it
whenever the file is there, so serving, ``flashmemory eval`` and ``flashmemory indexer evaluate``
all score through it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

HEAD_FILE = "score_head.pt"
HEAD_VERSION = 1
FEATURES = ("score_z", "prev_z", "next_z", "max_neighbour_z", "position", "position_sq",
            "dist_last_rel", "dist_last_log", "near_first", "is_first", "is_last", "score")


def zscore(s: torch.Tensor) -> torch.Tensor:
    """Scores standardised over one request's candidates (zeros for fewer than two)."""
    return (s - s.mean()) / (s.std() + 1e-6) if len(s) > 1 else torch.zeros_like(s)


def features(candidates: torch.Tensor, num_chunks: int, scores: torch.Tensor) -> torch.Tensor:
    """(len(candidates), len(FEATURES)) features; ``candidates`` are prompt chunk ids in
    ascending order, ``scores`` the text scores over them, ``num_chunks`` the prompt's chunks."""
    c = candidates.long()
    s = scores.float()
    z = zscore(s)
    full = torch.full((num_chunks + 2,), -3.0)  # standardised score of every chunk, padded
    full[c + 1] = z
    prev, nxt = full[c], full[c + 2]
    pos = c.float() / num_chunks
    first, last = c.min(), c.max()
    dist_last = (last - c).float()
    return torch.stack([z, prev, nxt, torch.maximum(prev, nxt), pos, pos ** 2,
                        dist_last / num_chunks, torch.log1p(dist_last),
                        1 / (1 + (c - first).float()), (c == first).float(), (c == last).float(),
                        s], 1)


def row_features(row: dict[str, Any], scores: torch.Tensor) -> torch.Tensor:
    """``features`` of a label row's candidates from their text scores."""
    return features(torch.tensor(row["candidates"]), len(row["chunk_texts"]), scores)


class ScoreHead(torch.nn.Module):
    """Standardise the features, then a linear layer (``hidden == 0``) or a one-hidden-layer
    MLP; one score per candidate."""

    def __init__(self, hidden: int = 0) -> None:
        super().__init__()
        d = len(FEATURES)
        self.hidden = hidden
        self.register_buffer("mu", torch.zeros(d))
        self.register_buffer("sd", torch.ones(d))
        self.body = (torch.nn.Linear(d, 1) if hidden == 0 else
                     torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(),
                                         torch.nn.Linear(hidden, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mu) / self.sd)[:, 0]

    @torch.no_grad()
    def score(self, candidates: torch.Tensor, num_chunks: int,
              scores: torch.Tensor) -> torch.Tensor:
        """Head scores of a request's candidates from their text scores."""
        if len(candidates) == 0:
            return scores
        return self(features(candidates, num_chunks, scores.cpu()))

    def save(self, directory: Path, info: dict[str, Any]) -> Path:
        path = directory / HEAD_FILE
        torch.save({"version": HEAD_VERSION, "features": list(FEATURES), "hidden": self.hidden,
                    "state": self.state_dict(), "info": info}, path)
        return path


def load_head(directory: Path) -> ScoreHead | None:
    """The head saved in an indexer directory, or None when it has none."""
    path = directory / HEAD_FILE
    if not path.exists():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("version", 0) > HEAD_VERSION or blob.get("features") != list(FEATURES):
        raise ValueError(f"{path}: a score head of another version or feature set "
                         f"(this build reads v{HEAD_VERSION} with features {FEATURES})")
    head = ScoreHead(int(blob["hidden"]))
    head.load_state_dict(blob["state"])
    return head.eval()


def fit_head(feats: list[torch.Tensor], masses: list[torch.Tensor], hidden: int = 0,
             steps: int = 400, lr: float = 1e-2, seed: int = 0) -> tuple[ScoreHead, list[float]]:
    """Fit a head (full-batch Adam, listwise cross-entropy against each row's mass shares);
    returns it and the loss every 50 steps."""
    if not feats:
        raise ValueError("no rows to fit the head on")
    torch.manual_seed(seed)
    head = ScoreHead(hidden)
    allf = torch.cat(feats)
    head.mu.copy_(allf.mean(0))
    head.sd.copy_(allf.std(0) + 1e-6)
    shares = [m / m.sum() for m in masses]
    opt = torch.optim.Adam(head.body.parameters(), lr=lr, weight_decay=1e-4)
    curve = []
    for step in range(steps):
        loss = sum(-(p * torch.log_softmax(head(f), 0)).sum()
                   for f, p in zip(feats, shares, strict=True)) / len(feats)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            curve.append(round(loss.item(), 5))
    return head.eval(), curve


def fit_from_labels(labels: Path, indexer: str, out_dir: Path, hidden: int = 0,
                    steps: int = 400, exclude: Path | None = None, target_recall: float = 0.9,
                    device: str = "cpu", seed: int = 0, mass: str = "peak") -> dict[str, Any]:
    """Fit a head over ``indexer``'s text scores on the training split of a label dump (less
    the documents of ``exclude``, the encoder's own training dump), calibrate its threshold on
    a held-out tenth, and write ``out_dir``: a copy of the encoder, the head and metadata.
    ``mass``: the labels' aggregation to fit (``train.read_labels``). Returns the metadata."""
    import datetime as dt
    import json
    import shutil

    from flashmemory.indexer.evaluate import indexer_scorer
    from flashmemory.indexer.neural import NeuralIndexer, resolve_indexer
    from flashmemory.indexer.train import (
        FORMAT,
        FORMAT_VERSION,
        META_FILE,
        read_labels,
        read_meta,
        threshold_at_recall,
    )

    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty")
    seen = {r["doc_id"] for r in read_labels(exclude)} if exclude else set()
    rows = [r for r in read_labels(labels, "train", mass)
            if r["candidates"] and sum(r["mass"]) > 0 and r["doc_id"] not in seen]
    if len(rows) < 2:
        raise ValueError(f"{labels}: {len(rows)} usable training rows (need >= 2)")
    random.Random(seed).shuffle(rows)
    held = rows[: max(1, len(rows) // 10)]
    fit_rows = rows[len(held):]
    idx = NeuralIndexer(indexer, device=device)
    if idx.prior is not None:
        raise ValueError(f"{indexer} was trained with a position prior; a score head would "
                         "replace it (fit the head on an encoder trained without one)")
    text_scores = indexer_scorer(idx, head=False)  # a base checkpoint's own head not applied

    def feats(r: dict[str, Any]) -> torch.Tensor:
        return row_features(r, text_scores(r))

    head, curve = fit_head([feats(r) for r in fit_rows],
                           [torch.tensor(r["mass"], dtype=torch.float32) for r in fit_rows],
                           hidden, steps, seed=seed)
    pos_s, neg_s = [], []
    with torch.no_grad():
        for r in held:
            pos = set(r["positives"])
            for c, s in zip(r["candidates"], head(feats(r)).tolist(), strict=True):
                (pos_s if c in pos else neg_s).append(s)
    threshold, neg_kept = threshold_at_recall(pos_s, neg_s, target_recall)
    base = resolve_indexer(indexer)
    shutil.copytree(base, out_dir, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("trainer", HEAD_FILE, META_FILE))
    meta = read_meta(base) or {"format": FORMAT, "version": FORMAT_VERSION, "base": indexer,
                               "config": {"overlap_chars": idx.overlap_chars}}
    meta.update(created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                threshold=threshold, threshold_recall=target_recall,
                threshold_negatives_kept=neg_kept)
    meta["head"] = {"encoder": indexer, "labels": str(labels), "mass": mass, "hidden": hidden,
                    "steps": steps, "fit_rows": len(fit_rows), "calibration_rows": len(held),
                    "families": sorted({r["family"] for r in fit_rows}), "loss_curve": curve}
    head.save(out_dir, meta["head"])
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta
