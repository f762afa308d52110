"""Train the Neural Memory Indexer from dumped lookahead labels alone (no backbone is loaded).

``flashmemory indexer train`` reads the label dump (``indexer.labels``) and fine-tunes the text
dual encoder with sentence-transformers' trainer, with one of two losses:

- ``mnrl`` (default): each training row becomes (lookahead query, positive chunk, hard negative
  chunk from the same document) triples under the multiple-negatives ranking loss (in-batch
  negatives plus the hard negative);
- ``kl``: listwise distillation of the window's attention mass. Each row's candidates are cut
  into groups of ``group`` chunks; the student's softmax over the group's cosine scores (at
  ``temperature``) is fitted to the mass share of each chunk in the group by KL divergence, so
  the ranking that mass recall measures is what is learned, not only the top few chunks.
  With ``position_prior`` a prior over each chunk's distance to the end of the prompt
  (``indexer.prior``), fitted on the same rows, is added to the student's logits, so the
  encoder learns the part of the mass that the distance does not explain; the prior is saved
  with the checkpoint and serving adds it the same way.

A held-out tenth of the rows calibrates a score threshold (the lowest positive score that keeps
``target_recall`` of the positives) so that selection can follow scores, as in the paper. The
checkpoint is a sentence-transformers directory plus ``flashmemory_indexer.json`` (format
version, base model, data, threshold).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from flashmemory.indexer.prior import PRIOR_FILE, PositionPrior

logger = logging.getLogger(__name__)

FORMAT = "flashmemory-indexer"
FORMAT_VERSION = 1
META_FILE = "flashmemory_indexer.json"
# label mass aggregations over layers and heads (indexer.labels; indexer.retrieval_heads)
MASSES = ("peak", "mean", "retrieval")


@dataclass(frozen=True)
class TrainConfig:
    base: str = "minilm"  # alias or sentence-transformers directory to start from
    epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float = 3e-5
    warmup_ratio: float = 0.1
    hard_negatives: int = 1  # per positive, from the same document's low-mass candidates
    max_rows: int | None = None
    target_recall: float = 0.9  # calibration: share of held-out positives above the threshold
    overlap_chars: int = 120  # as NeuralIndexer: each chunk is read with its predecessor's tail
    logging_steps: int = 10
    # re-derive each row's positives from its mass (top_p, at most max_positives) instead of the
    # dump's labels: sharper positives without re-running the backbone
    top_p: float | None = None
    max_positives: int | None = None
    seed: int = 0
    loss: str = "mnrl"  # or "kl": listwise mass distillation
    group: int = 8  # kl: candidates per example
    groupings: int = 1  # kl: independent shuffles of each row into groups (more pairs compared)
    temperature: float = 0.05  # kl: the student's softmax temperature over cosine scores
    mass: str = "peak"  # the labels' mass aggregation to learn (one of MASSES; read_labels)
    position_prior: bool = False  # kl: train and serve as cosine / temperature + log prior

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_size < 2 or self.learning_rate <= 0:
            raise ValueError("epochs > 0, batch_size >= 2 and learning_rate > 0 are required")
        if self.loss not in ("mnrl", "kl"):
            raise ValueError(f"loss must be 'mnrl' or 'kl', got {self.loss!r}")
        if self.group < 2 or self.temperature <= 0 or self.groupings < 1:
            raise ValueError("group >= 2, groupings >= 1 and temperature > 0 are required")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")
        if self.mass not in MASSES:
            raise ValueError(f"mass must be one of {MASSES}, got {self.mass!r}")
        if self.position_prior and self.loss != "kl":
            raise ValueError("position_prior needs loss 'kl' (it shifts the listwise logits)")


def read_labels(path: Path, split: str | None = None, mass: str = "peak",
                ) -> list[dict[str, Any]]:
    """Rows of a label dump (a directory of part files or one Parquet file). ``mass="mean"``:
    each row's ``mass`` and ``positives`` are its mean-over-heads ones (``mass_mean``,
    ``positives_mean``; ``indexer.labels``) instead of the peak-over-heads ones;
    ``mass="retrieval"``: the mean over the retrieval heads chosen for this dump
    (``indexer.retrieval_heads``, ``flashmemory indexer heads``)."""
    import pyarrow.parquet as pq

    if mass not in MASSES:
        raise ValueError(f"mass must be one of {MASSES}, got {mass!r}")
    if not path.exists():
        raise FileNotFoundError(f"no label dump at {path}")
    if path.is_dir():  # its Parquet files only (the dump keeps other files next to them)
        import pyarrow as pa

        parts = sorted(path.glob("*.parquet"))
        if not parts:
            raise FileNotFoundError(f"no Parquet files in {path}")
        table = pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default")
    else:
        table = pq.read_table(path)
    rows = [r for r in table.to_pylist() if split is None or r["split"] == split]
    if mass == "mean":
        if any(r.get("mass_mean") is None for r in rows):
            raise ValueError(f"{path} has rows without mass_mean (dumped before the mean was "
                             "recorded): dump it again to read it with mass='mean'")
        for r in rows:
            r["mass"], r["positives"] = r["mass_mean"], r["positives_mean"]
    elif mass == "retrieval":
        from flashmemory.indexer import retrieval_heads as heads

        heads.apply(rows, heads.load(path))
    return rows


def chunk_view(texts: list[str], i: int, overlap: int) -> str:
    """What the indexer embeds for chunk i: the previous chunk's tail, then the chunk."""
    return (texts[i - 1][-overlap:] if i and overlap else "") + texts[i]


