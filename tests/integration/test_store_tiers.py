"""Chunk store tiers: device memory first, pinned host memory behind it (GPU); one tier on CPU."""

from __future__ import annotations

import pytest
import torch

from flashmemory.prefill.chunk_store import ChunkStore

SHAPE = dict(num_layers=2, num_kv_heads=1, head_dim=4, chunk_size=8)
CHUNK_BYTES = 2 * 2 * 1 * 8 * 4 * 4  # (L, 2, Hkv, C, D) fp32


def _fill(store: ChunkStore, rid: str, n_tokens: int, value: float) -> None:
    store.allocate(rid, n_tokens, [(i, i + 1) for i in range(n_tokens)], "x" * n_tokens)
    kv = torch.full((n_tokens, 1, 4), value, device=store.device)
    for layer in range(2):
        store.write_layer(rid, layer, 0, kv, kv)


def test_cpu_store_is_one_tier_whatever_the_capacity() -> None:
    store = ChunkStore(**SHAPE, capacity_bytes=CHUNK_BYTES)
    _fill(store, "a", 32, 1.0)
    assert store.location("a") == "cpu" and store.spilled_bytes == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_oldest_requests_spill_to_pinned_host_memory() -> None:
    store = ChunkStore(**SHAPE, device="cuda", capacity_bytes=5 * CHUNK_BYTES)
    _fill(store, "a", 16, 1.0)  # 2 chunks
    _fill(store, "b", 16, 2.0)  # 2 chunks: 4 of 5 used
    assert store.location("a").startswith("cuda") and store.location("b").startswith("cuda")
    _fill(store, "c", 24, 3.0)  # 3 chunks: "a" (oldest) must move out
    assert store.location("a") == "cpu-pinned" and store.location("c").startswith("cuda")
    assert store.device_bytes() <= 5 * CHUNK_BYTES and store.spilled_bytes == 2 * CHUNK_BYTES
    assert store.read("a", [1, 0]).eq(1.0).sum() == 2 * CHUNK_BYTES // 4  # data moved intact
    _fill(store, "huge", 64, 4.0)  # 8 chunks > whole device tier: straight to host
    assert store.location("huge") == "cpu-pinned" and store.read("huge", [7]).max() == 4.0
    store.free("c")
    assert store.device_bytes() == 2 * CHUNK_BYTES
