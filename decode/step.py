"""One LSA decode step for a batch: each request attends only to its resident chunks.

Torch path: per layer, the resident pages of each request are gathered and attended with SDPA
(the Triton kernel of ``kernels/`` reads them in place instead). Called by the engine's loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flashmemory.decode.chunk_pool import ChunkPool
from flashmemory.indexer.backbone import QueryTap, bound_scores, chunk_bounds
from flashmemory.model.llama import CausalLM


@dataclass(frozen=True)
class DecodeSlot:
    """Where one request's new token goes and what it may attend to, fixed for one step."""

    request_id: str
    page: int  # page receiving the new token's K/V
    slot: int  # position inside that page
    pages: list[int]  # resident pages in chunk order; the last one is ``page``
    chunks: list[int]  # chunk index of each page
    num_valid: int  # valid tokens in the gathered pages, including the new one


class AttentionRecorder:
    """Per step, each chunk's attention mass aggregated over layers and query heads two ways.

    ``steps``: the peak over heads, kept for the labels because a few retrieval heads decide
    what a request needs; averaged over all heads their signal drowns in heads that attend to
    sinks and recent tokens. ``mean_steps``: the mean over every (layer, query head), the share
    of all attention the chunk receives (the textbook attention-mass measure, reported next to
    the peak by ``flashmemory indexer evaluate --mass mean``). ``head_steps`` (only with
    ``keep_heads``): every (layer, query head)'s own mass, (layers, heads, chunks) per step,
    from which the label dump aggregates over a chosen set of retrieval heads.
    """

    def __init__(self, num_layers: int, quest_every: int | None = None,
                 keep_heads: bool = False) -> None:
        self.num_layers = num_layers
        self.keep_heads = keep_heads
        self._layer_mass: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.head_steps: dict[str, list[torch.Tensor]] = {}
        self.current: dict[str, torch.Tensor] = {}  # request -> (num_chunks_seen,) peak
        self.steps: dict[str, list[torch.Tensor]] = {}
        self._sum: dict[str, torch.Tensor] = {}  # request -> summed mass over heads this step
        self._heads: dict[str, int] = {}  # request -> heads summed this step
        self.mean_steps: dict[str, list[torch.Tensor]] = {}
        # Quest-style scores (the backbone's own query against per-chunk key bounds), recorded
        # every ``quest_every`` steps: request -> step -> (num_chunks_seen,)
        self.quest_every = quest_every
        self.quest: dict[str, dict[int, torch.Tensor]] = {}
        self._quest_now: dict[str, torch.Tensor] = {}

    def wants_quest(self, request_id: str) -> bool:
        step = len(self.steps.get(request_id, []))
        return self.quest_every is not None and step % self.quest_every == 0

    def add(self, request_id: str, chunks: torch.Tensor, per_head: torch.Tensor,
            quest: torch.Tensor | None = None) -> None:
        """One layer's mass: ``per_head`` (query heads, len(chunks)) on the chunks ``chunks``."""
        self.current[request_id] = _peak(self.current.get(request_id), chunks,
                                         per_head.max(0).values)
        self._sum[request_id] = _add(self._sum.get(request_id), chunks, per_head.sum(0))
        self._heads[request_id] = self._heads.get(request_id, 0) + per_head.shape[0]
        if self.keep_heads:  # layers arrive in order
            self._layer_mass.setdefault(request_id, []).append((chunks.cpu(),
                                                                per_head.float().cpu()))
        if quest is not None:
            self._quest_now[request_id] = _peak(self._quest_now.get(request_id), chunks, quest)

    def end_step(self) -> None:
        for rid, acc in self.current.items():
            self.steps.setdefault(rid, []).append(acc)
            self.mean_steps.setdefault(rid, []).append(self._sum[rid] / self._heads[rid])
        for rid, layers in self._layer_mass.items():
            size = max(int(c.max()) for c, _ in layers) + 1
            hq = layers[0][1].shape[0]
            per = torch.zeros(len(layers), hq, size)
            for i, (c, m) in enumerate(layers):
                per[i][:, c] = m
            self.head_steps.setdefault(rid, []).append(per)
        for rid, acc in self._quest_now.items():
            self.quest.setdefault(rid, {})[len(self.steps[rid]) - 1] = acc
        self.current, self._quest_now, self._sum, self._heads = {}, {}, {}, {}
        self._layer_mass = {}


def _grown(acc: torch.Tensor | None, size: int) -> torch.Tensor:
    if acc is None or acc.numel() < size:
        grown = torch.zeros(size)
        if acc is not None:
            grown[: acc.numel()] = acc
        return grown
    return acc


