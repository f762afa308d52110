"""Kernel benchmark: LSA decode over resident chunks vs SDPA over the full context and over the
same subset made contiguous, with effective bandwidth on the resident bytes, against the peak
streaming read and against a streaming read of the same bytes (what one kernel can reach)."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from flashmemory.bench.common import (
    _READ_BLOCK,
    SHAPES,
    command,
    stream_reader,
    time_graph_ms,
)
from flashmemory.kernels.lsa_decode import lsa_decode, resident_bytes

logger = logging.getLogger(__name__)
FULL_LIMIT = 48 * 2**30  # skip the full-context SDPA baseline when its K/V would exceed this


@dataclass(frozen=True)
class KernelCase:
    shape: str
    context: int  # tokens of context per request
    budget: float  # fraction of chunks resident (sink and tail chunk included)
    batch: int
    chunk: int = 64
    num_warps: int = 4
    num_stages: int | None = None  # the kernel's default
    block_n: int | None = None
    num_splits: int | None = None  # None: the launcher's default

    def argv(self) -> list[str]:
        a = ["bench", "kernel", "--shapes", self.shape, "--contexts", str(self.context),
             "--budgets", str(self.budget), "--batches", str(self.batch)]
        return a if self.chunk == 64 else [*a, "--chunk-size", str(self.chunk)]


def _resident(case: KernelCase) -> tuple[int, int]:
    """(chunks kept, valid tokens over them): sink + random middle + the partial last chunk."""
    n = math.ceil(case.context / case.chunk)
    keep = min(n, max(2, round(case.budget * n)))
    last = case.context - (n - 1) * case.chunk
    return keep, (keep - 1) * case.chunk + last


def run_case(case: KernelCase, hbm_read: float, baselines: bool = True) -> dict[str, Any]:
    s = SHAPES[case.shape]
    hq, hkv, d = s["num_heads"], s["num_kv_heads"], s["head_dim"]
    keep, seq = _resident(case)
    q = torch.randn((case.batch, hq, d), dtype=torch.bfloat16, device="cuda")
    t_lsa = _lsa_ms(case, q, hkv, keep, seq)
    torch.cuda.empty_cache()
    nbytes = resident_bytes(torch.full((case.batch,), seq), hkv, d, q.dtype)
    row: dict[str, Any] = dict(
        shape=case.shape, context=case.context, budget=case.budget, batch=case.batch,
        resident_tokens=seq, resident_MB=nbytes / 1e6, lsa_us=t_lsa * 1e3,
        GBps=nbytes / t_lsa / 1e6, pct_hbm=100 * nbytes / (t_lsa / 1e3) / hbm_read,
        command=command(case.argv()))
    if baselines:
        row["read_us"] = read_us(nbytes, q.device)
        row["pct_read"] = 100 * row["read_us"] / row["lsa_us"]
        q4 = q.unsqueeze(2)  # (B, Hq, 1, D)
        row["subset_us"] = _sdpa_or_none(q4, case.batch, hkv, seq, d)
        row["full_us"] = _sdpa_or_none(q4, case.batch, hkv, case.context, d)
        if row["full_us"] is not None:
            row["x_vs_full"] = row["full_us"] / row["lsa_us"]
        if row["subset_us"] is not None:
            row["x_vs_subset"] = row["subset_us"] / row["lsa_us"]
    return row


CALLS = 8  # calls per graph replay: the replay's fixed cost is shared, as in a decode step


def _per_call_ms(make: Callable[[], Callable[[], Any]], nbytes: int) -> float:
    """ms per call of ``make()``'s function, CALLS calls captured in one graph. Each call reads
    its own input set (fresh from HBM after the L2 flush) unless one set is far larger than L2."""
    sets = [make() for _ in range(CALLS if nbytes * CALLS <= 2**31 else 1)]
    calls = [sets[i % len(sets)] for i in range(CALLS)]
    return time_graph_ms(lambda: [f() for f in calls]) / CALLS


def _lsa_ms(case: KernelCase, q: torch.Tensor, hkv: int, keep: int, seq: int) -> float:
    """One layer of a pool holding every request's resident pages, scattered in random order."""
    pages = case.batch * keep
    d = q.shape[-1]
    lens = torch.full((case.batch,), seq, dtype=torch.int32, device=q.device)

    def make() -> Callable[[], Any]:
        kv = torch.randn((pages + 1, 1, 2, hkv, case.chunk, d), dtype=q.dtype, device=q.device)
        layer = kv[:, 0]  # (P, 2, Hkv, C, D) as the decode step passes it
        table = torch.randperm(pages, device=q.device).to(torch.int32).view(case.batch, keep)
        return lambda: lsa_decode(q, layer, table, lens, num_warps=case.num_warps,
                                  num_stages=case.num_stages, block_n=case.block_n,
                                  num_splits=case.num_splits)

    return _per_call_ms(make, pages * case.chunk * hkv * d * 2 * q.element_size())


