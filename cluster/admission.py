"""Admission control of the Serve ingress by KV memory: a request is admitted when the decode
workers' KV capacity still holds its estimated resident KV; otherwise it waits in a bounded
queue for up to ``admission_timeout_s`` and is then refused (HTTP 429 with Retry-After).

The estimate is what the request can hold at its peak on a decode worker: under LSA the sink,
the selected chunks (the budget), the open chunk, the recency tail and the generated tokens;
with full attention the whole prompt plus the generated tokens.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from flashmemory.config import LSAConfig


class Overloaded(Exception):
    """No room for the request within the wait bound (or the queue is full)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def estimate_kv_tokens(prompt_tokens: int, max_tokens: int, lsa: LSAConfig) -> int:
    """Peak resident KV tokens of one request on a decode worker."""
    if lsa.mode == "full":
        return prompt_tokens + max_tokens
    c = lsa.chunk_size
    chunks = math.ceil(prompt_tokens / c)
    if lsa.budget_tokens is not None:
        selected = math.ceil(lsa.budget_tokens / c)
    else:
        selected = math.ceil((lsa.budget or 0.0) * chunks)
    # sink + selected + open chunk + the recency tail's chunks (+1 for a tail off the grid)
    kept = min(chunks, lsa.sink_chunks + selected + 1 + math.ceil(lsa.recent_tokens / c) + 1)
    return kept * c + max_tokens


@dataclass
class _Waiter:
    need: int
    ready: asyncio.Event


class KVAdmission:
    """Ingress-side accounting of admitted KV bytes against the decode workers' capacity.

    One instance per ingress replica (the replica owns its cluster); coroutine-safe on the
    replica's event loop. Requests are admitted first come, first served.
    """

    def __init__(self, capacity_bytes: int, max_waiting: int, timeout_s: float,
                 retry_after_s: int) -> None:
        self.capacity, self.max_waiting = capacity_bytes, max_waiting
        self.timeout_s, self.retry_after_s = timeout_s, retry_after_s
        self.admitted = 0
        self._queue: list[_Waiter] = []

    async def acquire(self, need: int) -> None:
        """Wait until ``need`` bytes fit; raises Overloaded past the bound."""
        if need > self.capacity:
            raise Overloaded(f"the request needs ~{need / 2**20:.0f} MiB of KV; the decode "
                             f"workers hold {self.capacity / 2**20:.0f} MiB in all",
                             self.retry_after_s)
        if not self._queue and self.admitted + need <= self.capacity:
            self.admitted += need
            return
        if len(self._queue) >= self.max_waiting:
            raise Overloaded(f"{len(self._queue)} requests are already waiting for KV memory",
                             self.retry_after_s)
        w = _Waiter(need, asyncio.Event())
        self._queue.append(w)
        try:
            await asyncio.wait_for(w.ready.wait(), self.timeout_s)
        except TimeoutError:
            if w.ready.is_set():  # admitted just as the wait ran out: keep it
                return
            raise Overloaded(f"no KV memory for this request within {self.timeout_s:g} s",
                             self.retry_after_s) from None
        finally:
            if w in self._queue:
                self._queue.remove(w)
                self._wake()

    def release(self, need: int) -> None:
        self.admitted -= need
        self._wake()

    def _wake(self) -> None:
        """Admit waiters in order while the head of the queue fits."""
        while self._queue and not self._queue[0].ready.is_set():
            head = self._queue[0]
            if self.admitted + head.need > self.capacity:
                return
            self.admitted += head.need
            head.ready.set()
            self._queue.pop(0)

    @property
    def waiting(self) -> int:
        return len(self._queue)
