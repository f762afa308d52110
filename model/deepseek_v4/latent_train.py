"""Train and evaluate the DeepSeek-V4 latent indexer's query tower from a ``latent_dump`` alone
(the backbone is never loaded): ``train_latent``, ``dump_loss``, ``evaluate_latent``.

Called by tests (later by the ``flashmemory indexer`` CLI). Each epoch, every window with a
non-empty label contributes its label pages as positives and ``negatives`` (3) random non-label
pages of the same window per positive; windows are shuffled into batches; loss BCE or focal on
the page logits; Adam. The keys are the dump's frozen native index keys; only the tower learns.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from flashmemory.model.deepseek_v4.latent_dump import LatentDump, Window, read_dump
from flashmemory.model.deepseek_v4.latent_indexer import (
    LatentConfig,
    LatentSelectConfig,
    LatentTower,
    choose_pages,
    save_latent,
)

logger = logging.getLogger(__name__)
LOSSES = ("bce", "focal")


@dataclass(frozen=True)
class LatentTrainConfig:
    epochs: int = 5
    batch_windows: int = 8  # windows per optimizer step
    learning_rate: float = 3e-3
    loss: Literal["bce", "focal"] = "bce"
    focal_gamma: float = 2.0
    negatives: int = 3  # random non-label pages per positive, from the same window
    inner: int = 256  # tower width (LatentConfig.inner)
    pooling: Literal["max", "logsumexp"] = "max"
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.epochs, self.batch_windows, self.negatives, self.inner) < 1:
            raise ValueError("epochs, batch_windows, negatives and inner must be >= 1")
        if self.learning_rate <= 0 or self.focal_gamma < 0:
            raise ValueError("learning_rate must be > 0 and focal_gamma >= 0")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")


def page_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str,
              gamma: float = 2.0) -> torch.Tensor:
    """Mean BCE, or focal loss (BCE weighted by (1 - p_t)^gamma), of logits vs targets (N,)."""
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if kind == "focal":
        p = torch.sigmoid(logits)
        p_t = p * targets + (1 - p) * (1 - targets)
        ce = (1 - p_t).pow(gamma) * ce
    return ce.mean()


def _samples(w: Window, negatives: int, rng: random.Random) -> tuple[list[int], list[float]]:
    """A window's training pages and targets: its label, then 3:1 random non-label pages."""
    label = set(w.label)
    others = [p for p in w.pages if p not in label]
    negs = rng.sample(others, min(len(others), negatives * len(label)))
    return [*sorted(label), *negs], [1.0] * len(label) + [0.0] * len(negs)


def _batch_logits(tower: LatentTower, dump: LatentDump, batch: list[Window],
                  pages: list[list[int]]) -> torch.Tensor:
    """Logits (N,) of the given pages of each window in ``batch``, concatenated."""
    q = tower.queries(torch.stack([w.hidden for w in batch]))  # (B, L, Di)
    which = torch.cat([torch.full((len(p),), b) for b, p in enumerate(pages)])  # (N,)
    keys = torch.cat([dump.keys[w.request][torch.tensor(p, dtype=torch.long)]
                      for w, p in zip(batch, pages, strict=True)])  # (N, L, E, Di)
    return tower.page_logits(q[which], keys)


def _epoch(tower: LatentTower, dump: LatentDump, opt: torch.optim.Optimizer,
           cfg: LatentTrainConfig, rng: random.Random) -> float:
    """One pass over the labelled windows; the mean loss of its steps."""
    windows = [w for w in dump.windows if w.label]
    rng.shuffle(windows)
    losses = []
    for i in range(0, len(windows), cfg.batch_windows):
        batch = windows[i:i + cfg.batch_windows]
        drawn = [_samples(w, cfg.negatives, rng) for w in batch]
        logits = _batch_logits(tower, dump, batch, [p for p, _ in drawn])
        targets = torch.tensor([t for _, ts in drawn for t in ts])
        loss = page_loss(logits, targets, cfg.loss, cfg.focal_gamma)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return sum(losses) / len(losses)