def _add(acc: torch.Tensor | None, chunks: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` summed into ``acc`` at ``chunks`` (grown as needed)."""
    acc = _grown(acc, int(chunks.max()) + 1)
    acc.index_add_(0, chunks.cpu(), value.float().cpu())
    return acc


def _peak(acc: torch.Tensor | None, chunks: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Elementwise max of ``value`` into ``acc`` at ``chunks`` (grown as needed)."""
    acc = _grown(acc, int(chunks.max()) + 1)
    idx = chunks.cpu()
    acc[idx] = torch.maximum(acc[idx], value.float().cpu())
    return acc


def quest_scores(q: torch.Tensor, k: torch.Tensor, n: int, c: int) -> torch.Tensor:
    """Quest's page scores, per chunk, for the label dump (``indexer.backbone``).

    q: (Hq, D); k: (Hkv, T, D) the request's keys in chunk order (T <= n * c) -> (n,).
    """
    kmin, kmax = chunk_bounds(k.cpu(), n, c)
    return bound_scores(q.cpu(), kmin, kmax)


class DecodeBackend:
    """AttentionBackend for a decode batch: writes new K/V into pages, attends resident pages."""

    def __init__(self, pool: ChunkPool, slots: list[DecodeSlot],
                 recorder: AttentionRecorder | None = None,
                 taps: dict[str, QueryTap] | None = None) -> None:
        self.pool, self.slots, self.recorder, self.taps = pool, slots, recorder, taps or {}
        dev = pool.kv.device
        self._pages = torch.tensor([s.page for s in slots], device=dev)
        self._offs = torch.tensor([s.slot for s in slots], device=dev)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kv = self.pool.kv  # (P, L, 2, Hkv, C, D)
        # 1. write this step's K/V of every request into its open page
        kv[self._pages, layer, 0, :, self._offs] = k.to(kv.dtype)
        kv[self._pages, layer, 1, :, self._offs] = v.to(kv.dtype)
        # 2. attend each request to its resident pages (ragged: one SDPA per request)
        outs = []
        for i, s in enumerate(self.slots):
            pages = kv[s.pages, layer]  # (n, 2, Hkv, C, D) gathered copy
            n, _, h, c, d = pages.shape
            flat = pages.permute(1, 2, 0, 3, 4).reshape(2, h, n * c, d)[:, :, : s.num_valid]
            qi = q[i].unsqueeze(1).unsqueeze(0)  # (1, Hq, 1, D)
            o = F.scaled_dot_product_attention(
                qi, flat[0].unsqueeze(0).to(q.dtype), flat[1].unsqueeze(0).to(q.dtype),
                enable_gqa=True,
            )
            outs.append(o[0, :, 0])  # (Hq, D)
            tap = self.taps.get(s.request_id)
            if tap is not None:  # the Quest baseline ranks chunks with this query
                tap.q[layer] = q[i].detach().float().cpu()
            if self.recorder is not None:
                self._record(s, qi, flat[0].to(q.dtype), n, c)
        return torch.stack(outs)  # (B, Hq, D)

    def _record(self, s: DecodeSlot, q: torch.Tensor, k: torch.Tensor, n: int, c: int) -> None:
        assert self.recorder is not None
        hq, hkv = q.shape[1], k.shape[0]
        kk = k.repeat_interleave(hq // hkv, dim=0)  # (Hq, T, D)
        probs = torch.softmax((q[0] @ kk.transpose(1, 2)) * q.shape[-1] ** -0.5, dim=-1)
        per_tok = probs[:, 0]  # (Hq, T)
        padded = torch.zeros(hq, n * c, dtype=per_tok.dtype)
        padded[:, : per_tok.shape[1]] = per_tok.cpu()
        per_chunk = padded.view(hq, n, c).sum(2)  # (Hq, n) mass of each head on each chunk
        quest = (quest_scores(q[0, :, 0], k, n, c) if self.recorder.wants_quest(s.request_id)
                 else None)
        self.recorder.add(s.request_id, torch.tensor(s.chunks), per_chunk, quest)


def build_slot(pool: ChunkPool, request_id: str) -> DecodeSlot:
    """Reserve the next token's slot and list the request's resident pages in chunk order
    (host-side lists: the torch path and the Triton path's page table both start here)."""
    page, slot = pool.ensure_slot(request_id)
    table = pool.tables[request_id]
    chunks = sorted(table.pages)
    assert chunks[-1] * pool.chunk_size + slot == table.num_tokens, "open page must be last"
    valid = (len(chunks) - 1) * pool.chunk_size + slot + 1
    return DecodeSlot(request_id, page, slot, [table.pages[c] for c in chunks], chunks, valid)


@torch.no_grad()
def decode_step(
    model: CausalLM,
    pool: ChunkPool,
    batch: list[tuple[str, int]],
    recorder: AttentionRecorder | None = None,
    taps: dict[str, QueryTap] | None = None,
) -> torch.Tensor:
    """Run one token per request; batch = [(request_id, last_token)] -> fp32 logits (B, vocab).
    ``recorder`` records attention mass; ``taps`` keep some requests' queries (Quest)."""
    # 1. reserve slots and fix each request's resident set for this step
    slots = [build_slot(pool, rid) for rid, _ in batch]
    positions = torch.tensor([pool.tables[rid].num_tokens for rid, _ in batch], device=model.device)
    ids = torch.tensor([tok for _, tok in batch], device=model.device)
    # 2. forward through the model with the paged backend
    hidden = model(ids, positions, DecodeBackend(pool, slots, recorder, taps))
    # 3. the new tokens are now part of each sequence
    for rid, _ in batch:
        pool.tables[rid].num_tokens += 1
    if recorder is not None:
        recorder.end_step()
    return model.logits(hidden)
