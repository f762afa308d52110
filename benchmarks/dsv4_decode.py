"""DeepSeek-V4 decode step at long context, full CSA KV vs LSA-resident CSA pages (issue 8 item 6).

Usage (one H200): python benchmarks/dsv4_decode.py --device cuda --contexts 128k,512k,1024k \
    --layers 2 --json out.json

Model: DS-V4-Flash attention shapes (hidden 4096, 64 heads x 512, one shared KV head, indexer
64 x 128, top-512, window 128, CSA 4:1, HCA 128:1, q/o low rank 1024, 8 output groups) with
random bf16 weights, reduced depth (``--layers`` CSA + HCA pairs) and a tiny MoE (not measured).
Context: a ``DSV4Cache`` filled synthetically for N tokens (no prefill): random CSA entries and
index keys at their global positions, HCA entries, a full sliding ring, compressor buffers
consistent with N. Two settings per context: full (every CSA entry resident) and LSA (sink page
+ recency tail + ceil(budget x closed pages) random other pages, moved through ``PageStore`` /
``open_resident`` / ``fetch_pages``). Each timed step decodes one token with the real
``DeepseekV4ForCausalLM.forward`` (torch-only path) and appends it to the cache (so the context
grows by warm-up + steps tokens during a run). Step time: median over ``--steps``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import flashmemory  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashmemory.bench.dsv4 import (
    bytes_table,
    flash_config,
    lsa_page_ids,
    per_token_bytes,
    random_model,
)
from flashmemory.model.deepseek_v4.cache import (
    CSA_PAGE_ENTRIES,
    CompressorState,
    DSV4Cache,
)
from flashmemory.model.deepseek_v4.config import CSA, HCA, SLIDING, DeepseekV4Config
from flashmemory.model.deepseek_v4.model import DeepseekV4ForCausalLM
from flashmemory.model.deepseek_v4.pages import PageStore, fetch_pages, open_resident

SLACK_ENTRIES = 1024  # spare rows in the full stores so decode appends never regrow them


def parse_context(text: str) -> int:
    text = text.strip().lower()
    if text.endswith("m"):
        return int(float(text[:-1]) * 1024 * 1024)
    if text.endswith("k"):
        return int(float(text[:-1]) * 1024)
    return int(text)


def build_config(args: argparse.Namespace) -> DeepseekV4Config:
    return flash_config(
        [CSA, HCA] * args.layers, experts=args.experts, moe_inter=args.moe_inter,
        vocab=args.vocab, hidden=args.hidden, heads=args.heads, head_dim=args.head_dim,
        index_heads=args.index_heads, index_dim=args.index_dim, topk=args.topk,
        window=args.window, q_lora=args.q_lora, o_lora=args.o_lora, o_groups=args.o_groups)


def _pending(width: int, p: int, emitted: int, ratio: int, overlap: bool,
             dtype: torch.dtype, device: torch.device) -> CompressorState:
    """A compressor state after n tokens: p = n % ratio pending raw projections, ``emitted``
    entries closed, and (overlapping compressors) the last closed window's first halves."""
    state = CompressorState(torch.randn(p, width, dtype=dtype, device=device),
                            torch.randn(p, width, dtype=dtype, device=device), emitted)
    if overlap and emitted:
        half = width // 2
        state.prev_kv = torch.randn(ratio, half, dtype=dtype, device=device)
        state.prev_gate = torch.randn(ratio, half, dtype=torch.float32, device=device)  # + ape
    return state


