"""IndexerActor (a Ray actor, created by ``cluster.launch``): holds each request's chunk
embeddings, builds lookahead queries' selections, chooses the decode worker for a request and
decides its resident chunk set at every re-prediction (the decode worker then pulls the delta).

Faults: a decode worker reported dead (``report_down``) gets no new requests until a probe of it
answers again (Ray restarts it). A request whose embeddings this indexer does not hold (it was
restarted since the request's prefill, or registration failed) gets no plan: the decode worker
then keeps its resident chunks plus sinks and tail (``decode.worker``), counted in
``flashmemory_indexer_fallbacks_total``."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from flashmemory.cluster.config import ClusterConfig
from flashmemory.config import LSAConfig
from flashmemory.indexer.base import ResidencyState, SelectionRequest, Selector, plan_resident
from flashmemory.indexer.selectors import baseline_selector

logger = logging.getLogger(__name__)


def pick_decode(load: list[int], down: set[int], exclude: tuple[int, ...] = ()) -> int:
    """The least-loaded decode worker, lowest index first among equals: a live one not in
    ``exclude`` if any, else one not in ``exclude`` (a worker only reported dead may be back),
    else any."""
    every = range(len(load))
    for pool in ([i for i in every if i not in down and i not in exclude],
                 [i for i in every if i not in exclude], list(every)):
        if pool:
            return min(pool, key=lambda i: (load[i], i))
    raise ValueError("no decode workers")


class IndexerActor:
    def __init__(self, cfg: ClusterConfig) -> None:
        from flashmemory.cluster.runtime import setup_process

        setup_process(cfg)
        self.cfg = cfg
        self._neural: Any = None
        self._load = [0] * cfg.num_decode  # active requests per decode worker
        self._routes: dict[str, int] = {}
        self._down: set[int] = set()  # decode workers reported dead, being probed
        self.repredictions = 0
        from flashmemory.cluster.metrics import Metrics

        self.metrics = Metrics({"worker": "indexer"})
        self.metrics.track_process("cpu")  # the indexer embeds on the CPU

    @property
    def neural(self) -> Any:
        if self._neural is None:
            from flashmemory.indexer.neural import NeuralIndexer

            self._neural = NeuralIndexer(self.cfg.engine.indexer, device="cpu")
        return self._neural

    def register(self, request_id: str, emb: torch.Tensor, owner: torch.Tensor) -> None:
        """Chunk-window embeddings computed by a prefill worker."""
        self.neural.add_embeddings(request_id, emb, owner)

    def route(self, request_id: str, exclude: tuple[int, ...] = ()) -> int:
        """Pick the least-loaded live decode worker for a new request (not one in ``exclude``,
        where the client already failed to submit it); re-routing moves its load."""
        self._unroute(request_id)
        d = pick_decode(self._load, self._down, exclude)
        self._load[d] += 1
        self._routes[request_id] = d
        return d

    def report_down(self, index: int) -> None:
        """A client saw decode worker ``index`` die: route around it until it answers again."""
        if index in self._down:
            return
        logger.warning("decode-%d reported dead; routing around it while it restarts", index)
        self._down.add(index)
        threading.Thread(target=self._probe, args=(index,), name=f"probe-decode-{index}",
                         daemon=True).start()

    def _probe(self, index: int) -> None:
        """Until decode worker ``index`` answers (Ray restarts it; calls wait for that) or Ray
        says it is gone for good."""
        import ray
        from ray.exceptions import ActorDiedError, RayError

        from flashmemory.cluster.launch import NAMESPACE

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                worker = ray.get_actor(f"decode-{index}", namespace=NAMESPACE)
                ray.get(worker.ready.remote(), timeout=30)
                self._down.discard(index)
                logger.info("decode-%d answers again", index)
                return
            except ActorDiedError as e:
                if "will not be restarted" in str(e):
                    break
            except (RayError, ValueError):  # RayError includes GetTimeoutError
                pass  # not reachable yet (dying, restarting, or its name is not back yet)
            time.sleep(1.0)
        logger.error("decode-%d did not come back; it gets no new requests", index)

    def plan(self, request_id: str, lsa: LSAConfig,
             state: ResidencyState) -> tuple[set[int], int] | None:
        """The request's target resident chunks now (and how many the selector chose); None
        when this indexer holds no embeddings for it (lost with a restart, or never
        registered): the decode worker then falls back."""
        self.repredictions += 1
        selector: Selector | None = baseline_selector(lsa)
        if selector is None:
            if not self.neural.holds(request_id):  # the decode worker counts the fallback
                return None
            selector = self.neural
        return plan_resident(lsa, selector, state, self.cfg.engine.lsa.chunk_size)

    def scores(self, req: SelectionRequest) -> torch.Tensor | None:
        """The text indexer's scores of ``req``'s candidates (a DeepSeek-V4 decode worker plans
        pages itself and asks only for these); None when no embeddings are held for it."""
        self.repredictions += 1
        if not self.neural.holds(req.request_id):
            return None
        return self.neural.scores(req)

    def _unroute(self, request_id: str) -> None:
        d = self._routes.pop(request_id, None)
        if d is not None:
            self._load[d] -= 1

    def forget(self, request_id: str) -> None:
        """Drop a finished / failed / cancelled request's embeddings and route."""
        self._unroute(request_id)
        if self._neural is not None:
            self._neural.forget(request_id)

    def config(self) -> ClusterConfig:
        return self.cfg

    def stats(self) -> dict[str, Any]:
        from flashmemory.cluster.metrics import process_rss

        held = len(self._neural._chunks) if self._neural is not None else 0
        return {"load": list(self._load), "requests_held": held,
                "repredictions": self.repredictions, "down": sorted(self._down),
                "rss_bytes": process_rss()}
