"""Lookahead Sparse Attention decoding for DeepSeek-V4 in one process (issue 8): greedy decoding
in which the decode cache holds only the CSA pages a selector chose; the rest wait in a
``PageStore``.

Called by tests, evaluation and the DeepSeek-V4 engine (``flashmemory.dsv4_engine``, which
samples instead of decoding greedily). ``prefill_request`` runs the prompt into a full
``DSV4Cache`` and pages its CSA entries into the store;
``decode_full`` is the reference with every entry resident; ``LSADecoder`` + ``decode_lsa``
re-plan the resident pages at step 0 and every ``repredict_every`` steps (sink page, recency
tail, the open partial page and pages decode writes, plus the selector's top pages under the
budget), evict the dropped pages and fetch the new ones. Selectors are
``flashmemory.indexer.base.Selector``s with pages as chunks (``FullSelector`` and
``RecencySelector`` of ``indexer.selectors``; ``oracle.NativeOracleSelector``); a
``HiddenStateSelector`` (``latent_indexer.LatentSelector``) is also handed the CSA layers'
attention inputs at the last token processed (``HiddenTap``) before each re-prediction.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, runtime_checkable

import torch

from flashmemory.indexer.base import Budget, SelectionRequest, Selector, pick
from flashmemory.model.deepseek_v4.attention import IndexerTrace
from flashmemory.model.deepseek_v4.cache import CSA_PAGE_ENTRIES, DSV4Cache
from flashmemory.model.deepseek_v4.config import CSA
from flashmemory.model.deepseek_v4.model import DeepseekV4ForCausalLM
from flashmemory.model.deepseek_v4.pages import (
    PageStore,
    evict_pages,
    fetch_pages,
    open_resident,
    resident_pages,
)


@dataclass(frozen=True)
class DSV4LSAConfig:
    """Which CSA pages stay resident. Always: page 0 (``sink_page``), the last ``recent_pages``
    closed prompt pages, a partial last prompt page and every page decode writes. The selector
    adds at most ceil(``budget`` * closed prompt pages) of the others."""

    budget: float = 0.1  # fraction of the closed prompt pages the selector may add
    recent_pages: int = 2  # the paper's ~8K-token tail is 32 pages of 256 tokens
    sink_page: bool = True
    repredict_every: int = 64  # decode steps between re-predictions (the lookahead window)
    page_entries: int = CSA_PAGE_ENTRIES  # production: 64 entries = 256 tokens; tests use fewer

    def __post_init__(self) -> None:
        Budget(fraction=self.budget)  # ValueError unless 0 <= budget <= 1
        if self.recent_pages < 0:
            raise ValueError(f"recent_pages must be >= 0, got {self.recent_pages}")
        if self.repredict_every < 1 or self.page_entries < 1:
            raise ValueError("repredict_every and page_entries must be >= 1")


@dataclass
class Prefilled:
    """A prompt run into a full cache (its CSA pages also in the store)."""

    request: str
    cache: DSV4Cache  # full cache after the prompt; decode_full / LSADecoder work on copies
    logits: torch.Tensor  # (vocab,) fp32 at the last prompt token
    # CSA layer -> (hidden,) its attention input at the last prompt token (HiddenTap)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Reselection:
    """One re-prediction: the resident prompt pages it left and what it moved."""

    step: int  # decode steps done before it
    resident: tuple[int, ...]  # prompt pages resident after it, sorted
    selected: int  # pages the selector added beyond the fixed ones
    fetched: tuple[int, ...]
    evicted: tuple[int, ...]
    bytes: int  # bytes read from the store (the fetched pages' payload)
    select_s: float = 0.0  # seconds planning (the selector included)
    transfer_s: float = 0.0  # seconds evicting, reading and placing the pages


@dataclass
class LSAStats:
    """Per-request LSA measures. Fractions count CSA entries summed over CSA layers."""

    request: str
    num_pages: int  # prompt pages in the store
    page_bytes: int
    reselections: list[Reselection] = field(default_factory=list)
    resident_fraction: list[float] = field(default_factory=list)  # per step, after it

    @property
    def bytes_moved(self) -> int:
        return sum(r.bytes for r in self.reselections)

    @property
    def transfer_ratio(self) -> float:
        """Bytes moved store -> decode over the bytes of all prompt pages."""
        return self.bytes_moved / max(1, self.num_pages * self.page_bytes)

    @property
    def selection_s(self) -> float:
        return sum(r.select_s for r in self.reselections)

    @property
    def transfer_s(self) -> float:
        return sum(r.transfer_s for r in self.reselections)

    @property
    def admission_s(self) -> float:
        """Planning and fetching of the first resident set (step 0)."""
        first = self.reselections[:1]
        return sum(r.select_s + r.transfer_s for r in first)

    @property
    def mean_resident_fraction(self) -> float:
        return sum(self.resident_fraction) / max(1, len(self.resident_fraction))

    @property
    def peak_resident_fraction(self) -> float:
        return max(self.resident_fraction, default=0.0)

    @property
    def pages_selected(self) -> list[int]:
        return [r.selected for r in self.reselections]


@dataclass
class DecodeRun:
    """A greedy decode: what was fed, what came out, what the indexers picked."""

    tokens: list[int]  # token fed at each step; step 0's is the prefill's greedy token
    logits: torch.Tensor  # (S, vocab) fp32 after each step; its argmax is the next step's token
    traces: list[IndexerTrace]  # per step: CSA layers' picks by global entry index
    stats: LSAStats | None = None  # LSA runs only


class HiddenTap:
    """While active (``with HiddenTap(model, layers) as tap``), records each forward's last-token
    input to the given layers' attention: ``x`` of ``Attention.forward``, the normalised block
    input that the native lightning indexer also reads. ``latest[layer]`` (hidden,) is the last
    forward's; with ``history`` every forward's ``latest`` is appended to ``history`` too.
    Forward pre-hooks, removed on exit; the model's computation is unchanged."""

    def __init__(self, model: DeepseekV4ForCausalLM, layers: Iterable[int],
                 history: bool = False) -> None:
        self.model, self.layers = model, sorted(layers)
        self.latest: dict[int, torch.Tensor] = {}
        self.history: list[dict[int, torch.Tensor]] | None = [] if history else None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, layer: int) -> Callable[..., None]:
        def record(_module: torch.nn.Module, args: tuple) -> None:
            self.latest[layer] = args[0][-1].detach().clone()  # (hidden,) of (T, hidden)
            if self.history is not None and layer == self.layers[-1]:  # last tapped layer
                self.history.append(dict(self.latest))
        return record

    def __enter__(self) -> HiddenTap:
        for i in self.layers:
            attn = self.model.layers[i].attn
            self._handles.append(attn.register_forward_pre_hook(self._hook(i)))
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@runtime_checkable
class HiddenStateSelector(Protocol):
    """A selector that also reads the backbone's state: before each re-prediction the decoder
    calls ``observe`` with the CSA layers' attention inputs (layer -> (hidden,)) at the last
    token processed (the prompt's last token at step 0, else the previous step's token)."""

    name: str

    def scores(self, req: SelectionRequest) -> torch.Tensor | None: ...

    def observe(self, request: str, hidden: Mapping[int, torch.Tensor]) -> None: ...


