"""Prefill latency: FlashMemory's model vs transformers' implementation of the same weights (CPU).

Usage: python benchmarks/prefill_vs_transformers.py [--model M] [--lengths 1024,2048,4096]
Prints a Markdown table: after one warm-up run of each, the best of --repeats runs per cell,
the two implementations alternating (which goes first alternates too).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date

import torch

from flashmemory.model.loader import load_model, load_tokenizer, resolve
from flashmemory.prefill.chunk_store import ChunkStore
from flashmemory.prefill.runner import prefill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    src = resolve(args.model)
    ours = load_model(src)
    tok = load_tokenizer(src)
    kw = {"gguf_file": src.path.name} if src.kind == "gguf" else {}
    path = str(src.path.parent if src.kind == "gguf" else src.path)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    c = ours.config
    print(f"model {args.model}, fp32, torch {torch.__version__}, {os.cpu_count()} CPU cores "
          f"({platform.processor() or platform.machine()}), {date.today()}")
    print("| tokens | flashmemory prefill (s) | transformers forward (s) | ratio |")
    print("|---:|---:|---:|---:|")
    text = "The quick brown fox jumps over the lazy dog near the quiet river bank. " * 2000
    all_ids = tok(text, add_special_tokens=False)["input_ids"]
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = all_ids[:n]
        offsets = [(i, i + 1) for i in range(n)]

        def run_ours(tag: str, ids: list[int] = ids, offsets: list = offsets) -> float:
            store = ChunkStore(c.num_layers, c.num_kv_heads, c.head_dim, 64)
            t = time.perf_counter()
            prefill(ours, store, tag, ids, offsets, "x" * len(ids))
            return time.perf_counter() - t

        def run_theirs(ids: list[int] = ids) -> float:
            with torch.no_grad():
                t = time.perf_counter()
                theirs(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
                return time.perf_counter() - t

        run_ours("warm"), run_theirs()
        mine, other = [], []
        for r in range(args.repeats):
            if r % 2:
                other.append(run_theirs())
                mine.append(run_ours(f"r{r}"))
            else:
                mine.append(run_ours(f"r{r}"))
                other.append(run_theirs())
        a, b = min(mine), min(other)
        print(f"| {n} | {a:.2f} | {b:.2f} | {a / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
