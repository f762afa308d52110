"""Per-process set-up shared by the workers: threads, model loading, transport construction."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch

from flashmemory.cluster.config import ClusterConfig
from flashmemory.cluster.transport import ChunkTransport, IpcTransport, TorchDistTransport
from flashmemory.model.llama import CausalLM
from flashmemory.model.loader import load_model, load_tokenizer, resolve


@dataclass
class Backbone:
    """What every worker loads: the model, its tokenizer and the stop tokens."""

    model: CausalLM
    tokenizer: Any
    eos_ids: set[int]
    max_model_len: int


def setup_process(cfg: ClusterConfig) -> None:
    """Quiet libraries, offline hub, bounded intra-op threads (workers share the cores)."""
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(key, value)
    torch.set_num_threads(cfg.torch_threads)
    logging.basicConfig(level=logging.INFO)


def load_backbone(cfg: ClusterConfig) -> Backbone:
    e = cfg.engine
    src = resolve(e.model)
    model = load_model(src, e.torch_dtype, e.device)
    tok = load_tokenizer(src)
    eos = set(model.config.eos_token_ids)
    if tok.eos_token_id is not None:
        eos.add(tok.eos_token_id)
    return Backbone(model, tok, eos, e.max_model_len or model.config.max_position_embeddings)


def make_transport(cfg: ClusterConfig) -> ChunkTransport:
    device = torch.device(cfg.engine.device)
    if cfg.resolved_transport() == "ipc":
        return IpcTransport(device)
    return TorchDistTransport(device)


def rendezvous_address() -> str:
    """A tcp:// address on this node with a free port, for torch.distributed's TCP store."""
    import ray

    ip = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"tcp://{ip}:{port}"
