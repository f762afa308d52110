"""DecodeWorker for a DeepSeek-V4 checkpoint (created by ``cluster.launch`` when the model's
config says ``deepseek_v4``). Each request gets an ``LSADecoder`` over a resident cache opened
from the ``DSV4State`` its prefill worker put in Ray's object store; the decoder plans its CSA
pages itself and fetches the missing ones through the chunk transport (``RemotePages``), one
packed message per re-prediction. Selection: the latent indexer runs here (it reads this
worker's hidden states and the shipped page keys); the text indexer's scores come from the
``IndexerActor`` (``RemoteTextScores``). Steps are round-robin over the active requests, one
forward each (there is no batched DS-V4 decode step yet)."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from flashmemory.cluster.messages import DecodeTask, DSV4State
from flashmemory.decode.loop import Sequence, emit
from flashmemory.decode.worker import DecodeWorker
from flashmemory.dsv4_engine import (
    _output,
    check_lsa,
    decoder_config,
    eos_ids,
    is_latent,
    load_tower,
    page_selector,
    page_tokens,
)
from flashmemory.indexer.base import SelectionRequest
from flashmemory.model.deepseek_v4 import (
    CSA_PAGE_ENTRIES,
    LatentTower,
    LSADecoder,
    LSAStats,
    PageLayout,
    PagePayload,
    load_deepseek_v4,
    resident_pages,
    unpack_pages,
)
from flashmemory.model.deepseek_v4.lsa import csa_layers
from flashmemory.model.loader import load_tokenizer, resolve
from flashmemory.sampling import make_generator, sample
from flashmemory.types import RequestOutput

logger = logging.getLogger(__name__)


class RemotePages:
    """The decode side's view of one request's page store: counts and (for the latent indexer)
    page keys from the ``DSV4State``; ``read`` pulls pages from the prefill worker."""

    def __init__(self, worker: DSV4DecodeWorker, seq: Sequence, state: DSV4State) -> None:
        self.worker, self.seq, self.state = worker, seq, state
        self.layers, self.layout = worker.csa, worker.layout
        self.page_entries, self.page_bytes = worker.layout.page_entries, worker.layout.page_bytes

    def num_pages(self, request: str) -> int:
        return self.state.num_pages

    def num_closed(self, request: str) -> int:
        return self.state.num_closed

    def index_keys(self, request: str) -> torch.Tensor:
        if self.state.index_keys is None:
            raise ValueError("the prefill shipped no page keys: not a latent-indexer request")
        return self.state.index_keys

    def read(self, request: str, page_ids: list[int]) -> PagePayload:
        if not page_ids:
            return unpack_pages(torch.empty((0, self.page_bytes), dtype=torch.uint8), [],
                                self.layout)
        rows = self.worker._fetch(self.seq, page_ids)
        return unpack_pages(rows, page_ids, self.layout)


class RemoteTextScores:
    """The text indexer behind the ``IndexerActor``: scores of a request's candidate pages.
    When the indexer cannot answer (dead, restarting, embeddings lost), later pages rank
    first, and the fallback is counted."""

    name = "text"

    def __init__(self, worker: DSV4DecodeWorker) -> None:
        self.worker = worker

    def scores(self, req: SelectionRequest) -> torch.Tensor:
        w = self.worker
        s = w.ask_indexer(w.indexer.scores.remote(req), f"score {req.request_id}", "recency")
        if s is None:
            return torch.tensor(req.candidates, dtype=torch.float32)
        return s


class DSV4Loop:
    """The decode loop's surface the worker drives (``active``, ``step``, ``abort``,
    ``output``), one ``LSADecoder`` per request."""

    def __init__(self, worker: DSV4DecodeWorker) -> None:
        self.w = worker
        self.active: list[Sequence] = []
        self.decoders: dict[str, LSADecoder] = {}
        self._stats: dict[str, Any] = {}  # kept until ``output`` (called after ``abort``)

    def add(self, s: Sequence, dec: LSADecoder, first: int) -> None:
        self.decoders[s.rid], self._stats[s.rid] = dec, dec.stats
        self._emit(s, first)
        if s.finish is None:
            self.active.append(s)
        else:
            self.abort(s)

    def step(self) -> list[Sequence]:
        """One decode step of every active request (re-predicting when due); returns those
        that finished, failed included."""
        done = []
        for s in list(self.active):
            dec = self.decoders[s.rid]
            try:
                logits = dec.step(s.steps, s.last_token)
            except Exception as e:  # a failed fetch / selection fails this request only
                logger.warning("request %s failed at step %d: %s", s.rid, s.steps, e)
                s.finish, s.error = "error", f"{type(e).__name__}: {e}"
                done.append(s)
                self.abort(s)
                continue
            s.steps += 1
            s.footprints.append(dec.stats.resident_fraction[-1])
            self._emit(s, sample(logits, s.params, s.gen))
            if s.finish is not None:
                done.append(s)
                self.abort(s)
        return done

    def abort(self, s: Sequence) -> None:
        if s in self.active:
            self.active.remove(s)
        dec = self.decoders.pop(s.rid, None)
        if dec is not None and hasattr(dec.selector, "forget"):
            dec.selector.forget(s.rid)

    def output(self, s: Sequence) -> RequestOutput:
        stats = self._stats.pop(s.rid, None)
        if stats is None:  # never admitted (its state could not be read)
            stats = LSAStats(s.store_id, 0, self.w.layout.page_bytes)
        return _output(s, stats)

    def _emit(self, s: Sequence, token: int) -> None:
        w = self.w
        emit(s, token, w.tokenizer, w.eos_ids, w.max_model_len)


class DSV4DecodeWorker(DecodeWorker):
    def _make_loop(self) -> DSV4Loop:
        e = self.cfg.engine
        src = resolve(e.model)
        self.model = load_deepseek_v4(src.path, e.torch_dtype, e.device)
        self.tokenizer = load_tokenizer(src)
        mc = self.model.config
        self.eos_ids = eos_ids(mc, self.tokenizer)
        self.max_model_len = e.max_model_len or mc.max_position_embeddings
        self.csa = csa_layers(self.model)
        self.layout = PageLayout.of(mc, self.model.dtype, CSA_PAGE_ENTRIES)
        self.page_tokens = page_tokens(mc, CSA_PAGE_ENTRIES)
        self.page_shape, self.page_dtype = (self.layout.page_bytes,), "uint8"
        self._towers: dict[str, LatentTower | None] = {}
        check_lsa(e.lsa, self.page_tokens)
        return DSV4Loop(self)

    def kv_bytes_per_token(self) -> int:
        """CSA page bytes per prompt token (what the admission estimate multiplies)."""
        return -(-self.layout.page_bytes // self.page_tokens)

    def _page_stats(self) -> dict[str, int]:
        """Resident CSA pages over every request's decoder (no shared pool: no pages_total)."""
        decs = list(self.loop.decoders.values())
        pages = sum(len(resident_pages(d.cache, d.cfg.page_entries)) for d in decs)
        return {"pages_in_use": pages, "page_bytes": self.layout.page_bytes,
                "tables": len(decs)}

    def _gauges(self) -> None:
        m = self.metrics
        m.set("flashmemory_num_requests_running", len(self.loop.active))
        full = resident = 0.0
        for d in self.loop.decoders.values():
            nbytes = d.num_pages * self.layout.page_bytes
            full += nbytes
            resident += nbytes * (d.stats.resident_fraction or [0.0])[-1]
        m.set("flashmemory_kv_resident_bytes", resident)
        m.set("flashmemory_kv_full_bytes", full)

    def _admit(self, task: DecodeTask) -> None:
        import ray

        gen = make_generator(task.sampling, offset=1)  # prefill used ``seed`` for token 1
        s = Sequence(task.request_id, task.request_id, task.prompt, task.sampling, task.lsa,
                     None, time.perf_counter(), gen, prefill_s=task.prefill_s)  # type: ignore[arg-type]
        self._tasks[s.rid] = task
        try:
            state: DSV4State = ray.get(task.state, timeout=self.cfg.transfer_timeout_s)
            pages = RemotePages(self, s, state)
            s.selector = page_selector(task.lsa, state.num_closed, pages,
                                       self._tower(task.lsa), lambda: RemoteTextScores(self))
            if hasattr(s.selector, "seq"):
                s.selector.seq = s  # the text indexer's lookahead query follows this sequence
            dec = LSADecoder(self.model, pages, state.prefilled, s.selector,
                             decoder_config(task.lsa, state.num_closed, self.page_tokens,
                                            CSA_PAGE_ENTRIES))
        except Exception as e:  # the prefill's state is gone or does not fit: fail this one
            logger.warning("request %s could not be admitted: %s", s.rid, e)
            s.first_token_at = s.start
            s.finish, s.error = "error", f"admission failed: {type(e).__name__}: {e}"
            self._publish(s)
            return
        self.loop.add(s, dec, task.first_token)
        s.first_token_at = s.start  # the first token came from prefill
        self._publish(s)

    def _tower(self, lsa: Any) -> LatentTower | None:
        """Mode lsa's latent indexer, loaded once per name; None for a text indexer."""
        if lsa.mode != "lsa":
            return None
        name = lsa.indexer or self.cfg.engine.indexer
        if name not in self._towers:
            self._towers[name] = (load_tower(name, self.model.config, self.cfg.engine.device)
                                  if is_latent(name) else None)
        return self._towers[name]

