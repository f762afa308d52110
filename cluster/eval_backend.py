"""Evaluation against a running cluster: the eval runner's backend interface (``tokenizer``,
``max_model_len``, ``config``, ``run_modes``) served by the live workers, not a private model copy.

Used by ``flashmemory eval --cluster ADDRESS`` (e.g. inside ``ray job submit``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from flashmemory.cluster.client import ClusterClient
from flashmemory.cluster.launch import NAMESPACE, connect_workers
from flashmemory.config import EngineConfig, LSAConfig, SamplingParams
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
        for c in configs:
            if c.mode == "oracle":
                raise ValueError("the oracle mode is not available through the cluster; "
                                 "run it with the single-process engine")
            if c.chunk_size != self.config.lsa.chunk_size:
                raise ValueError(f"the cluster runs chunk_size {self.config.lsa.chunk_size}; "
                                 f"got {c.chunk_size}")

        async def all_() -> list[RequestOutput]:
            return await asyncio.gather(*(self.client.generate(prompt, sampling, c)
                                          for c in configs))

        return asyncio.run(all_())
