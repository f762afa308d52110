"""Launch sweep of the DeepSeek-V4 lightning-indexer score kernel (kernels/dsv4_index.py): keys
per program x warps at V4-Flash's indexer shape (64 heads x 128), one CUDA graph per setting,
L2 flushed before each replay. Prints the five fastest per case, with the key read rate.

Usage (GPU): python benchmarks/dsv4_index_sweep.py
"""

from __future__ import annotations

import itertools

import torch

from flashmemory.bench.common import time_graph_ms
from flashmemory.kernels.dsv4_index import index_scores


def main() -> None:
    for batch, entries in ((1, 262144), (8, 262144), (8, 28352)):
        q = torch.randn(batch, 64, 128, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(batch, 64, device="cuda")
        k = torch.randn(batch, entries, 128, device="cuda", dtype=torch.bfloat16)
        count = torch.full((batch,), entries, device="cuda")
        args = (q, w, k, count, 0.1)
        rows = []
        for block, warps in itertools.product((32, 64, 128, 256), (2, 4, 8)):
            us = time_graph_ms(lambda a=args, b=block, n=warps: index_scores(*a, b, n))
            rows.append((us * 1e3, block, warps))
        rows.sort()
        best = ", ".join(f"block {b} warps {n}: {us:.1f} us ({k.nbytes / us / 1e3:.0f} GB/s)"
                         for us, b, n in rows[:5])
        print(f"B={batch} entries={entries}: {best}")


if __name__ == "__main__":
    main()
