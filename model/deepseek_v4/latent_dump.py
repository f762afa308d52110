"""Training data for the DeepSeek-V4 latent indexer (``latent_indexer``): a FULL greedy decode
per prompt with the native lightning indexer's scores kept, cut into lookahead windows.

``dump_latent`` writes it (called by tests, later by a CLI); ``read_dump`` loads it for
``latent_train`` (which never loads the backbone). A dump is a directory of per-request Parquet
pairs, written when the request is done, ``NNNNN`` counting requests:

  keys-NNNNN.parquet     one row per closed prompt page of the request (the pages LSA may evict)
    request: string
    page: int32          page id (page p = CSA entries [p * E, (p + 1) * E))
    keys: list<halffloat>  (L * E * Di) the page's frozen native index keys in the dumped CSA
                         layers (layer-major, then entry, then channel), as stored in the
                         ``PageStore``, cast to fp16
  windows-NNNNN.parquet  one row per window start (every ``window`` decode steps)
    request: string
    step: int32          decode steps done at the window start (0, 64, ...)
    horizon: int32       decode steps the label covers (``window``, fewer at the end)
    hidden: list<float>  (L * hidden) fp32 the dumped CSA layers' attention inputs at the last
                         token processed before ``step`` (the prompt's last token at step 0):
                         the tower's input, as ``lsa.HiddenTap`` records it
    pages: list<int32>   the page ids the label ranges over (the request's closed prompt pages)
    label: list<int32>   ``oracle.lookahead_pages``: pages in the top-p (0.6) nucleus of the
                         native indexer's softmax in >= min_layers (3, clamped) CSA layers at
                         some step of [step, step + horizon), restricted to ``pages``

Keys are stored once per request, not per window (a window refers to them by request id).
Every file's schema metadata ``flashmemory`` holds the ``DumpMeta`` JSON. The windows file is
written last (each file through a temporary name) and marks the request done: a rerun skips the
request ids already in windows files (resumable).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from flashmemory.model.deepseek_v4.cache import CSA_PAGE_ENTRIES
from flashmemory.model.deepseek_v4.lsa import HiddenTap, csa_layers, decode_full, prefill_request
from flashmemory.model.deepseek_v4.model import DeepseekV4ForCausalLM
from flashmemory.model.deepseek_v4.oracle import lookahead_pages
from flashmemory.model.deepseek_v4.pages import PageStore

logger = logging.getLogger(__name__)

DUMP_FORMAT = "flashmemory-latent-dump"
DUMP_VERSION = 1
_META_KEY = b"flashmemory"


@dataclass(frozen=True)
class LatentDumpConfig:
    steps: int = 128  # decode steps per prompt (windows start at 0, window, 2 window, ...)
    window: int = 64  # the re-prediction period: steps per label
    top_p: float = 0.6
    min_layers: int = 3
    page_entries: int = CSA_PAGE_ENTRIES
    layers: tuple[int, ...] | None = None  # CSA layers to dump; None: all of them

    def __post_init__(self) -> None:
        if min(self.steps, self.window, self.page_entries, self.min_layers) < 1:
            raise ValueError("steps, window, page_entries and min_layers must be >= 1")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class DumpMeta:
    """What every file of one dump shares (its schema metadata)."""

    layers: tuple[int, ...]
    hidden_size: int
    index_dim: int
    page_entries: int
    window: int
    top_p: float
    min_layers: int
    format: str = DUMP_FORMAT
    version: int = DUMP_VERSION

    def encode(self) -> dict[bytes, bytes]:
        return {_META_KEY: json.dumps(asdict(self)).encode()}

    @classmethod
    def decode(cls, metadata: Mapping[bytes, bytes] | None, where: Path) -> DumpMeta:
        raw = (metadata or {}).get(_META_KEY)
        meta = json.loads(raw) if raw else {}
        if meta.get("format") != DUMP_FORMAT or meta.get("version") != DUMP_VERSION:
            raise ValueError(f"{where} is not a {DUMP_FORMAT} v{DUMP_VERSION} file")
        return cls(**{**meta, "layers": tuple(meta["layers"])})


@dataclass
class Window:
    """One window row (see the module docstring)."""

    request: str
    step: int
    horizon: int
    hidden: torch.Tensor  # (L, hidden) fp32
    pages: list[int]
    label: list[int]


@dataclass
class LatentDump:
    meta: DumpMeta
    keys: dict[str, torch.Tensor]  # request -> (P, L, E, Di) fp16, page p at row p
    windows: list[Window]


def dump_latent(model: DeepseekV4ForCausalLM, prompts: Mapping[str, torch.Tensor],
                out_dir: Path, cfg: LatentDumpConfig | None = None) -> list[str]:
    """Dump every prompt (request id -> ids (T,)) not already in ``out_dir``; return the ids
    dumped now. ValueError if ``out_dir`` holds a dump with other settings."""
    cfg = cfg or LatentDumpConfig()
    every = csa_layers(model)
    layers = tuple(sorted(cfg.layers)) if cfg.layers is not None else tuple(every)
    if not layers or not set(layers) <= set(every):
        raise ValueError(f"layers {cfg.layers} must be CSA layers of the model ({every})")
    c = model.config
    meta = DumpMeta(layers, c.hidden_size, c.index_head_dim, cfg.page_entries, cfg.window,
                    cfg.top_p, cfg.min_layers)
    out_dir.mkdir(parents=True, exist_ok=True)
    done, part = _existing(out_dir, meta)
    dumped = []
    for request, ids in prompts.items():
        if request in done:
            logger.info("latent dump: %s already in %s, skipped", request, out_dir)
            continue
        keys, windows = _dump_request(model, request, ids, meta, cfg.steps)
        write_request(out_dir, part, meta, keys, windows)
        part, done = part + 1, done | {request}
        dumped.append(request)
    return dumped


def _dump_request(model: DeepseekV4ForCausalLM, request: str, ids: torch.Tensor,
                  meta: DumpMeta, steps: int) -> tuple[torch.Tensor, list[Window]]:
    """One prompt: keys (P, L, E, Di) of its closed pages and its window rows."""
    # 1. prefill (pages into a store) and a full decode with scores and hidden states kept
    store = PageStore(model.config, model.dtype, meta.page_entries)
    prefilled = prefill_request(model, request, ids, store)
    with HiddenTap(model, meta.layers, history=True) as tap:
        run = decode_full(model, prefilled, steps, keep_scores=True)
    assert tap.history is not None and len(tap.history) == steps
    before = [prefilled.hidden, *tap.history]  # before[s]: last token processed before step s
    # 2. frozen keys of the closed prompt pages, in the dumped layers
    n = store.num_closed(request)
    cols = [store.layers.index(i) for i in meta.layers]
    keys = store.index_keys(request)[:n, cols]  # (P, L, E, Di)
    store.free(request)
    # 3. one row per window start: the tower's input and the lookahead label
    windows = []
    for s in range(0, steps, meta.window):
        label = lookahead_pages(run.traces, s, window=meta.window, top_p=meta.top_p,
                                min_layers=meta.min_layers, page_entries=meta.page_entries)
        hidden = torch.stack([before[s][i] for i in meta.layers]).float().cpu()  # (L, hidden)
        windows.append(Window(request, s, min(meta.window, steps - s), hidden, list(range(n)),
                              [p for p in label if p < n]))
    return keys, windows


def write_request(out_dir: Path, part: int, meta: DumpMeta, keys: torch.Tensor,
                  windows: list[Window]) -> None:
    """Write one request's keys (P, L, E, Di) and windows as part ``part`` (keys first)."""
    import pyarrow as pa

    if not windows or len({w.request for w in windows}) != 1:
        raise ValueError("write_request takes the windows of exactly one request")
    request = windows[0].request
    out_dir.mkdir(parents=True, exist_ok=True)
    p = keys.shape[0]
    want = (len(meta.layers), meta.page_entries, meta.index_dim)
    if tuple(keys.shape[1:]) != want:
        raise ValueError(f"keys have shape {tuple(keys.shape)}; the meta says (P, *{want})")
    flat_keys = keys.detach().to("cpu", torch.float16).reshape(p, -1).numpy()
    _write(out_dir / f"keys-{part:05d}.parquet", meta, {
        "request": pa.array([request] * p, pa.string()),
        "page": pa.array(np.arange(p, dtype=np.int32)),
        "keys": _lists(flat_keys, pa.float16())})
    hidden = np.stack([w.hidden.detach().to("cpu", torch.float32).reshape(-1).numpy()
                       for w in windows])
    _write(out_dir / f"windows-{part:05d}.parquet", meta, {
        "request": pa.array([request] * len(windows), pa.string()),
        "step": pa.array([w.step for w in windows], pa.int32()),
        "horizon": pa.array([w.horizon for w in windows], pa.int32()),
        "hidden": _lists(hidden, pa.float32()),
        "pages": pa.array([w.pages for w in windows], pa.list_(pa.int32())),
        "label": pa.array([w.label for w in windows], pa.list_(pa.int32()))})


