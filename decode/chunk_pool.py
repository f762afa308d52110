"""Decode-side chunk pool: the pages that hold each request's resident chunks, and nothing else.

A page holds one chunk for every layer, in the transfer payload's layout (L, 2, Hkv, C, D), so a
received payload lands with one scatter. Used by the decode step and by the chunk transport.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class PoolExhaustedError(RuntimeError):
    """No free page is left and the pool may not grow."""


@dataclass
class ResidentTable:
    """One request's resident chunks on this decode worker."""

    pages: dict[int, int] = field(default_factory=dict)  # chunk index -> page id
    pinned: set[int] = field(default_factory=set)  # chunks decode writes into (never evicted)
    num_tokens: int = 0  # tokens in the sequence so far (prompt + generated)
    num_prompt_chunks: int = 0


class ChunkPool:
    """Paged KV pool (num_pages, L, 2, Hkv, C, D); grows by doubling up to ``max_pages``."""

    def __init__(
        self,
        page_shape: tuple[int, ...],
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        initial_pages: int = 64,
        max_pages: int | None = None,
    ) -> None:
        self.page_shape = page_shape
        self.chunk_size = page_shape[3]
        self.max_pages = max_pages
        self.kv = torch.zeros((initial_pages, *page_shape), dtype=dtype, device=device)
        self._free = list(range(initial_pages - 1, -1, -1))
        self.tables: dict[str, ResidentTable] = {}
        self.internal_pages = 0  # held by the decode runner itself (``alloc_internal``)

    @property
    def page_bytes(self) -> int:
        return self.kv[0].numel() * self.kv.element_size()

    @property
    def token_bytes(self) -> int:
        """KV bytes of one token (all layers, K and V)."""
        return self.page_bytes // self.chunk_size

    @property
    def num_pages(self) -> int:
        return self.kv.shape[0]

    def pages_in_use(self) -> int:
        """Pages holding requests' chunks (the runner's own pages are not counted)."""
        return self.num_pages - len(self._free) - self.internal_pages

    def alloc_internal(self) -> int:
        """One page for the decode runner's own use (padding rows of captured graphs write
        there), held for the pool's lifetime and left out of ``pages_in_use``."""
        page = self.alloc(1)[0]
        self.internal_pages += 1
        return page

    def _grow(self, need: int) -> None:
        old = self.num_pages
        new = max(old * 2, old + need)
        if self.max_pages is not None:
            new = min(new, self.max_pages)
        if new - old < need:
            raise PoolExhaustedError(
                f"chunk pool full: {self.pages_in_use()} of {self.num_pages} pages in use"
            )
        extra = torch.zeros((new - old, *self.page_shape), dtype=self.kv.dtype,
                            device=self.kv.device)
        self.kv = torch.cat([self.kv, extra])
        self._free = list(range(new - 1, old - 1, -1)) + self._free

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            self._grow(n - len(self._free))
        return [self._free.pop() for _ in range(n)]

    def open(self, request_id: str, num_prompt_tokens: int) -> ResidentTable:
        """Start tracking a request whose prompt has ``num_prompt_tokens`` tokens."""
        if request_id in self.tables:
            raise ValueError(f"request {request_id!r} is already on this decode pool")
        c = self.chunk_size
        table = ResidentTable(num_tokens=num_prompt_tokens,
                              num_prompt_chunks=-(-num_prompt_tokens // c))
        self.tables[request_id] = table
        return table

    def alloc_run(self, n: int) -> int | None:
        """Take ``n`` consecutive free pages; returns the first, or None if no such run is free."""
        if n < 1:
            return None
        if n > len(self._free):
            self._grow(n - len(self._free))  # the grown tail is one free run
        free = sorted(self._free)
        start = 0
        for i in range(1, len(free) + 1):
            if i == len(free) or free[i] != free[i - 1] + 1:  # a run ends at i - 1
                if i - start >= n:
                    first = free[start]
                    taken = set(range(first, first + n))
                    self._free = [p for p in self._free if p not in taken]
                    return first
                start = i
        return None

    def reserve(self, request_id: str,
                chunk_ids: list[int]) -> tuple[list[int], torch.Tensor | None]:
        """Pages for chunks about to arrive, and when they are consecutive, the pool's own view
        of them (n, L, 2, Hkv, C, D) so the transport writes straight into the pool."""
        table = self.tables[request_id]
        if any(c in table.pages for c in chunk_ids):
            raise ValueError(f"chunks already resident for {request_id!r}")
        first = self.alloc_run(len(chunk_ids))
        if first is None:
            return self.alloc(len(chunk_ids)), None
        return list(range(first, first + len(chunk_ids))), self.kv[first:first + len(chunk_ids)]

    def commit(self, request_id: str, chunk_ids: list[int], pages: list[int],
               payload: torch.Tensor | None = None) -> None:
        """Make reserved pages resident; ``payload`` is scattered in unless it already landed."""
        if payload is not None:
            dst = torch.tensor(pages, dtype=torch.long, device=self.kv.device)
            self.kv[dst] = payload.to(self.kv.device, self.kv.dtype)
        self.tables[request_id].pages.update(zip(chunk_ids, pages, strict=True))

    def release(self, pages: list[int]) -> None:
        """Return reserved pages that were never committed (a failed transfer)."""
        self._free.extend(pages)

    def load(self, request_id: str, chunk_ids: list[int], payload: torch.Tensor) -> None:
        """Place received chunks (payload (n, L, 2, Hkv, C, D)) into fresh pages."""
        pages, _ = self.reserve(request_id, chunk_ids)
        self.commit(request_id, chunk_ids, pages, payload)

    def evict(self, request_id: str, chunk_ids: list[int]) -> None:
        table = self.tables[request_id]
        for c in chunk_ids:
            if c in table.pinned:
                raise ValueError(f"chunk {c} of {request_id!r} is pinned (decode writes into it)")
            self._free.append(table.pages.pop(c))

    def ensure_slot(self, request_id: str) -> tuple[int, int]:
        """(page, slot) where the next token's K/V goes; opens a new pinned page when needed."""
        table = self.tables[request_id]
        chunk, slot = divmod(table.num_tokens, self.chunk_size)
        if chunk not in table.pages:
            if chunk < table.num_prompt_chunks:
                raise ValueError(f"chunk {chunk} of {request_id!r} holds prompt tokens but is "
                                 "not resident: fetch the recency tail before decoding")
            table.pages[chunk] = self.alloc(1)[0]
        table.pinned.add(chunk)
        return table.pages[chunk], slot

    def close(self, request_id: str) -> None:
        """Free every page of a finished, failed or cancelled request."""
        table = self.tables.pop(request_id, None)
        if table is not None:
            self._free.extend(table.pages.values())

    def resident_tokens(self, request_id: str) -> int:
        """Valid tokens held in pages for this request (the numerator of the KV footprint)."""
        table = self.tables[request_id]
        c, total = self.chunk_size, table.num_tokens
        return sum(min(c, total - i * c) for i in table.pages if i * c < total)
