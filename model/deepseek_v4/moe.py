"""DeepSeek-V4 mixture of experts: routed SwiGLU experts plus one shared expert.

Called by ``model.Block``. Hash-routed layers pick experts from a fixed token-id table
(``tid2eid``); score-routed layers pick the top-k of score + correction bias. Either way the
gate's scores weight the picked experts (renormalised, times ``routed_scaling_factor``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flashmemory.model.deepseek_v4.config import DeepseekV4Config


def _score(logits: torch.Tensor, func: str) -> torch.Tensor:
    if func == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    assert func == "sigmoid"
    return torch.sigmoid(logits)


class Gate(nn.Module):
    """Router for one layer: ``weight`` (E, hidden) scores experts; either ``bias`` (E,) shifts
    the scores for top-k selection only (score routing) or ``tid2eid`` (vocab, k) fixes the
    experts per token id (hash routing)."""

    def __init__(self, cfg: DeepseekV4Config, hashed: bool) -> None:
        super().__init__()
        self.hashed, self.k = hashed, cfg.num_experts_per_tok
        self.func, self.scale = cfg.scoring_func, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.k, dtype=torch.long))
        else:
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts))  # fp32

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (T, hidden), input_ids (T,) -> expert indices (T, k), weights (T, k)."""
        scores = _score(F.linear(x, self.weight), self.func)  # (T, E)
        if self.hashed:
            idx = self.tid2eid[input_ids].long()
        else:
            idx = torch.topk(scores + self.bias, self.k, dim=-1, sorted=False).indices
        w = scores.gather(1, idx)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, w * self.scale


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(gate) * up with both pre-activations clipped (gate from above, up both ways)."""
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


class Experts(nn.Module):
    """Routed experts stacked: ``w13`` (E, 2I, hidden) = [gate; up], ``w2`` (E, hidden, I)."""

    def __init__(self, cfg: DeepseekV4Config) -> None:
        super().__init__()
        e, i, h = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.limit = cfg.swiglu_limit
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h))
        self.w2 = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, hidden), idx / weights (T, k) -> sum_k weights * expert_idx(x), (T, hidden)."""
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():  # only the experts some token picked
            tok, slot = (idx == e).nonzero(as_tuple=True)
            gate, up = F.linear(x[tok], self.w13[e]).chunk(2, dim=-1)
            y = F.linear(swiglu(gate, up, self.limit), self.w2[e]) * weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


class SharedExpert(nn.Module):
    """The always-on expert: w2(swiglu(w1 x, w3 x)), width moe_intermediate_size."""

    def __init__(self, cfg: DeepseekV4Config) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.moe_intermediate_size
        self.limit = cfg.swiglu_limit
        self.w1 = nn.Linear(h, i, bias=False)
        self.w2 = nn.Linear(i, h, bias=False)
        self.w3 = nn.Linear(h, i, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), self.limit))


class MoE(nn.Module):
    def __init__(self, cfg: DeepseekV4Config, layer: int) -> None:
        super().__init__()
        self.gate = Gate(cfg, hashed=cfg.mlp_layer_types[layer] == "hash_moe")
        self.experts = Experts(cfg)
        self.shared_experts = SharedExpert(cfg)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """x (T, hidden) normalised block input -> (T, hidden)."""
        idx, weights = self.gate(x, input_ids)
        return self.experts(x, idx, weights) + self.shared_experts(x)
