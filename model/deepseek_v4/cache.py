"""Per-request KV state of the DeepSeek-V4 backbone (``DSV4Cache``), one ``LayerCache`` per layer.

Created by ``DeepseekV4ForCausalLM.new_cache``; read and appended by ``attention`` and
``compressor`` on every forward (prefill pieces or one decode token). Positions are global token
positions. Compressed entries are stored in emission order, so entry ``i`` of a layer is row ``i``
of its store and covers the tokens from position ``i * ratio`` on; a CSA "page" is
``CSA_PAGE_ENTRIES`` consecutive entries (256 tokens at ratio 4), the unit LSA keeps resident.
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

    def _grow(self, need: int) -> None:
        # Double the capacity so appending one entry per `ratio` decode steps stays amortised O(1).
        cap = max(need, 2 * self.kv.shape[0], 16)

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
        """Compressed entries held by ``layer`` (0 for sliding-only layers)."""
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
