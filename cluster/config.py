"""Cluster configuration: worker counts, placement resources, transport. Composes EngineConfig;
the Serve YAML's application args and ``flashmemory serve`` flags map onto these fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from flashmemory.config import EngineConfig

Transport = Literal["auto", "torch", "ipc"]
TRANSPORTS: tuple[str, ...] = get_args(Transport)


@dataclass(frozen=True)
class ClusterConfig:
    """Prefill / decode workers and how chunks move between them."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    num_prefill: int = 1
    num_decode: int = 1
    # Ray placement: custom resources let a cluster dedicate nodes/GPUs to each role.
    prefill_resources: dict[str, float] = field(default_factory=dict)
    decode_resources: dict[str, float] = field(default_factory=dict)
    num_gpus_per_worker: float = 0.0  # 0.5 lets prefill and decode share one GPU
    num_cpus_per_worker: float = 0.25  # fractional: Ray reserves 1 CPU per actor by default
    torch_threads: int = 1  # intra-op threads per worker process
    transport: Transport = "auto"  # auto: torch p2p (gloo/NCCL) unless workers share a GPU
    transfer_timeout_s: float = 60.0
    # fault handling: Ray restarts a dead worker (-1: always); a decode worker waits
    # indexer_timeout_s for the indexer's plan before it keeps its resident chunks instead
    max_restarts: int = -1
    restart_wait_s: float = 30.0  # how long a new request waits for a restarting worker
    indexer_timeout_s: float = 10.0
    max_batch: int = 32  # sequences per decode step
    # HTTP limits of the Serve ingress (a 1M-token prompt is ~4 MB of text)
    max_request_bytes: int = 32 << 20
    request_read_timeout_s: float = 30.0  # the whole body must arrive within this
    max_stop_sequences: int = 16
    # admission by KV memory: the decode workers' KV capacity (per worker; None: 90% of the free
    # GPU memory at start, or half the host's available memory / num_decode on CPU)
    kv_capacity_gb: float | None = None
    max_waiting_requests: int = 256  # waiting for KV memory; more are refused at once (429)
    admission_timeout_s: float = 30.0  # longest wait for KV memory before a 429
    retry_after_s: int = 5  # the 429's Retry-After

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {self.transport!r}; choose one of "
                             f"{', '.join(TRANSPORTS)}")
        if self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError("num_prefill and num_decode must be >= 1")
        if self.max_batch < 1 or self.transfer_timeout_s <= 0 or self.indexer_timeout_s <= 0:
            raise ValueError("max_batch must be >= 1, transfer_timeout_s and indexer_timeout_s > 0")
        if self.max_restarts < -1 or self.restart_wait_s < 0:
            raise ValueError("max_restarts must be >= 0 (or -1: no limit) and "
                             "restart_wait_s >= 0")
        if (self.max_request_bytes < 1024 or self.request_read_timeout_s <= 0
                or self.max_stop_sequences < 0):
            raise ValueError("max_request_bytes >= 1024, request_read_timeout_s > 0 and "
                             "max_stop_sequences >= 0 required")
        if ((self.kv_capacity_gb is not None and self.kv_capacity_gb <= 0)
                or self.max_waiting_requests < 0 or self.admission_timeout_s < 0
                or self.retry_after_s < 1):
            raise ValueError("kv_capacity_gb > 0, max_waiting_requests >= 0, "
                             "admission_timeout_s >= 0 and retry_after_s >= 1 required")
        if self.engine.lsa.mode == "oracle":
            raise ValueError("the oracle mode needs a full-attention trace; it is an evaluation "
                             "mode of the single-process engine, not of the cluster")

    def resolved_transport(self) -> str:
        """``torch`` or ``ipc``: NCCL refuses two ranks on one GPU, so shared GPUs use IPC."""
        if self.transport != "auto":
            return self.transport
        sharing_gpu = self.engine.device.startswith("cuda") and self.num_gpus_per_worker < 1
        return "ipc" if sharing_gpu else "torch"

    @property
    def backend(self) -> str:
        return "nccl" if self.engine.device.startswith("cuda") else "gloo"
