"""IndexerActor (a Ray actor, created by ``cluster.launch``): holds each request's chunk
embeddings, builds lookahead queries' selections, chooses the decode worker for a request and
decides its resident chunk set at every re-prediction (the decode worker then pulls the delta)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from flashmemory.cluster.config import ClusterConfig
from flashmemory.config import LSAConfig
from flashmemory.indexer.base import ResidencyState, Selector, plan_resident
from flashmemory.indexer.selectors import baseline_selector

logger = logging.getLogger(__name__)


class IndexerActor:
    def __init__(self, cfg: ClusterConfig) -> None:
        from flashmemory.cluster.runtime import setup_process

        setup_process(cfg)
        self.cfg = cfg
        self._neural: Any = None
        self._load = [0] * cfg.num_decode  # active requests per decode worker
        self._routes: dict[str, int] = {}
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

    def route(self, request_id: str) -> int:
        """Pick the least-loaded decode worker for a new request."""
        d = min(range(len(self._load)), key=lambda i: (self._load[i], i))
        self._load[d] += 1
        self._routes[request_id] = d
        return d

    def plan(self, request_id: str, lsa: LSAConfig,
             state: ResidencyState) -> tuple[set[int], int]:
        """The request's target resident chunks now (and how many the selector chose)."""
        self.repredictions += 1
        return plan_resident(lsa, self._selector(lsa), state, self.cfg.engine.lsa.chunk_size)

    def _selector(self, lsa: LSAConfig) -> Selector:
        return baseline_selector(lsa) or self.neural

    def forget(self, request_id: str) -> None:
        """Drop a finished / failed / cancelled request's embeddings and route."""
        d = self._routes.pop(request_id, None)
        if d is not None:
            self._load[d] -= 1
        if self._neural is not None:
            self._neural.forget(request_id)

    def config(self) -> ClusterConfig:
        return self.cfg

    def stats(self) -> dict[str, Any]:
        held = len(self._neural._chunks) if self._neural is not None else 0
        return {"load": list(self._load), "requests_held": held,
                "repredictions": self.repredictions}
