"""Per-process set-up shared by the workers: threads, environment, transport construction."""

from __future__ import annotations

import logging
import os

import torch

from flashmemory.cluster.config import ClusterConfig
from flashmemory.cluster.transport import ChunkTransport, IpcTransport, TorchDistTransport


def setup_process(cfg: ClusterConfig) -> None:
    """Quiet libraries, offline hub, bounded intra-op threads (workers share the cores)."""
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(key, value)
    torch.set_num_threads(cfg.torch_threads)
    logging.basicConfig(level=logging.INFO)


def placement(cfg: ClusterConfig) -> dict[str, str | None]:
    """Where this worker runs, for its ``stats``: the chunk transport (``nccl``, ``gloo`` or
    ``ipc``) and the UUID of the GPU it was given (None on CPU), which tells apart workers that
    each see their GPU as ``cuda:0``."""
    device = torch.device(cfg.engine.device)
    gpu = str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None
    ipc = cfg.resolved_transport() == "ipc"
    return {"transport": "ipc" if ipc else cfg.backend, "gpu": gpu}


def make_transport(cfg: ClusterConfig) -> ChunkTransport:
    device = torch.device(cfg.engine.device)
    if cfg.resolved_transport() == "ipc":
        return IpcTransport(device)
    return TorchDistTransport(device, cfg.backend)

