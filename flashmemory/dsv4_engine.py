"""Single-process engine for DeepSeek-V4 checkpoints: the ``Engine`` surface (``generate``,
``chat``, ``run_modes``) over ``model.deepseek_v4``. Built by ``engine.load_engine`` when a
checkpoint's config.json says ``model_type: deepseek_v4``; used by ``flashmemory generate`` and
``flashmemory eval`` (the CLI runs ``check_configs`` before loading). Not behind the cluster yet.

A request: one prefill (in pieces of ``prefill_piece_tokens``) into a ``DSV4Cache`` whose CSA
entries go to a ``PageStore`` as pages of 64 entries (256 tokens at 4:1); then, per LSA config,
an ``LSADecoder`` over those pages, sampled like the Llama loop (``sampling.sample``; EOS, stop
strings, ``max_tokens``). ``LSAConfig`` maps onto the decoder's ``DSV4LSAConfig``: a chunk is a
page, so ``chunk_size`` must be the page's token count or its default (64, read as "the page");
``budget`` is a fraction of the closed prompt pages (``budget_tokens`` // page tokens pages);
``recent_tokens`` -> ceil(recent_tokens / page tokens) tail pages; ``sink_chunks`` > 0 -> the
sink page (one, whatever the count); ``repredict_every`` as is.

Modes: full, recency, random; oracle (the full model's lightning-indexer picks per page over the
next ``oracle_window`` steps of a full decode run first: ``oracle.NativeOracleSelector``); lsa
with either indexer that ``LSAConfig.indexer`` / ``EngineConfig.indexer`` names: a checkpoint of
``latent_train`` (the paper's latent indexer; ``threshold`` and ``min_budget`` set its
probability threshold and floor), or else the text indexer (``minilm`` or a trained
sentence-transformers checkpoint), which embeds each page's text span and scores it against the
lookahead query as on Llama (``TextPageSelector``; ``threshold`` is then a cosine score).
snapkv / quest are not wired for DS-V4. Footprint = resident CSA
entries / all CSA entries (summed over CSA layers) after each step, as ``LSAStats``: sliding
windows and HCA entries always stay. TTFT = the prefill (plus, for oracle modes, the full run
they read) and the first token; e2e adds this mode's decode only.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from flashmemory.config import EngineConfig, LSAConfig, SamplingParams
from flashmemory.decode.loop import Sequence, emit, lookahead_query, timing
from flashmemory.engine import Engine
from flashmemory.indexer.base import SelectionRequest, Selector
from flashmemory.indexer.selectors import FullSelector, baseline_selector
from flashmemory.model.deepseek_v4 import (
    CSA_PAGE_ENTRIES,
    DeepseekV4Config,
    DSV4LSAConfig,
    IndexerTrace,
    LatentSelectConfig,
    LatentSelector,
    LatentTower,
    LSADecoder,
    LSAStats,
    NativeOracleSelector,
    PageStore,
    Prefilled,
    load_deepseek_v4,
    load_latent,
    prefill_request,
)
from flashmemory.model.deepseek_v4.latent_indexer import read_latent_meta
from flashmemory.model.loader import ModelSource, load_tokenizer, resolve
from flashmemory.sampling import make_generator, sample
from flashmemory.types import Prompt, RequestOutput, RequestStats

MODES: tuple[str, ...] = ("full", "lsa", "recency", "random", "oracle")


def page_tokens(cfg: DeepseekV4Config, page_entries: int = CSA_PAGE_ENTRIES) -> int:
    """Prompt tokens one CSA page covers (64 entries x the CSA ratio 4 = 256)."""
    return page_entries * cfg.csa_compress_rate


def check_lsa(lsa: LSAConfig, tokens_per_page: int) -> None:
    """ValueError for a config DS-V4 cannot run: snapkv / quest, a chunk size other than the
    page (or the default), a threshold on random / oracle (it applies to the latent indexer)."""
    if lsa.mode not in MODES:
        raise ValueError(f"mode {lsa.mode!r} is not available for DeepSeek-V4 (it reads a Llama "
                         f"backbone's queries and keys); choose one of {', '.join(MODES)}")
    if lsa.chunk_size not in (LSAConfig().chunk_size, tokens_per_page):
        raise ValueError(f"chunk_size {lsa.chunk_size}: DeepSeek-V4 keeps whole CSA pages of "
                         f"{tokens_per_page} tokens; set chunk_size {tokens_per_page} or leave "
                         "the default")
    if lsa.threshold is not None and lsa.mode in ("random", "oracle"):
        raise ValueError(f"threshold: on DeepSeek-V4 it applies to the latent indexer (mode lsa) "
                         f"only, not to {lsa.mode}")


def is_latent(name: str) -> bool:
    """Whether ``name`` is a latent indexer checkpoint directory (else: a text indexer)."""
    try:
        read_latent_meta(Path(name).expanduser())
    except (ValueError, OSError):
        return False
    return True


def check_indexer(lsa: LSAConfig, name: str) -> bool:
    """Whether mode lsa's indexer ``name`` is a latent checkpoint (with a probability
    threshold), else a text indexer that resolves (the ``minilm`` alias or a model directory);
    ValueError if neither."""
    if is_latent(name):
        if lsa.threshold is not None:
            LatentSelectConfig(lsa.threshold)  # ValueError unless a probability
        return True
    from flashmemory.indexer.neural import resolve_indexer

    try:
        resolve_indexer(name)
    except (ValueError, OSError) as e:
        raise ValueError(f"mode lsa on DeepSeek-V4 needs a latent indexer checkpoint "
                         f"(`flashmemory indexer latent-train`) or a text indexer (minilm or a "
                         f"sentence-transformers directory); {name!r} is neither ({e})") from None
    return False


def check_configs(source: ModelSource, configs: list[LSAConfig], indexer: str) -> None:
    """What needs no weights (the CLI runs it before loading): each config's mode and chunk
    size, and for each lsa config an indexer that loads (its own, else ``indexer``)."""
    cfg = DeepseekV4Config.from_hf_dict(json.loads((source.path / "config.json").read_text()))
    for lsa in configs:
        check_lsa(lsa, page_tokens(cfg))
        if lsa.mode == "lsa":
            check_indexer(lsa, lsa.indexer or indexer)


def page_texts(prompt: Prompt, tokens_per_page: int, num_pages: int) -> list[str]:
    """The prompt text each page covers: page p holds the CSA entries of tokens
    [p * tokens_per_page, (p + 1) * tokens_per_page), cut by the tokens' character offsets."""
    n = len(prompt.token_ids)
    out = []
    for p in range(num_pages):
        t0, t1 = min(p * tokens_per_page, n - 1), min((p + 1) * tokens_per_page, n)
        out.append(prompt.text[prompt.offsets[t0][0]:prompt.offsets[t1 - 1][1]])
    return out


