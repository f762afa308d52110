"""Would a cross-encoder re-ranker close the trained indexer's gap to the oracle? (issue 5)

A dual encoder scores the query and each chunk apart; a cross-encoder reads the (query, chunk)
pair together and can weigh one relevant chunk against another. This fine-tunes MiniLM as a
cross-encoder (one logit per pair, a new linear head on the [CLS] token) from a label dump
alone, with the listwise loss the dual encoder uses (KL of the softmax over a row's candidates
to their attention-mass shares), then scores every candidate of the evaluation rows and prints
mass recall against the oracle at 5/10/20%, and the time to score 64 pairs (a re-ranking of
the dual encoder's top 64 at one re-prediction).

Usage (GPU; the base is a MiniLM directory):
  python benchmarks/indexer_cross_encoder.py --labels LABELS --base MINILM [--epochs 3]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from flashmemory.indexer.evaluate import against_oracle
from flashmemory.indexer.train import chunk_view, read_labels

BUDGETS = (0.05, 0.1, 0.2)


def pairs(model, tok, row: dict, device: str, max_len: int, overlap: int) -> torch.Tensor:
    texts = [chunk_view(row["chunk_texts"], i, overlap) for i in row["candidates"]]
    enc = tok([row["query"]] * len(texts), texts, truncation="only_second", max_length=max_len,
              padding=True, return_tensors="pt").to(device)
    return model(**enc).logits[:, 0]


def main() -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=Path, required=True)
    ap.add_argument("--base", required=True, help="MiniLM (sentence-transformers) directory")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=120)
    ap.add_argument("--max-rows", type=int, help="first N training / evaluation rows (smoke)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    rows = [r for r in read_labels(args.labels) if r["candidates"] and sum(r["mass"]) > 0]
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "eval"]
    if args.max_rows:
        train, test = train[: args.max_rows], test[: args.max_rows]
    tok = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.base, num_labels=1, dtype=torch.float32).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    total = args.epochs * len(train)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, s / max(1, total // 10)) * max(0.0, 1 - s / total))
    rng = random.Random(0)
    t0 = time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        rng.shuffle(train)
        run = 0.0
        for r in train:
            logits = pairs(model, tok, r, args.device, args.max_len, args.overlap)
            teacher = torch.tensor(r["mass"], device=args.device, dtype=torch.float32)
            loss = torch.nn.functional.kl_div(torch.log_softmax(logits, 0),
                                              teacher / teacher.sum(), reduction="sum")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            run += loss.item()
        print(f"epoch {epoch + 1}: mean loss {run / len(train):.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad():
        scores = [pairs(model, tok, r, args.device, args.max_len, args.overlap).float().cpu()
                  for r in test]
        n = len(test[0]["chunk_texts"])
        big = dict(test[0], candidates=[i % n for i in range(64)])
        for _ in range(3):
            pairs(model, tok, big, args.device, args.max_len, args.overlap)
        if args.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            pairs(model, tok, big, args.device, args.max_len, args.overlap)
        if args.device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t) * 100
    print(f"cross-encoder from {args.base}: {len(train)} training rows, {args.epochs} epochs; "
          f"{len(test)} evaluation rows; 64 pairs scored in {ms:.1f} ms ({args.device}, fp32)")
    print("| selector | 5%: mass recall (vs oracle) | 10% | 20% |\n|---|---:|---:|---:|")
    cells = ["{:.1f} ({:.0f}%)".format(*against_oracle(test, scores, b)) for b in BUDGETS]
    print("| cross-encoder | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
