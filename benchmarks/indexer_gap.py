"""Where does a trained indexer lose the oracle's mass, and does a lexical or token-level score
win it back?

Issue 5 experiment. Scores the label rows with one indexer (as serving does), then prints:

1. the share of the oracle's mass at 10% per task family, per prompt length (short: at most
   ``--long-chunks`` prompt chunks), and per whether the backbone's own output holds the gold
   answer (a case-insensitive substring test: crude, but it separates the rows where the
   backbone read the evidence from those where it did not); with ``--fact-pattern REGEX``
   also the oracle's top 10% split into chunks that hold a fact of the task (the regex matches
   the chunk's text or the last 60 characters before it) and filler, with the indexer's
   catch of each;
2. the indexer's score fused with BM25 over the row's chunk texts (z-scores added with a
   weight), from weight 0 (the indexer alone) to BM25 alone;
3. with ``--maxsim``: zero-shot all-MiniLM-L6-v2 scored by token-level late interaction
   (ColBERT-style MaxSim: each query token's best cosine over a chunk's tokens, averaged)
   against the same encoder's mean-pooled score, both without the serving windows;
4. with ``--hops``: two-hop query expansion at inference (multi-hop dense retrieval's idea): the
   one or two chunks the indexer ranks first are put before the query, the chunks are scored
   again, and that score is added to the first one with a weight;
5. with ``--ceilings`` (needs ``--fact-pattern``): rankings that know more than any lookahead
   indexer can, as upper bounds on the share of the oracle: the indexer given the backbone's own
   output for the window in its query; the fact chunks known, ranked by the indexer, then the
   filler by its mean mass at that distance from the tail (learnt leaving the row out); the
   fact chunks' exact mass with the same filler rule; and the exact fact mass with no filler.

Usage (CPU is fine):
  python benchmarks/indexer_gap.py --labels LABELS [--labels LABELS2 ...] --indexer CKPT
      [--split eval|train] [--mass retrieval] [--fact-pattern REGEX] [--maxsim] [--hops]
      [--ceilings] [--device cuda]
"""

from __future__ import annotations

import argparse
import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

from flashmemory.indexer.evaluate import Scorer, against_oracle, neural_scorer
from flashmemory.indexer.head import zscore
from flashmemory.indexer.train import MASSES, read_labels

BUDGETS = (0.05, 0.1, 0.2)
WEIGHTS = (0.0, 0.1, 0.2, 0.35, 0.5, 1.0)
STOPWORDS = frozenset((
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "had", "has", "have", "he",
    "her", "his", "in", "is", "it", "of", "on", "or", "she", "that", "the", "their", "they",
    "this", "to", "was", "were", "what", "when", "which", "who", "with"))


def words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOPWORDS]


def bm25(row: dict[str, Any], k1: float = 1.2, b: float = 0.75) -> torch.Tensor:
    """Okapi BM25 of each candidate chunk for the row's query; the row's chunks are the
    collection (document frequencies, mean length)."""
    docs = [words(t) for t in row["chunk_texts"]]
    n = len(docs)
    mean_len = max(sum(map(len, docs)) / n, 1.0)
    df = Counter(w for d in docs for w in set(d))
    query = Counter(words(row["query"]))
    out = []
    for c in row["candidates"]:
        tf = Counter(docs[c])
        norm = k1 * (1 - b + b * len(docs[c]) / mean_len)
        out.append(sum(math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
                       * tf[w] * (k1 + 1) / (tf[w] + norm) for w in query if w in tf))
    return torch.tensor(out, dtype=torch.float32)


def answered(row: dict[str, Any]) -> bool:
    answer = str(row.get("answer") or "").strip().lower()
    return bool(answer) and answer in str(row.get("output") or "").lower()


def share(rows: list[dict], scores: list[torch.Tensor], budget: float = 0.1) -> str:
    return "{:.1f} ({:.0f}%)".format(*against_oracle(rows, scores, budget)) if rows else "—"


def table(title: str, rows: list[dict], long_: list[int],
          variants: list[tuple[str, list[torch.Tensor]]]) -> None:
    """One line per scoring variant: share of the oracle at each budget, and at 10% on the
    long rows (indices ``long_``)."""
    print(f"| {title} | " + " | ".join(f"{b:.0%}" for b in BUDGETS) + " | 10%, long rows |")
    print("|---|" + "---:|" * (len(BUDGETS) + 1))
    for name, s in variants:
        cells = [share(rows, s, b) for b in BUDGETS]
        cells.append(share([rows[i] for i in long_], [s[i] for i in long_]))
        print(f"| {name} | " + " | ".join(cells) + " |")


