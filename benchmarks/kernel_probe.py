"""Launch-configuration sweep of the LSA kernel at small batches, where it is latency-bound
(issue 4 notes): the default, and the default without programmatic dependent launch, without the
page-index prefetch and without the early next launch, next to a streaming read of the same
bytes (what one kernel reading them can reach); with --sweep, splits x pipeline stages x
prefetch. 8 calls per CUDA-graph replay, each call on its own input set. Prints one line per
case.

Usage (GPU): python benchmarks/kernel_probe.py [--sweep]
"""

from __future__ import annotations

import itertools

import torch

from flashmemory.bench.common import hbm_read_bandwidth, time_graph_ms
from flashmemory.bench.kernel import read_us
from flashmemory.kernels import lsa_decode as K

CALLS = 8


def make_sets(hq: int, hkv: int, d: int, tokens: int, batch: int, chunk: int = 64):
    pages = -(-tokens // chunk)
    sets = []
    for _ in range(CALLS):
        kv = torch.randn((batch * pages + 1, 1, 2, hkv, chunk, d), dtype=torch.bfloat16,
                         device="cuda")[:, 0]
        table = torch.randperm(batch * pages).to(torch.int32).view(batch, pages).cuda()
        sets.append((kv, table))
    lens = torch.full((batch,), tokens, dtype=torch.int32, device="cuda")
    q = torch.randn((batch, hq, d), dtype=torch.bfloat16, device="cuda")
    return q, lens, sets


def time_us(q, lens, sets, **kw) -> float:
    return time_graph_ms(lambda: [K.lsa_decode(q, kv, t, lens, **kw) for kv, t in sets]) \
        * 1e3 / CALLS


def main(sweep: bool) -> None:
    bw = hbm_read_bandwidth()["read"]
    print(f"HBM read {bw / 1e12:.2f} TB/s")
    cases = [("llama3-8b", 32, 8, 128, 52416, 1), ("llama3-8b", 32, 8, 128, 26240, 1),
             ("llama3-8b", 32, 8, 128, 16384, 1),
             ("llama3-8b", 32, 8, 128, 13120, 8), ("smollm2", 9, 3, 64, 52416, 1),
             ("llama3-8b", 32, 8, 128, 52416, 8), ("llama3-8b", 32, 8, 128, 13120, 64),
             ("smollm2", 9, 3, 64, 13120, 8), ("smollm2", 9, 3, 64, 1664, 64),
             ("smollm2", 9, 3, 64, 13120, 64)]
    for name, hq, hkv, d, tokens, batch in cases:
        q, lens, sets = make_sets(hq, hkv, d, tokens, batch)
        floor = batch * tokens * hkv * d * 4 / bw * 1e6
        default = time_us(q, lens, sets)
        no_pdl = time_us(q, lens, sets, pdl=False)
        no_pre = time_us(q, lens, sets, prefetch=False)
        no_next = time_us(q, lens, sets, early_next=False)
        read = read_us(batch * tokens * hkv * d * 4, q.device)
        print(f"{name} tokens={tokens} B={batch} floor={floor:.1f}us default={default:.1f}us "
              f"({100 * floor / default:.0f}%) without PDL={no_pdl:.1f}us without prefetch="
              f"{no_pre:.1f}us without early next={no_next:.1f}us | stream read of the same "
              f"bytes {read:.1f}us (default at {100 * read / default:.0f}% of it)")
        if not sweep:
            continue
        rows = []
        splits = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
        for sp, st, pre in itertools.product(splits, (2, 3), (True, False)):
            if sp * batch * hkv > 8 * 132:
                continue
            t = time_us(q, lens, sets, num_splits=sp, num_stages=st, prefetch=pre)
            rows.append((t, f"splits={sp} stages={st} prefetch={pre}"))
        rows.sort()
        best = ", ".join(f"{c}: {t:.1f}" for t, c in rows[:6])
        print(f"{name} tokens={tokens} B={batch} floor={floor:.1f}us default={default:.1f}us "
              f"({100 * floor / default:.0f}%) | best: {best}")
        del sets
        torch.cuda.empty_cache()


if __name__ == "__main__":
    import sys

    main(sweep="--sweep" in sys.argv)
