"""Lookahead labels for indexer training: the chunks the backbone attends to per decode window.

``flashmemory indexer dump`` runs the backbone over a corpus (``indexer.corpus``) with full
attention, recording every decode step's attention mass per chunk (``decode.step.
AttentionRecorder``: per step, each chunk's peak over layers and query heads of the mass the head
puts on it, and the mean over them). For each window of W steps (default 64) the mass is summed
over the window's steps; the candidates are the prompt chunks outside the always-resident set
(sink chunks and the recency tail); the positives are the fewest candidates holding ``top_p`` of
the candidates' summed mass.
Rows are written as Parquet part files, one per ``flush_every`` documents; a rerun skips the
documents already written (resumable). Schema, one row per (document, window):
  doc_id, family, split: str          from the corpus
  window, step_start: int             window index and its first decode step
  query: str                          the lookahead query at step_start, as decode forms it
  chunk_texts: list<str>              every prompt chunk's text (index = chunk id)
  candidates: list<int>               chunks a selector chooses among
  mass: list<float>                   summed peak mass of each candidate over the window
  positives: list<int>                the top-p candidates (the label)
  mass_mean: list<float>              summed mean mass (over every layer and query head: the
                                      share of all attention) of each candidate
  positives_mean: list<int>           the top-p candidates by mass_mean
                                      (``read_labels(..., mass="mean")`` reads these two as
                                      ``mass`` and ``positives``)
  window_steps: int                   decode steps in the window (fewer than W at the end)
  num_layers, num_heads: int          the backbone's layers, and H = layers x query heads
  mass_heads: list<float>             every head's own summed mass on each candidate, H rows of
                                      len(candidates), row-major (layer-major, then head);
                                      ``indexer.retrieval_heads`` reads the retrieval-head
                                      mass from it
  quest: list<float>                  Quest-style score of each candidate at step_start: the
                                      backbone's query against per-chunk key min / max bounds
  answer, output: str                 gold answer and the backbone's generated text
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from flashmemory.config import LSAConfig, SamplingParams
from flashmemory.indexer.base import fixed_chunks
from flashmemory.indexer.corpus import Document

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DumpConfig:
    window: int = 64  # decode steps per label window (the re-prediction period)
    steps: int = 64  # decode steps per document (max_tokens)
    top_p: float = 0.8  # share of the candidates' mass the positives hold
    max_positives: int = 16
    chunk_size: int = 64
    sink_chunks: int = 1
    recent_tokens: int = 128
    max_prompt_tokens: int = 4096
    flush_every: int = 8  # documents per Parquet part file

    def __post_init__(self) -> None:
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.window < 1 or self.steps < 1 or self.max_positives < 1:
            raise ValueError("window, steps and max_positives must be >= 1")


def top_p_positives(mass: torch.Tensor, top_p: float, limit: int) -> list[int]:
    """Indices (into ``mass``) of the fewest entries holding ``top_p`` of the total, at most
    ``limit``; empty when there is no mass."""
    total = float(mass.sum())
    if total <= 0:
        return []
    order = torch.argsort(mass, descending=True)
    cum = torch.cumsum(mass[order], 0) / total
    k = int(torch.searchsorted(cum, torch.tensor(top_p * (1 - 1e-6)))) + 1
    return sorted(order[: min(k, limit)].tolist())


def prompt_of(doc: Document) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{doc.context}\n\n{doc.question}"}]


def label_rows(doc: Document, trace: Any, num_prompt_tokens: int, query_base: str,
               decode: Any, cfg: DumpConfig) -> list[dict[str, Any]]:
    """One row per full or partial window of a ``Trace`` (see the module docstring)."""
    steps, chunk_texts, output_ids = trace.steps, trace.chunk_texts, trace.output.token_ids
    n = len(chunk_texts)
    output = decode(output_ids)
    rows = []
    means = trace.mean_steps
    per_head = getattr(trace, "head_steps", [])
    for w, s0 in enumerate(range(0, len(steps), cfg.window)):
        fixed = fixed_chunks(n, num_prompt_tokens + s0 + 1, cfg.chunk_size, cfg.sink_chunks,
                             cfg.recent_tokens)
        cands = [i for i in range(n) if i not in fixed]
        cand_mass = _window_mass(steps[s0:s0 + cfg.window], n)[cands]
        pos = [cands[i] for i in top_p_positives(cand_mass, cfg.top_p, cfg.max_positives)]
        cand_mean = _window_mass(means[s0:s0 + cfg.window], n)[cands] if means else None
        pos_mean = (None if cand_mean is None else
                    [cands[i] for i in top_p_positives(cand_mean, cfg.top_p, cfg.max_positives)])
        heads = (_window_mass(per_head[s0:s0 + cfg.window], n)[..., cands]
                 if per_head else None)
        recent = decode(output_ids[:s0])[-400:] if s0 else ""
        quest = trace.quest.get(s0)
        rows.append(dict(
            doc_id=doc.doc_id, family=doc.family, split=doc.split, window=w, step_start=s0,
            query=f"{query_base} {recent}" if recent else query_base,
            chunk_texts=chunk_texts, candidates=cands, mass=cand_mass.tolist(), positives=pos,
            mass_mean=None if cand_mean is None else cand_mean.tolist(),
            positives_mean=pos_mean,
            window_steps=len(steps[s0:s0 + cfg.window]),
            num_layers=None if heads is None else heads.shape[0],
            num_heads=None if heads is None else heads.shape[0] * heads.shape[1],
            mass_heads=None if heads is None else heads.flatten().tolist(),
            quest=None if quest is None else quest[cands].tolist(),
            answer=doc.answer, output=output))
    return rows


def _window_mass(window: list[torch.Tensor], n: int) -> torch.Tensor:
    """(..., n) the window's per-step chunk mass summed over its steps; each step's record
    (one value per chunk, or one per (layer, head) and chunk) covers the chunks seen so far
    (prompt + generated), of which the first n are the prompt's."""
    mass = torch.zeros(*window[0].shape[:-1], n)
    for m in window:
        k = min(n, m.shape[-1])
        mass[..., :k] += m[..., :k]
    return mass


