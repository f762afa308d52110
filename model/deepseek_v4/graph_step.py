"""DeepSeek-V4 attention for a decode batch with fixed shapes, so a step can be captured in a
CUDA graph (issue 8, item 6). Called by ``flashmemory bench dsv4`` and its tests.

``attention.Attention`` serves one request and grows its stores as entries arrive: right for
prefill and the reference, but every step is dozens of small launches and host syncs.
``GraphAttention`` runs the same layer for B requests at once over preallocated per-request
buffers: the sliding ring (B, W, D), the compressed entries (B, N, D) with a count per request,
and for CSA layers their index keys (B, N, Di). A request's rows are whatever its cache holds:
every entry (full KV) or only the resident pages' entries (LSA), so the lightning indexer's
top-k runs over resident entries only, as in the one-request path. The step:

1. queries and the new token's K=V, as ``Attention`` (each norm + RoPE one launch,
   ``kernels.dsv4_fused``); the new K=V goes to its ring slot;
2. the compressors take the new token's projections into each row's open window; a row whose
   window closes appends the pooled entry (and, CSA, its index key) at its count, in the step,
   so the token attends to it as in ``Attention`` (rows that do not close compute it unused);
3. HCA: every entry below the count; CSA: the indexer's scores over the rows below the count
   (``kernels.dsv4_index``), top-k, the picked rows gathered;
4. one softmax over window, new token, entries and the sink, read in place per key block (no
   concatenated key copy), then the output projection.

Against ``Attention.forward`` on the same caches (tests/unit/test_deepseek_v4_graph_step.py) the
outputs and the emitted entries agree step after step, for full and LSA-resident caches and
ragged batches.
"""

from __future__ import annotations

import torch

from flashmemory.kernels.dsv4_fused import (
    NORM_NONE,
    NORM_UNWEIGHTED,
    NORM_WEIGHTED,
    norm_rope,
    pool_window,
)
from flashmemory.kernels.dsv4_index import index_scores
from flashmemory.model.deepseek_v4.attention import Attention
from flashmemory.model.deepseek_v4.cache import CompressorState, LayerCache
from flashmemory.model.deepseek_v4.compressor import Compressor
from flashmemory.model.deepseek_v4.config import CSA, SLIDING
from flashmemory.model.deepseek_v4.layers import Rotary


