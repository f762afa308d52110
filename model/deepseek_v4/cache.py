"""Per-request KV state of the DeepSeek-V4 backbone (``DSV4Cache``), one ``LayerCache`` per layer.

Created by ``DeepseekV4ForCausalLM.new_cache``; read and appended by ``attention`` and
``compressor`` on every forward (prefill pieces or one decode token). Positions are global token
positions. Compressed entries are stored in emission order, so entry ``i`` of a layer is row ``i``
of its store and covers the tokens from position ``i * ratio`` on; a CSA "page" is
``CSA_PAGE_ENTRIES`` consecutive entries (256 tokens at ratio 4), the unit LSA keeps resident.
On LSA's decode side CSA layers use a ``ResidentEntryStore`` instead: only the resident pages'
entries, compact, each row tagged with its global entry index (``model.deepseek_v4.pages``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flashmemory.model.deepseek_v4.config import CSA, HCA, SLIDING, DeepseekV4Config

CSA_PAGE_ENTRIES = 64


@dataclass
class WindowRing:
    """The last ``size`` tokens' shared K=V (post-RoPE) of one layer; slot = position % size."""

    kv: torch.Tensor  # (W, D) compute dtype
    pos: torch.Tensor  # (W,) int64 global position of each slot, -1 while empty

    def write(self, kv: torch.Tensor, positions: torch.Tensor) -> None:
        """Store the new tokens kv (T, D) at positions (T,); only the last W can matter later."""
        size = self.kv.shape[0]
        kv, positions = kv[-size:], positions[-size:]
        slots = positions % size
        self.kv[slots] = kv
        self.pos[slots] = positions


@dataclass
class CompressorState:
    """A compressor's tokens not yet closed into an entry, plus what the next entry reuses.

    ``kv``/``gate`` hold the raw projections (p, C) of the p < ratio pending tokens. Overlapping
    compressors (CSA and its indexer) also keep the first half of the last closed window
    (``prev_kv`` (ratio, D), ``prev_gate`` (ratio, D) with its position bias added): entry w
    pools window w-1's first half with window w's second half.
    """

    kv: torch.Tensor
    gate: torch.Tensor
    emitted: int = 0  # entries emitted so far; the next window starts at emitted * ratio
    prev_kv: torch.Tensor | None = None
    prev_gate: torch.Tensor | None = None