def done_doc_ids(out_dir: Path) -> set[str]:
    import pyarrow.parquet as pq

    done: set[str] = set()
    for part in sorted(out_dir.glob("part-*.parquet")):
        done.update(pq.read_table(part, columns=["doc_id"]).column("doc_id").to_pylist())
    return done


def dump(llm: Any, docs: list[Document], out_dir: Path, cfg: DumpConfig,
         progress: bool = True) -> int:
    """Trace every document not yet in ``out_dir``; returns the number of rows written now."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    done = done_doc_ids(out_dir)
    todo = [d for d in docs if d.doc_id not in done]
    part = len(list(out_dir.glob("part-*.parquet")))
    lsa = LSAConfig(mode="full", chunk_size=cfg.chunk_size, sink_chunks=cfg.sink_chunks,
                    recent_tokens=cfg.recent_tokens)
    sampling = SamplingParams(max_tokens=cfg.steps, temperature=0.0)
    buffer: list[dict[str, Any]] = []
    written = 0

    def flush() -> None:
        nonlocal part, written
        if buffer:
            pq.write_table(pa.Table.from_pylist(buffer), out_dir / f"part-{part:05d}.parquet")
            part, written = part + 1, written + len(buffer)
            buffer.clear()

    for i, doc in enumerate(tqdm(todo, desc="dump", disable=not progress, unit="doc")):
        prompt = llm.tokenize(fit_prompt(llm, doc, cfg.max_prompt_tokens), chat=True)
        trace = llm.trace(prompt, sampling, lsa, quest_every=cfg.window)
        buffer += label_rows(doc, trace, len(prompt.token_ids), prompt.query,
                             lambda ids: llm.tokenizer.decode(ids, skip_special_tokens=True),
                             cfg)
        if (i + 1) % cfg.flush_every == 0:
            flush()
    flush()
    logger.info("dump: %d documents skipped (already written), %d rows written", len(done),
                written)
    return written


def fit_prompt(llm: Any, doc: Document, max_tokens: int) -> list[dict[str, str]]:
    """The document's chat prompt, its context cut at the end so the prompt fits."""
    limit = min(max_tokens, llm.max_model_len - 1)
    context = doc.context
    while True:
        msgs = prompt_of(replace(doc, context=context))
        text = llm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        n = len(llm.tokenizer(text, add_special_tokens=False)["input_ids"])
        if n <= limit or not context:
            return msgs
        context = context[: int(len(context) * limit / n * 0.97)]
