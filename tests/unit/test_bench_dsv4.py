"""``flashmemory bench dsv4``'s accounting (flashmemory/bench/dsv4.py), computed from known inputs
on CPU: bytes per token per layer type, KV per request at V4-Flash depth, the LSA page rule."""

from __future__ import annotations

import math

from flashmemory.bench import dsv4
from flashmemory.model.deepseek_v4.cache import CSA_PAGE_ENTRIES
from flashmemory.model.deepseek_v4.config import CSA, HCA, SLIDING


def test_bytes_per_token_follow_the_v4_flash_layout():
    cfg = dsv4.flash_config([SLIDING, CSA, HCA])
    b = dsv4.per_token_bytes(cfg)
    assert b["csa_per_token"] == (512 + 128) * 2 / 4 == 320
    assert b["hca_per_token"] == 512 * 2 / 128 == 8
    assert b["window_fixed_per_layer"] == 128 * 512 * 2
    assert "| CSA | 320 |" in dsv4.bytes_table(cfg)


def test_kv_per_request_at_43_layers():
    cfg = dsv4.flash_config([SLIDING, CSA, HCA])
    n = 131072
    want = 21 * (n // 4) * (512 + 128) * 2 + 20 * (n // 128) * 512 * 2 + 43 * 128 * 512 * 2
    assert dsv4.kv_per_request(cfg, n // 4, n) == want  # 0.907 GB, DESIGN.md: ~0.93 GB
    assert abs(want / 1e9 - 0.907) < 1e-3


def test_lsa_pages_are_sink_tail_open_page_and_kmax_others():
    entries = 1000 * CSA_PAGE_ENTRIES + 10  # 1000 closed pages and a partial one
    pages = dsv4.lsa_page_ids(entries, 0.1, 8192, seed=3)
    tail = set(range(1000 - 32, 1001))  # 8192 tokens = 32 pages of 256, plus the open page
    assert {0} | tail <= set(pages)
    assert len(pages) == 1 + len(tail) + math.ceil(0.1 * 1000)
    assert pages == sorted(set(pages)) and pages == dsv4.lsa_page_ids(entries, 0.1, 8192, seed=3)
    held = dsv4.entries_in(pages, entries)
    assert held == (len(pages) - 1) * CSA_PAGE_ENTRIES + 10