def synthetic_cache(model: DeepseekV4ForCausalLM, n: int) -> DSV4Cache:
    """A cache as if n tokens had been prefilled, with random contents (no forward run)."""
    cfg, cache = model.config, model.new_cache()
    dtype, device = model.dtype, model.embed.weight.device
    d, w = cfg.head_dim, cfg.sliding_window
    pos = torch.arange(max(0, n - w), n, device=device)
    for i, layer in enumerate(cache.layers):
        layer.window.kv[pos % w] = torch.randn(pos.numel(), d, dtype=dtype, device=device)
        layer.window.pos[pos % w] = pos
        if layer.kind == SLIDING:
            continue
        ratio = cfg.compress_rate(i)
        m, cap = n // ratio, n // ratio + SLACK_ENTRIES
        store = layer.entries
        assert store is not None
        store.kv = torch.zeros(cap, d, dtype=dtype, device=device)
        store.kv[:m] = torch.randn(m, d, dtype=dtype, device=device)
        store.positions = torch.zeros(cap, dtype=torch.long, device=device)
        store.positions[:m] = torch.arange(m, device=device) * ratio
        if layer.kind == CSA:
            di = cfg.index_head_dim
            store.index_keys = torch.zeros(cap, di, dtype=dtype, device=device)
            store.index_keys[:m] = torch.randn(m, di, dtype=dtype, device=device)
            layer.index_compressor = _pending(2 * di, n % ratio, m, ratio, True, dtype, device)
        store.count = m
        overlap = layer.kind == CSA
        layer.compressor = _pending(2 * d if overlap else d, n % ratio, m, ratio, overlap,
                                    dtype, device)
    cache.length = n
    return cache


def kv_bytes(cache: DSV4Cache) -> dict[str, int]:
    """KV bytes held on the decode device by layer type (valid rows only; compressor buffers,
    a few KiB, left out)."""
    out = {"window": 0, "csa": 0, "hca": 0}
    for layer in cache.layers:
        ring = layer.window.kv
        out["window"] += ring.numel() * ring.element_size()
        e = layer.entries
        if e is None:
            continue
        b = e.count * e.kv.shape[1] * e.kv.element_size()
        if e.index_keys is not None:
            b += e.count * e.index_keys.shape[1] * e.index_keys.element_size()
        out["csa" if layer.kind == CSA else "hca"] += b
    return out


