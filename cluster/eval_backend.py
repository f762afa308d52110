"""Evaluation against a running cluster: the eval runner's backend interface (``tokenizer``,
``max_model_len``, ``config``, ``run_modes``) served by the live workers, not a private model copy.

Used by ``flashmemory eval --cluster ADDRESS`` (e.g. inside ``ray job submit``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from flashmemory.cluster.client import ClusterClient
from flashmemory.cluster.launch import NAMESPACE, connect_workers
from flashmemory.config import BACKBONE_MODES, EngineConfig, LSAConfig, SamplingParams
from flashmemory.types import Prompt, RequestOutput


class ClusterBackend:
    """Duck-types the parts of ``LLM`` that ``evaluation.runner.run_eval`` uses."""

    def __init__(self, client: ClusterClient, tokenizer: Any, max_model_len: int) -> None:
        self.client, self.tokenizer, self.max_model_len = client, tokenizer, max_model_len

    @property
    def config(self) -> EngineConfig:
        return self.client.h.cfg.engine

    @classmethod
    def connect(cls, address: str = "auto") -> ClusterBackend:
        """Join the Ray cluster at ``address`` and find the FlashMemory workers by name."""
        import ray

        from flashmemory.model.loader import load_tokenizer, resolve

        if not ray.is_initialized():
            ray.init(address=address, logging_level="WARNING")
        try:
            indexer = ray.get_actor("indexer", namespace=NAMESPACE)
        except ValueError as e:
            raise ValueError(f"no FlashMemory cluster at {address!r} (start one with "
                             "`flashmemory serve`)") from e
        cfg = ray.get(indexer.config.remote())
        handles = connect_workers(cfg)
        max_len = ray.get(handles.prefills[0].max_model_len.remote())
        return cls(ClusterClient(handles), load_tokenizer(resolve(cfg.engine.model)), max_len)

    def run_modes(self, prompt: Prompt, sampling: SamplingParams,
                  configs: list[LSAConfig]) -> list[RequestOutput]:
        """One request per mode through the cluster (each re-prefills; modes run concurrently)."""
        return self.run_batch([(prompt, sampling, configs)])[0]

    def run_batch(self, items: list[tuple[Prompt, SamplingParams, list[LSAConfig]]],
                  ) -> list[list[RequestOutput]]:
        """Several samples at once, every mode of each: the client routes each request to the
        least-loaded decode worker, so a batch spreads over all of them."""
        for _, _, configs in items:
            self.check(configs)

        async def all_() -> list[RequestOutput]:
            return await asyncio.gather(*(self.client.generate(p, s, c)
                                          for p, s, configs in items for c in configs))

        flat = iter(asyncio.run(all_()))
        return [[next(flat) for _ in configs] for _, _, configs in items]

    def check(self, configs: list[LSAConfig]) -> None:
        """Modes the cluster cannot run fail before any request is sent."""
        for c in configs:
            if c.mode in BACKBONE_MODES:
                raise ValueError(f"the {c.mode} mode reads the backbone's attention and is not "
                                 "available through the cluster; run it with the "
                                 "single-process engine")
            if c.indexer is not None and c.indexer != self.config.indexer:
                raise ValueError(f"the cluster's indexer is {self.config.indexer!r}; a variant "
                                 f"with indexer={c.indexer} needs the single-process engine")
            if c.chunk_size != self.config.lsa.chunk_size:
                raise ValueError(f"the cluster runs chunk_size {self.config.lsa.chunk_size}; "
                                 f"got {c.chunk_size}")
