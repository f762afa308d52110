"""``flashmemory indexer build-corpus|dump|train|evaluate``: the text indexer's training pipeline;
``latent-dump|latent-train|latent-evaluate``: the same for DeepSeek-V4's latent indexer."""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
MASSES = ("peak", "mean", "retrieval")  # as indexer.train.MASSES (the CLI imports no torch)
MASS_HELP = ("the label mass to use: peak (over layers and heads, the default), mean (the "
             "share of all attention; needs a dump with mass_mean) or retrieval (the mean over "
             "the retrieval heads of `flashmemory indexer heads`; needs a dump with mass_heads)")


def add_parser(sub: Any, csv: Any, common: Any) -> argparse.ArgumentParser:
    """Register ``indexer``; ``csv`` parses lists, ``common`` adds the engine flags."""
    p = sub.add_parser("indexer", help="build corpora, dump labels, train and evaluate indexers")
    steps = p.add_subparsers(dest="step", required=True,
                             metavar="{build-corpus,dump,heads,train,fit-head,evaluate,"
                                     "latent-dump,latent-train,latent-evaluate}")

    c = steps.add_parser("build-corpus", help="write a corpus Parquet (synthetic and/or text)")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--families", type=csv, default=["retrieve", "aggregate", "multihop"],
                   help="retrieve, aggregate, vartrack (train) or multihop (eval)")
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
    common(d, selection=False)  # the dump decodes with full attention

    r = steps.add_parser("heads", help="choose the retrieval heads of a label dump (the heads "
                         "whose attention lands on the answer's chunks) for --mass retrieval")
    r.add_argument("--labels", type=Path, required=True)
    r.add_argument("--top", type=int, default=12,
                   help="heads to keep (12 of SmolLM2's 270: under 5%%, as Wu et al. found)")
    r.add_argument("--out", type=Path,
                   help="where to write them (default: retrieval_heads.json in the dump)")
    r.add_argument("--top-p", type=float, default=0.8,
                   help="positives: the fewest candidates holding this share of their mass")
    r.add_argument("--max-positives", type=int, default=16)

    t = steps.add_parser("train", help="fine-tune the dual encoder on a label dump")
    t.add_argument("--labels", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--base", default="minilm")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--batch-size", type=int,
                   help="examples per step (default 32 for mnrl, 8 for kl: a kl example holds "
                        "1 + group texts)")
    t.add_argument("--lr", type=float, default=3e-5)
    t.add_argument("--max-rows", type=int)
    t.add_argument("--top-p", type=float, help="re-derive positives: share of the window's mass")
    t.add_argument("--max-positives", type=int, help="re-derive positives: at most this many")
    t.add_argument("--loss", choices=["mnrl", "kl"], default="mnrl",
                   help="mnrl: (query, positive, hard negative) ranking; kl: listwise "
                        "distillation of the window's attention mass over groups of chunks")
    t.add_argument("--group", type=int, default=8, help="kl: chunks per example")
    t.add_argument("--groupings", type=int, default=1,
                   help="kl: independent shuffles of each row into groups")
    t.add_argument("--temperature", type=float, default=0.05,
                   help="kl: softmax temperature over cosine scores")
    t.add_argument("--position-prior", action="store_true",
                   help="kl: add a prior over each chunk's distance to the prompt's end, fitted "
                        "on the same rows, to the logits; saved with the checkpoint and used in "
                        "serving (docs/INDEXER.md)")
    t.add_argument("--device", default=None)
    t.add_argument("--mass", choices=MASSES, default="peak", help=MASS_HELP)

    h = steps.add_parser("fit-head", help="fit a position-aware score head over an indexer")
    h.add_argument("--labels", type=Path, required=True)
    h.add_argument("--indexer", default="minilm", help="minilm or a sentence-transformers dir")
    h.add_argument("--out", type=Path, required=True,
                   help="new indexer directory: the encoder, the head, metadata")
    h.add_argument("--hidden", type=int, default=0, help="0: linear head; else MLP width")
    h.add_argument("--steps", type=int, default=400)
    h.add_argument("--exclude", type=Path,
                   help="label dump the encoder was trained on (its documents are left out)")
    h.add_argument("--device", default="cpu")
    h.add_argument("--mass", choices=MASSES, default="peak", help=MASS_HELP)

    e = steps.add_parser("evaluate", help="selection recall of indexers against a label dump")
    e.add_argument("--labels", type=Path, required=True)
    e.add_argument("--indexers", type=csv, default=["minilm"],
                   help="'minilm' and/or trained checkpoint directories")
    e.add_argument("--split", choices=["train", "eval", "all"], default="eval")
    e.add_argument("--budgets", type=csv, default=["0.05", "0.1", "0.2"])
    e.add_argument("--json", type=Path, help="also write the result rows here")
    e.add_argument("--device", default="cpu")
    e.add_argument("--mass", choices=MASSES, default="peak", help=MASS_HELP)

    ld = steps.add_parser("latent-dump", help="DeepSeek-V4: full decodes over a corpus, writing "
                          "the latent indexer's inputs and lookahead page labels")
    ld.add_argument("--corpus", type=Path, required=True)
    ld.add_argument("--out", type=Path, required=True, help="directory of Parquet pairs")
    ld.add_argument("--split", choices=["train", "eval"], help="only this split (default both)")
    ld.add_argument("--limit", type=int, help="at most this many documents")
    ld.add_argument("--steps", type=int, default=128, help="decode steps per document")
    ld.add_argument("--window", type=int, default=64, help="steps per label window")
    ld.add_argument("--top-p", type=float, default=0.6)
    ld.add_argument("--min-layers", type=int, default=3)
    ld.add_argument("--layers", type=csv, help="CSA layers to dump (default: all)")
    ld.add_argument("--max-prompt-tokens", type=int, default=65536)
    common(ld, selection=False)

    lt = steps.add_parser("latent-train", help="train the latent indexer from a latent dump")
    lt.add_argument("--dump", type=Path, required=True)
    lt.add_argument("--out", type=Path, required=True)
    lt.add_argument("--epochs", type=int, default=5)
    lt.add_argument("--batch-windows", type=int, default=8)
    lt.add_argument("--lr", type=float, default=3e-3)
    lt.add_argument("--loss", choices=["bce", "focal"], default="bce")
    lt.add_argument("--negatives", type=int, default=3, help="random negatives per positive")
    lt.add_argument("--inner", type=int, default=256, help="tower width")
    lt.add_argument("--pooling", choices=["max", "logsumexp"], default="max")

    le = steps.add_parser("latent-evaluate", help="page recall of latent indexers on a dump")
    le.add_argument("--dump", type=Path, required=True)
    le.add_argument("--indexers", type=csv, required=True, help="latent checkpoint directories")
    le.add_argument("--budgets", type=csv, default=["0.05", "0.1", "0.2"],
                    help="KMAX = ceil(budget x pages)")
    le.add_argument("--threshold", type=float, default=0.5, help="sigmoid score to keep a page")
    le.add_argument("--json", type=Path, help="also write the result rows here")
    for q in (c, r, t, h, e, lt, le):
        q.add_argument("-v", "--verbose", action="store_true")
        q.add_argument("--debug", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, argv: list[str]) -> int:
    return {"build-corpus": _build, "dump": _dump, "heads": _heads, "train": _train,
            "fit-head": _fit_head, "evaluate": _evaluate, "latent-dump": _latent_dump,
            "latent-train": _latent_train, "latent-evaluate": _latent_evaluate}[args.step](args)


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
    from flashmemory.config import LSAConfig
    from flashmemory.engine import LLM
    from flashmemory.indexer import corpus, labels

    docs = corpus.read_corpus(args.corpus, args.split)[: args.limit]
    cfg = labels.DumpConfig(window=args.window, steps=args.steps, top_p=args.top_p,
                            chunk_size=args.chunk_size, sink_chunks=args.sink_chunks,
                            recent_tokens=args.recent_tokens,
                            max_prompt_tokens=args.max_prompt_tokens)
    # the dump decodes with full attention: the engine needs no indexer (the zero-shot MiniLM
    # would otherwise be loaded, and required, for nothing)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, attention=args.attention,
              lsa=LSAConfig(mode="full"))
    n = labels.dump(llm, docs, args.out, cfg)
    print(f"wrote {n} label rows to {args.out}")
    return 0


