"""Whole-model decode benchmark: tokens/s of one decode step (CUDA graphs, Triton attention) over
synthetic contexts with every chunk resident (full KV) or an LSA budget, and GPU memory per
request. Random weights of a real shape; the context is drawn by ``ChunkStore.add_synthetic``."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from flashmemory.bench.common import command, model_config, random_model
from flashmemory.decode.chunk_pool import ChunkPool
from flashmemory.decode.runner import DecodeRunner
from flashmemory.prefill.chunk_store import ChunkStore, chunk_shape

LOAD_BATCH = 256  # chunks per store read / pool load


@dataclass(frozen=True)
class DecodeCase:
    shape: str
    context: int
    budget: float | None  # None = full KV (every chunk resident)
    batch: int = 1
    steps: int = 32
    chunk: int = 64
    recent_tokens: int = 128

    @property
    def mode(self) -> str:
        return "full" if self.budget is None else f"lsa {self.budget:g}"

    def argv(self) -> list[str]:
        a = ["bench", "decode", "--shape", self.shape, "--contexts", str(self.context),
             "--batches", str(self.batch), "--steps", str(self.steps)]
        return [*a, "--full"] if self.budget is None else [*a, "--budget", str(self.budget)]


def resident_chunks(case: DecodeCase, rng: random.Random) -> list[int]:
    """Full: every chunk. LSA: sink chunk, the recency tail, and random chunks up to the budget
    (which chunks does not change the time: the kernel reads them all the same way)."""
    n = math.ceil(case.context / case.chunk)
    if case.budget is None:
        return list(range(n))
    tail = set(range(max(0, (case.context - case.recent_tokens) // case.chunk), n))
    keep = {0} | tail
    middle = [i for i in range(n) if i not in keep]
    want = max(0, round(case.budget * n) - len(keep))
    return sorted(keep | set(rng.sample(middle, min(want, len(middle)))))


def run_case(case: DecodeCase, model: Any) -> dict[str, Any]:
    cfg = model.config
    shape = chunk_shape(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, case.chunk)
    store = ChunkStore(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, case.chunk,
                       torch.bfloat16, "cuda")
    rng = random.Random(0)
    plans = [resident_chunks(case, rng) for _ in range(case.batch)]
    grow = math.ceil(case.steps / case.chunk) + 2  # pages decode opens while timing
    pages = sum(len(p) for p in plans) + case.batch * grow + 1  # +1: graph padding page
    row = dict(shape=case.shape, context=case.context, mode=case.mode, batch=case.batch,
               command=command(case.argv()))
    page_bytes = math.prod(shape) * 2
    free = torch.cuda.mem_get_info()[0] - 2 * 2**30  # leave room for activations and graphs
    if pages * page_bytes > free:
        row["kv_GiB_per_request"] = (pages - 1) * page_bytes / case.batch / 2**30
        row["step_ms"] = f"does not fit ({pages * page_bytes / 2**30:.0f} GiB of KV)"
        return row
    pool = ChunkPool(shape, torch.bfloat16, "cuda", initial_pages=pages)
    for r, chunks in enumerate(plans):
        rid = f"r{r}"
        store.add_synthetic(rid, case.context, seed=r)
        pool.open(rid, case.context)
        for i in range(0, len(chunks), LOAD_BATCH):
            part = chunks[i:i + LOAD_BATCH]
            pool.load(rid, part, store.read(rid, part))
    per_request = pool.pages_in_use() * pool.page_bytes / case.batch
    runner = DecodeRunner(model, pool)
    batch = [(f"r{r}", 1) for r in range(case.batch)]
    for _ in range(3):  # capture the graph and warm up
        runner.step(batch)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(case.steps):
        runner.step(batch)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / case.steps
    gpu = _graph_ms(runner, case.steps)
    row.update(resident_pct=100 * pool.resident_tokens("r0") / pool.tables["r0"].num_tokens,
               step_ms=dt * 1e3, gpu_step_ms=gpu, tokens_per_s=case.batch / dt,
               kv_GiB_per_request=per_request / 2**30, graphs=runner.replays > 0)
    for r in range(case.batch):
        pool.close(f"r{r}")
    del pool, runner, store
    torch.cuda.empty_cache()
    return row


def _graph_ms(runner: DecodeRunner, steps: int) -> float | None:
    """Device time of one step: replays of the captured graph alone, timed with CUDA events."""
    if not runner.graphs:
        return None
    graph = next(iter(runner.graphs.values())).graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def summarize(rows: list[dict[str, Any]], weights_bytes: int, reserve_gib: float = 4.0) -> None:
    """Add (in place) the requests of each row's size that fit beside the weights, and each LSA
    row's speed-up over the full-KV row of the same context and batch."""
    total = torch.cuda.get_device_properties(0).total_memory
    free = total - weights_bytes - reserve_gib * 2**30
    full = {(r["context"], r["batch"]): r for r in rows if r["mode"] == "full"}
    for r in rows:
        r["max_requests"] = int(free // (r["kv_GiB_per_request"] * 2**30))
        f = full.get((r["context"], r["batch"]))
        if r["mode"] != "full" and f and isinstance(f.get("step_ms"), float):
            r["x_vs_full"] = f["step_ms"] / r["step_ms"]


def bench_model(shape: str, max_len: int) -> Any:
    return random_model(model_config(shape, max_len))


COLUMNS = ["shape", "context", "mode", "batch", "resident_pct", "step_ms", "gpu_step_ms",
           "x_vs_full", "tokens_per_s", "kv_GiB_per_request", "max_requests", "graphs", "command"]
