"""Chunk transport: moves one request's selected chunks from a prefill worker to a decode worker.

Call order for one transfer (the decode side pulls, following a plan from the indexer):
  1. decode: ``transport.recv(plan, sender, out)`` asks the prefill worker to stage the payload
     (``sender.stage_chunks(plan)`` -> ``transport.stage(plan, payload)`` there). Errors on the
     prefill side (unknown request, a timeout) surface here before any collective is posted.
  2. torch p2p only: if the decode side has no process group with that sender's process yet
     (first transfer, a restarted sender, a pair broken by a failed transfer), it builds one
     (``sender.accept_pair``); then ``sender.send_chunks(plan)`` -> ``transport.send(plan)``
     posts the send while the decode side posts the matching receive; one message per transfer.
  3. decode: the payload lands in ``out`` when the decode pool reserved consecutive pages for
     the chunks (``pool.reserve``: no staging buffer, no scatter), else in a fresh buffer that
     ``pool.commit`` scatters into the pages; then ``sender.release_transfer``.
Staging first matters: a gloo receive that times out closes its pair of ranks for good (the
pair is then rebuilt), so a receive is only posted once the sender holds the payload.
Two implementations: ``TorchDistTransport`` (torch.distributed p2p: gloo on CPU, NCCL between
GPUs) and ``IpcTransport`` (same host: Ray's shared-memory object store for CPU tensors, CUDA IPC
handles for GPU tensors; needed because NCCL refuses two ranks on one GPU).
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)


class TransferError(RuntimeError):
    """A chunk transfer failed or timed out; the request fails, the workers keep serving."""


@dataclass(frozen=True)
class TransferPlan:
    """One batched move of chunks for one request (crosses actors)."""

    transfer_id: int  # unique per cluster, also across worker restarts (``transfer_ids``)
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
    def tag(self) -> int:
        """The p2p message tag (gloo takes 31 bits; unique within a pair's traffic)."""
        return self.transfer_id & 0x7FFFFFFF

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


def transfer_ids(rank: int) -> Iterator[int]:
    """Transfer ids of one receiving process: its rank, a random epoch (a restarted worker must
    not reuse ids the senders still remember as released) and a counter."""
    return itertools.count((rank << 48) | (secrets.randbits(16) << 32))


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
    """torch.distributed point-to-point over one two-rank process group per (prefill, decode)
    pair: rank 0 the prefill worker, rank 1 the decode worker.

    The decode side sets a pair up on its first transfer with a sender (it hosts the pair's
    TCP store, the sender joins through ``accept``) and again whenever the sender's process
    changed (``stage`` returns the sending process's id, so a restarted prefill worker is
    noticed before a receive is posted) or the pair broke: a gloo / NCCL pair whose send or
    receive failed or timed out is not reusable, so it is dropped and the next transfer builds
    a new one. A restarted decode worker simply starts with no pairs. Other pairs never notice.
    """

    def __init__(self, device: torch.device, backend: str = "gloo") -> None:
        self.device, self.backend = device, backend
        self.instance = uuid.uuid4().hex  # this process; a restarted worker has another one
        self._staged: dict[int, torch.Tensor] = {}
        self._pairs: dict[int, _Pair] = {}  # peer rank -> its pair group
        self.pairs_built = 0

    # -- prefill side (rank 0 of each pair) ------------------------------------------------------
    def accept(self, peer_rank: int, peer_instance: str, host: str, port: int,
               timeout_s: float) -> None:
        """Join the pair the decode worker ``peer_rank`` set up (replaces an older pair)."""
        self._pairs[peer_rank] = _Pair.join(self.backend, host, port, 0, peer_instance,
                                            timeout_s)

    def stage(self, plan: TransferPlan, payload: torch.Tensor) -> str:
        _check(plan, payload)
        if payload.device != self.device:  # from the store's host tier: NCCL sends GPU memory
            payload = payload.to(self.device)
        self._staged[plan.transfer_id] = payload.contiguous()
        return self.instance

    def send(self, plan: TransferPlan) -> None:
        payload = self._staged.pop(plan.transfer_id)
        pair = self._pairs.get(plan.dst_rank)
        if pair is None:
            raise TransferError(f"transfer {plan.transfer_id}: no pair with rank "
                                f"{plan.dst_rank}")
        _wait(pair.group.send([payload], 1, plan.tag), plan, "send")

    def release(self, transfer_id: int) -> None:
        self._staged.pop(transfer_id, None)

    def num_staged(self) -> int:
        return len(self._staged)

    # -- decode side (rank 1 of each pair) -------------------------------------------------------
    def recv(self, plan: TransferPlan, sender: Any,
             out: torch.Tensor | None = None) -> torch.Tensor:
        import ray

        peer = _staged(plan, sender)
        dtype = getattr(torch, plan.dtype)
        if out is not None and (tuple(out.shape) != plan.shape or out.dtype != dtype
                                or not out.is_contiguous()):
            raise TransferError(f"receive buffer {tuple(out.shape)} {out.dtype} does not match "
                                f"the plan {plan.shape} {plan.dtype}")
        pair = self._pairs.get(plan.src_rank)
        if pair is None or pair.peer != peer:  # first transfer, or the sender restarted
            pair = self._connect(plan, sender, peer)
        ref = sender.send_chunks.remote(plan)
        buf = torch.empty(plan.shape, dtype=dtype, device=self.device) if out is None else out
        try:
            _wait(pair.group.recv([buf], 0, plan.tag), plan, "recv")
            try:
                ray.get(ref, timeout=plan.timeout_s)
            except Exception as e:
                raise TransferError(f"transfer {plan.transfer_id} sender failed: {e}") from e
        except TransferError:
            self._pairs.pop(plan.src_rank, None)  # a broken pair is rebuilt by the next transfer
            raise
        return buf

    def _connect(self, plan: TransferPlan, sender: Any, peer: str) -> _Pair:
        import ray

        store = _store_master(plan.timeout_s)
        host = ray.util.get_node_ip_address()
        ref = sender.accept_pair.remote(plan.dst_rank, self.instance, host, store.port,
                                        plan.timeout_s)
        try:
            pair = _Pair.build(self.backend, store, 1, peer, plan.timeout_s)
            ray.get(ref, timeout=plan.timeout_s)
        except Exception as e:
            raise TransferError(f"transfer {plan.transfer_id}: could not connect to rank "
                                f"{plan.src_rank}: {type(e).__name__}: {e}") from e
        self._pairs[plan.src_rank] = pair
        self.pairs_built += 1
        return pair


def _store_master(timeout_s: float) -> Any:
    """A TCP store on a free port of this node: the rendezvous of one pair."""
    import torch.distributed as dist

    return dist.TCPStore("0.0.0.0", 0, 2, True, dt.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


@dataclass
class _Pair:
    """One two-rank process group and the process on its other end."""

    group: Any
    store: Any  # kept alive with the group
    peer: str  # the other process's transport instance id

    @staticmethod
    def build(backend: str, store: Any, rank: int, peer: str, timeout_s: float) -> _Pair:
        import torch.distributed as dist

        timeout = dt.timedelta(seconds=timeout_s)
        if backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            group = dist.ProcessGroupNCCL(store, rank, 2, opts)
        else:
            group = dist.ProcessGroupGloo(store, rank, 2, timeout)
        return _Pair(group, store, peer)

    @staticmethod
    def join(backend: str, host: str, port: int, rank: int, peer: str,
             timeout_s: float) -> _Pair:
        import torch.distributed as dist

        store = dist.TCPStore(host, port, 2, False, dt.timedelta(seconds=timeout_s))
        return _Pair.build(backend, store, rank, peer, timeout_s)


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