class _Pending:
    """A compressor's open window for each row: the raw kv / gate projections of its tokens
    (slot = position % ratio) and, for overlapping compressors, the previous window's first
    halves that the next entry pools with (gate with its position bias, as ``CompressorState``)."""

    def __init__(self, comp: Compressor, batch: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.comp, r, width, dim = comp, comp.ratio, comp.wkv.out_features, comp.dim
        self.kv = torch.zeros(batch, r, width, dtype=dtype, device=device)
        self.gate = torch.zeros(batch, r, width, dtype=dtype, device=device)
        self.prev_kv = self.prev_gate = None
        if comp.overlap:  # no previous window yet: zero kv, -inf gate (weight 0)
            self.prev_kv = torch.zeros(batch, r, dim, dtype=dtype, device=device)
            self.prev_gate = torch.full((batch, r, dim), float("-inf"), device=device)

    def load(self, row: int, state: CompressorState) -> None:
        p = state.kv.shape[0]  # pending tokens, slots 0..p-1 (windows start at multiples of r)
        self.kv[row, :p], self.gate[row, :p] = state.kv, state.gate
        if self.prev_kv is not None and self.prev_gate is not None:
            if state.prev_kv is None or state.prev_gate is None:
                self.prev_kv[row], self.prev_gate[row] = 0.0, float("-inf")
            else:
                self.prev_kv[row], self.prev_gate[row] = state.prev_kv, state.prev_gate

    def push(self, x: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
             rotary: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """Add each row's token; return the entry its window would close into (B, dim), for
        every row, and which rows did close one (B,) bool (the others' entries are unused)."""
        c, r = self.comp, self.comp.ratio
        slot = positions % r
        self.kv[rows, slot] = c.wkv(x)
        self.gate[rows, slot] = c.wgate(x)
        pooled = pool_window(self.kv, self.gate, c.ape, self.prev_kv, self.prev_gate, positions)
        cos, sin = rotary(positions + 1 - r, pooled.dtype)  # at the window's first token
        entry = norm_rope(pooled, NORM_WEIGHTED, c.norm.weight, c.norm.eps, cos, sin)
        return entry, (positions + 1) % r == 0


class GraphAttention:
    """One layer's attention for ``batch`` decode rows, entries padded to ``capacity`` (which
    must leave room for the entries decode adds: one per ``ratio`` steps)."""

    def __init__(self, attn: Attention, rotary: Rotary, batch: int, capacity: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.attn, self.kind, self.batch, self.rotary = attn, attn.kind, batch, rotary
        d, w = attn.head_dim, attn.window
        self.ring = torch.zeros(batch, w, d, dtype=dtype, device=device)
        self.ring_pos = torch.full((batch, w), -1, dtype=torch.long, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)
        self.entries = self.keys = None
        self.pending: list[_Pending] = []
        if self.kind != SLIDING:
            assert attn.compressor is not None
            self.entries = torch.zeros(batch, capacity, d, dtype=dtype, device=device)
            self.pending.append(_Pending(attn.compressor, batch, device, dtype))
            if self.kind == CSA:
                assert attn.indexer is not None
                di = attn.indexer.head_dim
                self.keys = torch.zeros(batch, capacity, di, dtype=dtype, device=device)
                self.pending.append(_Pending(attn.indexer.compressor, batch, device, dtype))

    def load(self, row: int, cache: LayerCache) -> None:
        """Copy one request's window and held entries (all, or the resident ones) into ``row``."""
        self.ring[row] = cache.window.kv
        self.ring_pos[row] = cache.window.pos
        if self.entries is None:
            return
        store = cache.entries
        assert store is not None
        n = store.valid_kv.shape[0]
        if n > self.entries.shape[1]:
            raise ValueError(f"request holds {n} entries; capacity is {self.entries.shape[1]}")
        self.entries[row, :n] = store.valid_kv
        if self.keys is not None:
            self.keys[row, :n] = store.valid_index_keys
        self.count[row] = n
        states = [cache.compressor, cache.index_compressor][:len(self.pending)]
        for pend, state in zip(self.pending, states, strict=True):
            assert state is not None
            pend.load(row, state)

    @torch.no_grad()
    def step(self, x: torch.Tensor, positions: torch.Tensor,
             rope: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """x (B, hidden) normalised attention input of each row's token at positions (B,);
        rope: "main" / "compress" cos, sin (B, R/2) at those positions -> (B, hidden)."""
        a, b = self.attn, x.shape[0]
        rows = torch.arange(b, device=x.device)
        cos, sin = rope[a.rope_kind]
        q_res = norm_rope(a.wq_a(x), NORM_WEIGHTED, a.q_norm.weight, a.q_norm.eps, None, None)
        q = norm_rope(a.wq_b(q_res).view(b, a.n_heads, a.head_dim), NORM_UNWEIGHTED, None,
                      a.eps, cos, sin)  # (B, H, D)
        kv = norm_rope(a.wkv(x), NORM_WEIGHTED, a.kv_norm.weight, a.kv_norm.eps, cos, sin)
        # window: ring slots inside (pos - W, pos], then the new token itself
        ok = (self.ring_pos >= 0) & (self.ring_pos > positions[:, None] - a.window)
        blocks = [(self.ring, ok), (kv[:, None, :], ok.new_ones(b, 1))]
        if self.entries is not None:
            self._compress(x, positions, rows)
            idx = torch.arange(self.entries.shape[1], device=x.device)
            if self.kind == CSA:
                blocks.append(self._picked(x, q_res, rope["compress"]))
            else:
                blocks.append((self.entries, idx[None, :] < self.count[:, None]))
        out = self._attend(q, blocks)
        self.ring[rows, positions % a.window] = kv  # after the read: the slot held pos - W
        self.ring_pos[rows, positions % a.window] = positions
        out = norm_rope(out, NORM_NONE, None, 0.0, cos, -sin)  # undo the rotation
        return a.wo_b(a.wo_a(out.reshape(b, a.groups, -1)).flatten(1))

    def _compress(self, x: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> None:
        """The compressors take each row's token; a row whose window closes appends its entry
        (and, CSA, its index key) at its count, visible to this step as in ``Attention``."""
        assert self.entries is not None
        closing = None
        targets = [self.entries] if self.keys is None else [self.entries, self.keys]
        slot = self.count.clamp(max=self.entries.shape[1] - 1)
        for pend, store in zip(self.pending, targets, strict=True):
            new, closing = pend.push(x, positions, rows, self.rotary)
            store[rows, slot] = torch.where(closing[:, None], new, store[rows, slot])
        assert closing is not None
        self.count += closing.long()

    def _picked(self, x: torch.Tensor, q_res: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The lightning indexer's top-k rows of each request: (B, k, D) and their validity."""
        ix = self.attn.indexer
        assert ix is not None and self.keys is not None and self.entries is not None
        b = x.shape[0]
        q = norm_rope(ix.wq_b(q_res).view(b, ix.n_heads, ix.head_dim), NORM_NONE, None, 0.0,
                      *rope)
        w = ix.weights_proj(x).float() * ix.n_heads**-0.5
        scores = index_scores(q, w, self.keys, self.count, ix.head_dim**-0.5)
        top, rows = scores.topk(min(ix.topk, scores.shape[1]), dim=1)
        d = self.entries.shape[2]
        picked = self.entries.gather(1, rows[..., None].expand(-1, -1, d))
        return picked, top > float("-inf")

    def _attend(self, q: torch.Tensor,
                blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Softmax over every key block (B, K_i, D) with mask (B, K_i) plus the sink; K = V."""
        scale = self.attn.head_dim**-0.5
        logits = [torch.bmm(q, k.transpose(1, 2)).float().mul_(scale)
                  .masked_fill_(~m[:, None, :], float("-inf")) for k, m in blocks]
        b, h = q.shape[:2]
        logits.append(self.attn.sink.float().view(1, h, 1).expand(b, h, 1))
        probs = torch.cat(logits, dim=-1).softmax(dim=-1).to(q.dtype)
        out, start = None, 0
        for k, _ in blocks:
            part = _weighted_sum(probs[..., start:start + k.shape[1]], k)
            out = part if out is None else out + part
            start += k.shape[1]
        assert out is not None
        return out


def _weighted_sum(p: torch.Tensor, k: torch.Tensor, piece: int = 512) -> torch.Tensor:
    """p (B, H, K) @ k (B, K, D). For a batch, a long K is cut into pieces of ``piece`` keys,
    one batched product each, summed in fp32: one (H, D) output per request is too few tiles to
    spread a long reduction over the GPU, and cuBLAS splits the reduction of a single product
    (B = 1) but not of a batched one. Measured on the H200 (BENCHMARKS 14b): an HCA layer at 1M
    tokens (8192 keys), batch 8, 504 -> 338 us; at batch 1 the pieces were 7 us slower."""
    b, h, n = p.shape
    s = n // piece
    if s < 2 or b == 1:
        return torch.bmm(p, k)
    m, d = s * piece, k.shape[2]
    pp = p[..., :m].reshape(b, h, s, piece).transpose(1, 2).reshape(b * s, h, piece)
    out = torch.bmm(pp, k[:, :m].reshape(b * s, piece, d)).view(b, s, h, d).float().sum(1)
    if m < n:
        out += torch.bmm(p[..., m:], k[:, m:]).float()
    return out.to(p.dtype)


def step_rope(rope_main: Rotary, rope_compress: Rotary, positions: torch.Tensor,
              dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The cos/sin tables a batch step needs, at each row's position."""
    return {"main": rope_main(positions, dtype), "compress": rope_compress(positions, dtype)}
