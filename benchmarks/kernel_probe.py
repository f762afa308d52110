# ruff: noqa: B023  (each lambda is timed at once, inside its loop iteration)
"""Where the LSA kernel's time goes at batch 1 (issue 4 notes): launch floor, merge cost, table
order, block size and warps, each timed as CUDA-graph replays. Prints one line per variant.

Usage (GPU): python benchmarks/kernel_probe.py
"""

from __future__ import annotations

import torch

from flashmemory.bench.common import hbm_read_bandwidth, time_graph_ms
from flashmemory.kernels import lsa_decode as K


def case(hq: int, hkv: int, d: int, tokens: int, batch: int = 1, chunk: int = 64,
         contiguous: bool = False):
    pages = -(-tokens // chunk)
    kv = torch.randn((batch * pages + 1, 1, 2, hkv, chunk, d), dtype=torch.bfloat16,
                     device="cuda")[:, 0]
    order = torch.arange(batch * pages) if contiguous else torch.randperm(batch * pages)
    table = order.to(torch.int32).view(batch, pages).cuda()
    lens = torch.full((batch,), tokens, dtype=torch.int32, device="cuda")
    q = torch.randn((batch, hq, d), dtype=torch.bfloat16, device="cuda")
    return q, kv, table, lens


def main() -> None:
    bw = hbm_read_bandwidth()
    print(f"HBM read {bw['read'] / 1e12:.2f} TB/s, copy {bw['copy'] / 1e12:.2f} TB/s")
    for name, (hq, hkv, d) in {"llama3-8b": (32, 8, 128), "smollm2": (9, 3, 64)}.items():
        for tokens in (16384, 52416):
            q, kv, table, lens = case(hq, hkv, d, tokens)
            nbytes = tokens * hkv * d * 4
            floor = nbytes / bw["read"] * 1e6
            print(f"\n{name} tokens={tokens} bytes={nbytes / 1e6:.0f}MB floor={floor:.1f}us")
            one = torch.ones(1, dtype=torch.int32, device="cuda")
            t = time_graph_ms(lambda: K.lsa_decode(q, kv, table[:, :1].contiguous(), one))
            print(f"  launch floor (1 token)       {t * 1e3:6.1f} us")
            for bn in (64, 128, 256):
                for w in (4, 8):
                    for sp in (None, 64, 128):
                        t = time_graph_ms(lambda: K.lsa_decode(
                            q, kv, table, lens, block_n=bn, num_warps=w, num_splits=sp))
                        print(f"  block_n={bn:3d} warps={w} splits={sp or 'auto':>4} "
                              f"{t * 1e3:6.1f} us  {100 * floor / (t * 1e3):5.1f}% of read BW")
            qc, kvc, tc, lc = case(hq, hkv, d, tokens, contiguous=True)
            t = time_graph_ms(lambda: K.lsa_decode(qc, kvc, tc, lc))
            print(f"  contiguous pages (default)   {t * 1e3:6.1f} us")
            s = K.default_splits(1, hkv, tokens // 64, 132)
            part = torch.randn((1, hq, s, d), device="cuda")
            lse = torch.randn((1, hq, s), device="cuda")
            out = torch.empty_like(q)
            t = time_graph_ms(lambda: K._lsa_merge_kernel[(1, hq)](
                part, lse, out, *part.stride()[:3], *lse.stride()[:2], *out.stride()[:2], s,
                HEAD_DIM=d, D_PAD=d, S_PAD=max(2, 1 << (s - 1).bit_length())))
            print(f"  merge kernel alone (S={s})    {t * 1e3:6.1f} us")


if __name__ == "__main__":
    main()