def positives(row: dict[str, Any], cfg: TrainConfig) -> set[int]:
    """The row's positive chunks: the dump's label, or re-derived from its mass (cfg.top_p /
    cfg.max_positives)."""
    from flashmemory.indexer.labels import top_p_positives

    if cfg.top_p is None and cfg.max_positives is None:
        return set(row["positives"])
    idx = top_p_positives(torch.tensor(row["mass"]), cfg.top_p or 1.0,
                          cfg.max_positives or len(row["candidates"]))
    return {row["candidates"][i] for i in idx}


def triples(rows: list[dict[str, Any]], cfg: TrainConfig) -> list[tuple[str, str, str]]:
    """(query, positive, hard negative) for every positive of every row that has one."""
    rng = random.Random(cfg.seed)
    out = []
    for r in rows:
        pos = positives(r, cfg)
        if not pos:
            continue
        ranked = sorted(zip(r["candidates"], r["mass"], strict=True), key=lambda cm: cm[1])
        negs = [c for c, _ in ranked if c not in pos][: max(4, len(ranked) // 2)]  # low mass
        if not negs:
            continue
        for p in sorted(pos):
            for n in rng.sample(negs, min(cfg.hard_negatives, len(negs))):
                out.append((r["query"], chunk_view(r["chunk_texts"], p, cfg.overlap_chars),
                            chunk_view(r["chunk_texts"], n, cfg.overlap_chars)))
    rng.shuffle(out)
    return out


def mass_groups(rows: list[dict[str, Any]], cfg: TrainConfig,
                prior: PositionPrior | None = None) -> list[dict[str, Any]]:
    """kl examples: {query, chunk_0..chunk_{group-1}, label: their masses}. A row's candidates
    are shuffled and cut into groups (the last one topped up from the rest of the row),
    ``cfg.groupings`` times with independent shuffles; groups without mass are dropped. Rows
    with fewer candidates than a group are skipped, with a warning that counts them. With a
    ``prior`` the label also carries each chunk's log prior after the masses (2 x group
    values), which ``MassKLLoss`` adds to the student's logits."""
    rng = random.Random(cfg.seed)
    out = []
    wide = [r for r in rows if len(r["candidates"]) >= cfg.group]
    if len(wide) < len(rows):
        logger.warning("kl: %d of %d training rows have fewer than --group %d candidates and "
                       "are skipped (fewest candidates in a row: %d)", len(rows) - len(wide),
                       len(rows), cfg.group, min(len(r["candidates"]) for r in rows))
    for r in wide:
        for _ in range(cfg.groupings):
            out += _groups(r, cfg, rng, prior)
    rng.shuffle(out)
    return out


def _groups(r: dict[str, Any], cfg: TrainConfig, rng: random.Random,
            prior: PositionPrior | None) -> list[dict[str, Any]]:
    """One shuffle of row ``r``'s candidates cut into kl examples."""
    out = []
    offset = (dict(zip(r["candidates"], prior.log_prior(r["candidates"]).tolist(), strict=True))
              if prior is not None else None)
    pairs = list(zip(r["candidates"], r["mass"], strict=True))
    rng.shuffle(pairs)
    for i in range(0, len(pairs), cfg.group):
        grp = pairs[i:i + cfg.group]
        if len(grp) < cfg.group:
            grp += rng.sample(pairs[:i], cfg.group - len(grp))
        masses = [max(0.0, float(m)) for _, m in grp]
        if sum(masses) <= 0:
            continue
        ex = {"query": r["query"],
              "label": masses if offset is None else masses + [offset[c] for c, _ in grp]}
        for j, (c, _) in enumerate(grp):
            ex[f"chunk_{j}"] = chunk_view(r["chunk_texts"], c, cfg.overlap_chars)
        out.append(ex)
    return out


class MassKLLoss(torch.nn.Module):
    """KL(mass share || softmax(cosine / temperature)) over each example's group of chunks.

    Unlike sentence-transformers' DistillKLDivLoss this takes the teacher as a distribution
    (masses, normalized here) and does not rescale by the temperature squared, so a sharp
    student temperature keeps full-sized gradients. A label twice the group's width carries a
    fixed logit offset per chunk after the masses (the log position prior; ``mass_groups``)."""

    def __init__(self, model: Any, temperature: float = 0.05) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature

    def forward(self, sentence_features: list[dict[str, torch.Tensor]],
                labels: torch.Tensor) -> torch.Tensor:
        emb = [self.model(f)["sentence_embedding"] for f in sentence_features]
        q = torch.nn.functional.normalize(emb[0], dim=-1)
        docs = torch.nn.functional.normalize(torch.stack(emb[1:], dim=1), dim=-1)  # (B, K, E)
        scores = torch.einsum("bke,be->bk", docs, q) / self.temperature
        labels = labels.float()
        if labels.shape[-1] == 2 * scores.shape[-1]:
            labels, offset = labels.chunk(2, dim=-1)
            scores = scores + offset
        teacher = labels.clamp_min(0)
        teacher = teacher / teacher.sum(-1, keepdim=True)
        return torch.nn.functional.kl_div(torch.log_softmax(scores, -1), teacher,
                                          reduction="batchmean")


def calibrate(model: Any, rows: list[dict[str, Any]], cfg: TrainConfig,
              prior: PositionPrior | None = None) -> tuple[float, float]:
    """Threshold keeping ``target_recall`` of held-out positives, and the share of negatives
    it also keeps (the price of that recall); with a ``prior`` on the serving score
    ``cosine / temperature + log prior``."""
    pos_s, neg_s = [], []
    for r in rows:
        pos = positives(r, cfg)
        if not pos:
            continue
        views = [chunk_view(r["chunk_texts"], c, cfg.overlap_chars) for c in r["candidates"]]
        emb = model.encode([r["query"], *views], convert_to_tensor=True,
                           normalize_embeddings=True, show_progress_bar=False)
        sims = (emb[1:] @ emb[0]).float().cpu()
        if prior is not None:
            sims = prior.score(sims, r["candidates"], cfg.temperature)
        sims = sims.tolist()
        for c, s in zip(r["candidates"], sims, strict=True):
            (pos_s if c in pos else neg_s).append(s)
    return threshold_at_recall(pos_s, neg_s, cfg.target_recall)


def threshold_at_recall(pos_s: list[float], neg_s: list[float],
                        target_recall: float) -> tuple[float, float]:
    """The highest score threshold keeping ``target_recall`` of the positive scores, and the
    share of the negative scores it also keeps."""
    if not pos_s:
        return 0.0, 1.0
    pos_s = sorted(pos_s, reverse=True)
    t = pos_s[min(len(pos_s) - 1, int(target_recall * len(pos_s) + 0.999) - 1)]
    kept = sum(s >= t for s in neg_s) / max(1, len(neg_s))
    return float(t), float(kept)


def train(labels: Path, out_dir: Path, cfg: TrainConfig, device: str | None = None) -> dict:
    """Fine-tune, calibrate and save; returns the metadata written next to the weights."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    try:  # sentence-transformers >= 6 moved these; 5.x has only the old paths
        from sentence_transformers.sentence_transformer.losses import (
            MultipleNegativesRankingLoss,
        )
        from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss
        from sentence_transformers.training_args import BatchSamplers

    from flashmemory.indexer.neural import resolve_indexer

    rows = read_labels(labels, "train", cfg.mass)
    if cfg.max_rows:
        rows = rows[: cfg.max_rows]
    rng = random.Random(cfg.seed)
    rng.shuffle(rows)
    held = rows[: max(1, len(rows) // 10)] if len(rows) >= 10 else []
    fit_rows = rows[len(held):]
    prior = PositionPrior.fit(fit_rows) if cfg.position_prior else None
    data: list[Any] = (triples(fit_rows, cfg) if cfg.loss == "mnrl"
                       else mass_groups(fit_rows, cfg, prior))
    if not data:
        raise ValueError(f"{labels} has no training rows with positives (split 'train')"
                         if cfg.loss == "mnrl" else
                         f"{labels} has no training row with >= {cfg.group} candidates and mass")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # fp32 whatever the base checkpoint stores: transformers 5 loads a checkpoint in its own
    # dtype, and training fp16 weights with AdamW ran into NaN gradients within 20 steps
    model = SentenceTransformer(str(resolve_indexer(cfg.base)), device=device,
                                model_kwargs={"dtype": torch.float32})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir / "trainer"), num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
        warmup_ratio=cfg.warmup_ratio, seed=cfg.seed, save_strategy="no", report_to="none",
        batch_sampler=(BatchSamplers.NO_DUPLICATES if cfg.loss == "mnrl"
                       else BatchSamplers.BATCH_SAMPLER), logging_steps=cfg.logging_steps,
        use_cpu=device == "cpu",
        disable_tqdm=True)
    if cfg.loss == "mnrl":
        dataset = Dataset.from_dict({"anchor": [a for a, _, _ in data],
                                     "positive": [p for _, p, _ in data],
                                     "negative": [n for _, _, n in data]})
        loss: torch.nn.Module = MultipleNegativesRankingLoss(model)
    else:  # columns in order: query, chunk_0.., then the label column the trainer splits off
        cols = ["query", *(f"chunk_{j}" for j in range(cfg.group)), "label"]
        dataset = Dataset.from_dict({c: [ex[c] for ex in data] for c in cols})
        loss = MassKLLoss(model, cfg.temperature)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,
                                         loss=loss)
    result = trainer.train()
    threshold, neg_kept = calibrate(model, held or fit_rows[:50], cfg, prior)
    model.save(str(out_dir))
    if prior is not None:
        prior.save(out_dir)
    meta = {"format": FORMAT, "version": FORMAT_VERSION,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "base": cfg.base, "config": asdict(cfg), "labels": str(labels),
            "train_rows": len(fit_rows), "calibration_rows": len(held), "examples": len(data),
            "families": sorted({r["family"] for r in fit_rows}),
            "train_loss": float(result.training_loss),
            "loss_curve": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "threshold": threshold,
            "threshold_recall": cfg.target_recall, "threshold_negatives_kept": neg_kept,
            "position_prior": None if prior is None else {
                "file": PRIOR_FILE, "rows": prior.rows, "max_distance": prior.max_distance}}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta


def read_meta(path: Path) -> dict | None:
    """A trained indexer's metadata, or None for a plain sentence-transformers directory."""
    f = path / META_FILE
    if not f.exists():
        return None
    meta = json.loads(f.read_text())
    if meta.get("format") != FORMAT or meta.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{f}: not a {FORMAT} v<={FORMAT_VERSION} checkpoint")
    return meta
