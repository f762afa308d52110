"""Chunk store and chunk pool bookkeeping, and LSA decode equal to full decode when all chunks
are resident (tiny random Llama)."""

from __future__ import annotations

import pytest
import torch

from flashmemory.decode.chunk_pool import ChunkPool, PoolExhaustedError
from flashmemory.decode.step import decode_step
from flashmemory.model.loader import load_model, resolve
from flashmemory.prefill.chunk_store import ChunkStore
from flashmemory.prefill.runner import prefill
from tests.helpers import full_decode_logits, save_tiny, store_and_pool


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return load_model(resolve(str(save_tiny("llama", tmp_path_factory.mktemp("llama")))))


def test_store_spans_and_payload_layout() -> None:
    store = ChunkStore(num_layers=2, num_kv_heads=1, head_dim=2, chunk_size=4)
    text = "abcdefghij"
    metas = store.allocate("r", 10, [(i, i + 1) for i in range(10)], text)
    assert [(m.token_start, m.token_end) for m in metas] == [(0, 4), (4, 8), (8, 10)]
    assert store.chunk_texts("r") == ["abcd", "efgh", "ij"]
    k = torch.arange(10, dtype=torch.float32).view(10, 1, 1).expand(10, 1, 2)
    store.write_layer("r", 1, 0, k, -k)
    payload = store.read("r", [2, 0])  # (n, L, 2, Hkv, C, D), in the asked order
    assert payload.shape == (2, 2, 2, 1, 4, 2)
    assert payload[0, 1, 0, 0, :, 0].tolist() == [8, 9, 0, 0]  # partial chunk is zero-padded
    assert payload[1, 1, 1, 0, :, 1].tolist() == [0, -1, -2, -3]
    assert payload[0, 1, :, 0, 2:].abs().sum() == 0  # padding of the last chunk stays zero
    with pytest.raises(ValueError, match="already has chunks"):
        store.allocate("r", 3, [(0, 1)] * 3, "abc")
    store.free("r")
    assert "r" not in store and store.nbytes() == 0


def test_pool_load_evict_grow_and_close() -> None:
    pool = ChunkPool((1, 2, 1, 4, 2), torch.float32, initial_pages=2, max_pages=4)
    pool.open("r", 10)  # 3 prompt chunks, the last partial
    pool.load("r", [0, 2], torch.ones(2, 1, 2, 1, 4, 2))
    assert pool.resident_tokens("r") == 4 + 2
    page, slot = pool.ensure_slot("r")  # token 10 goes into chunk 2, slot 2
    assert (page, slot) == (pool.tables["r"].pages[2], 2) and 2 in pool.tables["r"].pinned
    with pytest.raises(ValueError, match="pinned"):
        pool.evict("r", [2])
    pool.evict("r", [0])
    assert pool.pages_in_use() == 1
    pool.load("r", [1, 0], torch.zeros(2, 1, 2, 1, 4, 2))  # grows 2 -> 4 pages
    assert pool.num_pages == 4 and pool.pages_in_use() == 3
    pool.open("s", 4)
    pool.load("s", [0], torch.zeros(1, 1, 2, 1, 4, 2))
    with pytest.raises(PoolExhaustedError):
        pool.alloc(1)
    pool.close("r")
    pool.close("s")
    assert pool.pages_in_use() == 0 and not pool.tables


def test_runner_pages_are_not_counted_as_requests_pages() -> None:
    pool = ChunkPool((1, 2, 1, 4, 2), torch.float32, initial_pages=1)
    scratch = pool.alloc_internal()  # the decode runner's padding page (CUDA graphs)
    assert pool.pages_in_use() == 0 and pool.internal_pages == 1
    pool.open("r", 4)
    pool.load("r", [0], torch.ones(1, 1, 2, 1, 4, 2))  # grows: the scratch page stays taken
    assert pool.pages_in_use() == 1 and pool.tables["r"].pages[0] != scratch
    pool.close("r")
    assert pool.pages_in_use() == 0


def test_decode_refuses_a_missing_tail_chunk() -> None:
    pool = ChunkPool((1, 2, 1, 4, 2), torch.float32)
    pool.open("r", 10)
    with pytest.raises(ValueError, match="recency tail"):
        pool.ensure_slot("r")


@pytest.mark.parametrize("num_prompt,chunk", [(37, 8), (32, 8), (5, 16), (40, 1)])
def test_all_resident_lsa_equals_dense(tiny, num_prompt: int, chunk: int) -> None:
    """Teacher-forced decode over all chunks vs one dense forward over the whole sequence."""
    torch.manual_seed(0)
    ids = torch.randint(0, 257, (num_prompt + 12,)).tolist()
    store, _ = store_and_pool(tiny, 1000)
    dense = prefill(tiny, store, "d", ids, [(i, i + 1) for i in range(len(ids))], "x" * len(ids))
    got = full_decode_logits(tiny, ids, num_prompt, chunk)
    assert (got[-1] - dense.logits).abs().max().item() <= 1e-4


