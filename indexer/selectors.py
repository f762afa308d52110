"""Baseline selectors: full, recency (sink + window), random at the same budget, and oracle.

The oracle ranks chunks by the attention mass a full-attention run put on them over the next
``window`` decode steps; it exists for evaluation only (it needs that run first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from flashmemory.indexer.base import SelectionRequest, Selector

if TYPE_CHECKING:
    from flashmemory.config import LSAConfig


class FullSelector:
    """Keeps every chunk: LSA degenerates to full attention."""

    name = "full"

    def scores(self, req: SelectionRequest) -> torch.Tensor | None:
        return None


class RecencySelector:
    """Keeps nothing beyond sink and recency tail (StreamingLLM-style)."""

    name = "recency"

    def scores(self, req: SelectionRequest) -> torch.Tensor | None:
        return torch.full((len(req.candidates),), float("-inf"))  # -inf is never picked

class RandomSelector:
    """Keeps k random candidates, seeded per request and step."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def scores(self, req: SelectionRequest) -> torch.Tensor | None:
        g = torch.Generator().manual_seed(hash((self.seed, req.request_id, req.step)) % 2**63)
        return torch.rand(len(req.candidates), generator=g)


class OracleSelector:
    """Ranks by full-attention mass over the next ``window`` steps (from a recorded trace)."""

    name = "oracle"

    def __init__(self, traces: dict[str, list[torch.Tensor]], window: int = 64) -> None:
        self.traces, self.window = traces, window

    def scores(self, req: SelectionRequest) -> torch.Tensor | None:
        steps = self.traces.get(req.request_id)
        if not steps:
            raise ValueError(f"oracle has no attention trace for {req.request_id!r}")
        window = steps[req.step:req.step + self.window] or steps[-1:]
        mass = torch.zeros(req.num_prompt_chunks)
        for s in window:
            n = min(s.numel(), req.num_prompt_chunks)
            mass[:n] += s[:n]
        return mass[torch.tensor(req.candidates, dtype=torch.long)]


def baseline_selector(lsa: LSAConfig,
                      traces: dict[str, list[torch.Tensor]] | None = None) -> Selector | None:
    """The selector of every mode but ``lsa`` (whose neural indexer the caller owns), or None."""
    if lsa.mode == "full":
        return FullSelector()
    if lsa.mode == "recency":
        return RecencySelector()
    if lsa.mode == "random":
        return RandomSelector(lsa.seed)
    if lsa.mode == "oracle":
        if traces is None:
            raise ValueError("the oracle mode needs a full-attention trace (single-process "
                             "engine only)")
        return OracleSelector(traces, lsa.oracle_window)
    return None