@dataclass
class EntryStore:
    """Compressed entries of one layer in emission order, addressable by global entry index.

    ``kv`` (capacity, D) is the entry's shared K=V (post-RoPE at its position); ``index_keys``
    (capacity, Di) the lightning indexer's key for the same window (CSA only); ``positions``
    (capacity,) the global position of the window's first token. Rows [0, count) are valid.
    """

    kv: torch.Tensor
    positions: torch.Tensor
    index_keys: torch.Tensor | None = None
    count: int = 0

    def append(self, kv: torch.Tensor, positions: torch.Tensor,
               index_keys: torch.Tensor | None = None) -> None:
        n = kv.shape[0]
        if self.count + n > self.kv.shape[0]:
            self._grow(self.count + n)
        end = self.count + n
        self.kv[self.count:end] = kv
        self.positions[self.count:end] = positions
        if self.index_keys is not None:
            assert index_keys is not None and index_keys.shape[0] == n
            self.index_keys[self.count:end] = index_keys
        self.count = end

    def _capacity(self, need: int) -> int:
        # Double the capacity so appending one entry per `ratio` decode steps stays amortised O(1).
        return max(need, 2 * self.kv.shape[0], 16)

    def _grow(self, need: int) -> None:
        cap = self._capacity(need)

        def grown(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros((cap, *t.shape[1:]))
            out[: self.count] = t[: self.count]
            return out

        self.kv, self.positions = grown(self.kv), grown(self.positions)
        if self.index_keys is not None:
            self.index_keys = grown(self.index_keys)

    @property
    def valid_kv(self) -> torch.Tensor:
        return self.kv[: self.count]

    @property
    def valid_index_keys(self) -> torch.Tensor:
        assert self.index_keys is not None
        return self.index_keys[: self.count]

    @property
    def total(self) -> int:
        """Entries emitted so far (global indices [0, total)); all of them are held here."""
        return self.count

    @property
    def valid_ids(self) -> torch.Tensor:
        """(count,) int64 global entry index of each valid row: row i is entry i here."""
        return torch.arange(self.count, device=self.kv.device)


@dataclass
class ResidentEntryStore(EntryStore):
    """A decode-side CSA entry store holding only some entries (LSA's resident pages), compactly.

    Rows [0, count) are valid and sorted by global entry index ``ids`` (count,) int64, so the
    indexer's stable top-k breaks ties as over the full store. ``total`` counts every entry the
    request has, held or not; ``append`` (decode) gives new entries the next global indices.
    Capacity is ``count`` rounded up to a multiple of ``block`` rows: memory follows residency.
    Filled by ``model.deepseek_v4.pages`` (``fetch_pages`` / ``evict_pages``).
    """

    ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    num_total: int = 0
    block: int = CSA_PAGE_ENTRIES

    def append(self, kv: torch.Tensor, positions: torch.Tensor,
               index_keys: torch.Tensor | None = None) -> None:
        n, start = kv.shape[0], self.count
        super().append(kv, positions, index_keys)
        self.ids[start:self.count] = self.num_total + torch.arange(n, device=self.ids.device)
        self.num_total += n

    def insert(self, kv: torch.Tensor, positions: torch.Tensor, index_keys: torch.Tensor,
               ids: torch.Tensor) -> None:
        """Add entries (n, D), (n,), (n, Di) with global indices ids (n,) not held yet."""
        if torch.isin(ids, self.valid_ids).any() or ids.unique().numel() != ids.numel():
            raise ValueError("entries inserted twice into the resident store")
        if ids.numel() and int(ids.max()) >= self.num_total:
            raise ValueError(f"entry index {int(ids.max())} >= the request's {self.num_total}")
        assert self.index_keys is not None
        all_ids = torch.cat([self.valid_ids, ids.to(self.ids.device)])
        order = all_ids.argsort(stable=True)
        self._rebuild(order, all_ids,
                      torch.cat([self.valid_kv, kv.to(self.kv)]),
                      torch.cat([self.positions[: self.count], positions.to(self.positions)]),
                      torch.cat([self.valid_index_keys, index_keys.to(self.index_keys)]))

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the valid rows where rows (count,) bool is True; capacity shrinks."""
        assert rows.shape == (self.count,) and self.index_keys is not None
        order = rows.nonzero().flatten()
        self._rebuild(order, self.valid_ids, self.valid_kv, self.positions[: self.count],
                      self.valid_index_keys)

    def _rebuild(self, order: torch.Tensor, ids: torch.Tensor, kv: torch.Tensor,
                 positions: torch.Tensor, index_keys: torch.Tensor) -> None:
        n = order.numel()
        cap = self._capacity(n)

        def fitted(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros((cap, *t.shape[1:]))
            out[:n] = t[order]
            return out

        self.kv, self.positions, self.index_keys = fitted(kv), fitted(positions), fitted(index_keys)
        self.ids, self.count = fitted(ids), n

    def _capacity(self, need: int) -> int:
        return -(-need // self.block) * self.block  # whole pages: no doubling past residency

    def _grow(self, need: int) -> None:
        super()._grow(need)
        self.ids = torch.cat([self.ids, self.ids.new_zeros(self.kv.shape[0] - self.ids.shape[0])])

    @property
    def total(self) -> int:
        return self.num_total

    @property
    def valid_ids(self) -> torch.Tensor:
        return self.ids[: self.count]


@dataclass
class LayerCache:
    """Everything one layer keeps for a request. Sliding layers only use ``window``."""

    kind: str
    window: WindowRing
    entries: EntryStore | None = None  # CSA or HCA compressed entries
    compressor: CompressorState | None = None  # pending tokens of the main compressor
    index_compressor: CompressorState | None = None  # pending tokens of the indexer (CSA only)


@dataclass
class DSV4Cache:
    """The KV state of one request: per-layer caches and the number of tokens seen."""

    layers: list[LayerCache] = field(default_factory=list)
    length: int = 0  # tokens already processed; the next token's position

    @classmethod
    def empty(cls, cfg: DeepseekV4Config, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> DSV4Cache:
        return cls([_layer_cache(cfg, i, dtype, torch.device(device))
                    for i in range(cfg.num_hidden_layers)])

    def num_entries(self, layer: int) -> int:
        """Compressed entries ``layer`` has emitted, i.e. its global entry indices [0, n) (0 for
        sliding-only layers); a ``ResidentEntryStore`` holds only some of them."""
        entries = self.layers[layer].entries
        return 0 if entries is None else entries.total

    def num_resident(self, layer: int) -> int:
        """Compressed entries ``layer`` holds here (= ``num_entries`` unless LSA evicted some)."""
        entries = self.layers[layer].entries
        return 0 if entries is None else entries.count


def pages_to_mask(pages: torch.Tensor | list[int], num_entries: int,
                  page_entries: int = CSA_PAGE_ENTRIES) -> torch.Tensor:
    """Boolean residency mask (num_entries,) with the entries of the given page indices set."""
    pages_t = torch.as_tensor(pages, dtype=torch.long)
    mask = torch.zeros(num_entries, dtype=torch.bool)
    entry = (pages_t[:, None] * page_entries + torch.arange(page_entries)[None, :]).flatten()
    mask[entry[entry < num_entries]] = True
    return mask


def _layer_cache(cfg: DeepseekV4Config, layer: int, dtype: torch.dtype,
                 device: torch.device) -> LayerCache:
    kind, d = cfg.layer_types[layer], cfg.head_dim
    window = WindowRing(torch.zeros(cfg.sliding_window, d, dtype=dtype, device=device),
                        torch.full((cfg.sliding_window,), -1, dtype=torch.long, device=device))
    if kind == SLIDING:
        return LayerCache(kind, window)
    overlap = kind == CSA
    index_dim = cfg.index_head_dim if kind == CSA else None
    entries = EntryStore(
        kv=torch.zeros(0, d, dtype=dtype, device=device),
        positions=torch.zeros(0, dtype=torch.long, device=device),
        index_keys=None if index_dim is None
        else torch.zeros(0, index_dim, dtype=dtype, device=device))
    cache = LayerCache(kind, window, entries, _pending(d, overlap, dtype, device))
    if kind == CSA:
        cache.index_compressor = _pending(cfg.index_head_dim, True, dtype, device)
    assert kind in (CSA, HCA)
    return cache


def _pending(dim: int, overlap: bool, dtype: torch.dtype, device: torch.device) -> CompressorState:
    width = 2 * dim if overlap else dim
    return CompressorState(torch.zeros(0, width, dtype=dtype, device=device),
                           torch.zeros(0, width, dtype=dtype, device=device))