def _lists(rows: np.ndarray, kind: object):  # (N, X) -> list<kind> array of N rows
    import pyarrow as pa

    offsets = np.arange(rows.shape[0] + 1, dtype=np.int32) * rows.shape[1]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(rows.reshape(-1), kind))


def _write(path: Path, meta: DumpMeta, columns: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns).replace_schema_metadata(meta.encode())
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _existing(out_dir: Path, meta: DumpMeta) -> tuple[set[str], int]:
    """Request ids already dumped in ``out_dir`` and the next part number."""
    import pyarrow.parquet as pq

    parts = sorted(out_dir.glob("windows-*.parquet"))
    done: set[str] = set()
    for f in parts:
        if DumpMeta.decode(pq.read_schema(f).metadata, f) != meta:
            raise ValueError(f"{out_dir} holds a latent dump with other settings ({f.name})")
        done |= set(pq.read_table(f, columns=["request"]).column("request").to_pylist())
    return done, len(parts)


def read_dump(path: Path) -> LatentDump:
    """Every request of the dump at ``path`` (keys fp16 in memory, windows in file order)."""
    import pyarrow.parquet as pq

    parts = sorted(Path(path).glob("windows-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no latent dump at {path} (no windows-*.parquet)")
    meta = DumpMeta.decode(pq.read_schema(parts[0]).metadata, parts[0])
    keys: dict[str, torch.Tensor] = {}
    windows: list[Window] = []
    shape = (len(meta.layers), meta.page_entries, meta.index_dim)
    for wf in parts:
        kf = wf.with_name(wf.name.replace("windows-", "keys-"))
        wt, kt = pq.read_table(wf), pq.read_table(kf)
        for t, f in ((wt, wf), (kt, kf)):
            if DumpMeta.decode(t.schema.metadata, f) != meta:
                raise ValueError(f"{f} was written with other settings than {parts[0]}")
        flat = kt.column("keys").combine_chunks().flatten().to_numpy()
        request = kt.column("request")[0].as_py() if kt.num_rows else wt["request"][0].as_py()
        keys[request] = torch.from_numpy(flat.copy()).view(kt.num_rows, *shape)
        hidden = wt.column("hidden").combine_chunks().flatten().to_numpy()
        hidden = torch.from_numpy(hidden.copy()).view(wt.num_rows, len(meta.layers), -1)
        for i, row in enumerate(wt.drop_columns(["hidden"]).to_pylist()):
            windows.append(Window(row["request"], row["step"], row["horizon"], hidden[i],
                                  row["pages"], row["label"]))
    return LatentDump(meta, keys, windows)
