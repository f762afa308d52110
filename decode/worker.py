"""DecodeWorker (a Ray async actor, created by ``cluster.launch``): receives the selected chunks
of its requests into its chunk pool, runs continuous-batching LSA decode in a background thread,
streams tokens to clients, and evicts chunks at re-prediction, completion or cancellation."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from ray.exceptions import RayError

from flashmemory.cluster.config import ClusterConfig
from flashmemory.cluster.messages import DecodeTask, TokenEvent
from flashmemory.cluster.metrics import Metrics, process_rss
from flashmemory.cluster.runtime import make_transport, placement, setup_process
from flashmemory.cluster.transport import TransferPlan, transfer_ids
from flashmemory.decode.chunk_pool import ChunkPool
from flashmemory.decode.loop import DecodeLoop, Sequence
from flashmemory.decode.runner import DecodeRunner
from flashmemory.indexer.base import ResidencyState, plan_resident
from flashmemory.indexer.selectors import FullSelector, RecencySelector
from flashmemory.model.loader import load_backbone
from flashmemory.prefill.chunk_store import chunk_shape
from flashmemory.sampling import make_generator

logger = logging.getLogger(__name__)


class DecodeWorker:
    def __init__(self, cfg: ClusterConfig, rank: int, index: int, indexer: Any,
                 prefills: list[Any]) -> None:
        setup_process(cfg)
        self.cfg, self.rank, self.index = cfg, rank, index
        self.indexer, self.prefills = indexer, prefills
        e = cfg.engine
        self.transport = make_transport(cfg)
        self.placement = placement(cfg)
        self.loop = self._make_loop()
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, asyncio.Queue[TokenEvent]] = {}
        self._reading: set[str] = set()  # requests whose ``stream`` a client is reading
        self._sent: dict[str, tuple[int, int]] = {}  # (chars, token ids) streamed per request
        self._tasks: dict[str, DecodeTask] = {}
        self._ids = transfer_ids(rank)
        self._aio: asyncio.AbstractEventLoop | None = None
        self.bytes_received = 0
        self.fallbacks = 0  # re-predictions the indexer did not plan
        self.metrics = Metrics({"worker": f"decode-{index}"})
        self.metrics.track_process(e.device)
        self._thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)
        self._thread.start()

    def _make_loop(self) -> Any:
        """Backbone, chunk pool and the batched decode loop (a DeepSeek-V4 worker: its own)."""
        e = self.cfg.engine
        self.bb = load_backbone(e.model, e.torch_dtype, e.device, e.max_model_len)
        mc = self.bb.model.config
        shape = chunk_shape(mc.num_layers, mc.num_kv_heads, mc.head_dim, e.lsa.chunk_size)
        self.pool = ChunkPool(shape, e.torch_dtype, e.device)
        self.page_shape, self.page_dtype = tuple(self.pool.page_shape), e.dtype
        return DecodeLoop(self.bb.model, self.pool, self.bb.tokenizer, self.bb.eos_ids,
                          self.bb.max_model_len, self._fetch, self._select,
                          DecodeRunner(self.bb.model, self.pool, e.attention, e.cuda_graphs))

    # -- set-up -------------------------------------------------------------------------------
    def ready(self) -> int:
        return self.rank

    def kv_capacity(self) -> tuple[int, int]:
        """(KV bytes this worker may hold for requests, KV bytes per token)."""
        per_token = self.kv_bytes_per_token()
        cfg = self.cfg
        if cfg.kv_capacity_gb is not None:
            return int(cfg.kv_capacity_gb * 2**30), per_token
        dev = torch.device(cfg.engine.device)
        if dev.type == "cuda":
            return int(0.9 * torch.cuda.mem_get_info(dev)[0]), per_token
        import psutil

        return int(0.5 * psutil.virtual_memory().available / cfg.num_decode), per_token

    def kv_bytes_per_token(self) -> int:
        return self.pool.token_bytes

    # -- client-facing ----------------------------------------------------------------------
    async def submit(self, task: DecodeTask) -> None:
        """Admit a prefilled request; its events are read with ``stream``."""
        self._aio = asyncio.get_running_loop()
        self._streams[task.request_id] = asyncio.Queue()
        self._inbox.put(("add", task))

    async def stream(self, request_id: str) -> AsyncIterator[TokenEvent]:
        """Token events of one request until its final event."""
        q = self._streams[request_id]
        self._reading.add(request_id)
        try:
            while True:
                ev = await q.get()
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            self._reading.discard(request_id)
            self._streams.pop(request_id, None)

    async def cancel(self, request_id: str) -> None:
        """The client went away: stop decoding the request. Its pages, its chunks on the
        prefill worker and the indexer's state for it are freed when the decode thread drops it
        (``_release``), so no re-prediction runs after its chunks are gone. Events nobody reads
        are dropped."""
        if request_id not in self._reading:
            self._streams.pop(request_id, None)
        self._inbox.put(("cancel", request_id))

    async def stats(self) -> dict[str, Any]:
        return {"active": len(self.loop.active), **self._page_stats(),
                "bytes_received": self.bytes_received, "indexer_fallbacks": self.fallbacks,
                "rss_bytes": process_rss(), **self.placement}

    def _page_stats(self) -> dict[str, int]:
        """Resident pages: in use, bytes each, pool size, per-request tables."""
        return {"pages_in_use": self.pool.pages_in_use(), "page_bytes": self.pool.page_bytes,
                "pages_total": self.pool.num_pages, "tables": len(self.pool.tables)}

    # -- decode thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._drain_inbox(block=not self.loop.active)
            if not self.loop.active:
                continue
            try:
                done = self.loop.step()
            except Exception as e:  # a step that fails takes its batch down, not the worker
                logger.exception("decode step failed")
                done = list(self.loop.active)
                for s in done:
                    s.finish, s.error = "error", f"decode step failed: {e}"
                    self.loop.abort(s)
            for s in self.loop.active:
                self._publish(s)
            for s in done:
                self._publish(s)
            self._gauges()

    def _gauges(self) -> None:
        m, pool = self.metrics, self.pool
        per_token = pool.token_bytes
        m.set("flashmemory_num_requests_running", len(self.loop.active))
        m.set("flashmemory_kv_resident_bytes",
              sum(pool.resident_tokens(s.rid) for s in self.loop.active) * per_token)
        m.set("flashmemory_kv_full_bytes",
              sum(pool.tables[s.rid].num_tokens for s in self.loop.active) * per_token)
        m.set("flashmemory_chunk_pool_pages_used", pool.pages_in_use())
        m.set("flashmemory_chunk_pool_pages_total", pool.num_pages)

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                kind, item = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                self._admit(item)
            elif kind == "cancel":
                for s in list(self.loop.active):
                    if s.store_id == item:
                        s.finish = "cancelled"
                        self.loop.abort(s)
                        self._publish(s)

    def _admit(self, task: DecodeTask) -> None:
        gen = make_generator(task.sampling, offset=1)  # prefill used ``seed`` for token 1
        s = Sequence(task.request_id, task.request_id, task.prompt, task.sampling, task.lsa,
                     FullSelector(), time.perf_counter(), gen, prefill_s=task.prefill_s)
        self._tasks[s.rid] = task
        self.loop.add(s, task.first_token)
        s.first_token_at = s.start  # the first token came from prefill
        self._publish(s)

    def _publish(self, s: Sequence) -> None:
        sent, sent_ids = self._sent.get(s.rid, (0, 0))
        if s.finish is None and len(s.text) <= sent:
            return  # nothing new to stream yet
        stats = None
        if s.finish is not None:
            stats = self.loop.output(s).stats
            if s.footprints:
                self.metrics.observe("flashmemory_kv_footprint_ratio", stats.kv_footprint_mean)
                self.metrics.observe("flashmemory_kv_footprint_peak_ratio",
                                     stats.kv_footprint_peak)
            self._sent.pop(s.rid, None)
            task = self._tasks.pop(s.rid, None)
            if task is not None:
                self._release(task)
        else:
            self._sent[s.rid] = (len(s.text), len(s.out))
        ev = TokenEvent(s.rid, s.text[sent:], s.out[sent_ids:], s.finish, stats, s.error)
        q = self._streams.get(s.rid)
        if q is not None and self._aio is not None:
            self._aio.call_soon_threadsafe(q.put_nowait, ev)

    def _release(self, task: DecodeTask) -> None:
        """A request this worker took has ended here (finished, failed or cancelled): free its
        chunks on the prefill worker and the indexer's state for it. The decode worker does
        this, not the client, because only it knows that no re-prediction of the request is
        still to run."""
        self.prefills[task.prefill_rank].free.remote(task.request_id)
        self.indexer.forget.remote(task.request_id)

    def ask_indexer(self, ref: Any, what: str, fallback: str) -> Any:
        """The result of an indexer call; None when the indexer cannot answer in time (dead,
        restarting) or has nothing for the request (it returned None), counted as a fallback
        with its reason."""
        import ray

        try:
            out = ray.get(ref, timeout=self.cfg.indexer_timeout_s)
            reason = "no_embeddings"
        except RayError as e:  # includes GetTimeoutError
            logger.warning("indexer did not %s (%s): %s", what, type(e).__name__, fallback)
            out, reason = None, "indexer_unavailable"
        if out is None:
            self.fallbacks += 1
            self.metrics.inc("flashmemory_indexer_fallbacks_total", reason=reason)
        return out

    def _select(self, s: Sequence, state: ResidencyState) -> tuple[set[int], int]:
        """The indexer's plan; when the indexer cannot answer in time (dead, restarting) or
        holds no embeddings for the request, keep the resident chunks plus sinks and tail
        (at admission: recency + sinks), counted as a fallback."""
        t0 = time.perf_counter()
        planned = self.ask_indexer(self.indexer.plan.remote(s.store_id, s.lsa, state),
                                   f"plan {s.rid}", "keeping its resident chunks")
        if planned is None:
            planned = self._keep_resident(s, state)
        target, chosen = planned
        self.metrics.observe("flashmemory_selection_seconds", time.perf_counter() - t0)
        self.metrics.observe("flashmemory_chunks_selected", chosen)
        self.metrics.inc("flashmemory_repredictions_total")
        self.metrics.inc("flashmemory_chunks_selected_total", chosen)
        return target, chosen

    def _keep_resident(self, s: Sequence, state: ResidencyState) -> tuple[set[int], int]:
        fixed, _ = plan_resident(s.lsa, RecencySelector(), state, self.pool.chunk_size)
        kept = {i for i in self.pool.tables[s.rid].pages if i < state.num_prompt_chunks}
        return fixed | kept, len(kept - fixed)

    def _fetch(self, s: Sequence, chunk_ids: list[int],
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Pull chunks from the prefill worker holding them: one batched transfer, received
        straight into the pool's pages when they are consecutive (``out``)."""
        task = self._tasks[s.rid]
        plan = TransferPlan(next(self._ids), s.store_id, tuple(chunk_ids), task.prefill_rank,
                            self.rank, self.page_shape, self.page_dtype,
                            self.cfg.transfer_timeout_s)
        sender = self.prefills[task.prefill_rank]
        t0 = time.perf_counter()
        try:
            payload = self.transport.recv(plan, sender, out)
        finally:
            sender.release_transfer.remote(plan.transfer_id)
        route = {"src": f"prefill-{task.prefill_rank}", "dst": f"decode-{self.index}"}
        self.metrics.inc("flashmemory_transfer_bytes_total", payload.nbytes, **route)
        self.metrics.observe("flashmemory_transfer_seconds", time.perf_counter() - t0, **route)
        self.metrics.observe("flashmemory_transfer_payload_bytes", payload.nbytes, **route)
        # the first selection loads the working set; later fetches are misses of the resident set
        self.metrics.inc("flashmemory_chunks_fetched_total", len(chunk_ids),
                         reason="admission" if s.steps == 0 else "reprediction")
        self.bytes_received += payload.nbytes
        return payload