def breakdown(rows: list[dict], scores: list[torch.Tensor], long_chunks: int) -> None:
    groups: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        length = "long" if len(r["chunk_texts"]) > long_chunks else "short"
        ok = "yes" if answered(r) else "no"
        for key in ((r["family"], length, ok), (r["family"], length, "any"),
                    ("all", length, "any"), ("all", "any", ok), ("all", "any", "any")):
            groups[key].append(i)
    print("| family | length | backbone's output holds the answer | rows | 10%: mass recall "
          "(share of the oracle) |")
    print("|---|---|---|---:|---:|")
    for key in sorted(groups, key=lambda k: (k[0] == "all", k)):
        idx = groups[key]
        cell = share([rows[i] for i in idx], [scores[i] for i in idx])
        print(f"| {' | '.join(key)} | {len(idx)} | {cell} |")


def fact_flags(row: dict[str, Any], fact_re: re.Pattern) -> list[bool]:
    """Per candidate: does the chunk (or the 60 characters before it) state a task fact."""
    texts = row["chunk_texts"]
    return [bool(fact_re.search(texts[c - 1][-60:] + texts[c])) for c in row["candidates"]]


def facts(rows: list[dict], scores: list[torch.Tensor], pattern: str,
          long_chunks: int) -> None:
    """Mass in the top 10% of the oracle and of the indexer, on fact chunks and on filler."""
    fact_re = re.compile(pattern)
    sums: dict[tuple[str, str, bool], float] = defaultdict(float)
    for r, s in zip(rows, scores, strict=True):
        length = "long" if len(r["chunk_texts"]) > long_chunks else "short"
        is_fact = fact_flags(r, fact_re)
        mass = torch.tensor(r["mass"], dtype=torch.float32)
        share_ = 100 * mass / mass.sum()  # as mass recall: % of the row's mass
        k = max(1, round(0.1 * len(mass)))
        sums[(length, "rows", True)] += 1
        for who, ranked in (("oracle", mass), ("indexer", s)):
            for i in ranked.argsort(descending=True)[:k].tolist():
                sums[(length, who, is_fact[i])] += float(share_[i])
    print(f"Chunks that hold a fact: /{pattern}/. Mass in % of each row's, mean over rows.\n")
    print("| length | chunks | oracle's top 10% | indexer's top 10% | share |")
    print("|---|---|---:|---:|---:|")
    for length in ("short", "long"):
        n = max(sums[(length, "rows", True)], 1)
        for fact in (True, False):
            o, i = sums[(length, "oracle", fact)] / n, sums[(length, "indexer", fact)] / n
            if o or i:
                print(f"| {length} | {'fact' if fact else 'filler'} | {o:.1f} | {i:.1f} | "
                      f"{100 * i / o if o else float('nan'):.0f}% |")


def fusion(rows: list[dict], scores: list[torch.Tensor], long_: list[int]) -> None:
    lexical = [bm25(r) for r in rows]
    variants = [(f"indexer + {w} x BM25" if w else "indexer alone",
                 [zscore(s) + w * zscore(x) for s, x in zip(scores, lexical, strict=True)])
                for w in WEIGHTS]
    variants.append(("BM25 alone", lexical))
    table("score", rows, long_, variants)


def maxsim(rows: list[dict], device: str, long_: list[int]) -> None:
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer

    from flashmemory.indexer.neural import resolve_indexer

    enc = SentenceTransformer(str(resolve_indexer("minilm")), device=device)

    def tokens(texts: list[str]) -> list[torch.Tensor]:
        out = enc.encode(texts, output_value="token_embeddings", batch_size=64,
                         show_progress_bar=False)
        return [F.normalize(t.float().cpu(), dim=-1) for t in out]

    late, pooled = [], []
    for r in rows:
        q = tokens([r["query"]])[0]
        chunks = tokens([r["chunk_texts"][c] for c in r["candidates"]])
        late.append(torch.stack([(q @ c.T).max(1).values.mean() for c in chunks]))
        qp = F.normalize(q.mean(0), dim=0)
        pooled.append(torch.stack([F.normalize(c.mean(0), dim=0) @ qp for c in chunks]))
    table("zero-shot MiniLM", rows, long_,
          [("mean-pooled", pooled), ("MaxSim (late interaction)", late)])


def hops(rows: list[dict], scores: list[torch.Tensor], indexer: str, device: str,
         long_: list[int]) -> None:
    from flashmemory.indexer.neural import NeuralIndexer

    idx = NeuralIndexer(indexer, device=device)
    second: dict[int, list[torch.Tensor]] = {1: [], 2: []}
    for r, s in zip(rows, scores, strict=True):
        idx.add_request("row", r["chunk_texts"])
        first = [r["candidates"][i] for i in s.argsort(descending=True)[:2].tolist()]
        for k in second:
            query = " ".join(r["chunk_texts"][c] for c in first[:k]) + " " + r["query"]
            second[k].append(idx.candidate_scores("row", query, r["candidates"],
                                                  len(r["chunk_texts"])))
        idx.forget("row")
    variants = [("first hop (the indexer alone)", scores)]
    for k, again in second.items():
        variants.append((f"second hop alone, {k} chunk(s) before the query", again))
        variants += [(f"first + {w} x second ({k} chunk(s))",
                      [zscore(a) + w * zscore(b) for a, b in zip(scores, again, strict=True)])
                     for w in (0.25, 0.5, 1.0)]
    table("score", rows, long_, variants)