def read_us(nbytes: int, device: torch.device) -> float:
    """A streaming read of ``nbytes`` (``common.stream_reader``), timed as LSA."""
    n = -(-nbytes // 2 // _READ_BLOCK) * _READ_BLOCK  # bf16 elements, whole programs

    def make() -> Callable[[], Any]:
        return stream_reader(torch.randn(n, dtype=torch.bfloat16, device=device))

    t = _per_call_ms(make, nbytes) * 1e3
    torch.cuda.empty_cache()
    return t


def _sdpa_us(q: torch.Tensor, batch: int, hkv: int, tokens: int, d: int) -> float:
    """SDPA decode over ``tokens`` contiguous K/V tokens per request."""

    def make() -> Callable[[], Any]:
        k = torch.randn((batch, hkv, tokens, d), dtype=q.dtype, device=q.device)
        v = torch.randn_like(k)
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    return _per_call_ms(make, batch * hkv * tokens * d * 2 * q.element_size()) * 1e3


def _sdpa_or_none(q: torch.Tensor, batch: int, hkv: int, tokens: int, d: int) -> float | None:
    if batch * hkv * tokens * d * 2 * q.element_size() > FULL_LIMIT:
        return None
    t = _sdpa_us(q, batch, hkv, tokens, d)
    torch.cuda.empty_cache()
    return t


def cases(shapes: list[str], contexts: list[int], budgets: list[float], batches: list[int],
          chunk: int) -> list[KernelCase]:
    return [KernelCase(s, c, b, n, chunk)
            for s, c, b, n in itertools.product(shapes, contexts, budgets, batches)]


def sweep(case: KernelCase, hbm_read: float) -> list[dict[str, Any]]:
    """Launch configurations of one case, fastest first (for choosing the defaults)."""
    rows = []
    for w, st, bn, sp in itertools.product((4, 8), (2, 3, 4), (32, 64, 128),
                                           (None, 32, 64, 128, 256)):
        if case.chunk % bn and bn % case.chunk:  # a block lies in one page or spans whole ones
            continue
        c = replace(case, num_warps=w, num_stages=st, block_n=bn, num_splits=sp)
        try:
            r = run_case(c, hbm_read, baselines=False)
        except Exception as e:  # e.g. a block too large for shared memory at this depth
            logger.info("skipped %s: %s", c, str(e).splitlines()[0][:120])
            continue
        r["config"] = f"warps={w} stages={st} block_n={bn} splits={sp or 'auto'}"
        rows.append(r)
    return sorted(rows, key=lambda r: r["lsa_us"])


COLUMNS = ["shape", "context", "budget", "batch", "resident_tokens", "resident_MB", "lsa_us",
           "GBps", "pct_hbm", "read_us", "pct_read", "full_us", "x_vs_full", "subset_us",
           "x_vs_subset", "command"]
