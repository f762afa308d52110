"""Chunk transports between two real Ray actors: gloo point-to-point (a process group per pair,
built on demand) and the IPC (object store) path; one message per transfer, exact bytes, a
failed transfer that leaves both serving, and pairs rebuilt after a stalled send and after the
sender's process was replaced."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import torch

from flashmemory.cluster.transport import (
    IpcTransport,
    TorchDistTransport,
    TransferError,
    TransferPlan,
)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


class Peer:
    """A stand-in for a prefill (rank 0) or decode (rank 1) worker: transport only."""

    def __init__(self, kind: str, rank: int) -> None:
        cpu = torch.device("cpu")
        self.t = TorchDistTransport(cpu, "gloo") if kind == "torch" else IpcTransport(cpu)
        self.rank = rank
        self.stall_send_s = 0.0

    def accept_pair(self, peer_rank: int, peer: str, host: str, port: int, timeout: float) -> None:
        assert isinstance(self.t, TorchDistTransport)
        self.t.accept(peer_rank, peer, host, port, timeout)

    def stall_next_send(self, seconds: float) -> None:
        self.stall_send_s = seconds

    def pairs_built(self) -> int:
        return self.t.pairs_built if isinstance(self.t, TorchDistTransport) else 0

    def stage_chunks(self, plan: TransferPlan) -> Any:
        if plan.request_id == "missing":
            raise KeyError("no such request")  # as a prefill worker that freed the request
        return self.t.stage(plan, torch.full(plan.shape, float(plan.transfer_id)))

    def send_chunks(self, plan: TransferPlan) -> None:
        if self.stall_send_s:  # a sender stuck after staging: the receive times out
            time.sleep(self.stall_send_s)
            self.stall_send_s = 0.0
        self.t.send(plan)

    def pull(self, sender: Any, plan: TransferPlan) -> tuple[float, float, int]:
        payload = self.t.recv(plan, sender)
        return float(payload.min()), float(payload.max()), payload.nbytes

    def pull_into_pool(self, sender: Any, plan: TransferPlan) -> tuple[bool, float, float]:
        """Receive into consecutive pages of a decode pool: the payload lands in place."""
        from flashmemory.decode.chunk_pool import ChunkPool

        pool = ChunkPool(plan.page_shape, torch.float32, initial_pages=8)
        pool.open("r", 10 * plan.page_shape[3])
        pages, view = pool.reserve("r", list(plan.chunk_ids))
        got = self.t.recv(plan, sender, view)
        pool.commit("r", list(plan.chunk_ids), pages, None if got is view else got)
        landed = pool.kv[pages]
        return got is view, float(landed.min()), float(landed.max())

    def pull_failing(self, sender: Any, plan: TransferPlan) -> str:
        try:
            self.t.recv(plan, sender)
        except TransferError as e:
            return str(e)
        return "no error"


@pytest.fixture(scope="module")
def ray_cluster():
    import sys

    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Peer ships by value
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("kind", ["torch", "ipc"])
def test_transfer_moves_exact_payload_and_survives_a_timeout(ray_cluster, kind: str) -> None:
    ray = ray_cluster
    actor = ray.remote(Peer).options(num_cpus=0.1, max_concurrency=2)
    src, dst = actor.remote(kind, 0), actor.remote(kind, 1)
    page = (2, 2, 1, 8, 4)  # (L, 2, Hkv, C, D)
    plan = TransferPlan(1, "r", (0, 5, 9), 0, 1, page, "float32", timeout_s=20)
    lo, hi, nbytes = ray.get(dst.pull.remote(src, plan))
    assert (lo, hi) == (1.0, 1.0) and nbytes == plan.nbytes == 3 * 2 * 2 * 8 * 4 * 4
    failing = TransferPlan(2, "missing", (1,), 0, 1, page, "float32", timeout_s=5)
    msg = ray.get(dst.pull_failing.remote(src, failing))
    assert "could not be staged" in msg and "no such request" in msg, msg
    after = TransferPlan(3, "r", (2, 4), 0, 1, page, "float32", timeout_s=20)
    assert ray.get(dst.pull.remote(src, after))[:2] == (3.0, 3.0)  # both still serving
    into = TransferPlan(4, "r", (1, 7), 0, 1, page, "float32", timeout_s=20)
    assert ray.get(dst.pull_into_pool.remote(src, into)) == (True, 4.0, 4.0)
    for a in (src, dst):
        ray.kill(a)


def test_torch_pairs_are_rebuilt_after_a_stalled_send_and_a_replaced_sender(ray_cluster) -> None:
    """A send stuck after staging makes the receive time out and breaks that gloo pair; the next
    transfer builds a new pair and moves exact bytes. A sender whose process was replaced (a
    restarted prefill worker: same rank, new process) gets a new pair too."""
    ray = ray_cluster
    actor = ray.remote(Peer).options(num_cpus=0.1, max_concurrency=3)
    src, dst = actor.remote("torch", 0), actor.remote("torch", 1)
    page = (2, 2, 1, 8, 4)
    assert ray.get(dst.pull.remote(src, TransferPlan(1, "r", (0,), 0, 1, page, "float32",
                                                     timeout_s=20)))[:2] == (1.0, 1.0)
    assert ray.get(dst.pairs_built.remote()) == 1
    ray.get(src.stall_next_send.remote(6.0))
    msg = ray.get(dst.pull_failing.remote(src, TransferPlan(2, "r", (1,), 0, 1, page, "float32",
                                                            timeout_s=3)))
    assert "recv timed out" in msg or "recv failed" in msg, msg
    time.sleep(4)  # the stuck send wakes up and fails on the dropped pair
    plan = TransferPlan(3, "r", (2, 3), 0, 1, page, "float32", timeout_s=20)
    assert ray.get(dst.pull.remote(src, plan))[:2] == (3.0, 3.0)
    assert ray.get(dst.pairs_built.remote()) == 2
    ray.kill(src)
    src = actor.remote("torch", 0)  # the same rank in a new process
    plan = TransferPlan(4, "r", (5,), 0, 1, page, "float32", timeout_s=20)
    assert ray.get(dst.pull.remote(src, plan))[:2] == (4.0, 4.0)
    assert ray.get(dst.pairs_built.remote()) == 3
    for a in (src, dst):
        ray.kill(a)
