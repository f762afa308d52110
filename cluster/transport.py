"""Chunk transport: moves one request's selected chunks from a prefill worker to a decode worker.

Call order for one transfer (the decode side pulls, following a plan from the indexer):
  1. decode worker: ``ref = prefill.send_chunks.remote(plan)`` (prefill reads the chunks from its
     store and calls ``transport.send(plan, payload)``);
  2. decode worker: ``payload = transport.recv(plan, ref)``, which completes the transfer (a p2p
     receive matched with the send, or a handle opened) and surfaces the sender's errors;
  3. decode worker: ``pool.load(request, plan.chunk_ids, payload)``.
Two implementations: ``TorchDistTransport`` (torch.distributed p2p: gloo on CPU, NCCL between
GPUs; one message per transfer) and ``IpcTransport`` (same host/device: Ray's shared-memory
object store for CPU tensors, CUDA IPC handles for GPU tensors; needed because NCCL refuses two
ranks on one GPU).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)


class TransferError(RuntimeError):
    """A chunk transfer failed or timed out; the request fails, the workers keep serving."""


@dataclass(frozen=True)
class TransferPlan:
    """One batched move of chunks for one request (crosses actors)."""

    transfer_id: int  # unique per cluster; also the p2p tag
    request_id: str
    chunk_ids: tuple[int, ...]  # chunk indices, in payload order
    src_rank: int  # prefill worker's rank in the transport group
    dst_rank: int  # decode worker's rank
    page_shape: tuple[int, ...]  # (L, 2, Hkv, C, D) of one chunk
    dtype: str  # torch dtype name, e.g. "float32"
    timeout_s: float = 30.0

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.chunk_ids), *self.page_shape)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


class ChunkTransport(Protocol):
    """Both sides of a chunk transfer; see the module docstring for the call order."""

    def send(self, plan: TransferPlan, payload: torch.Tensor) -> Any:
        """Prefill side. Returns what ``recv`` needs from the sender (or None)."""
        ...

    def recv(self, plan: TransferPlan, send_ref: Any) -> torch.Tensor:
        """Decode side. ``send_ref`` is the Ray ObjectRef of the sender's ``send_chunks`` call."""
        ...


class TorchDistTransport:
    """torch.distributed point-to-point in one process group spanning all workers."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @staticmethod
    def init_group(backend: str, init_method: str, rank: int, world_size: int,
                   timeout_s: float = 120.0) -> None:
        """Join the workers' process group (each worker calls this once at start-up)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=init_method, rank=rank,
                                    world_size=world_size,
                                    timeout=dt.timedelta(seconds=timeout_s))

    def send(self, plan: TransferPlan, payload: torch.Tensor) -> None:
        import torch.distributed as dist

        if tuple(payload.shape) != plan.shape:
            raise TransferError(f"payload {tuple(payload.shape)} != plan {plan.shape}")
        work = dist.isend(payload.contiguous(), dst=plan.dst_rank, tag=plan.transfer_id)
        _wait(work, plan, "send")

    def recv(self, plan: TransferPlan, send_ref: Any) -> torch.Tensor:
        import ray
        import torch.distributed as dist

        buf = torch.empty(plan.shape, dtype=getattr(torch, plan.dtype), device=self.device)
        work = dist.irecv(buf, src=plan.src_rank, tag=plan.transfer_id)
        _wait(work, plan, "recv")
        try:
            ray.get(send_ref, timeout=plan.timeout_s)
        except Exception as e:  # the sender's own failure, if any
            raise TransferError(f"transfer {plan.transfer_id} sender failed: {e}") from e
        return buf


class IpcTransport:
    """Same-host transfer: CPU payloads through Ray's shared-memory object store, CUDA payloads
    through CUDA IPC handles (prefill and decode on one GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._held: dict[int, torch.Tensor] = {}  # CUDA payloads kept alive until received

    def send(self, plan: TransferPlan, payload: torch.Tensor) -> Any:
        if tuple(payload.shape) != plan.shape:
            raise TransferError(f"payload {tuple(payload.shape)} != plan {plan.shape}")
        if payload.is_cuda:
            from torch.multiprocessing.reductions import reduce_tensor

            self._held[plan.transfer_id] = payload
            return reduce_tensor(payload)
        return payload.contiguous()  # Ray stores it in shared memory; the reader maps it

    def release(self, transfer_id: int) -> None:
        """Prefill side: drop a CUDA payload once the decode side has copied it."""
        self._held.pop(transfer_id, None)

    def recv(self, plan: TransferPlan, send_ref: Any) -> torch.Tensor:
        import ray

        try:
            handle = ray.get(send_ref, timeout=plan.timeout_s)
        except Exception as e:
            raise TransferError(f"transfer {plan.transfer_id} failed: {e}") from e
        if isinstance(handle, torch.Tensor):
            return handle.to(self.device)
        rebuild, args = handle
        return rebuild(*args).to(self.device, copy=True)


def _wait(work: Any, plan: TransferPlan, what: str) -> None:
    try:
        ok = work.wait(timeout=dt.timedelta(seconds=plan.timeout_s))
    except Exception as e:
        raise TransferError(f"transfer {plan.transfer_id} {what} failed: {e}") from e
    if ok is False:
        raise TransferError(f"transfer {plan.transfer_id} {what} timed out after "
                            f"{plan.timeout_s:.0f} s")
