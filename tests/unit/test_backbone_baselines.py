"""The backbone baselines (SnapKV- and Quest-style chunk scores) on hand-built queries and keys,
the prefill's query window, and mode variants (``MODE:key=value``)."""

from __future__ import annotations

import pytest
import torch

from flashmemory.config import LSAConfig, mode_variant
from flashmemory.indexer.backbone import (
    PromptKeys,
    QueryTap,
    QuestSelector,
    SnapKVSelector,
    bound_scores,
    chunk_bounds,
    observe,
    snapkv_scores,
)
from flashmemory.indexer.base import SelectionRequest


def test_chunk_bounds_cover_partial_chunks() -> None:
    k = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)  # 2 heads, 5 tokens, D=3
    lo, hi = chunk_bounds(k, n=3, c=2)  # chunks {0,1}, {2,3}, {4}
    assert lo.shape == hi.shape == (2, 3, 3)
    assert torch.equal(lo[0, 1], k[0, 2]) and torch.equal(hi[0, 1], k[0, 3])
    assert torch.equal(lo[1, 2], k[1, 4]) and torch.equal(hi[1, 2], k[1, 4])  # one token only


def test_quest_bound_is_an_upper_bound_and_ranks_the_matching_chunk_first() -> None:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 64, 8, generator=g)  # 8 chunks of 8 tokens
    q = torch.randn(2, 8, generator=g)  # 2 query heads share the one KV head
    lo, hi = chunk_bounds(k, 8, 8)
    bound = torch.maximum(q[:, None] * lo, q[:, None] * hi).sum(-1)  # (Hq, n)
    exact = (q @ k[0].T).view(2, 8, 8).amax(-1)  # true max of q.k per chunk
    assert torch.all(bound >= exact - 1e-5)
    k[0, 40] = 10 * q[1]  # a key aligned with head 1's query in chunk 5
    scores = bound_scores(q, *chunk_bounds(k, 8, 8))
    assert scores.shape == (8,) and int(scores.argmax()) == 5


def test_snapkv_votes_go_to_the_chunk_the_window_attends() -> None:
    d, c, n = 16, 4, 6  # 24 tokens, the last 4 are the window
    k = torch.zeros(1, n * c, d)
    k[0, 9, 0] = 8.0  # token 9 (chunk 2) matches the window queries' direction
    window_q = torch.zeros(4, 2, d)
    window_q[:, :, 0] = 4.0
    scores = snapkv_scores(window_q, k, n, c, kernel=1)
    assert int(scores.argmax()) == 2
    assert scores[5] == 0  # the window's own chunk gets no votes (the recency tail keeps it)
    assert scores.sum() <= 1.0 + 1e-6  # per head normalised, then the peak over heads
    smoothed = snapkv_scores(window_q, k, n, c, kernel=7)
    assert int(smoothed.argmax()) == 2 and smoothed[1] > scores[1]  # pooling spreads votes


def test_selectors_read_the_prompt_view_and_the_latest_query() -> None:
    g = torch.Generator().manual_seed(1)
    k = [torch.randn(1, 32, 4, generator=g) for _ in range(2)]  # 2 layers, 8 chunks of 4
    for layer in range(2):
        k[layer][0, 25, 0] = 20.0  # chunk 6 holds a key far out along dimension 0
    wq = [torch.randn(4, 2, 4, generator=g) for _ in range(2)]
    keys = observe(wq, k, 8, 4)
    assert isinstance(keys, PromptKeys) and keys.snapkv.shape == (8,)
    req = SelectionRequest("r", 8, [1, 2, 3, 6], 2, 0, "")
    assert torch.equal(SnapKVSelector(keys).scores(req), keys.snapkv[[1, 2, 3, 6]])
    tap = QueryTap()
    quest = QuestSelector(keys, tap)
    before = quest.scores(req)  # no decode step yet: the prompt's last query
    for layer in range(2):  # now a decode query along dimension 0 in every layer
        tap.q[layer] = torch.tensor([[10.0, 0, 0, 0]] * 2)
    after = quest.scores(req)
    assert not torch.equal(before, after) and int(after.argmax()) == 3  # candidate 6


def test_mode_variants() -> None:
    base = LSAConfig(budget=0.1, budget_tokens=512)
    v = mode_variant("lsa:budget=0.05:threshold=0.4:min_budget=0.02", base)
    assert (v.mode, v.budget, v.budget_tokens, v.threshold, v.min_budget) == \
        ("lsa", 0.05, None, 0.4, 0.02)  # a fraction here replaces the base's token budget
    assert mode_variant("quest", base) == LSAConfig(mode="quest", budget=0.1, budget_tokens=512)
    assert mode_variant("lsa:indexer=runs/idx", base).indexer == "runs/idx"
    for spec, match in [("fast", "unknown mode"), ("lsa:budget", "expected KEY=VALUE"),
                        ("lsa:budget=2", "budget must be"), ("lsa:seed=x", "bad value"),
                        ("full:indexer=x", "only mode lsa")]:
        with pytest.raises(ValueError, match=match):
            mode_variant(spec, base)
