"""Token compression and the lightning indexer of DeepSeek-V4 (CSA and HCA layers).

``Compressor`` turns every ``ratio`` tokens into one entry (HCA: 128:1, non-overlapping; CSA and
the indexer's keys: 4:1, overlapping windows of 2 * ratio tokens). ``Indexer`` scores a query
against all CSA entries' keys and keeps the top-k among the causally visible, resident ones.
Both are called by ``attention.Attention``; their state lives in ``cache.LayerCache``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flashmemory.model.deepseek_v4.cache import CompressorState
from flashmemory.model.deepseek_v4.config import DeepseekV4Config
from flashmemory.model.deepseek_v4.layers import RMSNorm, Rotary, apply_rope


class Compressor(nn.Module):
    """Pools each closed window of ``ratio`` tokens into one ``dim``-wide entry.

    entry = RMSNorm(sum_j softmax_j(gate_j + ape_j) * kv_j) (softmax per channel, over the
    window's tokens), then RoPE at the position of the window's first token. Overlapping
    compressors project 2 * dim per token: the first half feeds the *next* window's entry, the
    second half the token's own window's, so each entry sees 2 * ratio tokens with stride ratio.
    """

    def __init__(self, hidden: int, dim: int, ratio: int, overlap: bool, eps: float) -> None:
        super().__init__()
        width = 2 * dim if overlap else dim
        self.dim, self.ratio, self.overlap = dim, ratio, overlap
        self.wkv = nn.Linear(hidden, width, bias=False)
        self.wgate = nn.Linear(hidden, width, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, width))  # learned per-slot gate bias (fp32)
        self.norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, state: CompressorState,
                rotary: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """Add tokens x (T, hidden) to the pending ones; return the entries (n, dim) of the windows
        this closes and their positions (n,). Leftover tokens stay pending in ``state``."""
        kv = torch.cat([state.kv, self.wkv(x)])  # (p + T, width)
        gate = torch.cat([state.gate, self.wgate(x)])
        n = kv.shape[0] // self.ratio
        used = n * self.ratio
        state.kv, state.gate = kv[used:], gate[used:]
        positions = (state.emitted + torch.arange(n, device=x.device)) * self.ratio
        if n == 0:
            return kv.new_zeros(0, self.dim), positions
        kv = kv[:used].view(n, self.ratio, -1)  # (n, r, width)
        gate = gate[:used].view(n, self.ratio, -1) + self.ape  # fp32 after the bias
        if self.overlap:
            kv, gate = self._overlap(kv, gate, state)  # (n, 2r, dim)
        weights = gate.softmax(dim=1, dtype=torch.float32).to(kv.dtype)
        pooled = self.norm((kv * weights).sum(dim=1))  # (n, dim)
        state.emitted += n
        cos, sin = rotary(positions, pooled.dtype)
        return apply_rope(pooled, cos, sin), positions

    def _overlap(self, kv: torch.Tensor, gate: torch.Tensor,
                 state: CompressorState) -> tuple[torch.Tensor, torch.Tensor]:
        """Lay out entry w's 2r slots: window w-1's first halves, then window w's second halves.

        Before the very first window there is nothing: zero kv with -inf gate (weight 0).
        """
        n, r, d = kv.shape[0], self.ratio, self.dim
        prev_kv = kv.new_zeros(n, r, d)
        prev_gate = gate.new_full((n, r, d), float("-inf"))
        prev_kv[1:], prev_gate[1:] = kv[:-1, :, :d], gate[:-1, :, :d]
        if state.prev_kv is not None:
            prev_kv[0], prev_gate[0] = state.prev_kv, state.prev_gate
        state.prev_kv, state.prev_gate = kv[-1, :, :d].clone(), gate[-1, :, :d].clone()
        kv = torch.cat([prev_kv, kv[..., d:]], dim=1)
        return kv, torch.cat([prev_gate, gate[..., d:]], dim=1)


class Indexer(nn.Module):
    """Lightning indexer: score(t, s) = sum_h w_{t,h} * relu(q_{t,h} . k_s), top-k per query.

    Queries come from the attention's low-rank query residual; keys are this indexer's own
    overlapping compression of the same windows as the CSA entries (so key s belongs to entry s).
    """

    def __init__(self, cfg: DeepseekV4Config) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.topk, self.ratio = cfg.index_topk, cfg.csa_compress_rate
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.compressor = Compressor(cfg.hidden_size, self.head_dim, self.ratio, True,
                                     cfg.rms_norm_eps)

    def scores(self, x: torch.Tensor, q_res: torch.Tensor, rope: tuple[torch.Tensor, ...],
               keys: torch.Tensor) -> torch.Tensor:
        """x (T, hidden), q_res (T, q_lora_rank), rope = cos/sin at the queries' positions,
        keys (E, Di) -> scores (T, E) fp32 (no masking)."""
        t = x.shape[0]
        q = self.wq_b(q_res).view(t, self.n_heads, self.head_dim)  # (T, Hi, Di)
        q = apply_rope(q, *rope)
        per_head = F.relu(torch.einsum("thd,ed->the", q.float(), keys.float()))  # (T, Hi, E)
        per_head = per_head * self.head_dim**-0.5
        weights = self.weights_proj(x).float() * self.n_heads**-0.5  # (T, Hi)
        return (per_head * weights[..., None]).sum(dim=1)

    def select(self, scores: torch.Tensor, positions: torch.Tensor, resident: torch.Tensor | None,
               ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Top-k entries per query among the visible ones.

        scores (T, R) are over the rows of an entry store whose global entry indices are ``ids``
        (R,) int64, sorted (None: row r is entry r, the full store). Returns row indices (T, k),
        valid (T, k) and the scores with what could not be picked at -inf.

        Query t sees entry s once s's window is closed: s < (t + 1) // ratio. ``resident``
        (bool (n,), by global index) drops entries s < n that are not resident; entries past n
        (emitted after the mask was made) count as resident. When fewer than k entries are
        visible the tail picks are invalid (row -1). Ties go to the lower index (stable sort over
        rows sorted by global index), so a prefill and the same tokens decoded one by one agree,
        and a store holding a subset picks as the full store would among that subset.
        """
        num = scores.shape[1]
        if ids is None:
            ids = torch.arange(num, device=scores.device)
        visible = ids[None, :] < ((positions + 1) // self.ratio)[:, None]  # (T, R)
        if resident is not None:
            resident = resident.to(scores.device)
            inside = ids < resident.shape[0]
            keep = torch.ones(num, dtype=torch.bool, device=scores.device)
            keep[inside] = resident[ids[inside]]
            visible = visible & keep[None, :]
        k = min(self.topk, num)
        masked = scores.masked_fill(~visible, float("-inf"))
        order = masked.sort(dim=-1, descending=True, stable=True).indices[:, :k]  # (T, k)
        valid = visible.gather(1, order)
        return torch.where(valid, order, torch.full_like(order, -1)), valid, masked
