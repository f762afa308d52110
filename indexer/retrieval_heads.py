"""Retrieval heads: the label mass of the (layer, query head)s that read the evidence.

The peak and the mean over every head (``indexer.labels``) both follow where attention goes, and
on SmolLM2 most of it goes near the end of the prompt whatever the question: a selector fitted
to them leaves the needle out (docs/BENCHMARKS.md section 8, run 8). A few heads behave
differently: at the decode steps that write the answer they look at the chunks that hold it
(the "retrieval heads" of Wu et al., 2024). This aggregation keeps only those heads.

How the heads are chosen, from a dump's training split alone (``flashmemory indexer heads``):
a row's evidence chunks are the candidates whose text holds a part of the gold answer (parts
split on "; ", at least 3 characters, so also the sentence a real-text row asks for; rows with
no such candidate are skipped). A head's score on a row is its lift on those chunks: the share
of its attention on them, averaged over the window's decode steps, over the share they would
get from attention spread evenly across the prompt's chunks (heads that attend evenly, as
several of the first layer's do, score below 1 however many evidence chunks a row has); its
retrieval score is the mean over rows. The ``top`` best heads are written, with every head's
score, to ``retrieval_heads.json`` next to the dump. ``read_labels(..., mass="retrieval")``
then gives each row's candidates the mean mass of those heads, and positives by top-p of that
mass. The held-out family never chooses heads: its rows are only scored with the heads the
training families chose.
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
import json
from pathlib import Path
from typing import Any

import torch

HEADS_FILE = "retrieval_heads.json"
HEADS_VERSION = 1
MIN_PART_CHARS = 3


def heads_path(labels: Path) -> Path:
    """Where a dump's head set lives: inside a dump directory, or next to a single file."""
    return labels / HEADS_FILE if labels.is_dir() else labels.with_name(
        f"{labels.stem}.{HEADS_FILE}")


def head_matrix(row: dict[str, Any]) -> torch.Tensor:
    """(heads, candidates) summed mass of every head on the row's candidates."""
    if row.get("mass_heads") is None:
        raise ValueError(f"row {row['doc_id']}/{row['window']} has no mass_heads (dumped before "
                         "per-head mass was recorded): dump it again")
    return torch.tensor(row["mass_heads"], dtype=torch.float32).view(row["num_heads"], -1)


def evidence(row: dict[str, Any]) -> list[int]:
    """Indices into the row's candidates of the chunks holding (part of) a part of the answer;
    an answer that runs over a chunk boundary marks both chunks."""
    import re

    parts = [p.strip() for p in (row.get("answer") or "").split(";")]
    parts = [p for p in parts if len(p) >= MIN_PART_CHARS]
    texts = row["chunk_texts"]
    ends = list(itertools.accumulate(len(t) for t in texts))
    full = "".join(texts)
    hit: set[int] = set()
    for part in parts:
        for m in re.finditer(re.escape(part), full):
            first = bisect.bisect_right(ends, m.start())
            last = bisect.bisect_right(ends, m.end() - 1)
            hit.update(range(first, last + 1))
    return [i for i, c in enumerate(row["candidates"]) if c in hit]


def head_scores(rows: list[dict[str, Any]]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """(heads,) each head's mean lift on the evidence chunks (its per-step attention share on
    them over the share uniform attention across the prompt's chunks would give them), and the
    rows it is averaged over (those with evidence)."""
    total, voters = None, []
    for r in rows:
        ev = evidence(r)
        steps = r.get("window_steps") or 0
        if not ev or steps <= 0:
            continue
        share = head_matrix(r)[:, ev].sum(1) / steps * len(r["chunk_texts"]) / len(ev)
        total = share if total is None else total + share
        voters.append(r)
    if total is None:
        raise ValueError("no training row has answer text in a candidate chunk (and per-head "
                         "mass): retrieval heads need synthetic families with gold answers")
    return total / len(voters), voters


def choose(labels: Path, top: int, out: Path | None = None, top_p: float = 0.8,
           max_positives: int = 16) -> dict[str, Any]:
    """Score every head on ``labels``' training split, write the ``top`` best to ``out``
    (default ``heads_path(labels)``) and return what was written."""
    from flashmemory.indexer.train import read_labels

    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    rows = read_labels(labels, "train")
    scores, voters = head_scores(rows)
    if top > scores.numel():
        raise ValueError(f"top={top} but the dump has {scores.numel()} heads")
    order = torch.argsort(scores, descending=True)[:top].tolist()
    num_heads = int(scores.numel())
    per_layer = num_heads // int(voters[0]["num_layers"])
    info = {"version": HEADS_VERSION, "labels": str(labels), "num_heads": num_heads,
            "heads_per_layer": per_layer, "heads": order,
            "layer_head": [[h // per_layer, h % per_layer] for h in order],
            "score": "lift", "selected_scores": [round(float(scores[h]), 5) for h in order],
            "scores": [round(float(s), 5) for s in scores], "rows": len(voters),
            "families": sorted({r["family"] for r in voters}),
            "top_p": top_p, "max_positives": max_positives,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    path = out or heads_path(labels)
    path.write_text(json.dumps(info, indent=1))
    return info


def load(labels: Path) -> dict[str, Any]:
    path = heads_path(labels)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no retrieval heads chosen for {labels}; run "
                                f"`flashmemory indexer heads --labels {labels}` first")
    info = json.loads(path.read_text())
    if info.get("version", 0) > HEADS_VERSION:
        raise ValueError(f"{path}: retrieval heads of a newer format (v{info['version']})")
    return info


def apply(rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    """Set each row's ``mass`` and ``positives`` to the chosen heads' (in place)."""
    from flashmemory.indexer.labels import top_p_positives

    heads = torch.tensor(info["heads"])
    for r in rows:
        if r.get("num_heads") != info["num_heads"]:
            raise ValueError(f"row {r['doc_id']} has {r.get('num_heads')} heads; the head set "
                             f"was chosen over {info['num_heads']}")
        mass = head_matrix(r)[heads].mean(0)
        r["mass"] = mass.tolist()
        r["positives"] = [r["candidates"][i] for i in
                          top_p_positives(mass, info["top_p"], info["max_positives"])]
