"""Selectors, budgets, the resident-set rule, and re-prediction's fetch/evict bookkeeping."""

from __future__ import annotations

import os
import time

import pytest
import torch

from flashmemory.config import LSAConfig, SamplingParams
from flashmemory.decode.loop import DecodeLoop, Sequence
from flashmemory.indexer.base import Budget, SelectionRequest, fixed_chunks, pick
from flashmemory.indexer.neural import NeuralIndexer
from flashmemory.indexer.selectors import (
    FullSelector,
    OracleSelector,
    RandomSelector,
    RecencySelector,
)
from flashmemory.model.loader import load_model, resolve
from flashmemory.prefill.runner import prefill
from flashmemory.types import Prompt
from tests.helpers import save_tiny, store_and_pool

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def req(cands: list[int], k: int, step: int = 0, query: str = "") -> SelectionRequest:
    return SelectionRequest("r", 20, cands, k, step, query)


def test_budget_fraction_tokens_and_validation() -> None:
    assert Budget(0.1).num_chunks(64, 64) == 7  # ceil(6.4)
    assert Budget(None, 300).num_chunks(64, 64) == 4
    assert Budget(1.0).num_chunks(64, 64) == 64
    for bad in ({"fraction": 1.5}, {"fraction": -0.1}, {"fraction": None}):
        with pytest.raises(ValueError, match="budget"):
            Budget(**bad)


def test_fixed_chunks_sink_and_tail() -> None:
    # 10 prompt chunks of 8 tokens; sequence is 80 tokens; the last 20 tokens touch chunks 7..9
    assert fixed_chunks(10, 80, 8, 1, 20) == {0, 7, 8, 9}
    assert fixed_chunks(10, 80, 8, 0, 1) == {9}
    # generated tokens beyond the prompt shrink the prompt part of the tail
    assert fixed_chunks(10, 100, 8, 2, 16) == {0, 1}


def test_pick_topk_threshold_and_full() -> None:
    r = req([1, 2, 3, 4], k=2)
    assert pick(torch.tensor([0.1, 0.9, 0.5, 0.8]), r, None) == [2, 4]
    assert pick(torch.tensor([0.1, 0.9, 0.5, 0.8]), r, 0.85) == [2]
    assert pick(FullSelector().scores(r), r, None) == [1, 2, 3, 4]
    assert pick(RecencySelector().scores(r), r, None) == []


def test_adaptive_budget_follows_scores_between_floor_and_ceiling() -> None:
    from dataclasses import replace

    r = replace(req([1, 2, 3, 4, 5, 6], k=4), floor=1)
    s = torch.tensor([0.1, 0.9, 0.5, 0.8, 0.7, 0.2])
    assert pick(s, r, 0.6) == [2, 4, 5]  # three above the threshold, under the ceiling of 4
    assert pick(s, r, 0.3) == [2, 3, 4, 5]  # five above it: the ceiling keeps four
    assert pick(s, r, 0.95) == [2]  # none above it: the floor keeps the best one


def test_random_is_seeded_and_respects_budget() -> None:
    r = req(list(range(1, 19)), k=5)
    a = pick(RandomSelector(0).scores(r), r, None)
    assert len(a) == 5 and a == pick(RandomSelector(0).scores(r), r, None)
    assert a != pick(RandomSelector(1).scores(r), r, None)


def test_oracle_ranks_by_future_window_mass() -> None:
    early, late = torch.zeros(20), torch.zeros(20)
    early[3], late[11] = 1.0, 1.0
    oracle = OracleSelector({"r": [early] * 4 + [late] * 4}, window=4)
    assert pick(oracle.scores(req(list(range(1, 19)), 1, step=0)), req(list(range(1, 19)), 1),
                None) == [3]
    assert pick(oracle.scores(req(list(range(1, 19)), 1, step=4)), req(list(range(1, 19)), 1),
                None) == [11]
    with pytest.raises(ValueError, match="no attention trace"):
        OracleSelector({}).scores(req([1], 1))


@pytest.fixture(scope="module")
def minilm() -> NeuralIndexer:
    return NeuralIndexer()