class TextPageSelector:
    """The text indexer over DS-V4 pages. ``LSADecoder`` asks with no query, so the lookahead
    query (question + recently generated text) is read from the sequence being decoded; with a
    threshold, candidates scoring below it are dropped unless among the top ``floor``."""

    def __init__(self, indexer: Any, threshold: float | None, floor: int) -> None:
        self.indexer, self.threshold, self.floor = indexer, threshold, floor
        self.name = getattr(indexer, "name", "text")
        self.seq: Sequence | None = None

    def scores(self, req: SelectionRequest) -> torch.Tensor | None:
        assert self.seq is not None, "set TextPageSelector.seq before decoding"
        s = self.indexer.scores(replace(req, query=lookahead_query(self.seq))).float()
        if self.threshold is not None:
            rank = torch.empty_like(s)
            rank[torch.argsort(s, descending=True, stable=True)] = torch.arange(
                len(s), dtype=s.dtype)
            s = torch.where((s >= self.threshold) | (rank < self.floor), s, float("-inf"))
        return s


class DSV4LLM(Engine):
    """Loads a DeepSeek-V4 checkpoint and its tokenizer once; decodes one request at a time."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.source = resolve(config.model)
        self.model = load_deepseek_v4(self.source.path, config.torch_dtype, config.device)
        self.tokenizer = load_tokenizer(self.source)
        mc = self.model.config
        self.eos_ids = eos_ids(mc, self.tokenizer)
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        self.store = PageStore(mc, self.model.dtype)  # host side: every prefilled CSA page
        self.page_tokens = page_tokens(mc, self.store.page_entries)
        self._towers: dict[str, LatentTower] = {}  # latent checkpoints, loaded on first use
        self._indexers = {}
        self._ids = itertools.count()
        check_lsa(config.lsa, self.page_tokens)
        if config.lsa.mode == "lsa":  # load now, not inside the first request's TTFT
            if check_indexer(config.lsa, config.indexer):
                self.latent(config.indexer)
            else:
                self.indexer_for(config.indexer)

    def latent(self, name: str) -> LatentTower:
        """The latent indexer checkpoint ``name`` (loaded once); ValueError if it is not one or
        was trained on another backbone's shapes."""
        if name not in self._towers:
            self._towers[name] = load_tower(name, self.model.config, self.config.device)
        return self._towers[name]

    def run_modes(self, prompt: Prompt, sampling: SamplingParams,
                  configs: list[LSAConfig]) -> list[RequestOutput]:
        """One prefill, then one decode per LSA config (the evaluation's inner loop)."""
        texts = []  # text indexers to embed the pages for
        for lsa in configs:  # every config is checked before any work
            check_lsa(lsa, self.page_tokens)
            if lsa.mode == "lsa":
                name = lsa.indexer or self.config.indexer
                if check_indexer(lsa, name):
                    self.latent(name)  # loaded: _selector tells the two kinds apart by this
                else:
                    texts.append(self.indexer_for(name))
        rid = f"d{next(self._ids)}"
        start = time.perf_counter()
        try:
            # 1. prefill: the full cache, its CSA pages into the store (and, for text indexers,
            #    each page's text embedded)
            ids = torch.tensor(prompt.token_ids, device=self.model.embed.weight.device)
            pre = prefill_request(self.model, rid, ids, self.store,
                                  self.config.prefill_piece_tokens)
            for indexer in dict.fromkeys(texts):
                indexer.add_request(rid, page_texts(prompt, self.page_tokens,
                                                    self.store.num_pages(rid)))
            lead = time.perf_counter() - start
            # 2. oracle modes read a full run's indexer picks first
            traces, oracle_s = None, 0.0
            if any(c.mode == "oracle" for c in configs):
                traces = self._full_traces(pre, prompt, sampling)
                oracle_s = time.perf_counter() - start - lead
            # 3. one decode per config, each over its own resident copy of the prefilled cache
            return [self._decode(pre, prompt, sampling, c,
                                 lead + (oracle_s if c.mode == "oracle" else 0.0), lead, traces)
                    for c in configs]
        finally:
            self.store.free(rid)
            for indexer in self._indexers.values():
                indexer.forget(rid)

    def _run(self, prompts: list[Prompt], sampling: SamplingParams | None,
             lsa: LSAConfig | None) -> list[RequestOutput]:
        sampling, lsa = sampling or SamplingParams(), lsa or self.config.lsa
        return [self.run_modes(p, sampling, [lsa])[0] for p in prompts]

    def _decode(self, pre: Prefilled, prompt: Prompt, sampling: SamplingParams,
                lsa: LSAConfig, lead: float, pre_s: float,
                traces: list[IndexerTrace] | None) -> RequestOutput:
        """One mode; ``lead``: seconds of shared work before it (prefill, oracle run), of which
        ``pre_s`` the prefill (with the pages' text embedding)."""
        selector = self._selector(pre, lsa, traces)
        seq = Sequence(f"{pre.request}-{lsa.mode}", pre.request, prompt, sampling, lsa, selector,
                       time.perf_counter() - lead, make_generator(sampling))
        if isinstance(selector, TextPageSelector):
            selector.seq = seq  # its lookahead query follows this sequence's text
        dec = LSADecoder(self.model, self.store, pre, selector,
                         self._decoder_config(lsa, pre.request))
        seq.prefill_s = pre_s
        self._generate(seq, pre.logits, dec)
        return _output(seq, dec.stats)

    def _full_traces(self, pre: Prefilled, prompt: Prompt,
                     sampling: SamplingParams) -> list[IndexerTrace]:
        """A full decode of the request (every page resident, same sampling), recording its CSA
        indexers' picks at every step: what the oracle ranks pages by."""
        full = LSAConfig(mode="full")
        seq = Sequence(f"{pre.request}-trace", pre.request, prompt, sampling, full, FullSelector(),
                       time.perf_counter(), make_generator(sampling))
        dec = LSADecoder(self.model, self.store, pre, seq.selector,
                         self._decoder_config(full, pre.request))
        traces: list[IndexerTrace] = []
        self._generate(seq, pre.logits, dec, traces)
        return traces

    def _generate(self, seq: Sequence, first_logits: torch.Tensor, dec: LSADecoder,
                  record: list[IndexerTrace] | None = None) -> None:
        """Sample until EOS, a stop string, ``max_tokens`` or the end of the context."""
        # 1. the first token, from the prefill's logits
        emit(seq, sample(first_logits, seq.params, seq.gen), self.tokenizer, self.eos_ids,
             self.max_model_len)
        seq.first_token_at = time.perf_counter()
        while seq.finish is None:
            # 2. re-predict when due (evict / fetch pages), one forward over the resident pages
            trace = IndexerTrace() if record is not None else None
            logits = dec.step(seq.steps, seq.last_token, trace)
            seq.steps += 1
            if record is not None and trace is not None:
                record.append(trace)
            # 3. sample, check EOS / stop strings / length
            emit(seq, sample(logits, seq.params, seq.gen), self.tokenizer, self.eos_ids,
                 self.max_model_len)

    def _selector(self, pre: Prefilled, lsa: LSAConfig,
                  traces: list[IndexerTrace] | None) -> Selector:
        if lsa.mode == "oracle":
            assert traces is not None
            return NativeOracleSelector({pre.request: traces}, self.store.page_entries,
                                        lsa.oracle_window)
        name = lsa.indexer or self.config.indexer
        latent = lsa.mode == "lsa" and name in self._towers  # run_modes loaded those it uses
        return page_selector(lsa, self.store.num_closed(pre.request), self.store,
                             self.latent(name) if latent else None,
                             lambda: self.indexer_for(name))

    def _decoder_config(self, lsa: LSAConfig, request: str) -> DSV4LSAConfig:
        return decoder_config(lsa, self.store.num_closed(request), self.page_tokens,
                              self.store.page_entries)


