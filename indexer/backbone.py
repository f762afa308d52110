"""Baselines that rank chunks with the backbone's own queries and keys (modes ``snapkv`` and
``quest``): the comparison points for the backbone-free neural indexer. Built by the engine after
prefill from the chunk store; single-process only (the cluster's indexer never sees the backbone).

- SnapKV-style (Li et al., 2024): the last ``window`` prompt queries vote on earlier positions;
  votes are smoothed with a 1-D average pool, summed per chunk, and fixed for the whole decode.
- Quest-style (Tang et al., 2024): per chunk, the elementwise min / max of its keys bound q.k from
  above; at every re-prediction the latest decode query (the previous step's, an approximation:
  Quest uses the current one per layer) ranks chunks by that bound.
Both select one chunk set per request for all layers and heads, like the neural indexer: per
(layer, head) scores are normalised over chunks and the peak over layers and heads is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from flashmemory.indexer.base import SelectionRequest

SNAPKV_WINDOW = 32  # observation window (prompt-end queries), SnapKV's default size
SNAPKV_KERNEL = 7  # average-pool width over token positions


def chunk_bounds(k: torch.Tensor, n: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chunk, the elementwise min and max of its keys.

    k: (Hkv, T, D) keys in chunk order with T <= n * c -> two (Hkv, n, D) fp32 tensors; a partial
    last chunk is bounded by the keys it has.
    """
    hkv, t, d = k.shape
    lo = torch.full((hkv, n * c, d), float("inf"), dtype=torch.float32, device=k.device)
    hi = torch.full((hkv, n * c, d), float("-inf"), dtype=torch.float32, device=k.device)
    lo[:, :t], hi[:, :t] = k.float(), k.float()
    return lo.view(hkv, n, c, d).amin(2), hi.view(hkv, n, c, d).amax(2)


def bound_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound of q.k per chunk, softmaxed over chunks, peak over query heads.

    q: (Hq, D); kmin, kmax: (Hkv, n, D) -> (n,) fp32.
    """
    hq, hkv, d = q.shape[0], kmin.shape[0], q.shape[-1]
    qq = q.float().to(kmin.device)[:, None, :]  # (Hq, 1, D)
    lo = kmin.repeat_interleave(hq // hkv, 0)  # (Hq, n, D)
    hi = kmax.repeat_interleave(hq // hkv, 0)
    bound = torch.maximum(qq * lo, qq * hi).sum(-1)  # (Hq, n)
    return torch.softmax(bound * d ** -0.5, dim=-1).max(0).values


def snapkv_scores(window_q: torch.Tensor, k: torch.Tensor, n: int, c: int,
                  kernel: int = SNAPKV_KERNEL) -> torch.Tensor:
    """One layer's SnapKV votes per chunk, peak over query heads.

    window_q: (W, Hq, D) the last W prompt queries; k: (Hkv, T, D) all prompt keys -> (n,) fp32.
    Each window query attends causally to the prompt; its probabilities on positions before the
    window are summed over the window (the window itself is the recency tail, kept anyway).
    """
    w, hq, d = window_q.shape
    hkv, t, _ = k.shape
    kk = k.float().repeat_interleave(hq // hkv, 0)  # (Hq, T, D)
    logits = torch.einsum("whd,htd->hwt", window_q.float().to(k.device), kk) * d ** -0.5
    qpos = torch.arange(t - w, t, device=k.device)
    causal = torch.arange(t, device=k.device)[None, :] <= qpos[:, None]  # (W, T)
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)  # (Hq, W, T)
    votes = probs[:, :, : t - w].sum(1)  # (Hq, T - W)
    if kernel > 1 and votes.shape[-1] > 0:  # smooth: a fact spans a few tokens, not one
        votes = F.avg_pool1d(votes[:, None], kernel, stride=1, padding=kernel // 2,
                             count_include_pad=False)[:, 0]
    per_chunk = torch.zeros(hq, n * c, device=k.device)
    per_chunk[:, : votes.shape[-1]] = votes
    mass = per_chunk.view(hq, n, c).sum(-1)  # (Hq, n)
    mass = mass / mass.sum(-1, keepdim=True).clamp_min(1e-12)
    return mass.max(0).values


@dataclass
class QueryTap:
    """The latest decode query of one sequence, per layer; written by the torch decode step."""

    q: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (Hq, D) fp32 CPU


@dataclass(frozen=True)
class PromptKeys:
    """What the backbone baselines keep of a prefilled prompt (built by ``observe``)."""

    num_chunks: int
    snapkv: torch.Tensor  # (n,) SnapKV votes per chunk, peak over layers
    kmin: list[torch.Tensor]  # per layer (Hkv, n, D)
    kmax: list[torch.Tensor]
    last_q: dict[int, torch.Tensor]  # layer -> (Hq, D) the last prompt token's query


def observe(window_q: list[torch.Tensor], layer_keys: list[torch.Tensor], n: int,
            c: int) -> PromptKeys:
    """Build the baselines' view of a prompt.

    window_q: per layer (W, Hq, D) the last prompt queries; layer_keys: per layer (Hkv, T, D).
    """
    votes, kmin, kmax = [], [], []
    for q, k in zip(window_q, layer_keys, strict=True):
        votes.append(snapkv_scores(q, k, n, c).cpu())
        lo, hi = chunk_bounds(k, n, c)
        kmin.append(lo.cpu())
        kmax.append(hi.cpu())
    last = {i: q[-1].float().cpu() for i, q in enumerate(window_q)}
    return PromptKeys(n, torch.stack(votes).max(0).values, kmin, kmax, last)


class SnapKVSelector:
    """Ranks candidates by the prompt-end observation window's votes (fixed after prefill)."""

    name = "snapkv"

    def __init__(self, keys: PromptKeys) -> None:
        self.keys = keys

    def scores(self, req: SelectionRequest) -> torch.Tensor | None:
        return self.keys.snapkv[torch.tensor(req.candidates, dtype=torch.long)]


class QuestSelector:
    """Ranks candidates by the latest decode query against each chunk's key bounds."""

    name = "quest"

    def __init__(self, keys: PromptKeys, tap: QueryTap) -> None:
        self.keys, self.tap = keys, tap

    def scores(self, req: SelectionRequest) -> torch.Tensor | None:
        q = self.tap.q or self.keys.last_q  # before the first decode step: the prompt's last
        peak = torch.stack([bound_scores(q[layer], lo, hi) for layer, (lo, hi)
                            in enumerate(zip(self.keys.kmin, self.keys.kmax, strict=True))])
        return peak.max(0).values[torch.tensor(req.candidates, dtype=torch.long)]
