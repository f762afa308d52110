"""LSA over CSA pages for the DeepSeek-V4 backbone (model/deepseek_v4/{pages,lsa,oracle}.py)
against full decoding, on the tiny random config of tests.helpers.TINY_DSV4, CPU, fp32.

A 1600-token prompt gives 400 CSA entries per CSA layer (layers 1 and 3): with the production
page of 64 entries (256 tokens) that is 6 closed pages plus a partial one of 16 entries; with
16-entry pages (used where many pages make the test sharper) 25 closed pages and no partial one.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from flashmemory.indexer.base import SelectionRequest
from flashmemory.indexer.selectors import FullSelector, RecencySelector
from flashmemory.model.deepseek_v4 import (
    DSV4LSAConfig,
    IndexerTrace,
    LSADecoder,
    NativeOracleSelector,
    PageStore,
    ResidentEntryStore,
    decode_full,
    decode_lsa,
    evict_pages,
    fetch_pages,
    lookahead_pages,
    open_resident,
    pack_pages,
    page_pick_counts,
    pages_to_mask,
    prefill_request,
    resident_pages,
    unpack_pages,
)
from tests.helpers import TINY_DSV4, tiny_dsv4

PROMPT = 1600
STEPS = 80  # decode steps of the reference run: two re-predictions (0, 64)
CSA_LAYERS = (1, 3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """(model, prefilled request "r" (pages in a 64-entry store), full greedy decode run)."""
    model = tiny_dsv4(tmp_path_factory.mktemp("dsv4-lsa"))
    ids = torch.randint(0, TINY_DSV4["vocab_size"], (PROMPT,),
                        generator=torch.Generator().manual_seed(2))
    store = PageStore(model.config, model.dtype)
    prefilled = prefill_request(model, "r", ids, store)
    return model, prefilled, decode_full(model, prefilled, STEPS, keep_scores=True)


def _store(ref, page_entries: int) -> PageStore:
    model, prefilled, _ = ref
    store = PageStore(model.config, model.dtype, page_entries)
    store.add("r", prefilled.cache)
    return store


def test_all_pages_resident_equals_full_decoding(ref):
    """(a) Full selector, production pages: 72 steps across the re-prediction at step 64."""
    model, prefilled, full = ref
    store = _store(ref, 64)
    assert (store.num_pages("r"), store.num_closed("r"), store.num_entries("r")) == (7, 6, 400)
    run = decode_lsa(LSADecoder(model, store, prefilled, FullSelector(), DSV4LSAConfig()), 72)
    assert (run.logits - full.logits[:72]).abs().max().item() <= 1e-6
    assert run.tokens == full.tokens[:72]
    for mine, theirs in zip(run.traces, full.traces, strict=False):
        assert all(torch.equal(mine.topk[i], theirs.topk[i]) for i in CSA_LAYERS)
    stats = run.stats
    assert [r.step for r in stats.reselections] == [0, 64]
    assert stats.reselections[0].fetched == tuple(range(7)) and stats.reselections[1].fetched == ()
    assert stats.bytes_moved == 7 * store.page_bytes and stats.transfer_ratio == 1.0
    assert stats.mean_resident_fraction == stats.peak_resident_fraction == 1.0


def _check_compact(dec: LSADecoder, pages: tuple[int, ...]) -> None:
    """Each CSA layer's compact store holds exactly the resident prompt pages' entries plus the
    ones decode created, sorted by global index, in whole pages of capacity."""
    e, n = dec.cfg.page_entries, dec.store.num_entries("r")
    for i in CSA_LAYERS:
        store = dec.cache.layers[i].entries
        assert isinstance(store, ResidentEntryStore)
        rows = sum(min(e, n - p * e) for p in pages) + store.total - n
        assert store.count == rows < store.total
        assert store.kv.shape[0] == store.index_keys.shape[0] == math.ceil(rows / e) * e
        ids = store.valid_ids
        assert torch.equal(ids, ids.sort().values)
        assert torch.equal(store.positions[:rows], ids * 4)  # entry i starts at token 4 i
        prompt_ids = ids[ids < n]
        assert set((prompt_ids // e).tolist()) == set(pages)


def test_partial_residency_is_the_masked_full_model(ref):
    """(b) Budget < 1, 16-entry pages, oracle-native selector, 80 steps. At every step the
    compact store holds exactly the resident pages' entries (sizes follow the page count), and
    its logits and picks equal the FULL cache's under the equivalent residency mask; picks stay
    on resident pages; bytes moved = fetched pages' bytes."""
    model, prefilled, full = ref
    store, e = _store(ref, 16), 16
    cfg = DSV4LSAConfig(budget=0.2, recent_pages=2, page_entries=e)
    dec = LSADecoder(model, store, prefilled, NativeOracleSelector({"r": full.traces}, e), cfg)
    full_cache = copy.deepcopy(prefilled.cache)  # the reference: all entries + a resident mask
    token, worst = dec.first_token, 0.0
    for s in range(STEPS):
        mine, theirs = IndexerTrace(), IndexerTrace()
        logits = dec.step(s, token, mine)
        pages = dec.stats.reselections[-1].resident
        _check_compact(dec, pages)
        held = [*pages, *range(25, 99)]  # pages 25.. hold what decode appended: resident
        mask = {i: pages_to_mask(held, full_cache.num_entries(i), e) for i in CSA_LAYERS}
        ids, pos = torch.tensor([token]), torch.tensor([PROMPT + s])
        ref_logits = model.logits(model(ids, pos, full_cache, resident=mask, trace=theirs))[0]
        worst = max(worst, (logits - ref_logits).abs().max().item())
        for i in CSA_LAYERS:
            assert torch.equal(mine.topk[i], theirs.topk[i])
            picked = (mine.topk[i][mine.topk[i] >= 0] // e).tolist()
            assert set(picked) <= set(held)
        token = int(logits.argmax())
    assert worst <= 1e-6
    # the unmasked model does pick outside the resident pages (step 0: same state as here)
    first = dec.stats.reselections[0].resident
    assert any(not set((full.traces[0].topk[i][0] // e).tolist()) <= set(first)
               for i in CSA_LAYERS)
    stats = dec.stats
    assert stats.pages_selected == [5, 5]  # ceil(0.2 * 25)
    assert [len(r.resident) for r in stats.reselections] == [8, 8]  # + sink and 2 tail pages
    fetched = sum(len(r.fetched) for r in stats.reselections)
    assert fetched == 8 + len(stats.reselections[1].evicted)
    assert stats.bytes_moved == fetched * store.page_bytes
    assert all(r.bytes == store.read("r", list(r.fetched)).nbytes for r in stats.reselections)
    assert 8 / 25 < stats.mean_resident_fraction <= stats.peak_resident_fraction < 9 / 25


@pytest.mark.parametrize("start", [0, 64])
def test_oracle_native_keeps_the_most_of_the_full_indexers_picks(ref, start):
    """(b) The oracle-native property, deterministic: at a re-prediction, the pages it selects
    hold the largest share of the FULL model's lightning-indexer picks over the next 64 steps
    that any selection of that many candidate pages could (every subset tried), and strictly
    more than recency's (fixed pages only). Greedy-token agreement is not asserted: on a random
    tiny model it swings with the budget for every selector, this one included."""
    model, prefilled, full = ref
    store = _store(ref, 64)
    ahead = full.traces[start:start + 64]  # 64 steps, or the 16 the run has left
    counts = page_pick_counts(ahead, 7, 64)  # pages 0..6 (6 holds decode's entries too)
    assert counts.sum() == 2 * 8 * len(ahead)  # 2 CSA layers x top-8, every step
    cfg = DSV4LSAConfig(budget=0.25, recent_pages=1)  # k = ceil(0.25 * 6) = 2 of pages 1..4
    plans = {}
    for name, sel in (("oracle", NativeOracleSelector({"r": full.traces})),
                      ("recency", RecencySelector())):
        plans[name] = LSADecoder(model, store, prefilled, sel, cfg).plan(start)
    fixed = {0, 5, 6}  # sink, 1-page tail, the partial page
    assert plans["recency"] == (fixed, 0) and plans["oracle"][1] == 2

    def held(pages: set[int]) -> float:
        return counts[sorted(pages)].sum().item()

    best = max(held(fixed | set(c)) for c in itertools.combinations([1, 2, 3, 4], 2))
    assert held(plans["oracle"][0]) == best > held(fixed)


@pytest.mark.parametrize("e", [64, 16])
def test_page_store_round_trip(ref, e):
    """(c) read returns exactly the prefill's entries (any pages, any order); fetching them into
    a resident cache rebuilds the full store; evict + fetch again restores it."""
    _, prefilled, _ = ref
    store, n = _store(ref, e), 400
    pages = store.num_pages("r")
    assert pages == math.ceil(n / e) and store.page_bytes == e * (2 * (32 + 16) * 4 + 8)
    every = store.read("r", list(range(pages)))
    assert every.nbytes == pages * store.page_bytes
    for j, i in enumerate(CSA_LAYERS):
        full = prefilled.cache.layers[i].entries
        assert torch.equal(every.kv[:, j].flatten(0, 1)[:n], full.valid_kv)
        assert torch.equal(every.index_keys[:, j].flatten(0, 1)[:n], full.valid_index_keys)
        assert not every.kv[:, j].flatten(0, 1)[n:].any()  # padding of a partial page
    assert torch.equal(every.positions.flatten()[:n], prefilled.cache.layers[1].entries.positions)
    assert (every.positions.flatten()[n:] == -1).all()
    some = store.read("r", [3, 0])
    assert torch.equal(some.kv, every.kv[[3, 0]]) and torch.equal(some.pages, torch.tensor([3, 0]))
    cache = open_resident(prefilled.cache, e)
    assert resident_pages(cache, e) == []
    assert (cache.num_entries(1), cache.num_resident(1)) == (n, 0)
    fetch_pages(cache, store.read("r", [2, 0, 1, *range(3, pages)]))
    _assert_same_entries(cache, prefilled.cache)
    evict_pages(cache, [1, 2], e)
    assert resident_pages(cache, e) == [0, *range(3, pages)]
    assert cache.num_resident(3) == n - 2 * e
    fetch_pages(cache, store.read("r", [2, 1]))
    _assert_same_entries(cache, prefilled.cache)


def _assert_same_entries(resident, full) -> None:
    for i in CSA_LAYERS:
        mine, theirs = resident.layers[i].entries, full.layers[i].entries
        assert torch.equal(mine.valid_ids, torch.arange(theirs.count))
        assert torch.equal(mine.valid_kv, theirs.valid_kv)
        assert torch.equal(mine.valid_index_keys, theirs.valid_index_keys)
        assert torch.equal(mine.positions[:mine.count], theirs.positions[:theirs.count])


def _trace(layer_probs: dict[int, list[float]]) -> IndexerTrace:
    """A decode step's trace whose indexer softmax is the given probabilities (0 = not visible)."""
    scores = {i: torch.tensor(p).log()[None, :] for i, p in layer_probs.items()}
    return IndexerTrace(keep_scores=True, scores=scores,
                        topk={i: torch.zeros(1, 2, dtype=torch.long) for i in scores})


def test_pages_pack_into_transport_rows_and_back(ref):
    """A payload packed as one uint8 row per page (the chunk transport's unit) unpacks to the
    same entries, keys and positions, the last page's padding included."""
    store = _store(ref, 64)
    payload = store.read("r", [6, 0, 3])  # the partial last page first
    rows = pack_pages(payload, store.layout)
    assert rows.dtype == torch.uint8 and rows.shape == (3, store.page_bytes)
    back = unpack_pages(rows.clone(), [6, 0, 3], store.layout)
    for a, b in ((back.kv, payload.kv), (back.index_keys, payload.index_keys),
                 (back.positions, payload.positions), (back.pages, payload.pages)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(ValueError, match="uint8"):
        unpack_pages(rows[:, 1:], [6, 0, 3], store.layout)


def test_lookahead_pages_on_a_hand_built_trace():
    """(d) 2-entry pages, 6 entries (pages 0-2), 4 CSA layers, top_p 0.6, >= 3 layers.
    Step 0 nuclei: L1 {e0, e1} (.5+.2), L3 {e2} (.7), L5 {e0, e2} (.35+.3), L7 {e0, e2} (.3+.3,
    tie to the lower index; the sum just reaches .6) -> page 0 in 3 layers, page 1 in 3: {0, 1}.
    Step 1: page 2 in L1, L3; page 0 in L5, L7 -> nothing with 3 layers; {0, 2} with 2.
    Step 2: page 2 in every layer -> {2}."""
    step0 = _trace({1: [.5, .2, .1, .1, .1, 0], 3: [.1, .1, .7, .1, 0, 0],
                    5: [.35, .05, .3, .1, .1, .1], 7: [.3, .1, .3, .1, .1, .1]})
    far, near = [.05, .05, .05, .05, .05, .75], [.75, .05, .05, .05, .05, .05]
    step1 = _trace({1: far, 3: far, 5: near, 7: near})
    step2 = _trace({i: far for i in (1, 3, 5, 7)})
    traces = [step0, step1, step2]
    kw = {"page_entries": 2, "top_p": 0.6}
    assert lookahead_pages(traces, 0, window=2, min_layers=3, **kw) == [0, 1]
    assert lookahead_pages(traces, 0, window=2, min_layers=2, **kw) == [0, 1, 2]
    assert lookahead_pages(traces, 1, window=1, min_layers=3, **kw) == []
    assert lookahead_pages(traces, 1, window=64, min_layers=3, **kw) == [2]
    assert lookahead_pages(traces, 0, window=3, **kw) == [0, 1, 2]  # default min_layers 3
    assert lookahead_pages(traces, 0, window=1, top_p=1.0, page_entries=2) == [0, 1, 2]
    two_layers = [_trace({1: near, 3: near}), _trace({1: near, 3: far})]
    assert lookahead_pages(two_layers, window=2, page_entries=2) == [0]  # 3 clamped to 2


def test_native_oracle_counts_picks_per_page():
    """Pages of 2 entries, 3 prompt pages: counts over steps, layers and picks; -1 (no pick) and
    pages past the prompt (entry 6) are ignored; the selector sums the next ``window`` steps."""
    def picks(by_layer: dict[int, list[int]]) -> IndexerTrace:
        return IndexerTrace(topk={i: torch.tensor([p]) for i, p in by_layer.items()})

    traces = [picks({1: [0, 3, -1], 3: [2, 5, 1]}),  # pages 0 1 | 1 2 0 -> [2, 2, 1]
              picks({1: [4, 5, 6], 3: [5, 0, -1]}),  # pages 2 2 (3) | 2 0 -> [1, 0, 3]
              picks({1: [2, 3], 3: [3, 1]})]  # pages 1 1 | 1 0 -> [1, 3, 0]
    assert page_pick_counts(traces[:1], 3, 2).tolist() == [2, 2, 1]
    assert page_pick_counts(traces, 3, 2).tolist() == [4, 5, 4]
    oracle = NativeOracleSelector({"r": traces}, page_entries=2, window=2)
    assert oracle.scores(SelectionRequest("r", 3, [0, 2], 1, 1, "")).tolist() == [2, 3]
    assert oracle.scores(SelectionRequest("r", 3, [0, 2], 1, 2, "")).tolist() == [1, 0]
    assert oracle.scores(SelectionRequest("r", 3, [0, 2], 1, 9, "")).tolist() == [1, 0]  # last


@pytest.mark.parametrize(("kw", "match"), [
    ({"budget": 1.5}, "budget"), ({"budget": -0.1}, "budget"),
    ({"recent_pages": -1}, "recent_pages"), ({"repredict_every": 0}, "repredict_every"),
    ({"page_entries": 0}, "page_entries"),
])
def test_bad_lsa_config(kw, match):
    """(e) bad budgets and schedule values name what is wrong."""
    with pytest.raises(ValueError, match=match):
        DSV4LSAConfig(**kw)


def test_errors(ref):
    """(e) unknown request, page ids out of range, and misuse of stores and caches."""
    model, prefilled, full = ref
    store = _store(ref, 64)  # 7 pages
    with pytest.raises(KeyError, match="unknown request"):
        store.read("nope", [0])
    other = copy.copy(prefilled)
    other.request = "nope"
    with pytest.raises(KeyError, match="unknown request"):
        LSADecoder(model, store, other, FullSelector(), DSV4LSAConfig())
    for bad in ([7], [0, -1]):
        with pytest.raises(IndexError, match="out of range"):
            store.read("r", bad)
    with pytest.raises(ValueError, match="already has pages"):
        store.add("r", prefilled.cache)
    with pytest.raises(ValueError, match="page_entries"):
        PageStore(model.config, model.dtype, 0)
    with pytest.raises(ValueError, match="16 entries"):
        LSADecoder(model, _store(ref, 16), prefilled, FullSelector(), DSV4LSAConfig())
    cache = open_resident(prefilled.cache)
    with pytest.raises(ValueError, match="does not hold all"):
        store.add("x", cache)
    fetch_pages(cache, store.read("r", [1]))
    with pytest.raises(ValueError, match="twice"):
        fetch_pages(cache, store.read("r", [1]))
    with pytest.raises(ValueError, match="not a resident cache"):
        evict_pages(prefilled.cache, [0])
    sel = NativeOracleSelector({"other": full.traces})
    with pytest.raises(ValueError, match="no indexer trace"):
        LSADecoder(model, store, prefilled, sel, DSV4LSAConfig()).plan(0)
    with pytest.raises(ValueError, match="keep_scores"):
        lookahead_pages([IndexerTrace(topk={1: torch.zeros(1, 1, dtype=torch.long)})])
    with pytest.raises(ValueError, match="top_p"):
        lookahead_pages(full.traces, top_p=0.0)
    with pytest.raises(ValueError, match="steps"):
        decode_full(model, prefilled, 0)
