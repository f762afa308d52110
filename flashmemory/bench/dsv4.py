"""``flashmemory bench dsv4``: DeepSeek-V4-Flash decode attention per layer type, full CSA KV vs
LSA-resident CSA pages, batched and replayed from CUDA graphs (issue 8, item 6).

Layers: DS-V4-Flash attention shapes (hidden 4096, 64 heads x 512, one shared K=V head, indexer
64 x 128 top-512, window 128, q/o rank 1024, 8 output groups, CSA 4:1, HCA 128:1) with random
bf16 weights, ``layers`` of each type (sliding, CSA, HCA), each with its own weights and KV.
Each request's state is random at its global positions (no prefill): a full window ring, n // 128
HCA entries, and for CSA either every one of the n // 4 entries (full) or the entries of its
resident pages (LSA at the paper's settings: the sink page, the last ``recent_tokens`` of pages,
and KMAX = ceil(``budget`` x closed pages) others, random here since no checkpoint's scores
exist). A step is ``model.deepseek_v4.graph_step.GraphAttention.step`` for every layer of a type
captured in one CUDA graph (queries, the new token's K=V, the compressors' pooling of the open
window, the lightning indexer over the held entries, top-k, the softmax over window + entries +
sink, the output projection), L2 flushed before each replay. Per token at V4-Flash depth:
2 sliding + 21 CSA + 20 HCA layers x these times. Not in it: the MoE/FFN and mHC of each block
(the same for full and LSA), the embedding and the head.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from flashmemory.model.deepseek_v4.cache import CSA_PAGE_ENTRIES
from flashmemory.model.deepseek_v4.config import CSA, HCA, SLIDING, DeepseekV4Config

DEPTH = {SLIDING: 2, CSA: 21, HCA: 20}  # V4-Flash's 43 layers (DESIGN.md: 21 CSA; rest assumed)


def flash_config(kinds: list[str], experts: int = 4, moe_inter: int = 256,
                 vocab: int = 1024, **shape: int) -> DeepseekV4Config:
    """A DS-V4-Flash-shaped config with the given layer types (MoE cut small: not measured).
    ``shape`` overrides hidden / heads / head_dim / index_heads / index_dim / topk / window /
    q_lora / o_lora / o_groups."""
    s = {"hidden": 4096, "heads": 64, "head_dim": 512, "index_heads": 64, "index_dim": 128,
         "topk": 512, "window": 128, "q_lora": 1024, "o_lora": 1024, "o_groups": 8, **shape}
    n = len(kinds)
    return DeepseekV4Config(
        vocab_size=vocab, hidden_size=s["hidden"], num_hidden_layers=n,
        num_attention_heads=s["heads"], head_dim=s["head_dim"], q_lora_rank=s["q_lora"],
        o_groups=s["o_groups"], o_lora_rank=s["o_lora"],
        qk_rope_head_dim=max(2, s["head_dim"] * 64 // 512),  # V4: 64 RoPE channels of 512
        sliding_window=s["window"], layer_types=tuple(kinds), mlp_layer_types=("moe",) * n,
        index_n_heads=s["index_heads"], index_head_dim=s["index_dim"], index_topk=s["topk"],
        n_routed_experts=experts, num_experts_per_tok=min(2, experts),
        moe_intermediate_size=moe_inter)


def random_model(cfg: DeepseekV4Config, device: torch.device, seed: int = 0):
    """A DeepseekV4ForCausalLM of ``cfg`` with N(0, 0.02) matrices, in bf16 (norms, mHC, sinks
    kept fp32 as the loader does)."""
    from flashmemory.model.deepseek_v4.model import DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = DeepseekV4ForCausalLM(cfg)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
    return model.cast(torch.bfloat16).eval()


def lsa_page_ids(num_entries: int, budget: float, recent_tokens: int, ratio: int = 4,
                 seed: int = 0) -> list[int]:
    """Resident CSA pages at the paper's settings: the sink page, the recency tail, the open
    partial page, and KMAX = ceil(budget x closed pages) of the others (random)."""
    closed = num_entries // CSA_PAGE_ENTRIES
    total = -(-num_entries // CSA_PAGE_ENTRIES)
    tail = recent_tokens // (CSA_PAGE_ENTRIES * ratio)
    fixed = {0} | set(range(max(0, closed - tail), total))
    others = [p for p in range(closed) if p not in fixed]
    kmax = min(len(others), math.ceil(budget * closed))
    gen = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(others), generator=gen)[:kmax].tolist()
    return sorted(fixed | {others[i] for i in picked})


def per_token_bytes(cfg: DeepseekV4Config, elt: int = 2) -> dict[str, float]:
    """Bytes one context token costs per layer of each type (bf16), and the window's fixed size."""
    return {"window_per_windowed_token": cfg.head_dim * elt,
            "window_fixed_per_layer": cfg.sliding_window * cfg.head_dim * elt,
            "csa_per_token": (cfg.head_dim + cfg.index_head_dim) * elt / cfg.csa_compress_rate,
            "hca_per_token": cfg.head_dim * elt / cfg.hca_compress_rate}


def bytes_table(cfg: DeepseekV4Config) -> str:
    """KV bytes per context token per layer type, as a Markdown table."""
    b = per_token_bytes(cfg)
    return "\n".join([
        "| layer type | bytes / token | note |", "|---|---:|---|",
        f"| window | {b['window_per_windowed_token']:.0f} | last {cfg.sliding_window} tokens "
        f"only: {b['window_fixed_per_layer'] / 1024:.0f} KiB fixed per layer |",
        f"| CSA | {b['csa_per_token']:.0f} | ({cfg.head_dim} entry + {cfg.index_head_dim} "
        f"index key) x 2 B / {cfg.csa_compress_rate} |",
        f"| HCA | {b['hca_per_token']:.0f} | {cfg.head_dim} x 2 B / {cfg.hca_compress_rate} |"])