def time_steps(model: DeepseekV4ForCausalLM, cache: DSV4Cache, warmup: int, steps: int,
               device: torch.device) -> list[float]:
    """Decode warmup + steps single tokens (appending); ms per timed step."""
    vocab, times = model.config.vocab_size, []
    for i in range(warmup + steps):
        ids = torch.randint(vocab, (1,), device=device)
        positions = torch.tensor([cache.length], device=device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(ids, positions, cache)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            model(ids, positions, cache)
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    return times


def full_depth_gb(bpt: dict[str, float], csa_tokens: float, n: int,
                  args: argparse.Namespace) -> float:
    """KV per request (GB, 1e9) at V4-Flash depth: est_csa CSA layers holding csa_tokens tokens'
    entries, est_hca HCA layers holding n tokens', a window in every layer."""
    layers = args.est_sliding + args.est_csa + args.est_hca
    b = (args.est_csa * bpt["csa_per_token"] * csa_tokens + args.est_hca * bpt["hca_per_token"] * n
         + layers * bpt["window_fixed_per_layer"])
    return b / 1e9


def run_context(model: DeepseekV4ForCausalLM, n: int, args: argparse.Namespace,
                device: torch.device) -> list[dict]:
    cfg = model.config
    full = synthetic_cache(model, n)
    csa_layers = [i for i, k in enumerate(cfg.layer_types) if k == CSA]
    num_entries = full.num_entries(csa_layers[0])
    pages = lsa_page_ids(num_entries, args.budget, args.recent_tokens, cfg.csa_compress_rate,
                         args.seed + n)
    store = PageStore(cfg, model.dtype)
    store.add("r", full)
    resident = open_resident(full)
    fetch_pages(resident, store.read("r", pages))
    store.free("r")
    bpt = per_token_bytes(cfg)
    rows = []
    for mode, cache in (("full", full), ("lsa", resident)):
        res_entries = cache.num_resident(csa_layers[0])
        kv = kv_bytes(cache)
        times = time_steps(model, cache, args.warmup, args.steps, device)
        rows.append({
            "context": n, "mode": mode, "csa_entries": num_entries,
            "resident_csa_entries": res_entries,
            "resident_pages": len(pages) if mode == "lsa" else -(-num_entries // CSA_PAGE_ENTRIES),
            "kv_bytes": kv, "kv_bytes_total": sum(kv.values()),
            "step_ms": statistics.median(times), "step_ms_all": times,
            "full_depth_kv_gb": full_depth_gb(bpt, res_entries * cfg.csa_compress_rate, n, args)})
        del cache
    del full, resident
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows[1]["speedup"] = rows[0]["step_ms"] / rows[1]["step_ms"]
    return rows


def fmt_ctx(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def mib(b: int) -> str:
    return f"{b / 2**20:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--contexts", default="128k,512k,1024k")
    ap.add_argument("--layers", type=int, default=1, help="CSA + HCA layer pairs")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=0)
    # LSA residency (the paper's settings)
    ap.add_argument("--budget", type=float, default=0.1, help="KMAX as a fraction of pages")
    ap.add_argument("--recent-tokens", type=int, default=8192, help="recency tail (tokens)")
    # shapes (defaults: DS-V4-Flash; transformers' DeepseekV4Config defaults for q/o low rank)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=512)
    ap.add_argument("--index-heads", type=int, default=64)
    ap.add_argument("--index-dim", type=int, default=128)
    ap.add_argument("--topk", type=int, default=512)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--q-lora", type=int, default=1024)
    ap.add_argument("--o-lora", type=int, default=1024)
    ap.add_argument("--o-groups", type=int, default=8)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--moe-inter", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=1024)
    # full-depth KV estimate (V4-Flash: 43 layers = 2 sliding-only + 21 CSA + 20 HCA)
    ap.add_argument("--est-sliding", type=int, default=2)
    ap.add_argument("--est-csa", type=int, default=21)
    ap.add_argument("--est-hca", type=int, default=20)
    args = ap.parse_args()

    device = torch.device(args.device)
    print("command: python " + shlex.join(sys.argv))
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {dev_name}, bf16, random weights, torch-only path")
    cfg = build_config(args)
    model = random_model(cfg, device, args.seed)
    nparam = sum(p.numel() for p in model.parameters())
    print(f"model: {cfg.num_hidden_layers} layers {list(cfg.layer_types)}, hidden "
          f"{cfg.hidden_size}, {cfg.num_attention_heads} heads x {cfg.head_dim}, indexer "
          f"{cfg.index_n_heads} x {cfg.index_head_dim} top-{cfg.index_topk}, window "
          f"{cfg.sliding_window}, q/o rank {cfg.q_lora_rank}/{cfg.o_lora_rank}, "
          f"{nparam / 1e6:.1f}M params")
    print(f"LSA: sink page + last {args.recent_tokens // (CSA_PAGE_ENTRIES * 4)} pages + "
          f"ceil({args.budget} x closed pages) random others; page = {CSA_PAGE_ENTRIES} entries "
          f"= {CSA_PAGE_ENTRIES * cfg.csa_compress_rate} tokens")
    print(f"step: median of {args.steps} decode steps after {args.warmup} warm-up "
          f"({'CUDA events' if device.type == 'cuda' else 'wall clock'}); each step appends\n")

    rows = []
    for ctx in args.contexts.split(","):
        rows += run_context(model, parse_context(ctx), args, device)

    print("| context | mode | resident CSA entries / layer | pages | KV CSA (MiB) | KV HCA (MiB) "
          "| KV window (MiB) | KV total (MiB) | step (ms) | speed-up | KV/req at 43 layers (GB) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        kv = r["kv_bytes"]
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "—"
        print(f"| {fmt_ctx(r['context'])} | {r['mode']} | {r['resident_csa_entries']} / "
              f"{r['csa_entries']} | {r['resident_pages']} | {mib(kv['csa'])} | {mib(kv['hca'])} "
              f"| {mib(kv['window'])} | {mib(r['kv_bytes_total'])} | {r['step_ms']:.2f} | {sp} "
              f"| {r['full_depth_kv_gb']:.3f} |")

    bpt = per_token_bytes(cfg)
    print(f"\nKV bytes per context token per layer (bf16, {args.layers} CSA + {args.layers} HCA "
          f"layer(s) measured above; the 43-layer column assumes {args.est_sliding} sliding + "
          f"{args.est_csa} CSA + {args.est_hca} HCA):\n")
    print(bytes_table(cfg))

    if args.json:
        meta = {"command": "python " + shlex.join(sys.argv), "torch": torch.__version__,
                "device": dev_name, "config": {k: v for k, v in vars(args).items()},
                "bytes_per_token": bpt}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