def eos_ids(mc: DeepseekV4Config, tokenizer: Any) -> set[int]:
    """Ids that end a DS-V4 generation: the config's and the tokenizer's."""
    return set(mc.eos_token_ids) | ({tokenizer.eos_token_id} - {None})


def load_tower(name: str, mc: DeepseekV4Config, device: str) -> LatentTower:
    """The latent indexer checkpoint ``name`` for a model of config ``mc``; ValueError if it
    was trained on another backbone's shapes."""
    tower = load_latent(Path(name).expanduser(), device)
    tc = tower.cfg
    if (tc.hidden_size, tc.index_dim) != (mc.hidden_size, mc.index_head_dim):
        raise ValueError(f"latent indexer {name!r} expects hidden size {tc.hidden_size} "
                         f"and index keys of {tc.index_dim}; this model has "
                         f"{mc.hidden_size} and {mc.index_head_dim}")
    return tower


def page_selector(lsa: LSAConfig, closed: int, store: Any, tower: LatentTower | None,
                  text: Callable[[], Any]) -> Selector:
    """The selector of a non-oracle mode over one request's ``closed`` pages: for mode lsa the
    latent ``tower`` (scoring ``store``'s index keys) when given, else the text indexer
    ``text()`` over page texts; full / recency / random otherwise."""
    if lsa.mode == "lsa":
        floor = math.ceil(lsa.min_budget * closed - 1e-9) if lsa.threshold is not None else 0
        if tower is None:
            return TextPageSelector(text(), lsa.threshold, floor)
        threshold = LatentSelectConfig().threshold if lsa.threshold is None else lsa.threshold
        return LatentSelector(tower, store, LatentSelectConfig(threshold, None, floor))
    selector = baseline_selector(lsa)
    assert selector is not None  # check_lsa let only full / recency / random through
    return selector


