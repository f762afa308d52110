"""PrefillWorker (a Ray actor, created by ``cluster.launch``): runs chunked prefill, keeps each
request's chunks in its chunk store, embeds chunk texts for the indexer, produces the first
token, and sends selected chunks to decode workers over the chunk transport."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Any

from flashmemory.cluster.config import ClusterConfig
from flashmemory.cluster.faults import Failpoints, Fault
from flashmemory.cluster.messages import PrefillReply, PrefillTask
from flashmemory.cluster.metrics import Metrics, process_rss
from flashmemory.cluster.runtime import make_transport, placement, setup_process
from flashmemory.cluster.transport import TorchDistTransport, TransferError, TransferPlan
from flashmemory.model.loader import load_backbone
from flashmemory.prefill.chunk_store import ChunkStore
from flashmemory.prefill.runner import prefill
from flashmemory.sampling import make_generator, sample

logger = logging.getLogger(__name__)
FREED_REMEMBERED = 4096  # freed request ids kept to catch a prefill that ends after its free


class RequestCancelledError(RuntimeError):
    """The request was freed (its client went away) before its prefill ended."""


class PrefillWorker:
    def __init__(self, cfg: ClusterConfig, rank: int, indexer: Any) -> None:
        setup_process(cfg)
        self.cfg, self.rank, self.indexer = cfg, rank, indexer
        e = cfg.engine
        self._load_model()
        self.transport = make_transport(cfg)
        self.placement = placement(cfg)
        self._encoder: Any = None
        self.bytes_sent = 0
        self.metrics = Metrics({"worker": f"prefill-{rank}"})
        self.faults = Failpoints()
        self._released: deque[int] = deque(maxlen=4096)  # recently released transfer ids
        # Requests the client freed, newest last. This actor runs calls in several threads, so
        # a free can arrive while the request's prefill runs, or before it starts: that prefill
        # then drops what it built instead of holding it for a client that is gone.
        self._freed: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self.cancelled = 0  # prefills whose request was freed before they ended
        self.metrics.track_process(e.device)

    def _load_model(self) -> None:
        """The backbone and the chunk store (a DeepSeek-V4 worker loads its own kind)."""
        e = self.cfg.engine
        self.bb = load_backbone(e.model, e.torch_dtype, e.device, e.max_model_len)
        mc = self.bb.model.config
        self.store = ChunkStore(mc.num_layers, mc.num_kv_heads, mc.head_dim, e.lsa.chunk_size,
                                e.torch_dtype, e.device, e.store_capacity_bytes)

    # -- set-up -------------------------------------------------------------------------------
    def ready(self) -> int:
        return self.rank

    # -- requests ------------------------------------------------------------------------------
    def prefill(self, task: PrefillTask) -> PrefillReply:
        """Prefill the request (``_prefill``). When the client freed it before or while this
        ran (it hung up during prefill), drop its chunks and the embeddings this call handed
        the indexer, and raise ``RequestCancelledError``."""
        rid = task.request_id
        if self._was_freed(rid, count=True):
            raise RequestCancelledError(f"request {rid} was cancelled before its prefill")
        try:
            reply = self._prefill(task)
        except Exception:
            if not self._was_freed(rid):
                raise
            # a free that landed mid-prefill took the chunks from under it: it was cancelled
        if self._was_freed(rid, count=True):
            self.store.free(rid)
            self.indexer.forget.remote(rid)  # after this worker's register: same caller, in order
            raise RequestCancelledError(f"request {rid} was cancelled during its prefill")
        return reply

    def _was_freed(self, request_id: str, count: bool = False) -> bool:
        """Whether the client freed ``request_id``; ``count``: a prefill of it is being dropped."""
        with self._lock:
            freed = request_id in self._freed
            self.cancelled += int(freed and count)
            return freed

    def _prefill(self, task: PrefillTask) -> PrefillReply:
        """Prefill, register chunk embeddings with the indexer, sample the first token."""
        if task.lsa.chunk_size != self.store.chunk_size:
            raise ValueError(f"chunk_size {task.lsa.chunk_size} differs from the cluster's "
                             f"{self.store.chunk_size}")
        self.faults.hit("prefill")
        t0 = time.perf_counter()
        p = task.prompt
        res = prefill(self.bb.model, self.store, task.request_id, p.token_ids, p.offsets, p.text,
                      self.cfg.engine.prefill_piece_tokens)
        try:
            if task.lsa.mode == "lsa":
                emb, owner = self.encoder.encode_chunks(self.store.chunk_texts(task.request_id))
                self._register(task.request_id, emb, owner)
            first = sample(res.logits, task.sampling, make_generator(task.sampling))
        except Exception:
            self.store.free(task.request_id)
            raise
        payload_bytes = self.store.read(task.request_id, [0]).nbytes
        self.metrics.set("flashmemory_chunk_store_bytes", self.store.nbytes())
        seconds = time.perf_counter() - t0
        self.metrics.observe("flashmemory_prefill_seconds", seconds)
        return PrefillReply(task.request_id, self.rank, first, len(res.metas), payload_bytes,
                            seconds)

    def _register(self, request_id: str, emb: Any, owner: Any) -> None:
        """Hand the chunk embeddings to the indexer; if it cannot take them (dead, restarting
        past the timeout) the request goes on and decode falls back (``indexer.actor``)."""
        import ray
        from ray.exceptions import RayError

        try:
            ray.get(self.indexer.register.remote(request_id, emb, owner),
                    timeout=self.cfg.indexer_timeout_s)
        except RayError as e:  # includes GetTimeoutError
            logger.warning("indexer did not take the embeddings of %s: %s", request_id,
                           type(e).__name__)
            self.metrics.inc("flashmemory_indexer_fallbacks_total", reason="register_failed")

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            from flashmemory.indexer.neural import NeuralIndexer

            self._encoder = NeuralIndexer(self.cfg.engine.indexer, device=self.cfg.engine.device)
        return self._encoder

    def stage_chunks(self, plan: TransferPlan) -> Any:
        """Read the planned chunks as one payload and stage it in the transport."""
        self.faults.hit("stage")
        if plan.transfer_id in self._released:  # the receiver gave up while this ran
            raise TransferError(f"transfer {plan.transfer_id} was released before staging")
        payload = self._payload(plan)
        out = self.transport.stage(plan, payload)
        self.bytes_sent += payload.nbytes
        return out

    def _payload(self, plan: TransferPlan) -> Any:
        """The planned chunks as the one tensor the transport moves."""
        return self.store.read(plan.request_id, list(plan.chunk_ids))

    def accept_pair(self, peer_rank: int, peer_instance: str, host: str, port: int,
                    timeout_s: float) -> None:
        """torch transport: join the process group a decode worker set up with this worker."""
        assert isinstance(self.transport, TorchDistTransport)
        self.transport.accept(peer_rank, peer_instance, host, port, timeout_s)

    def send_chunks(self, plan: TransferPlan) -> None:
        self.faults.hit("send")
        self.transport.send(plan)

    def release_transfer(self, transfer_id: int) -> None:
        self.transport.release(transfer_id)
        self._released.append(transfer_id)  # a late stage of this transfer must not stay staged

    def set_fault(self, fault: Fault) -> None:
        """Failpoint for tests and outage drills (``cluster.faults``)."""
        self.faults.set(fault)

    def staged_transfers(self) -> int:
        return self.transport.num_staged()

    def free(self, request_id: str) -> None:
        """Drop a request's chunks; a prefill of it still running (or not yet started) drops
        them when it ends."""
        with self._lock:
            self._freed[request_id] = None
            while len(self._freed) > FREED_REMEMBERED:
                self._freed.popitem(last=False)
        self.store.free(request_id)
        self.metrics.set("flashmemory_chunk_store_bytes", self.store.nbytes())

    def stats(self) -> dict[str, Any]:
        return {"requests": len(self.store.requests()), "store_bytes": self.store.nbytes(),
                "cancelled": self.cancelled,
                "bytes_sent": self.bytes_sent, "staged": self.transport.num_staged(),
                "rss_bytes": process_rss(), **self.placement}

    def max_model_len(self) -> int:
        return self.bb.max_model_len