def entries_in(pages: list[int], num_entries: int) -> int:
    return sum(min(CSA_PAGE_ENTRIES, num_entries - p * CSA_PAGE_ENTRIES) for p in pages)


def kv_per_request(cfg: DeepseekV4Config, csa_entries: int, n: int) -> float:
    """Bytes of KV one request keeps on the decode GPU at V4-Flash depth (``DEPTH``), bf16:
    ``csa_entries`` CSA entries (with index keys) per CSA layer, n // 128 entries per HCA layer,
    a full window in every layer."""
    b = per_token_bytes(cfg)
    return (DEPTH[CSA] * csa_entries * b["csa_per_token"] * cfg.csa_compress_rate
            + DEPTH[HCA] * (n // cfg.hca_compress_rate) * b["hca_per_token"]
            * cfg.hca_compress_rate + sum(DEPTH.values()) * b["window_fixed_per_layer"])


def _fill(g: Any, n: int, count: int) -> None:
    """Random request state after n tokens in every row: full ring, ``count`` entries."""
    w = g.ring.shape[1]
    pos = torch.arange(n - w, n, device=g.ring.device)
    g.ring.normal_()
    g.ring_pos[:, pos % w] = pos
    if g.entries is not None:
        g.entries[:, :count].normal_()
        if g.keys is not None:
            g.keys[:, :count].normal_()
        g.count.fill_(count)


def run_case(model, n: int, mode: str, batch: int, args: Any) -> dict[str, Any]:
    from flashmemory.bench.common import time_graph_ms
    from flashmemory.model.deepseek_v4.graph_step import GraphAttention, step_rope

    cfg, dev = model.config, model.embed.weight.device
    csa_entries, hca_entries = n // cfg.csa_compress_rate, n // cfg.hca_compress_rate
    pages = lsa_page_ids(csa_entries, args.budget, args.recent_tokens, cfg.csa_compress_rate,
                         args.seed + n)
    held = csa_entries if mode == "full" else entries_in(pages, csa_entries)
    positions = torch.full((batch,), n, device=dev)  # the token after an n-token prompt
    if (n + 1) % cfg.csa_compress_rate == 0:
        positions += 1  # replays keep one count (the pooling runs in every step either way)
    rope = step_rope(model.rope_main, model.rope_compress, positions, model.dtype)
    x = torch.randn(batch, cfg.hidden_size, device=dev, dtype=model.dtype)
    row: dict[str, Any] = {"context": n, "mode": mode, "batch": batch,
                           "csa_entries": csa_entries, "resident_csa_entries": held,
                           "resident_pct": 100 * held / max(1, csa_entries)}
    total = 0.0
    for kind in (SLIDING, CSA, HCA):
        layers = []
        for i, block in enumerate(model.layers):
            if cfg.layer_types[i] != kind:
                continue
            cap = {SLIDING: 1, CSA: held, HCA: hca_entries}[kind]
            g = GraphAttention(block.attn, model.rope_compress, batch, cap + 64, dev,
                               model.dtype)
            _fill(g, n, cap)
            layers.append(g)
        us = time_graph_ms(lambda layers=layers: [g.step(x, positions, rope) for g in layers])
        us = us * 1e3 / len(layers)
        row[{SLIDING: "sliding_us", CSA: "csa_us", HCA: "hca_us"}[kind]] = us
        total += DEPTH[kind] * us
        del layers
    row["attn_ms_per_step"] = total / 1e3
    row["attn_tokens_per_s"] = batch / (total / 1e6)
    row["kv_gb_per_request"] = kv_per_request(cfg, held, n) / 1e9
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run(contexts: list[int], batches: list[int], modes: list[str], args: Any,
        argv: list[str]) -> list[dict[str, Any]]:
    from flashmemory.bench.common import command

    kinds = [SLIDING] * args.layers + [CSA] * args.layers + [HCA] * args.layers
    cfg = flash_config(kinds)
    model = random_model(cfg, torch.device("cuda"), args.seed)
    print("KV bytes per context token per layer type (bf16; DESIGN.md: CSA stores a 512-d entry "
          "and a 128-d index key per 4 tokens, HCA one entry per 128 tokens, every layer a "
          "128-token window):\n")
    print(bytes_table(cfg) + "\n")
    rows = []
    for n in contexts:
        for batch in batches:
            full_us = None
            for mode in modes:
                r = run_case(model, n, mode, batch, args)
                if mode == "full":
                    full_us = r["attn_ms_per_step"]
                elif full_us is not None:
                    r["x_vs_full"] = full_us / r["attn_ms_per_step"]
                r["command"] = command(["bench", "dsv4", "--contexts", str(n), "--batches",
                                        str(batch), "--modes", mode, "--layers",
                                        str(args.layers)])
                print(f"{n} {mode} B={batch}: CSA {r['csa_us']:.1f} us, HCA "
                      f"{r['hca_us']:.1f} us, sliding {r['sliding_us']:.1f} us per layer",
                      flush=True)
                rows.append(r)
    return rows


COLUMNS = ["context", "mode", "batch", "resident_csa_entries", "resident_pct", "sliding_us",
           "csa_us", "hca_us", "attn_ms_per_step", "x_vs_full", "attn_tokens_per_s",
           "kv_gb_per_request", "command"]
