"""Token sampling (greedy, temperature, top-k, top-p) and stop handling for the engine."""

from __future__ import annotations

import torch

from flashmemory.config import SamplingParams

GREEDY_BELOW = 1e-5  # temperatures under this decode greedily (as vLLM does)


def make_generator(params: SamplingParams, offset: int = 0) -> torch.Generator | None:
    """The request's CPU generator (seed, default 0, plus ``offset``); None when greedy."""
    if params.temperature < GREEDY_BELOW:
        return None
    return torch.Generator().manual_seed((params.seed or 0) + offset)


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """logits: (vocab,) -> one token id (sampled on the CPU, where the generator lives)."""
    if params.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    logits = logits.float().cpu()
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        drop = sorted_p.cumsum(0) - sorted_p >= params.top_p  # keep the smallest set reaching p
        drop[0] = False  # the most likely token always stays (a top_p below float32's range is 0)
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def find_stop(text: str, stops: tuple[str, ...], search_from: int) -> int | None:
    """Index where the earliest stop string starts in ``text`` (searching the new part), or None."""
    hits = [i for s in stops if (i := text.find(s, max(0, search_from - len(s)))) >= 0]
    return min(hits) if hits else None
