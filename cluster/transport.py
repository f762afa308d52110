"""Chunk transport: moves one request's selected chunks from a prefill worker to a decode worker.

Call order for one transfer (the decode side pulls, following a plan from the indexer):
  1. decode: ``transport.recv(plan, sender, out)`` asks the prefill worker to stage the payload
     (``sender.stage_chunks(plan)`` -> ``transport.stage(plan, payload)`` there). Errors on the
     prefill side (unknown request, a timeout) surface here before any collective is posted.
  2. torch p2p only: ``sender.send_chunks(plan)`` -> ``transport.send(plan)`` posts the send
     while the decode side posts the matching receive; one message per transfer.
  3. decode: the payload lands in ``out`` when the decode pool reserved consecutive pages for
     the chunks (``pool.reserve``: no staging buffer, no scatter), else in a fresh buffer that
     ``pool.commit`` scatters into the pages; then ``sender.release_transfer``.
Staging first matters: a gloo receive that times out closes the pair of ranks for good, so a
receive is only posted once the sender holds the payload.
Two implementations: ``TorchDistTransport`` (torch.distributed p2p: gloo on CPU, NCCL between
GPUs) and ``IpcTransport`` (same host: Ray's shared-memory object store for CPU tensors, CUDA IPC
handles for GPU tensors; needed because NCCL refuses two ranks on one GPU).
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

    def stage(self, plan: TransferPlan, payload: torch.Tensor) -> Any:
        """Prefill side: hold the payload; returns what the receiver needs (IPC: a handle)."""
        ...

    def send(self, plan: TransferPlan) -> None:
        """Prefill side: move the staged payload (p2p send; a no-op for IPC)."""
        ...

    def release(self, transfer_id: int) -> None:
        """Prefill side: drop a staged payload."""
        ...

    def num_staged(self) -> int:
        """Prefill side: payloads staged and not yet sent or released (0 when idle)."""
        ...

    def recv(self, plan: TransferPlan, sender: Any,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode side: run the transfer with ``sender`` (the prefill worker's actor handle);
        lands in ``out`` (the decode pool's pages) when given and returns it."""
        ...


def _check(plan: TransferPlan, payload: torch.Tensor) -> None:
    if tuple(payload.shape) != plan.shape:
        raise TransferError(f"payload {tuple(payload.shape)} != plan {plan.shape}")


def _staged(plan: TransferPlan, sender: Any) -> Any:
    import ray

    try:
        return ray.get(sender.stage_chunks.remote(plan), timeout=plan.timeout_s)
    except Exception as e:
        raise TransferError(f"transfer {plan.transfer_id} of {plan.request_id!r} could not be "
                            f"staged: {type(e).__name__}: {e}") from e


class TorchDistTransport:
    """torch.distributed point-to-point in one process group spanning all workers."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._staged: dict[int, torch.Tensor] = {}

    @staticmethod
    def init_group(backend: str, init_method: str, rank: int, world_size: int,
                   timeout_s: float = 120.0) -> None:
        """Join the workers' process group (each worker calls this once at start-up)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=init_method, rank=rank,
                                    world_size=world_size,
                                    timeout=dt.timedelta(seconds=timeout_s))

    def stage(self, plan: TransferPlan, payload: torch.Tensor) -> None:
        _check(plan, payload)
        if payload.device != self.device:  # from the store's host tier: NCCL sends GPU memory
            payload = payload.to(self.device)
        self._staged[plan.transfer_id] = payload.contiguous()

    def send(self, plan: TransferPlan) -> None:
        import torch.distributed as dist

        payload = self._staged.pop(plan.transfer_id)
        _wait(dist.isend(payload, dst=plan.dst_rank, tag=plan.transfer_id), plan, "send")

    def release(self, transfer_id: int) -> None:
        self._staged.pop(transfer_id, None)

    def num_staged(self) -> int:
        return len(self._staged)

    def recv(self, plan: TransferPlan, sender: Any,
             out: torch.Tensor | None = None) -> torch.Tensor:
        import ray
        import torch.distributed as dist

        _staged(plan, sender)
        ref = sender.send_chunks.remote(plan)
        dtype = getattr(torch, plan.dtype)
        if out is not None and (tuple(out.shape) != plan.shape or out.dtype != dtype
                                or not out.is_contiguous()):
            raise TransferError(f"receive buffer {tuple(out.shape)} {out.dtype} does not match "
                                f"the plan {plan.shape} {plan.dtype}")
        buf = torch.empty(plan.shape, dtype=dtype, device=self.device) if out is None else out
        _wait(dist.irecv(buf, src=plan.src_rank, tag=plan.transfer_id), plan, "recv")
        try:
            ray.get(ref, timeout=plan.timeout_s)
        except Exception as e:
            raise TransferError(f"transfer {plan.transfer_id} sender failed: {e}") from e
        return buf


class IpcTransport:
    """Same-host transfer: CPU payloads through Ray's shared-memory object store, CUDA payloads
    through CUDA IPC handles (prefill and decode on one GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._held: dict[int, torch.Tensor] = {}  # CUDA payloads kept alive until received

    def stage(self, plan: TransferPlan, payload: torch.Tensor) -> Any:
        _check(plan, payload)
        if payload.is_cuda:
            from torch.multiprocessing.reductions import reduce_tensor

            self._held[plan.transfer_id] = payload
            return reduce_tensor(payload)
        return payload.contiguous()  # Ray stores it in shared memory; the reader maps it

    def send(self, plan: TransferPlan) -> None:
        return None

    def release(self, transfer_id: int) -> None:
        self._held.pop(transfer_id, None)

    def num_staged(self) -> int:
        return len(self._held)

    def recv(self, plan: TransferPlan, sender: Any,
             out: torch.Tensor | None = None) -> torch.Tensor:
        handle = _staged(plan, sender)
        src = handle if isinstance(handle, torch.Tensor) else handle[0](*handle[1])
        return src.to(self.device, copy=True) if out is None else out.copy_(src)


def _wait(work: Any, plan: TransferPlan, what: str) -> None:
    try:
        ok = work.wait(timeout=dt.timedelta(seconds=plan.timeout_s))
    except Exception as e:
        raise TransferError(f"transfer {plan.transfer_id} {what} failed: {e}") from e
    if ok is False:
        raise TransferError(f"transfer {plan.transfer_id} {what} timed out after "
                            f"{plan.timeout_s:.0f} s")
