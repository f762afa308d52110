"""Prefill-side chunk store: every request's prompt KV as chunks of C tokens holding all layers.

Written by prefill (``prefill.runner``), read by the chunk transport when decode fetches chunks.
It is the one place that knows where a chunk lives and what token/text span it covers. Two
tiers: the store's device first (GPU memory, up to ``capacity_bytes``), then pinned host memory:
when a new request does not fit, the oldest requests move to the host tier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChunkMeta:
    """Token span [token_start, token_end) and text span [char_start, char_end) of one chunk."""

    index: int
    token_start: int
    token_end: int
    char_start: int
    char_end: int

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start


@dataclass
class _Entry:
    kv: torch.Tensor | None  # (num_chunks, L, 2, Hkv, C, D) prompt KV, last chunk zero-padded
    metas: list[ChunkMeta]
    text: str
    num_tokens: int
    seed: int | None = None  # synthetic context: kv is None, chunks are drawn on read


def chunk_shape(num_layers: int, num_kv_heads: int, head_dim: int,
                chunk_size: int) -> tuple[int, ...]:
    """(L, 2, Hkv, C, D): one chunk of every layer's K and V, the unit of store, pool and wire."""
    return (num_layers, 2, num_kv_heads, chunk_size, head_dim)


class ChunkStore:
    """Chunked prompt KV per request; ``read`` returns one contiguous payload for a transfer."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        chunk_size: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        capacity_bytes: int | None = None,
    ) -> None:
        self.shape = chunk_shape(num_layers, num_kv_heads, head_dim, chunk_size)
        self.chunk_size = chunk_size
        self.dtype, self.device = dtype, torch.device(device)
        self.capacity_bytes = capacity_bytes  # of the first tier; None = unbounded
        self._entries: dict[str, _Entry] = {}  # insertion order = age (oldest spills first)
        self.spilled_bytes = 0  # total moved to the host tier, for metrics

    # -- prefill side -------------------------------------------------------------------------
    def allocate(self, request_id: str, num_tokens: int, offsets: list[tuple[int, int]],
                 text: str) -> list[ChunkMeta]:
        """Reserve chunks for ``num_tokens`` tokens; offsets[i] is token i's char span."""
        if request_id in self._entries:
            raise ValueError(f"request {request_id!r} already has chunks")
        c = self.chunk_size
        n = -(-num_tokens // c)
        metas = []
        for i in range(n):
            t0, t1 = i * c, min((i + 1) * c, num_tokens)
            metas.append(ChunkMeta(i, t0, t1, offsets[t0][0], offsets[t1 - 1][1]))
        need = n * self._chunk_bytes()
        kv = torch.empty((n, *self.shape), dtype=self.dtype,
                         device=self.device if self._make_room(need) else "cpu")
        if not self._on_device(kv):
            kv = _pin(kv)
        kv[-1].zero_()  # only the last chunk has padding; prefill writes every other slot
        self._entries[request_id] = _Entry(kv, metas, text, num_tokens)
        return metas

    def add_synthetic(self, request_id: str, num_tokens: int, seed: int = 0) -> list[ChunkMeta]:
        """A context of ``num_tokens`` random-KV tokens that no prefill ran (for benchmarks).

        Nothing is stored: ``read`` draws each chunk from a generator seeded by (seed, chunk), so
        the same chunk reads the same every time and contexts of 1M+ tokens cost no memory.
        """
        if request_id in self._entries:
            raise ValueError(f"request {request_id!r} already has chunks")
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        c = self.chunk_size
        metas = [ChunkMeta(i, i * c, min((i + 1) * c, num_tokens), 0, 0)
                 for i in range(-(-num_tokens // c))]
        self._entries[request_id] = _Entry(None, metas, "", num_tokens, seed)
        return metas

    def write_layer(self, request_id: str, layer: int, start: int, k: torch.Tensor,
                    v: torch.Tensor) -> None:
        """Write K/V (T, Hkv, D) of tokens [start, start+T) for one layer into their chunks."""
        e = self._entries[request_id]
        c = self.chunk_size
        t = k.shape[0]
        end = start + t
        i = start
        while i < end:  # one slice copy per chunk touched
            chunk, off = divmod(i, c)
            n = min(c - off, end - i)
            dst = e.kv[chunk, layer]  # (2, Hkv, C, D)
            dst[0, :, off:off + n] = k[i - start:i - start + n].transpose(0, 1)
            dst[1, :, off:off + n] = v[i - start:i - start + n].transpose(0, 1)
            i += n

    # -- transport side -----------------------------------------------------------------------
    def read(self, request_id: str, chunk_ids: list[int],
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Contiguous payload (n, L, 2, Hkv, C, D) of the given chunks, in the given order;
        written into ``out`` (e.g. a decode pool's pages) when given, and ``out`` returned."""
        e = self._entries[request_id]
        if e.kv is None:
            return self._draw(e, chunk_ids, out)
        idx = torch.tensor(chunk_ids, dtype=torch.long, device=e.kv.device)
        if out is None:
            return e.kv.index_select(0, idx)
        if out.device == e.kv.device and out.dtype == e.kv.dtype:
            return torch.index_select(e.kv, 0, idx, out=out)  # one copy, into the pages
        return out.copy_(e.kv.index_select(0, idx), non_blocking=True)  # across tiers

    def _draw(self, e: _Entry, chunk_ids: list[int],
              out: torch.Tensor | None = None) -> torch.Tensor:
        """Synthetic chunks: N(0, 1) K/V, zero past the context's last token."""
        assert e.seed is not None
        if out is None or out.device.type != self.device.type:
            drawn = self._draw(e, chunk_ids, torch.empty(
                (len(chunk_ids), *self.shape), dtype=self.dtype, device=self.device))
            return drawn if out is None else out.copy_(drawn)
        g = torch.Generator(device=self.device)
        for i, c in enumerate(chunk_ids):
            if not 0 <= c < len(e.metas):
                raise IndexError(f"chunk {c} out of range ({len(e.metas)} chunks)")
            g.manual_seed(e.seed * 1_000_003 + c)
            out[i].normal_(generator=g)
            out[i, :, :, :, e.metas[c].num_tokens:] = 0
        return out

    def location(self, request_id: str) -> str:
        """Where a request's chunks live: the device, or ``cpu-pinned`` / ``cpu`` (host tier)."""
        kv = self._entries[request_id].kv
        if kv is None:
            return "synthetic"
        if self._on_device(kv):
            return str(kv.device)
        return "cpu-pinned" if kv.is_pinned() else "cpu"

    def _chunk_bytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()

    def device_bytes(self) -> int:
        return sum(e.kv.nbytes for e in self._entries.values()
                   if e.kv is not None and self._on_device(e.kv))

    def _on_device(self, t: torch.Tensor) -> bool:
        """In the first tier? (compares device types: ``cuda`` and ``cuda:0`` are the same)"""
        return t.device.type == self.device.type

    def _make_room(self, need: int) -> bool:
        """Spill the oldest device-tier requests to host memory until ``need`` bytes fit."""
        if self.capacity_bytes is None or self.device.type == "cpu":
            return True  # one tier only: host memory is the device
        if need > self.capacity_bytes:
            return False  # larger than the whole first tier: goes straight to the host tier
        for e in self._entries.values():
            if self.device_bytes() + need <= self.capacity_bytes:
                break
            if e.kv is not None and self._on_device(e.kv):
                e.kv = _pin(e.kv.to("cpu"))
                self.spilled_bytes += e.kv.nbytes
        return self.device_bytes() + need <= self.capacity_bytes

    def metas(self, request_id: str) -> list[ChunkMeta]:
        return self._entries[request_id].metas

    def chunk_texts(self, request_id: str) -> list[str]:
        e = self._entries[request_id]
        return [e.text[m.char_start:m.char_end] for m in e.metas]

    def num_tokens(self, request_id: str) -> int:
        return self._entries[request_id].num_tokens

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._entries

    def free(self, request_id: str) -> None:
        self._entries.pop(request_id, None)

    def nbytes(self) -> int:
        return sum(e.kv.nbytes for e in self._entries.values() if e.kv is not None)

    def requests(self) -> list[str]:
        return list(self._entries)

    def layer_kv(self, request_id: str, layer: int, num_tokens: int) -> torch.Tensor:
        """One layer's K/V for tokens [0, num_tokens) as (2, Hkv, num_tokens, D) (a copy)."""
        full = self._entries[request_id].kv
        if full is None:
            raise ValueError(f"request {request_id!r} is synthetic: it has no prefill KV")
        kv = full[:, layer]  # (n, 2, Hkv, C, D)
        n = kv.shape[0]
        flat = kv.permute(1, 2, 0, 3, 4).reshape(2, kv.shape[2], n * self.chunk_size, kv.shape[4])
        return flat[:, :, :num_tokens].to(self.device)  # from either tier to where prefill runs


def _pin(t: torch.Tensor) -> torch.Tensor:
    """Page-locked host memory when a GPU exists (fast, async copies); plain memory otherwise."""
    return t.pin_memory() if torch.cuda.is_available() else t
