"""Start the workers of a FlashMemory cluster on a running Ray cluster and wire them together.

Called by ``flashmemory serve``, the Serve app and the tests. Transport ranks: prefill workers
0..P-1, decode workers P..P+D-1 (the torch transport builds a process group per pair on demand).
Every actor is restarted by Ray when its process dies (``ClusterConfig.max_restarts``); calls in
flight then fail, calls made while it restarts wait for it; nothing is retried behind the client's
back (``max_task_retries=0``): the client decides (``cluster.client``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flashmemory.cluster.config import ClusterConfig

logger = logging.getLogger(__name__)
NAMESPACE = "flashmemory"  # Ray namespace of the named worker actors


@dataclass
class ClusterHandles:
    """Ray actor handles of one cluster (picklable: Serve replicas receive it)."""

    cfg: ClusterConfig
    indexer: Any
    prefills: list[Any]
    decodes: list[Any]


def _options(cfg: ClusterConfig, resources: dict[str, float]) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": cfg.num_cpus_per_worker,
                            "max_restarts": cfg.max_restarts, "max_task_retries": 0}
    if cfg.num_gpus_per_worker:
        opts["num_gpus"] = cfg.num_gpus_per_worker
    if resources:
        opts["resources"] = dict(resources)
    return opts


def check_backbone(cfg: ClusterConfig) -> bool:
    """Whether the checkpoint is DeepSeek-V4 (its workers: ``prefill.dsv4_worker``,
    ``decode.dsv4_worker``); for one, ValueError before any actor starts when the cluster's
    LSA settings or indexer do not fit it (``dsv4_engine.check_configs``)."""
    from flashmemory.model.loader import model_type, resolve

    source = resolve(cfg.engine.model)
    if model_type(source) != "deepseek_v4":
        return False
    from flashmemory.dsv4_engine import check_configs

    check_configs(source, [cfg.engine.lsa], cfg.engine.indexer)
    return True


def start_workers(cfg: ClusterConfig) -> ClusterHandles:
    """Create indexer, prefill and decode actors; wait until ready."""
    import ray

    from flashmemory.indexer.actor import IndexerActor

    if check_backbone(cfg):
        from flashmemory.decode.dsv4_worker import DSV4DecodeWorker as DecodeWorker
        from flashmemory.prefill.dsv4_worker import DSV4PrefillWorker as PrefillWorker
    else:
        from flashmemory.decode.worker import DecodeWorker
        from flashmemory.prefill.worker import PrefillWorker

    p, d = cfg.num_prefill, cfg.num_decode
    named = {"namespace": NAMESPACE}
    indexer = ray.remote(IndexerActor).options(  # CPU only: it embeds queries on the CPU
        name="indexer", **named, num_cpus=cfg.num_cpus_per_worker,
        max_restarts=cfg.max_restarts, max_task_retries=0).remote(cfg)
    prefills = [
        ray.remote(PrefillWorker)
        .options(max_concurrency=4, name=f"prefill-{i}", **named,
                 **_options(cfg, cfg.prefill_resources))
        .remote(cfg, i, indexer)
        for i in range(p)
    ]
    decodes = [
        ray.remote(DecodeWorker)
        .options(max_concurrency=64, name=f"decode-{j}", **named,
                 **_options(cfg, cfg.decode_resources))
        .remote(cfg, p + j, j, indexer, prefills)
        for j in range(d)
    ]
    ray.get([w.ready.remote() for w in prefills + decodes])
    logger.info("cluster up: %d prefill, %d decode workers, transport %s (%s)", p, d,
                cfg.resolved_transport(), cfg.backend)
    return ClusterHandles(cfg, indexer, prefills, decodes)


def connect_workers(cfg: ClusterConfig) -> ClusterHandles:
    """Handles of a running cluster's workers, by name (e.g. from a test or an eval job)."""
    import ray

    def get(name: str) -> Any:
        return ray.get_actor(name, namespace=NAMESPACE)

    return ClusterHandles(cfg, get("indexer"),
                          [get(f"prefill-{i}") for i in range(cfg.num_prefill)],
                          [get(f"decode-{j}") for j in range(cfg.num_decode)])


def stop_workers(h: ClusterHandles) -> None:
    import ray

    for a in [h.indexer, *h.prefills, *h.decodes]:
        ray.kill(a)
