"""Launch-configuration sweep of the LSA kernel at small batches, where it is latency-bound
(issue 4 notes): the default, and the default without programmatic dependent launch, without the
page-index prefetch and without the early next launch, next to a streaming read of the same
bytes (what one kernel reading them can reach); with --sweep, splits x pipeline stages x
prefetch. 8 calls per CUDA-graph replay, each call on its own input set. Prints one line per
case. --variants times blocks dealt to the splits in runs against round-robin (each variant's
graph replays checked against the un-captured result) and a few deeper pipelines; --profile
prints each kernel's GPU time (CUPTI) and how long the merge ends after the split kernel.

Usage (GPU): python benchmarks/kernel_probe.py [--sweep | --variants | --profile]
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


# The variant runs of 2026-11-30 (docs/results/issue4/probe-variants-*.log) also had a scores-side
# scale and a merge polling arrival counters; both were dropped (BENCHMARKS section 4).
VARIANTS = {
    "default": {},
    "runs": {"strided": False},
    "round-robin": {"strided": True},
}


def variants() -> None:
    """Kernel variants at the small cases where the fixed cost shows (issue 4's 16K-26K gap)."""
    bw = hbm_read_bandwidth()["read"]
    print(f"HBM read {bw / 1e12:.2f} TB/s")
    cases = [("llama3-8b", 32, 8, 128, 16384, 1), ("llama3-8b", 32, 8, 128, 26240, 1),
             ("llama3-8b", 32, 8, 128, 52416, 1), ("llama3-8b", 32, 8, 128, 3264, 8),
             ("smollm2", 9, 3, 64, 26240, 1), ("smollm2", 9, 3, 64, 104832, 1),
             ("smollm2", 9, 3, 64, 13120, 8), ("llama3-8b", 32, 8, 128, 13120, 8),
             ("llama3-8b", 32, 8, 128, 3264, 64), ("smollm2", 9, 3, 64, 1664, 64)]
    for name, hq, hkv, d, tokens, batch in cases:
        q, lens, sets = make_sets(hq, hkv, d, tokens, batch)
        nbytes = batch * tokens * hkv * d * 4
        read = read_us(nbytes, q.device)
        cols = [f"{name} tokens={tokens} B={batch} read={read:.1f}us "
                f"({100 * nbytes / (read * 1e-6) / bw:.0f}% of peak)"]
        want = [K.lsa_decode(q, kv, t, lens, pdl=False) for kv, t in sets]
        for label, kw in VARIANTS.items():
            t = time_us(q, lens, sets, **kw)
            g = torch.cuda.CUDAGraph()
            outs = _calls(q, lens, sets, kw)()
            with torch.cuda.graph(g):
                outs = _calls(q, lens, sets, kw)()
            err = 0.0
            for _ in range(20):
                g.replay()
                torch.cuda.synchronize()
                err = max(err, max((o - w).abs().max().item() for o, w in zip(outs, want,
                                                                               strict=True)))
            if err > 1e-2:
                label += f" WRONG (max error {err:.3g})"
            cols.append(f"{label}={t:.1f}us ({100 * read / t:.0f}% of read)")
        for sp, st in ((16, 4), (24, 4), (48, 3)):
            if sp * batch * hkv > 4 * 132:
                continue
            t = time_us(q, lens, sets, num_splits=sp * (2 if d == 64 else 1), num_stages=st,
                        strided=True)
            cols.append(f"rr {sp * (2 if d == 64 else 1)}x{st}={t:.1f}")
        print(" | ".join(cols), flush=True)
        del sets
        torch.cuda.empty_cache()


def _calls(q, lens, sets, kw):
    return lambda: [K.lsa_decode(q, kv, t, lens, **kw) for kv, t in sets]


def profile() -> None:
    """Per-kernel GPU time (CUPTI) of one LSA call per graph replay, and the replay's time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    cases = [("llama3-8b", 32, 8, 128, 16384, 1), ("llama3-8b", 32, 8, 128, 26240, 1),
             ("smollm2", 9, 3, 64, 26240, 1)]
    for name, hq, hkv, d, tokens, batch in cases:
        q, lens, sets = make_sets(hq, hkv, d, tokens, batch)
        for label, kw in (("runs", {"strided": False}), ("round-robin", {"strided": True}),
                          ("runs no PDL", {"strided": False, "pdl": False}),
                          ("round-robin no PDL", {"strided": True, "pdl": False})):
            fn = _calls(q, lens, sets, kw)
            per_call = time_graph_ms(fn) * 1e3 / CALLS
            fn()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            for _ in range(3):
                g.replay()
            torch.cuda.synchronize()
            with prof(activities=[ProfilerActivity.CUDA]) as p:
                for _ in range(20):
                    g.replay()
                torch.cuda.synchronize()
            evs = sorted((e for e in p.events() if e.device_type.name == "CUDA"),
                         key=lambda e: e.time_range.start)
            dur: dict[str, list[float]] = {}
            for e in evs:
                dur.setdefault(e.name[:24], []).append(e.time_range.elapsed_us())
            starts = [e.time_range.start for e in evs]
            ends = [e.time_range.end for e in evs]
            gaps = [s2 - e1 for e1, s2 in zip(ends, starts[1:], strict=False)]
            gaps.sort()
            sp = [e for e in evs if "split" in e.name]
            mg = [e for e in evs if "merge" in e.name]
            tail = [m.time_range.end - x.time_range.end for x, m in zip(sp, mg, strict=False)]
            period = [b2.time_range.start - a.time_range.start
                      for a, b2 in itertools.pairwise(sp)]
            print(f"   merge end - split end {sum(tail) / len(tail):.2f}us, split start period "
                  f"{sorted(period)[len(period) // 2]:.2f}us")
            desc = ", ".join(f"{k}: {sum(v) / len(v):.1f}us x{len(v)}" for k, v in dur.items())
            print(f"{name} tokens={tokens} B={batch} {label}: per call {per_call:.1f}us | {desc}"
                  f" | median gap {gaps[len(gaps) // 2]:.2f}us", flush=True)
        del sets
        torch.cuda.empty_cache()


if __name__ == "__main__":
    import sys

    if "--profile" in sys.argv:
        profile()
    elif "--variants" in sys.argv:
        variants()
    else:
        main(sweep="--sweep" in sys.argv)
