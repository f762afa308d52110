"""Manifold-constrained hyper-connections (mHC) of DeepSeek-V4: the residual is ``hc_mult``
parallel streams (T, N, hidden). Called by ``model.Block`` around attention and MoE, and by the
model (``HyperHead``) to merge the streams before the final norm.

Per block, a small projection of the normalised, flattened streams gives three mixings: ``pre``
(N) collapses the streams into the block input, ``post`` (N) spreads the block output back over
the streams, and ``comb`` (N, N), made doubly stochastic by Sinkhorn-Knopp, mixes the residual
streams: new[k] = post[k] * out + sum_j comb[j, k] * streams[j].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flashmemory.model.deepseek_v4.layers import rms_unweighted


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Alternately normalise columns and rows of positive (..., N, N) matrices (column first)."""
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


class HyperConnection(nn.Module):
    """Parameters (fp32): ``fn`` ((2 + N) * N, N * hidden), ``base`` ((2 + N) * N,),
    ``scale`` (3,)."""

    def __init__(self, hidden: int, mult: int, iters: int, hc_eps: float, norm_eps: float) -> None:
        super().__init__()
        self.mult, self.iters, self.hc_eps, self.norm_eps = mult, iters, hc_eps, norm_eps
        width = (2 + mult) * mult
        self.fn = nn.Parameter(torch.empty(width, mult * hidden))
        self.base = nn.Parameter(torch.zeros(width))
        self.scale = nn.Parameter(torch.ones(3))

    def mixings(self, streams: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """streams (T, N, hidden) -> pre (T, N), post (T, N), comb (T, N, N), all fp32."""
        n = self.mult
        flat = rms_unweighted(streams.flatten(1).float(), self.norm_eps)  # (T, N * hidden)
        mixed = F.linear(flat, self.fn.float())  # (T, (2 + N) * N)
        pre_w, post_w, comb_w = mixed.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.split([n, n, n * n])
        pre = torch.sigmoid(pre_w * self.scale[0] + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * self.scale[1] + post_b)
        comb = comb_w.view(-1, n, n) * self.scale[2] + comb_b.view(n, n)
        comb = torch.softmax(comb, dim=-1) + self.hc_eps
        return pre, post, sinkhorn(comb, self.iters, self.hc_eps)

    @staticmethod
    def collapse(streams: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """(T, N, hidden), (T, N) -> block input (T, hidden) in the streams' dtype."""
        return (pre[..., None] * streams).sum(dim=1).to(streams.dtype)

    @staticmethod
    def expand(streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor,
               comb: torch.Tensor) -> torch.Tensor:
        """New streams (T, N, hidden) from the old ones and the block output out (T, hidden)."""
        dtype = streams.dtype
        spread = post.to(dtype)[..., None] * out[:, None, :]  # (T, N, hidden)
        return spread + torch.matmul(comb.to(dtype).transpose(-1, -2), streams)


class HyperHead(nn.Module):
    """Final merge of the N streams: sigmoid-weighted sum. ``fn`` (N, N * hidden), ``base`` (N,),
    ``scale`` (1,), fp32."""

    def __init__(self, hidden: int, mult: int, hc_eps: float, norm_eps: float) -> None:
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.fn = nn.Parameter(torch.empty(mult, mult * hidden))
        self.base = nn.Parameter(torch.zeros(mult))
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        """streams (T, N, hidden) -> (T, hidden)."""
        flat = rms_unweighted(streams.flatten(1).float(), self.norm_eps)
        mixed = F.linear(flat, self.fn.float())  # (T, N)
        pre = torch.sigmoid(mixed * self.scale.float() + self.base.float()) + self.hc_eps
        return (pre[..., None] * streams).sum(dim=1).to(streams.dtype)
