"""CSA pages of DeepSeek-V4 for LSA: the host-side ``PageStore`` a prefill fills, and the
operations that move pages in and out of a decode-side cache whose CSA layers hold only resident
pages (``open_resident``, ``fetch_pages``, ``evict_pages``).

Called by ``model.deepseek_v4.lsa`` (the single-process LSA decode loop); the engine / cluster
integration of issue 8 will put the store on the prefill side and the transfer between the two.
A page is ``page_entries`` consecutive CSA entries of one request (production: 64 entries = 256
tokens at 4:1) in every CSA layer at once: entry ``i`` is on page ``i // page_entries`` in all
of them, since every CSA layer compresses the same tokens at the same ratio. Sliding-window rings,
compressor buffers and HCA entries are not paged: they stay resident.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from flashmemory.model.deepseek_v4.cache import (
    CSA_PAGE_ENTRIES,
    DSV4Cache,
    EntryStore,
    LayerCache,
    ResidentEntryStore,
)
from flashmemory.model.deepseek_v4.config import CSA, DeepseekV4Config


@dataclass
class PagePayload:
    """Pages of one request, the unit of a store -> decode transfer (one contiguous read).

    Slots past a partial page's last entry hold zeros and position -1.
    """

    pages: torch.Tensor  # (P,) int64 page ids, in the order asked
    kv: torch.Tensor  # (P, Lc, E, D) entry K=V per CSA layer (Lc CSA layers in layer order)
    index_keys: torch.Tensor  # (P, Lc, E, Di) lightning-indexer keys
    positions: torch.Tensor  # (P, E) int64 global position of each entry's first token

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kv, self.index_keys,
                                                          self.positions))


@dataclass(frozen=True)
class PageLayout:
    """How a page is laid out as raw bytes for the chunk transport (one uint8 row per page:
    entries, then index keys, then positions), so DS-V4 pages travel through the same
    single-tensor transfers as Llama chunks."""

    csa_layers: int
    page_entries: int
    head_dim: int
    index_dim: int
    dtype: torch.dtype

    @staticmethod
    def of(cfg: DeepseekV4Config, dtype: torch.dtype,
           page_entries: int = CSA_PAGE_ENTRIES) -> PageLayout:
        """The layout of a model's pages (every CSA layer of ``cfg``)."""
        return PageLayout(sum(kind == CSA for kind in cfg.layer_types), page_entries,
                          cfg.head_dim, cfg.index_head_dim, dtype)

    @property
    def parts(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        lc, e = self.csa_layers, self.page_entries
        return [((lc, e, self.head_dim), self.dtype), ((lc, e, self.index_dim), self.dtype),
                ((e,), torch.long)]

    @property
    def page_bytes(self) -> int:
        return sum(math.prod(shape) * torch.empty(0, dtype=dt).element_size()
                   for shape, dt in self.parts)


def pack_pages(payload: PagePayload, layout: PageLayout) -> torch.Tensor:
    """(P, layout.page_bytes) uint8: each page's entries, index keys and positions, byte for
    byte (``unpack_pages`` inverts it)."""
    p = payload.pages.numel()
    rows = [t.contiguous().view(p, -1).view(torch.uint8)
            for t in (payload.kv, payload.index_keys, payload.positions)]
    return torch.cat(rows, dim=1)


def unpack_pages(buf: torch.Tensor, pages: list[int] | torch.Tensor,
                 layout: PageLayout) -> PagePayload:
    """The ``PagePayload`` of a packed (P, page_bytes) uint8 buffer (views into ``buf``)."""
    if buf.dtype != torch.uint8 or buf.dim() != 2 or buf.shape[1] != layout.page_bytes:
        raise ValueError(f"want a (P, {layout.page_bytes}) uint8 buffer, got "
                         f"{tuple(buf.shape)} {buf.dtype}")
    p, parts, at = buf.shape[0], [], 0
    for shape, dt in layout.parts:
        n = math.prod(shape) * torch.empty(0, dtype=dt).element_size()
        parts.append(buf[:, at:at + n].contiguous().view(dt).view(p, *shape))
        at += n
    ids = torch.as_tensor(pages, dtype=torch.long, device=buf.device)
    return PagePayload(ids, parts[0], parts[1], parts[2])


@dataclass
class _Request:
    payload: PagePayload  # every page of the request, page i at row i
    num_entries: int  # CSA entries per CSA layer when the prefill ended


class PageStore:
    """Host-side store of every prefilled request's CSA pages (per page, per CSA layer: entries,
    indexer keys; per page: positions). ``add`` after a prefill, ``read`` per fetch, ``free``."""

    def __init__(self, cfg: DeepseekV4Config, dtype: torch.dtype,
                 page_entries: int = CSA_PAGE_ENTRIES) -> None:
        if page_entries < 1:
            raise ValueError(f"page_entries must be >= 1, got {page_entries}")
        self.layers = [i for i, kind in enumerate(cfg.layer_types) if kind == CSA]
        self.page_entries, self.dtype = page_entries, dtype
        self.layout = PageLayout.of(cfg, dtype, page_entries)
        self.page_bytes = self.layout.page_bytes  # bytes of one page in a payload
        self._requests: dict[str, _Request] = {}

    def add(self, request: str, cache: DSV4Cache) -> int:
        """Split the CSA entries of a prefilled (full) ``cache`` into pages; return their count."""
        if request in self._requests:
            raise ValueError(f"request {request!r} already has pages")
        stores = [_full_store(cache.layers[i], i) for i in self.layers]
        n = stores[0].count if stores else 0
        if any(s.count != n or not torch.equal(s.positions[:n], stores[0].positions[:n])
               for s in stores):
            raise ValueError("CSA layers hold different entries; not one prefilled cache")
        pages, e = -(-n // self.page_entries), self.page_entries

        def paged(t: torch.Tensor) -> torch.Tensor:  # (n, X) -> (pages, E, X), zero-padded
            out = t.new_zeros((pages * e, *t.shape[1:]))
            out[:n] = t[:n]
            return out.view(pages, e, *t.shape[1:])

        positions = torch.full((pages * e,), -1, dtype=torch.long)
        if stores:
            positions[:n] = stores[0].positions[:n].cpu()
        kv = torch.stack([paged(s.valid_kv.to("cpu", self.dtype)) for s in stores], dim=1)
        keys = torch.stack([paged(s.valid_index_keys.to("cpu", self.dtype)) for s in stores], 1)
        payload = PagePayload(torch.arange(pages), kv, keys, positions.view(pages, e))
        self._requests[request] = _Request(payload, n)
        return pages

    def read(self, request: str, page_ids: list[int]) -> PagePayload:
        """The given pages of ``request``, in the given order, as one payload (copies)."""
        entry = self._get(request)
        n = entry.payload.pages.numel()
        bad = [p for p in page_ids if not 0 <= p < n]
        if bad:
            raise IndexError(f"pages {bad} out of range: request {request!r} has {n} pages")
        idx = torch.tensor(page_ids, dtype=torch.long)
        full = entry.payload
        return PagePayload(idx, full.kv.index_select(0, idx), full.index_keys.index_select(0, idx),
                           full.positions.index_select(0, idx))

    def index_keys(self, request: str) -> torch.Tensor:
        """(P, Lc, E, Di) every page's lightning-indexer keys, CSA layers in ``self.layers``
        order (the store's own tensor, not a copy: read only; the latent indexer scores these)."""
        return self._get(request).payload.index_keys

    def num_pages(self, request: str) -> int:
        """Pages of ``request``, the last one partial unless the entry count divides evenly."""
        return self._get(request).payload.pages.numel()

    def num_closed(self, request: str) -> int:
        """Full pages of ``request``: the ones LSA may evict (a partial last page stays)."""
        return self._get(request).num_entries // self.page_entries

    def num_entries(self, request: str) -> int:
        return self._get(request).num_entries

    def free(self, request: str) -> None:
        self._requests.pop(request, None)

    def requests(self) -> list[str]:
        return list(self._requests)

    def nbytes(self) -> int:
        """Bytes of every stored page."""
        return sum(r.payload.nbytes for r in self._requests.values())

    def _get(self, request: str) -> _Request:
        if request not in self._requests:
            raise KeyError(f"unknown request {request!r}: no pages stored")
        return self._requests[request]


def _full_store(layer: LayerCache, index: int) -> EntryStore:
    entries = layer.entries
    if entries is None or isinstance(entries, ResidentEntryStore):
        raise ValueError(f"layer {index} does not hold all its CSA entries")
    return entries


def open_resident(cache: DSV4Cache, page_entries: int = CSA_PAGE_ENTRIES) -> DSV4Cache:
    """A decode-side copy of a prefilled ``cache`` with every CSA entry evicted: window rings,
    compressor buffers and HCA entries copied, CSA stores empty ``ResidentEntryStore``s that
    know their request's entry count. ``fetch_pages`` then brings pages in."""
    layers = []
    for layer in cache.layers:
        if layer.kind != CSA:
            layers.append(copy.deepcopy(layer))
            continue
        full = layer.entries
        assert full is not None and full.index_keys is not None
        keys = full.index_keys
        empty = ResidentEntryStore(kv=full.kv.new_zeros(0, full.kv.shape[1]),
                                   positions=full.positions.new_zeros(0),
                                   index_keys=keys.new_zeros(0, keys.shape[1]),
                                   ids=full.positions.new_zeros(0), num_total=full.total,
                                   block=page_entries)
        layers.append(LayerCache(layer.kind, copy.deepcopy(layer.window), empty,
                                 copy.deepcopy(layer.compressor),
                                 copy.deepcopy(layer.index_compressor)))
    return DSV4Cache(layers, cache.length)


def fetch_pages(cache: DSV4Cache, payload: PagePayload) -> None:
    """Insert a payload's pages into every CSA layer of a resident ``cache`` (global ids kept)."""
    _, _, e, _ = payload.kv.shape
    pages = payload.pages.to(payload.positions.device)
    ids = pages[:, None] * e + torch.arange(e, device=pages.device)[None, :]  # (P, E) entry ids
    valid = (payload.positions >= 0).flatten()
    for j, store in enumerate(_resident_stores(cache)):
        device = store.kv.device
        store.insert(payload.kv[:, j].flatten(0, 1)[valid].to(device),
                     payload.positions.flatten()[valid].to(device),
                     payload.index_keys[:, j].flatten(0, 1)[valid].to(device),
                     ids.flatten()[valid].to(device))


def evict_pages(cache: DSV4Cache, pages: list[int], page_entries: int = CSA_PAGE_ENTRIES) -> None:
    """Drop the given pages' entries from every CSA layer of a resident ``cache``."""
    for store in _resident_stores(cache):
        gone = torch.tensor(pages, dtype=torch.long, device=store.ids.device)
        store.keep(~torch.isin(store.valid_ids // page_entries, gone))


def resident_pages(cache: DSV4Cache, page_entries: int = CSA_PAGE_ENTRIES) -> list[int]:
    """Sorted pages with at least one entry held (the same in every CSA layer)."""
    stores = _resident_stores(cache)
    return [] if not stores else (stores[0].valid_ids // page_entries).unique().tolist()


def _resident_stores(cache: DSV4Cache) -> list[ResidentEntryStore]:
    stores = [layer.entries for layer in cache.layers if layer.kind == CSA]
    if not all(isinstance(s, ResidentEntryStore) for s in stores):
        raise ValueError("not a resident cache: open it with open_resident")
    return stores  # type: ignore[return-value]
