"""Runs decode steps for the decode loop: the torch path, or the Triton LSA kernel in CUDA graphs.

``DecodeLoop`` calls ``DecodeRunner.step`` once per step. On a GPU each layer reads the resident
pages in place (``kernels.lsa_decode``) and the whole step is replayed from a CUDA graph captured
per (batch, table width) bucket; the chunk table is rewritten outside the graph, before replay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from flashmemory.config import ATTENTIONS, Attention
from flashmemory.decode.chunk_pool import ChunkPool
from flashmemory.decode.step import AttentionRecorder, build_slot, decode_step
from flashmemory.indexer.backbone import QueryTap
from flashmemory.kernels.fused import store_kv
from flashmemory.kernels.lsa_decode import lsa_decode
from flashmemory.model.llama import CausalLM

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class StepInputs:
    """One step's device inputs; graphs own one of these and replay reads it in place."""

    ids: torch.Tensor  # (B,) int64 last token of each request
    positions: torch.Tensor  # (B,) int64 absolute position of that token
    write_pages: torch.Tensor  # (B,) int64 page receiving the token's K/V
    write_slots: torch.Tensor  # (B,) int64 slot inside that page
    table: torch.Tensor  # (B, M) int32 resident pages in chunk order (the open page last)
    seq_lens: torch.Tensor  # (B,) int32 valid tokens over those pages, the new one included

    @classmethod
    def empty(cls, batch: int, width: int, device: torch.device | str,
              pin: bool = False) -> StepInputs:
        def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            t = torch.zeros(shape, dtype=dtype, device=device)
            return t.pin_memory() if pin else t

        return cls(zeros(batch), zeros(batch), zeros(batch), zeros(batch),
                   zeros(batch, width, dtype=torch.int32), zeros(batch, dtype=torch.int32) + 1)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.ids, self.positions, self.write_pages, self.write_slots, self.table,
                self.seq_lens)

    def fill(self, src: StepInputs) -> None:
        """Copy a step of <= as many rows (same table width or narrower) into these buffers."""
        b, w = src.ids.shape[0], src.table.shape[1]
        for dst, t in zip(self.tensors(), src.tensors(), strict=True):
            (dst[:b, :w] if dst.dim() == 2 else dst[:b]).copy_(t, non_blocking=True)

    def pad(self, start: int, page: int) -> None:
        """Rows from ``start`` on write and read only ``page`` (one token)."""
        self.write_pages[start:] = page
        self.write_slots[start:] = 0
        self.seq_lens[start:] = 1
        self.table[start:] = page


class PagedBackend:
    """AttentionBackend: writes the new K/V into its page slot, then runs the LSA kernel."""

    def __init__(self, pool: ChunkPool, inputs: StepInputs) -> None:
        self.pool, self.inputs = pool, inputs

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        x = self.inputs
        kv = self.pool.kv[:, layer]  # (P, 2, Hkv, C, D) a view: pages are read in place
        store_kv(kv, k, v, x.write_pages, x.write_slots)  # one launch for K and V
        # splits follow from (batch, table width), both fixed for a captured graph
        return lsa_decode(q, kv, x.table, x.seq_lens)


class _Graph:
    """A decode step captured for ``batch`` rows and a table ``width``; padding rows write and
    read only the runner's scratch page, so they never touch a request's KV."""

    def __init__(self, runner: DecodeRunner, batch: int, width: int, scratch: int) -> None:
        self.batch, self.scratch, self.kv_ptr = batch, scratch, runner.pool.kv.data_ptr()
        self.inputs = StepInputs.empty(batch, width, runner.device)
        self.inputs.pad(0, scratch)
        self.host = StepInputs.empty(batch, width, "cpu", pin=True)  # staging for async copies
        self.copied = torch.cuda.Event()
        self.copied.record()
        backend = PagedBackend(runner.pool, self.inputs)
        model, x = runner.model, self.inputs
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up: Triton compiles, cuBLAS picks its kernels
            for _ in range(2):
                model.logits(model(x.ids, x.positions, backend))
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=runner.graph_pool):
            self.logits = model.logits(model(x.ids, x.positions, backend))  # (batch, vocab)

    def run(self, step: StepInputs) -> torch.Tensor:
        """Stage the step in pinned host buffers, copy them in asynchronously, replay.

        The host may plan the next step while this one runs: it waits only until this step's
        copies have left the host buffers before overwriting them.
        """
        b = step.ids.shape[0]
        self.copied.synchronize()
        self.host.fill(step)
        self.host.pad(b, self.scratch)
        self.inputs.fill(self.host)
        self.copied.record()
        self.graph.replay()
        return self.logits[:b].clone()