def _heads(args: argparse.Namespace) -> int:
    from flashmemory.cli import UsageError
    from flashmemory.indexer import retrieval_heads as heads

    if args.top < 1 or not 0 < args.top_p <= 1 or args.max_positives < 1:
        raise UsageError("--top and --max-positives must be >= 1, --top-p in (0, 1]")
    info = heads.choose(args.labels, args.top, args.out, args.top_p, args.max_positives)
    print(f"{len(info['heads'])} retrieval heads of {info['num_heads']} (over {info['rows']} "
          f"training rows of {', '.join(info['families'])}) -> "
          f"{args.out or heads.heads_path(args.labels)}")
    for (layer, head), score in zip(info["layer_head"], info["selected_scores"], strict=True):
        print(f"  layer {layer:3d} head {head:3d}  evidence lift {score:.2f}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from flashmemory.indexer.train import TrainConfig, train

    batch = args.batch_size or (8 if args.loss == "kl" else 32)
    cfg = TrainConfig(base=args.base, epochs=args.epochs, batch_size=batch,
                      learning_rate=args.lr, max_rows=args.max_rows, top_p=args.top_p,
                      max_positives=args.max_positives, loss=args.loss, group=args.group,
                      groupings=args.groupings,
                      temperature=args.temperature, mass=args.mass,
                      position_prior=args.position_prior)
    meta = train(args.labels, args.out, cfg, args.device)
    print(json.dumps(meta, indent=1))
    return 0


def _fit_head(args: argparse.Namespace) -> int:
    from flashmemory.cli import UsageError
    from flashmemory.indexer.head import fit_from_labels

    if args.hidden < 0 or args.steps < 1:
        raise UsageError("--hidden must be >= 0 and --steps >= 1")
    meta = fit_from_labels(args.labels, args.indexer, args.out, args.hidden, args.steps,
                           args.exclude, device=args.device, mass=args.mass)
    print(json.dumps(meta, indent=1))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from flashmemory.bench.common import markdown
    from flashmemory.indexer import evaluate
    from flashmemory.indexer.train import read_labels

    budgets = tuple(float(b) for b in args.budgets)
    rows = read_labels(args.labels, None if args.split == "all" else args.split, args.mass)
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
    result = [dict(r, mass=args.mass) for r in evaluate.evaluate(rows, scorers, budgets, adaptive)]
    print(f"mass recall against the {args.mass} mass over layers and heads")
    print(markdown(result, ["selector", "budget", "family", "rows", "kept_pct", "mass_recall",
                            "recall", "precision"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


def _latent_dump(args: argparse.Namespace) -> int:
    import torch

    from flashmemory.cli import UsageError
    from flashmemory.config import EngineConfig
    from flashmemory.dsv4_engine import DSV4LLM
    from flashmemory.indexer import corpus
    from flashmemory.indexer.labels import fit_prompt
    from flashmemory.model.deepseek_v4.latent_dump import LatentDumpConfig, dump_latent
    from flashmemory.model.loader import model_type, resolve

    try:
        cfg = LatentDumpConfig(steps=args.steps, window=args.window, top_p=args.top_p,
                               min_layers=args.min_layers,
                               layers=tuple(int(x) for x in args.layers) if args.layers else None)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if model_type(resolve(args.model)) != "deepseek_v4":  # before any weights load
        raise UsageError(f"latent-dump needs a DeepSeek-V4 checkpoint; {args.model!r} is not one "
                         "(the text indexer's labels come from `flashmemory indexer dump`)")
    docs = corpus.read_corpus(args.corpus, args.split)[: args.limit]
    llm = DSV4LLM(EngineConfig(model=args.model, device=args.device, dtype=args.dtype))
    prompts = {}
    for doc in docs:  # the same chat prompt as the text indexer's dump, cut to fit
        prompt = llm.tokenize(fit_prompt(llm, doc, args.max_prompt_tokens), chat=True)
        prompts[doc.doc_id] = torch.tensor(prompt.token_ids, dtype=torch.long)
    done = dump_latent(llm.model, prompts, args.out, cfg)
    print(f"dumped {len(done)} documents to {args.out} ({len(prompts) - len(done)} already there)")
    return 0


def _latent_train(args: argparse.Namespace) -> int:
    from flashmemory.model.deepseek_v4.latent_train import LatentTrainConfig, train_latent

    cfg = LatentTrainConfig(epochs=args.epochs, batch_windows=args.batch_windows,
                            learning_rate=args.lr, loss=args.loss, negatives=args.negatives,
                            inner=args.inner, pooling=args.pooling)
    _, meta = train_latent(args.dump, args.out, cfg)
    print(json.dumps(meta, indent=1))
    return 0


def _latent_evaluate(args: argparse.Namespace) -> int:
    from flashmemory.bench.common import markdown
    from flashmemory.model.deepseek_v4.latent_dump import read_dump
    from flashmemory.model.deepseek_v4.latent_indexer import LatentSelectConfig, load_latent
    from flashmemory.model.deepseek_v4.latent_train import evaluate_latent

    dump = read_dump(args.dump)
    select = LatentSelectConfig(threshold=args.threshold)
    rows = []
    for name in args.indexers:
        tower = load_latent(Path(name))
        for b in args.budgets:
            ev = evaluate_latent(tower, dump, select, float(b))
            rows.append(dict(indexer=name, budget=float(b), windows=ev.windows,
                             recall=100 * ev.recall, resident_pct=100 * ev.resident_fraction))
    print(markdown(rows, ["indexer", "budget", "windows", "recall", "resident_pct"]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0
