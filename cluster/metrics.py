"""Prometheus metrics of the served system, exported from every actor through Ray's metrics
agent (``ray.util.metrics``); Prometheus scrapes each node's metrics export port. Ray prefixes the
names below with ``ray_``. Suffixes follow vLLM's metric names where one exists.

Created once per process by the ingress (request-level metrics) and the workers (KV metrics).
Ray drops a gauge series that is not set again within two export intervals, so an idle worker's
gauges would vanish from Prometheus; each process re-sets its last gauge values periodically,
and the same loop samples a worker's memory (``track_process``).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psutil
import torch

LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160]
# Ray rebuilds histogram observations from bucket midpoints, so a histogram's _sum (and a mean
# taken from it) is only as exact as its buckets: footprints get 1-point buckets where LSA runs
RATIO_BUCKETS = [k / 100 for k in range(1, 31)] + [0.35, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0]
BYTES_BUCKETS = [2.0**k for k in range(16, 38, 2)]
_START_TIME = time.time()  # this process's start, as far as metrics are concerned
GAUGE_REFRESH_S = 4.0  # Ray's default export interval is 10 s; its gauge TTL two intervals

# name -> (kind, description, tag keys, buckets); documented in docs/METRICS.md
SPECS: dict[str, tuple[str, str, tuple[str, ...], list[float] | None]] = {
    "flashmemory_time_to_first_token_seconds": (
        "histogram", "Time from request arrival to the first token", ("model",), LATENCY_BUCKETS),
    "flashmemory_inter_token_latency_seconds": (
        "histogram", "Time between consecutive streamed tokens", ("model",), LATENCY_BUCKETS),
    "flashmemory_e2e_request_latency_seconds": (
        "histogram", "Request latency, arrival to last token", ("model",), LATENCY_BUCKETS),
    "flashmemory_prompt_tokens_total": ("counter", "Prompt tokens processed", ("model",), None),
    "flashmemory_generation_tokens_total": ("counter", "Tokens generated", ("model",), None),
    "flashmemory_request_success_total": (
        "counter", "Finished requests by finish reason", ("model", "finish_reason"), None),
    "flashmemory_request_errors_total": (
        "counter", "Failed requests by error type", ("model", "error_type"), None),
    "flashmemory_num_requests_running": (
        "gauge", "Requests being decoded on a decode worker", ("worker",), None),
    "flashmemory_num_requests_waiting": (
        "gauge", "Requests admitted by the ingress, not yet decoding", ("model",), None),
    "flashmemory_kv_footprint_ratio": (
        "histogram", "Per-request mean KV footprint (resident / full)", ("worker",),
        RATIO_BUCKETS),
    "flashmemory_kv_footprint_peak_ratio": (
        "histogram", "Per-request peak KV footprint", ("worker",), RATIO_BUCKETS),
    "flashmemory_kv_resident_bytes": (
        "gauge", "KV bytes resident in a decode worker's chunk pool", ("worker",), None),
    "flashmemory_kv_full_bytes": (
        "gauge", "KV bytes the running requests would hold with full attention", ("worker",),
        None),
    "flashmemory_chunks_selected": (
        "histogram", "Chunks selected per re-prediction", ("worker",),
        [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]),
    "flashmemory_transfer_bytes_total": (
        "counter", "Chunk bytes moved prefill -> decode", ("src", "dst"), None),
    "flashmemory_transfer_seconds": (
        "histogram", "Latency of one chunk transfer", ("src", "dst"), LATENCY_BUCKETS),
    "flashmemory_prefill_seconds": (
        "histogram", "Prefill worker seconds per request (prefill and chunk embedding)",
        ("worker",), LATENCY_BUCKETS),
    "flashmemory_selection_seconds": (
        "histogram", "Seconds planning one re-prediction (the indexer's plan included)",
        ("worker",), LATENCY_BUCKETS),
    "flashmemory_transfer_payload_bytes": (
        "histogram", "Bytes of one chunk transfer", ("src", "dst"), BYTES_BUCKETS),
    "flashmemory_repredictions_total": ("counter", "Re-predictions", ("worker",), None),
    "flashmemory_chunks_selected_total": (
        "counter", "Chunks selected, summed over re-predictions (exact mean with "
        "repredictions_total)", ("worker",), None),
    "flashmemory_chunk_pool_pages_used": (
        "gauge", "Pages in use in a decode worker's chunk pool", ("worker",), None),
    "flashmemory_chunk_pool_pages_total": (
        "gauge", "Pages allocated in a decode worker's chunk pool", ("worker",), None),
    "flashmemory_chunk_store_bytes": (
        "gauge", "Bytes of chunk KV held by a prefill worker", ("worker",), None),
    "flashmemory_chunks_fetched_total": (
        "counter", "Chunks fetched into a decode worker's pool; reason=reprediction counts "
        "misses (chunks the indexer asked for that were not resident)", ("worker", "reason"),
        None),
    "flashmemory_device_memory_bytes": (
        "gauge", "Memory held by a worker process: CUDA memory reserved by torch on a GPU, "
        "resident set size on CPU", ("worker", "device"), None),
    "flashmemory_indexer_fallbacks_total": (
        "counter", "Indexer fallbacks. reason=indexer_unavailable|no_embeddings: re-predictions "
        "the decode worker planned itself (resident chunks plus sinks and tail); "
        "reason=register_failed: prefills whose embeddings the indexer did not take",
        ("worker", "reason"), None),
    "flashmemory_worker_start_time_seconds": (
        "gauge", "Unix time a worker process started; a change means the actor restarted",
        ("worker",), None),
}


def process_rss() -> int:
    """This process's resident set size in bytes (the memory gauge on CPU; workers' ``stats``)."""
    return psutil.Process().memory_info().rss


class Metrics:
    """This process's metric objects, created on first use."""

    def __init__(self, default_tags: dict[str, str] | None = None) -> None:
        self.default_tags = default_tags or {}
        self._objs: dict[str, Any] = {}
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._lock = threading.Lock()
        self._refresher: threading.Thread | None = None
        self._device: torch.device | None = None  # whose memory the refresher samples

    def _get(self, name: str) -> Any:
        obj = self._objs.get(name)
        if obj is None:
            from ray.util import metrics as rm

            kind, desc, keys, buckets = SPECS[name]
            if kind == "histogram":
                obj = rm.Histogram(name, desc, boundaries=buckets, tag_keys=keys)
            elif kind == "counter":
                obj = rm.Counter(name, desc, tag_keys=keys)
            else:
                obj = rm.Gauge(name, desc, tag_keys=keys)
            self._objs[name] = obj
        return obj

    def _tags(self, name: str, tags: dict[str, str]) -> dict[str, str]:
        keys = SPECS[name][2]
        merged = {**self.default_tags, **tags}
        return {k: str(merged.get(k, "")) for k in keys}

    def observe(self, name: str, value: float, **tags: str) -> None:
        self._get(name).observe(value, tags=self._tags(name, tags))

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        if value > 0:
            self._get(name).inc(value, tags=self._tags(name, tags))

    def set(self, name: str, value: float, **tags: str) -> None:
        full = self._tags(name, tags)
        with self._lock:
            self._get(name).set(value, tags=full)
            self._gauges[(name, tuple(full.items()))] = value
            if self._refresher is None:
                self._refresher = threading.Thread(target=self._refresh, name="metrics-gauges",
                                                   daemon=True)
                self._refresher.start()

    def _refresh(self) -> None:
        """Every GAUGE_REFRESH_S: sample the tracked memory, then re-set every gauge's last
        value, so idle series stay exported (0 stays 0)."""
        while True:
            time.sleep(GAUGE_REFRESH_S)
            if self._device is not None:
                self._sample_memory()
            with self._lock:
                for (name, tags), value in self._gauges.items():
                    self._get(name).set(value, tags=dict(tags))

    def track_process(self, device: str) -> None:
        """Export this worker's start time and, from now on, its memory on ``device`` (CUDA
        memory reserved by torch, or the process's RSS on CPU); called once at start-up."""
        self._device = torch.device(device)
        self.set("flashmemory_worker_start_time_seconds", _START_TIME)
        self._sample_memory()

    def _sample_memory(self) -> None:
        dev = self._device
        assert dev is not None
        used = torch.cuda.memory_reserved(dev) if dev.type == "cuda" else process_rss()
        self.set("flashmemory_device_memory_bytes", used, device=str(dev))
