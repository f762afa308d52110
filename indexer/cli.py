"""``flashmemory indexer build-corpus|dump|train|evaluate``: the indexer's training pipeline."""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def add_parser(sub: Any, csv: Any, common: Any) -> argparse.ArgumentParser:
    """Register ``indexer``; ``csv`` parses lists, ``common`` adds the engine flags."""
    p = sub.add_parser("indexer", help="build corpora, dump labels, train and evaluate indexers")
    steps = p.add_subparsers(dest="step", required=True,
                             metavar="{build-corpus,dump,train,evaluate}")

    c = steps.add_parser("build-corpus", help="write a corpus Parquet (synthetic and/or text)")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--families", type=csv, default=["retrieve", "aggregate", "multihop"])
    c.add_argument("--per-family", type=int, default=100)
    c.add_argument("--chars", type=int, default=12000, help="characters per document")
    c.add_argument("--text-dir", type=Path, help="real text: .html/.txt files (e.g. python3-doc)")
    c.add_argument("--text-docs", type=int, default=100)
    c.add_argument("--seed", type=int, default=0)

    d = steps.add_parser("dump", help="run the backbone over a corpus and write lookahead labels")
    d.add_argument("--corpus", type=Path, required=True)
    d.add_argument("--out", type=Path, required=True, help="directory of Parquet part files")
    d.add_argument("--split", choices=["train", "eval"], help="only this split (default both)")
    d.add_argument("--limit", type=int, help="at most this many documents")
    d.add_argument("--steps", type=int, default=64)
    d.add_argument("--window", type=int, default=64)
    d.add_argument("--top-p", type=float, default=0.8)
    d.add_argument("--max-prompt-tokens", type=int, default=4096)
    common(d)

    t = steps.add_parser("train", help="fine-tune the dual encoder on a label dump")
    t.add_argument("--labels", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--base", default="minilm")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=3e-5)
    t.add_argument("--max-rows", type=int)
    t.add_argument("--top-p", type=float, help="re-derive positives: share of the window's mass")
    t.add_argument("--max-positives", type=int, help="re-derive positives: at most this many")
    t.add_argument("--device", default=None)

    e = steps.add_parser("evaluate", help="selection recall of indexers against a label dump")
    e.add_argument("--labels", type=Path, required=True)
    e.add_argument("--indexers", type=csv, default=["minilm"],
                   help="'minilm' and/or trained checkpoint directories")
    e.add_argument("--split", choices=["train", "eval", "all"], default="eval")
    e.add_argument("--budgets", type=csv, default=["0.05", "0.1", "0.2"])
    e.add_argument("--json", type=Path, help="also write the result rows here")
    e.add_argument("--device", default="cpu")
    for q in (c, t, e):
        q.add_argument("-v", "--verbose", action="store_true")
        q.add_argument("--debug", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, argv: list[str]) -> int:
    return {"build-corpus": _build, "dump": _dump, "train": _train,
            "evaluate": _evaluate}[args.step](args)


def _build(args: argparse.Namespace) -> int:
    from flashmemory.indexer import corpus

    docs = list(corpus.synthetic(args.families, args.per_family, args.chars, args.seed))
    if args.text_dir:
        docs += list(corpus.text_documents(args.text_dir, args.text_docs, args.chars, args.seed))
    corpus.write_corpus(docs, args.out)
    fams = Counter(f"{doc.family} ({doc.split})" for doc in docs)
    print(f"wrote {len(docs)} documents to {args.out}: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(fams.items())))
    return 0


def _dump(args: argparse.Namespace) -> int:
    from flashmemory.engine import LLM
    from flashmemory.indexer import corpus, labels

    docs = corpus.read_corpus(args.corpus, args.split)[: args.limit]
    cfg = labels.DumpConfig(window=args.window, steps=args.steps, top_p=args.top_p,
                            chunk_size=args.chunk_size, sink_chunks=args.sink_chunks,
                            recent_tokens=args.recent_tokens,
                            max_prompt_tokens=args.max_prompt_tokens)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, attention=args.attention)
    n = labels.dump(llm, docs, args.out, cfg)
    print(f"wrote {n} label rows to {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from flashmemory.indexer.train import TrainConfig, train

    cfg = TrainConfig(base=args.base, epochs=args.epochs, batch_size=args.batch_size,
                      learning_rate=args.lr, max_rows=args.max_rows, top_p=args.top_p,
                      max_positives=args.max_positives)
    meta = train(args.labels, args.out, cfg, args.device)
    print(json.dumps(meta, indent=1))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from flashmemory.bench.common import markdown
    from flashmemory.indexer import evaluate
    from flashmemory.indexer.train import read_labels

    budgets = tuple(float(b) for b in args.budgets)
    rows = read_labels(args.labels, None if args.split == "all" else args.split)
    if not rows:
        raise ValueError(f"{args.labels} has no rows for split {args.split!r}")
    from flashmemory.indexer.train import read_meta

    scorers = evaluate.baseline_scorers(quest=all(r.get("quest") is not None for r in rows))
    adaptive = {}
    for name in args.indexers:
        scorers[name] = evaluate.neural_scorer(name, args.device)
        meta = read_meta(Path(name)) if Path(name).is_dir() else None
        if meta is not None:  # a trained indexer: also its calibrated threshold
            adaptive[name] = evaluate.Adaptive(meta["threshold"])
    result = evaluate.evaluate(rows, scorers, budgets, adaptive)
    print(markdown(result, ["selector", "budget", "family", "rows", "kept_pct", "mass_recall",
                            "recall", "precision"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0