def csa_layers(model: DeepseekV4ForCausalLM) -> list[int]:
    return [i for i, kind in enumerate(model.config.layer_types) if kind == CSA]


def prefill_request(model: DeepseekV4ForCausalLM, request: str, ids: torch.Tensor,
                    store: PageStore, piece_tokens: int | None = None) -> Prefilled:
    """Run prompt ids (T,) into a fresh full cache, in pieces of ``piece_tokens`` (default: one
    forward); page its CSA entries into ``store``."""
    cache, n = model.new_cache(), ids.shape[0]
    piece = piece_tokens or n
    with HiddenTap(model, csa_layers(model)) as tap:
        for a in range(0, n, piece):
            positions = torch.arange(a, min(n, a + piece), device=ids.device)
            hidden = model(ids[a:a + piece], positions, cache)  # (piece, hidden)
    store.add(request, cache)
    return Prefilled(request, cache, model.logits(hidden[-1:])[0], tap.latest)


def decode_full(model: DeepseekV4ForCausalLM, prefilled: Prefilled, steps: int,
                keep_scores: bool = False) -> DecodeRun:
    """Greedy decode with every CSA entry resident (the reference LSA is compared with)."""
    cache = copy.deepcopy(prefilled.cache)
    return _greedy(lambda _s, tok, trace: _forward_one(model, cache, tok, trace),
                   int(prefilled.logits.argmax()), steps, keep_scores)