def test_neural_indexer_ranks_the_relevant_chunk(minilm: NeuralIndexer) -> None:
    texts = ["The weather in the valley was mild and the rivers ran clear all spring.",
             "Our accountant filed the quarterly tax report for the bakery on Tuesday.",
             "The secret launch code for the blue submarine is 7731.",
             "Children played football in the park while their parents had coffee."]
    minilm.overlap_chars = 0
    try:
        minilm.add_request("r", texts)
    finally:
        minilm.overlap_chars = 120
    scores = minilm.chunk_scores("r", "What is the launch code of the submarine?")
    assert int(scores.argmax()) == 2
    minilm.forget("r")


def test_neural_indexer_overlap_keeps_a_fact_cut_by_a_chunk_boundary(minilm: NeuralIndexer) -> None:
    filler = "The committee discussed the budget for road repairs and the new library hours. "
    texts = [filler * 3 + "The secret launch code for the blue submarine",
             " is 7731. " + filler * 3, filler * 3, filler * 3]
    minilm.add_request("r", texts)
    top2 = minilm.chunk_scores("r", "What is the launch code of the blue submarine?").topk(2)
    assert sorted(top2.indices.tolist()) == [0, 1]  # the key's chunk and the value's chunk
    minilm.forget("r")


def test_neural_indexer_scores_long_chunks_by_best_window(minilm: NeuralIndexer) -> None:
    filler = " ".join(["The committee discussed the budget for road repairs at length."] * 60)
    long_text = filler + " The password of the lighthouse keeper is amber-falcon. " + filler
    assert len(minilm.windows(long_text)) >= 3  # longer than one 256-token window
    minilm.add_request("r", [filler, long_text, filler])
    assert int(minilm.chunk_scores("r", "lighthouse keeper password").argmax()) == 1
    minilm.forget("r")


def test_repredict_fetches_new_and_evicts_dropped(tmp_path) -> None:
    model = load_model(resolve(str(save_tiny("llama", tmp_path / "m"))))
    store, pool = store_and_pool(model, 8)
    ids = torch.randint(0, 257, (80,)).tolist()
    prompt = Prompt(ids, [(i, i + 1) for i in range(80)], "x" * 80, "q")
    prefill(model, store, "p", ids, prompt.offsets, prompt.text)
    # oracle traces: chunk 3 matters for steps 0-3, chunk 5 afterwards
    a, b = torch.zeros(10), torch.zeros(10)
    a[3], b[5] = 1.0, 1.0
    lsa = LSAConfig(mode="oracle", chunk_size=8, budget_tokens=8, recent_tokens=8,
                    repredict_every=4, oracle_window=4)
    seq = Sequence("s", "p", prompt, SamplingParams(max_tokens=9, ignore_eos=True), lsa,
                   OracleSelector({"p": [a] * 4 + [b] * 8}, 4), time.perf_counter())
    loop = DecodeLoop.local(model, store, pool, _NoTok(), set(), 512)
    pool.open("s", 80)
    seq.out.append(1)
    loop.repredict(seq)
    assert sorted(pool.tables["s"].pages) == [0, 3, 9]  # sink, oracle pick, tail
    page_bytes = pool.page_bytes
    assert seq.bytes_moved == 3 * page_bytes
    seq.steps = 4
    loop.repredict(seq)
    assert sorted(pool.tables["s"].pages) == [0, 5, 9]  # 3 evicted, 5 fetched
    assert seq.bytes_moved == 4 * page_bytes and seq.selected == [1, 1]
    pool.close("s")
    outs = loop.run([seq_copy(seq)], {"p": torch.zeros(257)})
    assert outs[0].stats.repredictions == 2  # 8 decode steps: re-predict at 0 and 4
    assert 0 < outs[0].stats.kv_footprint_mean < 0.5 and pool.pages_in_use() == 0


def seq_copy(s: Sequence) -> Sequence:
    return Sequence(s.rid + "2", s.store_id, s.prompt, s.params, s.lsa, s.selector, s.start)


class _NoTok:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))