def test_sparse_decode_only_sees_resident_chunks(tiny) -> None:
    """Zeroing a non-resident chunk in the store changes nothing; a resident one does."""
    torch.manual_seed(0)
    ids = torch.randint(0, 257, (48,)).tolist()

    def run(poison: int | None, resident: list[int]) -> torch.Tensor:
        store, pool = store_and_pool(tiny, 8)
        prefill(tiny, store, "r", ids, [(i, i + 1) for i in range(48)], "x" * 48)
        if poison is not None:
            store._entries["r"].kv[poison].normal_()
        pool.open("r", 48)
        pool.load("r", resident, store.read("r", resident))
        pool.ensure_slot("r")
        return decode_step(tiny, pool, [("r", 3)])[0]

    base = run(None, [0, 3, 5])
    assert torch.equal(run(2, [0, 3, 5]), base)
    assert not torch.allclose(run(3, [0, 3, 5]), base)


def test_synthetic_context_draws_chunks_on_read() -> None:
    store = ChunkStore(2, 1, 4, 8, torch.bfloat16)
    metas = store.add_synthetic("s", 1_000_003, seed=7)  # 1M tokens: nothing is allocated
    assert len(metas) == 125_001 and metas[-1].num_tokens == 3
    assert store.nbytes() == 0 and store.location("s") == "synthetic"
    a = store.read("s", [5, 125_000])
    assert a.shape == (2, 2, 2, 1, 8, 4) and a.dtype == torch.bfloat16
    assert torch.equal(store.read("s", [125_000, 5])[1], a[0])  # same chunk, same KV
    assert a[1, :, :, :, 3:].abs().sum() == 0 and a[1, :, :, :, :3].abs().sum() > 0
    assert not torch.equal(a[0], store.read("s", [6])[0])
    with pytest.raises(IndexError, match="out of range"):
        store.read("s", [125_001])
    with pytest.raises(ValueError, match="synthetic"):
        store.layer_kv("s", 0, 8)
    store.free("s")
    assert "s" not in store


def test_pool_reserves_consecutive_pages_and_falls_back_when_fragmented() -> None:
    pool = ChunkPool((1, 2, 1, 4, 2), torch.float32, initial_pages=8)
    pool.open("r", 40)
    pages, view = pool.reserve("r", [0, 1, 2])
    assert pages == [0, 1, 2] and view is not None and view.data_ptr() == pool.kv[0].data_ptr()
    view.fill_(7.0)  # as a transport receiving in place
    pool.commit("r", [0, 1, 2], pages)
    assert pool.tables["r"].pages == {0: 0, 1: 1, 2: 2} and pool.kv[:3].eq(7).all()
    taken = pool.alloc(5)  # pages 3..7: nothing free any more
    pool.release([taken[0], taken[2], taken[4]])  # free pages 3, 5, 7: no run of two
    pages, view = pool.reserve("r", [5, 6])
    assert view is None and len(set(pages)) == 2 and set(pages) <= {3, 5, 7}  # scattered
    pool.commit("r", [5, 6], pages, torch.ones((2, 1, 2, 1, 4, 2)))  # commit copies them in
    assert pool.kv[pages].eq(1).all()
    pages, view = pool.reserve("r", [8, 9, 10])  # the pool grows: its new tail is one run
    assert view is not None and pages == [8, 9, 10]
    pool.release(pages)
    with pytest.raises(ValueError, match="already resident"):
        pool.reserve("r", [0])


def test_local_decode_fetch_lands_in_pool_pages(tiny) -> None:
    """The engine's loop reads chunks from the store straight into consecutive pool pages."""
    from flashmemory.config import LSAConfig, SamplingParams
    from flashmemory.decode.loop import DecodeLoop, Sequence
    from flashmemory.indexer.selectors import baseline_selector
    from flashmemory.types import Prompt

    ids = torch.randint(0, 257, (80,), generator=torch.Generator().manual_seed(0)).tolist()
    store, pool = store_and_pool(tiny, 16)
    prefill(tiny, store, "p", ids, [(i, i + 1) for i in range(80)], "x" * 80)
    landed = []

    def fetch(s, chunk_ids, out):
        got = store.read(s.store_id, chunk_ids, out)
        landed.append(out is not None and got is out)
        return got

    loop = DecodeLoop(tiny, pool, None, set(), 512, fetch)
    loop._emit = lambda s, tok: s.out.append(tok)  # no tokenizer in this test: keep raw ids
    lsa = LSAConfig(mode="random", chunk_size=16, budget=0.5, recent_tokens=16)
    seq = Sequence("q", "p", Prompt(ids, [(i, i + 1) for i in range(80)], "x" * 80, "x"),
                   SamplingParams(max_tokens=4), lsa, baseline_selector(lsa, {}), 0.0)
    loop.add(seq, 5)
    loop.repredict(seq)
    assert landed == [True]
    for c, page in pool.tables["q"].pages.items():
        assert torch.equal(pool.kv[page], store.read("p", [c])[0])


def test_store_reads_into_a_given_buffer() -> None:
    store = ChunkStore(1, 1, 2, 4, torch.float32)
    store.allocate("r", 10, [(i, i + 1) for i in range(10)], "x" * 10)
    k = torch.arange(20.0).view(10, 1, 2)
    store.write_layer("r", 0, 0, k, -k)
    store.add_synthetic("s", 9, seed=1)
    for rid in ("r", "s"):
        out = torch.full((2, 1, 2, 1, 4, 2), float("nan"))
        got = store.read(rid, [2, 0], out)
        assert got is out and torch.equal(out, store.read(rid, [2, 0]))