class DecodeRunner:
    """One decode step for a batch: ``torch`` (gather + SDPA, CPU) or ``triton`` (in place)."""

    def __init__(self, model: CausalLM, pool: ChunkPool, attention: Attention = "auto",
                 cuda_graphs: bool = True) -> None:
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {attention!r}; choose {', '.join(ATTENTIONS)}")
        self.model, self.pool = model, pool
        self.device = pool.kv.device
        if attention == "auto":  # the kernel reads 16-token blocks: smaller chunks use torch
            gpu = self.device.type == "cuda" and pool.chunk_size % 16 == 0
            attention = "triton" if gpu else "torch"
        self.attention = attention
        self.use_graphs = cuda_graphs and attention == "triton" and self.device.type == "cuda"
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.scratch: int | None = None  # page that padding rows of a graph write into
        self.replays = 0

    @torch.no_grad()
    def step(self, batch: list[tuple[str, int]], recorder: AttentionRecorder | None = None,
             taps: dict[str, QueryTap] | None = None) -> torch.Tensor:
        """batch = [(request_id, last_token)] -> fp32 logits (B, vocab); advances each request.
        Recording attention or tapping queries (evaluation only) takes the torch path."""
        if self.attention == "torch" or recorder is not None or taps:
            return decode_step(self.model, self.pool, batch, recorder, taps)
        # 1. reserve slots and lay out each request's resident pages (host side)
        step = self._plan(batch)
        # 2. forward: replay the bucket's graph (table rewritten outside it) or run eagerly
        graph = self._graph_for(len(batch), step.table.shape[1]) if self.use_graphs else None
        if graph is not None:
            logits = graph.run(step)
            self.replays += 1
        else:
            dev = StepInputs(*(t.to(self.device, non_blocking=True) for t in step.tensors()))
            backend = PagedBackend(self.pool, dev)
            logits = self.model.logits(self.model(dev.ids, dev.positions, backend))
        # 3. the new tokens are now part of each sequence
        for rid, _ in batch:
            self.pool.tables[rid].num_tokens += 1
        return logits

    def _plan(self, batch: list[tuple[str, int]]) -> StepInputs:
        """Host tensors of one step; the page table is padded to a power-of-two width."""
        slots = [build_slot(self.pool, rid) for rid, _ in batch]
        width = _bucket(max(len(s.pages) for s in slots), 16)
        tab = torch.zeros((len(batch), width), dtype=torch.int32)
        for i, s in enumerate(slots):
            tab[i, : len(s.pages)] = torch.tensor(s.pages, dtype=torch.int32)
        return StepInputs(
            torch.tensor([t for _, t in batch], dtype=torch.int64),
            torch.tensor([self.pool.tables[rid].num_tokens for rid, _ in batch]),
            torch.tensor([s.page for s in slots]), torch.tensor([s.slot for s in slots]), tab,
            torch.tensor([s.num_valid for s in slots], dtype=torch.int32))

    def _graph_for(self, batch: int, width: int) -> _Graph | None:
        bb = next((b for b in BATCH_BUCKETS if b >= batch), None)
        if bb is None:
            return None  # larger than any bucket: eager
        if self.scratch is None:
            self.scratch = self.pool.alloc_internal()  # may grow the pool: before the pointer check
        if self.graphs and next(iter(self.graphs.values())).kv_ptr != self.pool.kv.data_ptr():
            logger.info("chunk pool grew: re-capturing decode graphs")
            self.graphs.clear()  # the pool was reallocated; old graphs point at freed memory
            # the old graphs' private memory pool died with them: torch refuses to capture into
            # a pool id whose use count fell to zero, so new graphs get a new pool
            self.graph_pool = torch.cuda.graph_pool_handle()
        key = (bb, width)
        if key not in self.graphs:
            try:
                self.graphs[key] = _Graph(self, bb, width, self.scratch)
            except Exception:  # a capture that fails must not fail every later step
                logger.exception("CUDA graph capture failed: decoding eagerly from now on")
                self.use_graphs = False
                self.graphs.clear()
                return None
        return self.graphs[key]


def _bucket(n: int, least: int) -> int:
    """Smallest power of two >= max(n, least): graph keys stay few."""
    b = least
    while b < n:
        b *= 2
    return b