def ceiling_rankings(rows: list[dict], scores: list[torch.Tensor], fact_re: re.Pattern,
                     max_distance: int = 64) -> list[tuple[str, list[torch.Tensor]]]:
    """Rankings that know which candidates hold a fact (and, two of them, the backbone's exact
    mass on those): fact chunks first, by the indexer's score or by their mass, then filler by
    the mean mass share of filler at the same distance from the last candidate over the other
    rows (the row itself left out)."""
    flags = [fact_flags(r, fact_re) for r in rows]
    shares = [torch.tensor(r["mass"], dtype=torch.float64) / sum(r["mass"]) for r in rows]
    dists = [[min(r["candidates"][-1] - c, max_distance) for c in r["candidates"]] for r in rows]
    totals: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    per_row = []  # each row's own filler (distance -> [mass, count]), to leave it out
    for f, m, d in zip(flags, shares, dists, strict=True):
        own: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for is_fact, mi, di in zip(f, m.tolist(), d, strict=True):
            if not is_fact:
                own[di][0] += mi
                own[di][1] += 1
        for di, (mi, n) in own.items():
            totals[di][0] += mi
            totals[di][1] += n
        per_row.append(own)

    def filler_mean(j: int, d: int) -> float:
        mass, n = totals[d][0] - per_row[j][d][0], totals[d][1] - per_row[j][d][1]
        return mass / n if n else 0.0

    known, exact, alone = [], [], []
    for j, (f, m, d, s) in enumerate(zip(flags, shares, dists, scores, strict=True)):
        rank = torch.argsort(torch.argsort(s)).double() / len(s)  # in [0, 1), higher is better
        filler = torch.tensor([filler_mean(j, di) for di in d], dtype=torch.float64)
        fact = torch.tensor(f, dtype=torch.bool)
        known.append(torch.where(fact, 2.0 + rank, filler))  # above every filler share
        exact.append(torch.where(fact, m, filler))
        alone.append(torch.where(fact, m, torch.full_like(m, -1.0)))
    return [("facts known, ranked by the indexer; filler by mean mass at its distance", known),
            ("exact mass of the fact chunks; filler by mean mass at its distance", exact),
            ("exact mass of the fact chunks; no filler", alone)]


def ceilings(rows: list[dict], scores: list[torch.Tensor], score: Scorer, pattern: str,
             long_: list[int]) -> None:
    """The indexer (``score``: its scorer) next to rankings that know more than it can."""
    future = [score({**r, "query": f"{r['query']} {r.get('output') or ''}"}) for r in rows]
    table("ranking", rows, long_, [
        ("the indexer", scores),
        ("the indexer, told the backbone's output for the window", future),
        *ceiling_rankings(rows, scores, re.compile(pattern))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=Path, action="append", required=True)
    ap.add_argument("--indexer", required=True)
    ap.add_argument("--split", choices=("train", "eval"), default="eval")
    ap.add_argument("--mass", choices=MASSES, default="retrieval")
    ap.add_argument("--long-chunks", type=int, default=50,
                    help="prompts with more chunks than this count as long")
    ap.add_argument("--fact-pattern", help="regex naming the chunks that hold a task fact")
    ap.add_argument("--maxsim", action="store_true")
    ap.add_argument("--hops", action="store_true")
    ap.add_argument("--ceilings", action="store_true",
                    help="upper bounds from knowing the facts or the output (--fact-pattern)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    rows = [r for p in args.labels for r in read_labels(p, split=args.split, mass=args.mass)
            if r["candidates"] and sum(r["mass"]) > 0]
    if args.ceilings and not args.fact_pattern:
        ap.error("--ceilings needs --fact-pattern")
    if not rows:
        ap.error(f"no {args.split} rows with candidates and mass in {args.labels}")
    score = neural_scorer(args.indexer, args.device)
    scores = [score(r) for r in rows]
    print(f"{len(rows)} {args.split} rows of {', '.join(map(str, args.labels))}; "
          f"indexer {args.indexer}; mass {args.mass}\n")
    breakdown(rows, scores, args.long_chunks)
    print()
    if args.fact_pattern:
        facts(rows, scores, args.fact_pattern, args.long_chunks)
        print()
    long_ = [i for i, r in enumerate(rows) if len(r["chunk_texts"]) > args.long_chunks]
    fusion(rows, scores, long_)
    if args.maxsim:
        print()
        maxsim(rows, args.device, long_)
    if args.hops:
        print()
        hops(rows, scores, args.indexer, args.device, long_)
    if args.ceilings:
        print()
        ceilings(rows, scores, score, args.fact_pattern, long_)


if __name__ == "__main__":
    main()