def decoder_config(lsa: LSAConfig, closed: int, tokens_per_page: int,
                   page_entries: int) -> DSV4LSAConfig:
    """``LSAConfig`` -> the decoder's: the budget as a fraction of ``closed`` pages (a token
    budget in whole pages), the tail in pages, the sink page, the re-prediction period."""
    budget = lsa.budget
    if lsa.budget_tokens is not None:
        budget = min(1.0, (lsa.budget_tokens // tokens_per_page) / max(1, closed))
    assert budget is not None
    return DSV4LSAConfig(budget=budget, recent_pages=math.ceil(lsa.recent_tokens / tokens_per_page),
                         sink_page=lsa.sink_chunks > 0, repredict_every=lsa.repredict_every,
                         page_entries=page_entries)


def _output(seq: Sequence, st: LSAStats) -> RequestOutput:
    """The request's output; chunks are CSA pages, footprints count CSA entries."""
    picked = st.pages_selected
    stats = RequestStats(
        prompt_tokens=len(seq.prompt.token_ids), completion_tokens=len(seq.out),
        num_prompt_chunks=st.num_pages,
        kv_footprint_mean=st.mean_resident_fraction, kv_footprint_peak=st.peak_resident_fraction,
        kv_bytes_transferred=st.bytes_moved, transfer_ratio=st.transfer_ratio,
        chunks_selected=sum(picked) / len(picked) if picked else 0.0, repredictions=len(picked),
        **timing(seq, time.perf_counter()), prefill_s=seq.prefill_s,
        selection_s=st.selection_s, transfer_s=st.transfer_s, admission_s=st.admission_s,
        transfers=sum(1 for r in st.reselections if r.bytes))
    return RequestOutput(seq.store_id, seq.text, list(seq.out), seq.finish or "length",
                         seq.lsa.mode, stats)
