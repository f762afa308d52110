"""Prefill: run the prompt exactly (dense causal attention) and leave its KV as chunks in the store.

Called by the engine (and later by the Ray PrefillWorker). Long prompts run in pieces of
``piece_tokens`` tokens, each attending to all earlier tokens, to bound activation memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flashmemory.model.llama import CausalLM
from flashmemory.prefill.chunk_store import ChunkMeta, ChunkStore


@dataclass(frozen=True)
class PrefillResult:
    logits: torch.Tensor  # (vocab,) fp32 logits at the last prompt token
    metas: list[ChunkMeta]
    num_tokens: int
    window_q: list[torch.Tensor] | None = None  # per layer (W, Hq, D): the last W queries


class _PrefillBackend:
    """Dense causal attention for tokens [start, start+T) of one request; stores their K/V."""

    def __init__(self, store: ChunkStore, request_id: str, start: int,
                 window: tuple[int, dict[int, list[torch.Tensor]]] | None = None) -> None:
        self.store, self.request_id, self.start = store, request_id, start
        self.window = window  # (first position kept, layer -> query pieces) or None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.store.write_layer(self.request_id, layer, self.start, k, v)
        t = q.shape[0]
        if self.window is not None and self.start + t > self.window[0]:  # keep the window's q
            first, kept = self.window
            kept.setdefault(layer, []).append(q[max(0, first - self.start):].clone())
        qh = q.transpose(0, 1).unsqueeze(0)  # (1, Hq, T, D)
        if self.start == 0:
            kh, vh = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
        else:  # attend to every earlier token, read back from the store, plus this piece
            end = self.start + t
            kv = self.store.layer_kv(self.request_id, layer, end)  # (2, Hkv, end, D)
            kpos = torch.arange(end, device=q.device)
            qpos = torch.arange(self.start, end, device=q.device)
            mask = kpos[None, :] <= qpos[:, None]  # (T, end)
            out = F.scaled_dot_product_attention(
                qh, kv[0].unsqueeze(0), kv[1].unsqueeze(0), attn_mask=mask, enable_gqa=True
            )
        return out.squeeze(0).transpose(0, 1)  # (T, Hq, D)


@torch.no_grad()
def prefill(
    model: CausalLM,
    store: ChunkStore,
    request_id: str,
    token_ids: list[int],
    offsets: list[tuple[int, int]],
    text: str,
    piece_tokens: int = 8192,
    observe_last: int = 0,
) -> PrefillResult:
    """Run the prompt, store its chunked KV, and return the last token's logits (and, with
    ``observe_last``, the queries of the last that many tokens: the SnapKV/Quest baselines)."""
    # 1. reserve the request's chunks (token and text spans)
    metas = store.allocate(request_id, len(token_ids), offsets, text)
    ids = torch.tensor(token_ids, dtype=torch.long, device=model.device)
    hidden = None
    kept: dict[int, list[torch.Tensor]] = {}
    window = (max(0, len(token_ids) - observe_last), kept) if observe_last > 0 else None
    # 2. run the prompt piece by piece; each piece writes its K/V into the chunks
    for start in range(0, len(token_ids), piece_tokens):
        piece = ids[start:start + piece_tokens]
        positions = torch.arange(start, start + piece.numel(), device=model.device)
        hidden = model(piece, positions, _PrefillBackend(store, request_id, start, window))
    assert hidden is not None
    # 3. logits of the last prompt token give the first generated token
    window_q = [torch.cat(kept[i]) for i in sorted(kept)] if window is not None else None
    return PrefillResult(model.logits(hidden[-1:])[0], metas, len(token_ids), window_q)
