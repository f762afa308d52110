"""The selector interface: given a request's chunks and its lookahead query, pick chunks to keep.

Called by the engine (later the IndexerActor) at decode start and every ``repredict_every``
steps. Selectors rank prompt chunks only; sink chunks and the recency tail are added by
``resident_target`` so every selector gets them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from flashmemory.config import LSAConfig


@dataclass(frozen=True)
class Budget:
    """How many prompt chunks a selector may keep: a fraction of them, or a token count."""

    fraction: float | None = 0.1
    tokens: int | None = None
    threshold: float | None = None  # keep only chunks scoring >= threshold (within the budget)

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.tokens is None):
            raise ValueError("give exactly one of budget fraction or budget tokens")
        if self.fraction is not None and not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"budget fraction must be in [0, 1], got {self.fraction}")
        if self.tokens is not None and self.tokens < 0:
            raise ValueError(f"budget tokens must be >= 0, got {self.tokens}")

    def num_chunks(self, num_prompt_chunks: int, chunk_size: int) -> int:
        if self.tokens is not None:
            return min(num_prompt_chunks, self.tokens // chunk_size)
        assert self.fraction is not None
        return min(num_prompt_chunks, math.ceil(self.fraction * num_prompt_chunks - 1e-9))


@dataclass(frozen=True)
class SelectionRequest:
    """What a selector sees at one re-prediction."""

    request_id: str
    num_prompt_chunks: int
    candidates: list[int]  # prompt chunks outside sink and tail, the ones to rank
    k: int  # how many of the candidates may be kept (the ceiling)
    step: int  # decode steps done so far
    query: str  # lookahead query text: the question plus recently generated text
    floor: int = 0  # with a threshold: keep at least this many top candidates anyway


class Selector(Protocol):
    """Ranks candidate chunks; returns at most ``req.k`` of them."""

    name: str

    def scores(self, req: SelectionRequest) -> torch.Tensor | None:
        """(len(candidates),) scores, higher = keep; None = keep all candidates."""
        ...


def pick(scores: torch.Tensor | None, req: SelectionRequest, threshold: float | None) -> list[int]:
    """Top-k of candidates by score (ties broken by chunk order), filtered by threshold; with a
    threshold the count follows the scores between ``req.floor`` and ``req.k`` (adaptive)."""
    if scores is None:
        return list(req.candidates)
    if req.k <= 0 or not req.candidates:
        return []
    k = min(req.k, len(req.candidates))
    top = torch.topk(scores.float(), k, sorted=True)
    pairs = zip(top.indices.tolist(), top.values.tolist(), strict=True)
    keep = [req.candidates[i] for rank, (i, s) in enumerate(pairs)
            if s != float("-inf") and (threshold is None or s >= threshold or rank < req.floor)]
    return sorted(keep)


def fixed_chunks(num_prompt_chunks: int, num_tokens: int, chunk_size: int, sink_chunks: int,
                 recent_tokens: int) -> set[int]:
    """Sink chunks plus every chunk overlapping the last ``recent_tokens`` tokens."""
    sink = set(range(min(sink_chunks, num_prompt_chunks)))
    first_recent = max(0, num_tokens - max(recent_tokens, 1)) // chunk_size
    last = (num_tokens - 1) // chunk_size
    return sink | set(range(first_recent, min(last, num_prompt_chunks - 1) + 1))


@dataclass(frozen=True)
class ResidencyState:
    """A request's decode-side state that the resident-set decision depends on."""

    store_id: str  # the request's id in the chunk store / indexer
    num_prompt_chunks: int
    num_tokens: int  # sequence length including the token about to be written
    pinned: frozenset[int]  # chunks decode writes into
    step: int  # decode steps done
    query: str  # lookahead query


def plan_resident(lsa: LSAConfig, selector: Selector, state: ResidencyState,
                  chunk_size: int) -> tuple[set[int], int]:
    """Target resident prompt chunks (sink + tail + pinned + selected), and how many selected."""
    n = state.num_prompt_chunks
    # 1. fixed part: sink, recency tail, pinned chunks
    fixed = fixed_chunks(n, state.num_tokens, chunk_size, lsa.sink_chunks, lsa.recent_tokens)
    fixed |= {i for i in state.pinned if i < n}
    # 2. selected part: the selector ranks the other prompt chunks under the budget
    budget = Budget(None if lsa.budget_tokens is not None else lsa.budget, lsa.budget_tokens,
                    lsa.threshold)
    cands = [i for i in range(n) if i not in fixed]
    floor = math.ceil(lsa.min_budget * n - 1e-9) if lsa.threshold is not None else 0
    req = SelectionRequest(state.store_id, n, cands, budget.num_chunks(n, chunk_size),
                           state.step, state.query, floor)
    chosen = pick(selector.scores(req), req, lsa.threshold) if cands else []
    return fixed | set(chosen), len(chosen)