class LSADecoder:
    """One request's LSA decode: a resident cache fed from the store, re-planned periodically."""

    def __init__(self, model: DeepseekV4ForCausalLM, store: PageStore, prefilled: Prefilled,
                 selector: Selector, cfg: DSV4LSAConfig) -> None:
        if store.page_entries != cfg.page_entries:
            raise ValueError(f"store pages hold {store.page_entries} entries; the config says "
                             f"{cfg.page_entries}")
        self.model, self.store, self.selector, self.cfg = model, store, selector, cfg
        self.request = prefilled.request
        self.num_pages = store.num_pages(self.request)  # KeyError for an unknown request
        self.num_closed = store.num_closed(self.request)
        self.cache = open_resident(prefilled.cache, cfg.page_entries)  # no CSA entry yet
        self.first_token = int(prefilled.logits.argmax())
        self.cache_device = prefilled.logits.device
        self.csa_layers = csa_layers(model)
        self.hidden = dict(prefilled.hidden)  # CSA inputs at the last token processed
        self.stats = LSAStats(self.request, self.num_pages, store.page_bytes)

    def plan(self, step: int) -> tuple[set[int], int]:
        """Target resident prompt pages at ``step`` and how many of them the selector chose."""
        n, cfg = self.num_closed, self.cfg
        # 1. fixed: the partial last prompt page (decode appends to it), sink, recency tail
        fixed = set(range(n, self.num_pages)) | set(range(max(0, n - cfg.recent_pages), n))
        if cfg.sink_page and n:
            fixed.add(0)
        # 2. the selector ranks the other closed pages and keeps at most the budget's count
        cands = [p for p in range(n) if p not in fixed]
        if isinstance(self.selector, HiddenStateSelector):
            self.selector.observe(self.request, self.hidden)
        req = SelectionRequest(self.request, n, cands, Budget(cfg.budget).num_chunks(n, 1),
                               step, query="")
        chosen = pick(self.selector.scores(req), req, None) if cands else []
        return fixed | set(chosen), len(chosen)

    def repredict(self, step: int) -> Reselection:
        """Plan, evict the prompt pages no longer wanted, fetch the missing ones in one read."""
        e = self.cfg.page_entries
        t0 = time.perf_counter()
        target, selected = self.plan(step)
        t1 = time.perf_counter()
        held = {p for p in resident_pages(self.cache, e) if p < self.num_pages}
        evicted, fetched = sorted(held - target), sorted(target - held)
        if evicted:
            evict_pages(self.cache, evicted, e)
        payload = self.store.read(self.request, fetched)
        fetch_pages(self.cache, payload)
        if self.cache_device.type == "cuda":  # time the copies whole
            torch.cuda.current_stream(self.cache_device).synchronize()
        rec = Reselection(step, tuple(sorted(target)), selected, tuple(fetched),
                          tuple(evicted), payload.nbytes, t1 - t0, time.perf_counter() - t1)
        self.stats.reselections.append(rec)
        return rec

    def step(self, step: int, token: int, trace: IndexerTrace | None = None) -> torch.Tensor:
        """Decode step ``step`` on ``token``: re-predict when due, then one forward -> (vocab,)."""
        if step % self.cfg.repredict_every == 0:
            self.repredict(step)
        if isinstance(self.selector, HiddenStateSelector):
            with HiddenTap(self.model, self.csa_layers) as tap:
                logits = _forward_one(self.model, self.cache, token, trace)
            self.hidden = tap.latest
        else:
            logits = _forward_one(self.model, self.cache, token, trace)
        held = sum(self.cache.num_resident(i) for i in self.csa_layers)
        total = sum(self.cache.num_entries(i) for i in self.csa_layers)
        self.stats.resident_fraction.append(held / max(1, total))
        return logits


def decode_lsa(decoder: LSADecoder, steps: int, keep_scores: bool = False) -> DecodeRun:
    """Greedy LSA decode of ``steps`` tokens from step 0; the run carries the decoder's stats."""
    run = _greedy(decoder.step, decoder.first_token, steps, keep_scores)
    run.stats = decoder.stats
    return run


def _greedy(step_fn: Callable[[int, int, IndexerTrace], torch.Tensor], first: int, steps: int,
            keep_scores: bool) -> DecodeRun:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    tokens, logits, traces, token = [], [], [], first
    for s in range(steps):
        trace = IndexerTrace(keep_scores=keep_scores)
        out = step_fn(s, token, trace)  # (vocab,)
        tokens.append(token)
        logits.append(out)
        traces.append(trace)
        token = int(out.argmax())
    return DecodeRun(tokens, torch.stack(logits), traces)


def _forward_one(model: DeepseekV4ForCausalLM, cache: DSV4Cache, token: int,
                 trace: IndexerTrace | None) -> torch.Tensor:
    device = model.embed.weight.device
    ids = torch.tensor([token], device=device)
    positions = torch.tensor([cache.length], device=device)
    return model.logits(model(ids, positions, cache, trace=trace))[0]
