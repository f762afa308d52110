"""DeepSeek-V4 attention: shared-KV MQA over a sliding window plus compressed entries, with
per-head attention sinks and a grouped low-rank output projection. Called by ``model.Block``.

Every layer attends to the last ``sliding_window`` tokens. HCA layers add all their 128:1
compressed entries (dense); CSA layers add only the lightning indexer's top-k 4:1 entries per
query. Keys double as values (K = V, RoPE included); the output's RoPE channels are rotated back
to the query position before the output projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from flashmemory.model.deepseek_v4.cache import LayerCache
from flashmemory.model.deepseek_v4.compressor import Compressor, Indexer
from flashmemory.model.deepseek_v4.config import CSA, HCA, SLIDING, DeepseekV4Config
from flashmemory.model.deepseek_v4.layers import (
    GroupedLinear,
    RMSNorm,
    Rotary,
    apply_rope,
    rms_unweighted,
)


@dataclass
class IndexerTrace:
    """What the CSA layers' lightning indexers chose in one forward (for tests, LSA labels).

    ``topk[layer]`` (T, k) int64 global entry indices (-1: no pick); ``scores[layer]`` (T, E)
    fp32 masked scores by global entry index (non-visible / non-resident entries at -inf), kept
    if ``keep_scores``. Each forward overwrites the previous one's layers.
    """

    keep_scores: bool = False
    topk: dict[int, torch.Tensor] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class StepInputs:
    """Per-forward inputs shared by all layers (built once by the model)."""

    input_ids: torch.Tensor  # (T,) int64, for hash routing
    positions: torch.Tensor  # (T,) int64 global positions
    rope: dict[str, tuple[torch.Tensor, ...]]  # "main" / "compress": cos, sin (T, R/2)
    compress_rotary: Rotary  # RoPE for compressed entries at their own positions
    resident: dict[int, torch.Tensor]  # layer -> bool (n,) residency of CSA entries [0, n)
    trace: IndexerTrace | None = None


@dataclass
class _Keys:
    """Keys (= values) one query block attends to: shared ones and per-query gathered ones."""

    shared: list[torch.Tensor] = field(default_factory=list)  # each (K, D)
    shared_mask: list[torch.Tensor] = field(default_factory=list)  # each (T, K) bool
    picked: torch.Tensor | None = None  # (T, k, D) CSA entries chosen per query
    picked_mask: torch.Tensor | None = None  # (T, k) bool


class Attention(nn.Module):
    def __init__(self, cfg: DeepseekV4Config, layer: int) -> None:
        super().__init__()
        self.layer, self.kind = layer, cfg.layer_types[layer]
        self.rope_kind = "main" if self.kind == SLIDING else "compress"
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.window, self.eps, self.groups = cfg.sliding_window, cfg.rms_norm_eps, cfg.o_groups
        h, d = cfg.hidden_size, cfg.head_dim
        self.wq_a = nn.Linear(h, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * d, bias=False)
        self.wkv = nn.Linear(h, d, bias=False)
        self.kv_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.wo_a = GroupedLinear(self.n_heads * d // cfg.o_groups, cfg.o_lora_rank, cfg.o_groups)
        self.wo_b = nn.Linear(cfg.o_groups * cfg.o_lora_rank, h, bias=False)
        self.sink = nn.Parameter(torch.zeros(self.n_heads))  # per-head sink logit (fp32)
        self.compressor = None
        if self.kind != SLIDING:
            ratio = cfg.compress_rate(layer)
            self.compressor = Compressor(h, d, ratio, self.kind == CSA, cfg.rms_norm_eps)
        self.indexer = Indexer(cfg) if self.kind == CSA else None

    def forward(self, x: torch.Tensor, step: StepInputs, cache: LayerCache) -> torch.Tensor:
        """x (T, hidden) normalised block input of tokens at step.positions -> (T, hidden)."""
        t = x.shape[0]
        cos, sin = step.rope[self.rope_kind]
        # 1. queries (low rank, per-head RMSNorm) and the new tokens' shared K=V
        q_res = self.q_norm(self.wq_a(x))  # (T, q_lora_rank)
        q = self.wq_b(q_res).view(t, self.n_heads, self.head_dim)  # (T, H, D)
        q = apply_rope(rms_unweighted(q, self.eps), cos, sin)
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)  # (T, D)
        # 2. sliding window: cached tokens plus the new ones, masked by position
        keys = _Keys()
        self._window_keys(kv, step.positions, cache, keys)
        # 3. compressed entries: all of them (HCA) or the indexer's top-k (CSA)
        if self.kind == HCA:
            self._hca_keys(x, step, cache, keys)
        elif self.kind == CSA:
            self._csa_keys(x, q_res, step, cache, keys)
        # 4. softmax over window + entries + sink, then undo RoPE on the output channels
        out = self._attend(q, keys)  # (T, H, D)
        out = apply_rope(out, cos, -sin)
        grouped = self.wo_a(out.reshape(t, self.groups, -1))  # (T, G, o_lora_rank)
        return self.wo_b(grouped.flatten(1))

    def _window_keys(self, kv: torch.Tensor, positions: torch.Tensor, cache: LayerCache,
                     keys: _Keys) -> None:
        ring = cache.window
        k = torch.cat([ring.kv, kv])  # (W + T, D)
        kpos = torch.cat([ring.pos, positions])
        q = positions[:, None]
        mask = (kpos[None, :] >= 0) & (kpos[None, :] <= q) & (kpos[None, :] > q - self.window)
        keys.shared.append(k)
        keys.shared_mask.append(mask)
        ring.write(kv, positions)

    def _hca_keys(self, x: torch.Tensor, step: StepInputs, cache: LayerCache,
                  keys: _Keys) -> None:
        assert self.compressor is not None and cache.entries is not None
        assert cache.compressor is not None
        new, pos = self.compressor(x, cache.compressor, step.compress_rotary)
        cache.entries.append(new, pos)
        entries = cache.entries.valid_kv  # (E, D)
        if entries.shape[0] == 0:
            return
        idx = torch.arange(entries.shape[0], device=x.device)
        limit = (step.positions + 1) // self.compressor.ratio  # entry s closed once t+1 >= (s+1)r
        keys.shared.append(entries)
        keys.shared_mask.append(idx[None, :] < limit[:, None])

    def _csa_keys(self, x: torch.Tensor, q_res: torch.Tensor, step: StepInputs,
                  cache: LayerCache, keys: _Keys) -> None:
        assert self.compressor is not None and self.indexer is not None
        assert cache.entries is not None and cache.compressor is not None
        assert cache.index_compressor is not None
        rotary = step.compress_rotary
        new, pos = self.compressor(x, cache.compressor, rotary)
        new_keys, _ = self.indexer.compressor(x, cache.index_compressor, rotary)
        cache.entries.append(new, pos, new_keys)
        if cache.entries.count == 0:
            return
        entries = cache.entries
        ids = entries.valid_ids  # (R,) global index of each held row (all entries unless LSA)
        scores = self.indexer.scores(x, q_res, step.rope["compress"], entries.valid_index_keys)
        rows, valid, masked = self.indexer.select(scores, step.positions,
                                                  step.resident.get(self.layer), ids)
        if step.trace is not None:
            step.trace.topk[self.layer] = torch.where(valid, ids[rows.clamp(min=0)], -1)
            if step.trace.keep_scores:  # (T, total) by global index, -inf where not held
                full = masked.new_full((masked.shape[0], entries.total), float("-inf"))
                step.trace.scores[self.layer] = full.index_copy_(1, ids, masked)
        keys.picked = entries.valid_kv[rows.clamp(min=0)]  # (T, k, D)
        keys.picked_mask = valid

    def _attend(self, q: torch.Tensor, keys: _Keys) -> torch.Tensor:
        """q (T, H, D) -> (T, H, D): one softmax over every key block plus the sink logit."""
        scale = self.head_dim**-0.5
        shared = torch.cat(keys.shared)  # (K, D)
        mask = torch.cat(keys.shared_mask, dim=1)  # (T, K)
        logits = [_masked(torch.einsum("thd,kd->thk", q, shared) * scale, mask)]
        if keys.picked is not None:
            assert keys.picked_mask is not None
            picked = torch.einsum("thd,tkd->thk", q, keys.picked) * scale  # (T, H, k)
            logits.append(_masked(picked, keys.picked_mask))
        t = q.shape[0]
        logits.append(self.sink.float().view(1, -1, 1).expand(t, -1, 1))
        probs = torch.cat([lg.float() for lg in logits], dim=-1).softmax(dim=-1).to(q.dtype)
        n_shared = shared.shape[0]
        out = torch.einsum("thk,kd->thd", probs[..., :n_shared], shared)
        if keys.picked is not None:
            n_picked = keys.picked.shape[1]
            p = probs[..., n_shared:n_shared + n_picked]
            out = out + torch.einsum("thk,tkd->thd", p, keys.picked)
        return out


def _masked(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Set logits (T, H, K) to -inf where mask (T, K) is False."""
    return logits.masked_fill(~mask[:, None, :], float("-inf"))