def new_tower(dump: LatentDump, cfg: LatentTrainConfig) -> LatentTower:
    """An untrained tower shaped for ``dump`` (seeded by ``cfg.seed``)."""
    m = dump.meta
    torch.manual_seed(cfg.seed)
    return LatentTower(LatentConfig(m.layers, m.hidden_size, m.index_dim, cfg.inner, cfg.pooling))


def train_latent(parquet_dir: Path, out_dir: Path,
                 cfg: LatentTrainConfig | None = None) -> tuple[LatentTower, dict]:
    """Train a tower on the dump at ``parquet_dir``; save it to ``out_dir``; return (tower,
    meta). ValueError if no window has a label."""
    cfg = cfg or LatentTrainConfig()
    dump = read_dump(parquet_dir)
    labelled = [w for w in dump.windows if w.label]
    if not labelled:
        raise ValueError(f"{parquet_dir} has no window with a non-empty label")
    tower = new_tower(dump, cfg).train()
    opt = torch.optim.Adam(tower.parameters(), lr=cfg.learning_rate)
    rng = random.Random(cfg.seed)
    curve = []
    for epoch in range(cfg.epochs):
        curve.append(_epoch(tower, dump, opt, cfg, rng))
        logger.info("latent indexer epoch %d: loss %.4f", epoch, curve[-1])
    tower.eval()
    meta = save_latent(tower, out_dir, {
        "train": asdict(cfg), "data": str(parquet_dir), "dump": asdict(dump.meta),
        "windows": len(dump.windows), "labelled_windows": len(labelled),
        "requests": len(dump.keys), "loss_curve": curve})
    return tower, meta


@torch.no_grad()
def window_logits(tower: LatentTower, dump: LatentDump, w: Window) -> torch.Tensor:
    """Logits (len(w.pages),) of every page of one window."""
    keys = dump.keys[w.request][torch.tensor(w.pages, dtype=torch.long)]
    return tower(w.hidden, keys)


@torch.no_grad()
def dump_loss(tower: LatentTower, dump: LatentDump, kind: str = "bce") -> float:
    """Mean loss over every (window, page) of the dump, labelled windows only (no sampling)."""
    logits, targets = [], []
    for w in dump.windows:
        if w.label:
            logits.append(window_logits(tower, dump, w))
            label = set(w.label)
            targets.append(torch.tensor([float(p in label) for p in w.pages]))
    return float(page_loss(torch.cat(logits), torch.cat(targets), kind))


@dataclass(frozen=True)
class LatentEval:
    recall: float  # |chosen & label| / |label|, summed over labelled windows
    resident_fraction: float  # mean over windows of chosen pages / the window's pages
    windows: int


def evaluate_latent(tower: LatentTower, dump: LatentDump | Path, select: LatentSelectConfig,
                    budget: float = 1.0) -> LatentEval:
    """The selector's rule on every window of ``dump`` (or the dump at that path): KMAX =
    ceil(budget * pages) (the decoder's budget; ``select.kmax`` caps further). Only the
    selector's own picks count: the sink and recency pages a decoder adds are not included."""
    if not isinstance(dump, LatentDump):
        dump = read_dump(dump)
    hits = total = 0
    fractions = []
    for w in dump.windows:
        keep = choose_pages(window_logits(tower, dump, w),
                            math.ceil(budget * len(w.pages) - 1e-9), select)
        chosen = {p for p, k in zip(w.pages, keep.tolist(), strict=True) if k}
        hits += len(chosen & set(w.label))
        total += len(w.label)
        fractions.append(len(chosen) / max(1, len(w.pages)))
    return LatentEval(hits / max(1, total), sum(fractions) / max(1, len(fractions)),
                      len(dump.windows))
