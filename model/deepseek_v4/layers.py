"""Small shared pieces of the DeepSeek-V4 backbone: RMSNorms, partial interleaved RoPE, grouped
linear. Used by the attention, compressor, hyper-connection and model modules of this package."""

from __future__ import annotations

import torch
from torch import nn

from flashmemory.model.config import RopeConfig
from flashmemory.model.rope import inv_frequencies


class RMSNorm(nn.Module):
    """RMSNorm whose weight stays fp32 (as upstream): normalise and scale in fp32, cast once."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


def rms_unweighted(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalise the last dim without a weight; the factor is cast to x's dtype first."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class Rotary(nn.Module):
    """cos/sin tables for one RoPE flavour over ``dim`` channels, one angle per channel pair."""

    def __init__(self, rope: RopeConfig, dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_frequencies(rope, dim), persistent=False)
        self.scale = rope.yarn_attention_factor()

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """positions (N,) int64 -> cos, sin (N, dim/2), rounded to ``dtype`` as upstream does."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (N, dim/2)
        return (freqs.cos() * self.scale).to(dtype), (freqs.sin() * self.scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing ``2 * cos.shape[-1]`` channels of x in consecutive pairs (interleaved).

    x: (N, D) or (N, H, D); cos/sin: (N, R/2). The leading D - R channels pass through. The
    rotation runs in fp32 and is cast back to x's dtype. Pass ``-sin`` to undo a rotation.
    """
    if x.dim() == cos.dim() + 1:
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads: (N, 1, R/2)
    rd = 2 * cos.shape[-1]
    head, tail = x[..., :-rd], x[..., -rd:].float()
    even, odd = tail[..., 0::2], tail[..., 1::2]
    turned = torch.stack((-odd, even), dim=-1).flatten(-2)  # pair (a, b) -> (-b, a)
    cos2, sin2 = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    rotated = (tail * cos2 + turned * sin2).to(x.dtype)
    return torch.cat([head, rotated], dim=-1)


class GroupedLinear(nn.Module):
    """Block-diagonal projection: each of ``groups`` input slices gets its own (rank, in) matrix.

    Stored like upstream's ``wo_a``: weight (groups * rank, in_per_group).
    """

    def __init__(self, in_per_group: int, rank: int, groups: int) -> None:
        super().__init__()
        self.groups, self.rank = groups, rank
        self.weight = nn.Parameter(torch.empty(groups * rank, in_per_group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, G, in_per_group) -> (N, G, rank)."""
        w = self.weight.view(self.groups, self.rank, -1)  # (G, R, in)
        return torch.einsum("ngi,gri->ngr", x, w)
