"""DeepSeek-V4's per-row RMSNorm + partial interleaved RoPE in one launch, for the batched decode
step (``model.deepseek_v4.graph_step``). The torch form (``norm_rope_ref``) is what
``model.deepseek_v4.layers`` computes: ``RMSNorm`` (fp32 weight, normalise and scale in fp32,
one cast), ``rms_unweighted`` (the factor rounded to x's dtype, then multiplied) and
``apply_rope`` (the trailing 2 x cos.shape[-1] channels rotated in consecutive pairs, in fp32);
each of those is 5-10 element-wise launches in torch.
"""

from __future__ import annotations

import os

import torch

from flashmemory.model.deepseek_v4.layers import apply_rope

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None

NORM_NONE, NORM_WEIGHTED, NORM_UNWEIGHTED = 0, 1, 2


def norm_rope_ref(x: torch.Tensor, mode: int, weight: torch.Tensor | None, eps: float,
                  cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    """x (N, D) or (N, H, D); ``mode`` NORM_NONE / NORM_WEIGHTED (weight (D,)) / NORM_UNWEIGHTED;
    cos/sin (N, R/2) or None for no rotation."""
    if mode == NORM_WEIGHTED:
        assert weight is not None
        xf = x.float()
        x = (weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))
             ).to(x.dtype)
    elif mode == NORM_UNWEIGHTED:
        x = x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)
    if cos is not None:
        assert sin is not None
        x = apply_rope(x, cos, sin)
    return x


if triton is not None:

    @triton.jit
    def _norm_rope_kernel(X, W, Cos, Sin, Out, heads, stride_xn, stride_xh, stride_cn,
                          stride_on, stride_oh, eps,
                          DIM: tl.constexpr, D_PAD: tl.constexpr, HALF: tl.constexpr,
                          H_PAD: tl.constexpr, MODE: tl.constexpr, ROPE: tl.constexpr):
        row = tl.program_id(0)
        n = row // heads
        h = row % heads
        x_row = X + n * stride_xn + h * stride_xh
        o_row = Out + n * stride_on + h * stride_oh
        d = tl.arange(0, D_PAD)
        d_ok = d < DIM
        x = tl.load(x_row + d, mask=d_ok, other=0.0)
        dtype = x.dtype
        r = 1.0
        if MODE != 0:
            xf = x.to(tl.float32)
            r = tl.math.rsqrt(tl.sum(xf * xf, 0) / DIM + eps)
        if MODE == 1:
            y = (tl.load(W + d, mask=d_ok, other=0.0).to(tl.float32) * (xf * r)).to(dtype)
        elif MODE == 2:
            y = (x.to(tl.float32) * r.to(dtype).to(tl.float32)).to(dtype)
        else:
            y = x
        if ROPE:
            tl.store(o_row + d, y, mask=d < DIM - 2 * HALF)  # channels RoPE leaves alone
            j = tl.arange(0, H_PAD)
            j_ok = j < HALF
            at = DIM - 2 * HALF + 2 * j
            e = tl.load(x_row + at, mask=j_ok, other=0.0)
            o = tl.load(x_row + at + 1, mask=j_ok, other=0.0)
            if MODE == 1:
                e = (tl.load(W + at, mask=j_ok, other=0.0).to(tl.float32)
                     * (e.to(tl.float32) * r)).to(dtype)
                o = (tl.load(W + at + 1, mask=j_ok, other=0.0).to(tl.float32)
                     * (o.to(tl.float32) * r)).to(dtype)
            elif MODE == 2:
                e = (e.to(tl.float32) * r.to(dtype).to(tl.float32)).to(dtype)
                o = (o.to(tl.float32) * r.to(dtype).to(tl.float32)).to(dtype)
            c = tl.load(Cos + n * stride_cn + j, mask=j_ok, other=0.0).to(tl.float32)
            s = tl.load(Sin + n * stride_cn + j, mask=j_ok, other=0.0).to(tl.float32)
            ef, of = e.to(tl.float32), o.to(tl.float32)
            tl.store(o_row + at, (ef * c - of * s).to(dtype), mask=j_ok)
            tl.store(o_row + at + 1, (of * c + ef * s).to(dtype), mask=j_ok)
        else:
            tl.store(o_row + d, y, mask=d_ok)


def norm_rope(x: torch.Tensor, mode: int, weight: torch.Tensor | None, eps: float,
              cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    """As ``norm_rope_ref``, one launch on a GPU or under TRITON_INTERPRET=1 (the reference
    otherwise); never synchronizes."""
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if triton is None or not (x.is_cuda or interp):
        return norm_rope_ref(x, mode, weight, eps, cos, sin)
    x3 = x if x.dim() == 3 else x[:, None, :]
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    n, heads, dim = x3.shape
    out = torch.empty((n, heads, dim), dtype=x.dtype, device=x.device)
    half = 0 if cos is None else cos.shape[-1]
    if cos is not None:
        assert sin is not None and cos.shape == sin.shape == (n, half)
        assert cos.stride(0) == sin.stride(0) and cos.stride(-1) == sin.stride(-1) == 1
    dummy = out  # an unused pointer argument
    _norm_rope_kernel[(n * heads,)](
        x3, weight if weight is not None else dummy, cos if cos is not None else dummy,
        sin if sin is not None else dummy, out, heads, x3.stride(0), x3.stride(1),
        cos.stride(0) if cos is not None else 0, out.stride(0), out.stride(1), eps,
        DIM=dim, D_PAD=triton.next_power_of_2(dim), HALF=half,
        H_PAD=max(2, triton.next_power_of_2(max(1, half))), MODE=mode, ROPE=cos is not None,
        num_warps=4)
    return out.view(x.shape)
