"""Small fused kernels for the GPU decode step: RMSNorm and rotary embedding, one launch each.

Called by ``model.llama`` on CUDA tensors. In eager PyTorch each is 5-7 elementwise kernels;
inside a captured decode step those tiny launches, ~1,000 per Llama-3-8B step, cost
milliseconds. Each kernel has its plain-torch reference beside it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face Llama's RMSNorm: normalize in fp32, round to x's dtype, scale by weight."""
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


@triton.jit
def _rms_norm_kernel(X, W, Out, stride_x, stride_o, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, 0) / n + eps)
    w = tl.load(W + cols, mask=ok, other=0.0)
    out = w.to(tl.float32) * y.to(X.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * stride_o + cols, out.to(Out.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., n) with a contiguous last dim; weight: (n,) -> same shape, dtype of weight*x."""
    n = x.shape[-1]
    if weight.shape != (n,) or x.stride(-1) != 1:
        raise ValueError(f"want x (..., {n}) contiguous in its last dim and weight ({n},)")
    x2 = x.reshape(-1, n)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype),
                      device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, x2.stride(0), out.stride(0), n, eps,
                                         BLOCK=triton.next_power_of_2(n), num_warps=4)
    return out.view(x.shape)


@triton.jit
def _rotary_kernel(X, Cos, Sin, Out, heads, stride_xn, stride_xh, stride_cn, stride_on,
                   stride_oh, HALF: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, H_PAD)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    ok = (h < heads) & (d < HALF)
    x = X + n * stride_xn + h * stride_xh + d
    x1 = tl.load(x, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(Cos + n * stride_cn + d, mask=d < HALF, other=0.0).to(tl.float32)
    s = tl.load(Sin + n * stride_cn + d, mask=d < HALF, other=0.0).to(tl.float32)
    o = Out + n * stride_on + h * stride_oh + d
    tl.store(o, (x1 * c - x2 * s).to(Out.dtype.element_ty), mask=ok)
    tl.store(o + HALF, (x2 * c + x1 * s).to(Out.dtype.element_ty), mask=ok)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x (N, H, D), cos/sin (N, 1, D) with equal halves -> (N, H, D)."""
    nt, h, d = x.shape
    if cos.shape != (nt, 1, d) or sin.shape != cos.shape or x.stride(-1) != 1 or d % 2:
        raise ValueError(f"want x (N, H, D) contiguous in D (even) and cos/sin (N, 1, D); got "
                         f"{tuple(x.shape)}, {tuple(cos.shape)}")
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    if nt:
        _rotary_kernel[(nt,)](x, cos, sin, out, h, x.stride(0), x.stride(1), cos.stride(0),
                              out.stride(0), out.stride(1), HALF=d // 2,
                              H_PAD=triton.next_power_of_2(h),
                              D_PAD=triton.next_power_of_2(d // 2), num_warps=4)
    return out


def store_kv_ref(kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor,
                 slots: torch.Tensor) -> None:
    """kv: (P, 2, Hkv, C, D) one layer of the pool; k/v: (B, Hkv, D); pages/slots: (B,) int."""
    kv[pages, 0, :, slots] = k.to(kv.dtype)
    kv[pages, 1, :, slots] = v.to(kv.dtype)


@triton.jit
def _store_kv_kernel(KV, K, V, Pages, Slots, stride_p, stride_s, stride_h, stride_t,
                     stride_kb, stride_kh, stride_vb, stride_vh,
                     HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, D_PAD)
    ok = d < HEAD_DIM
    page = tl.load(Pages + b).to(tl.int64)
    slot = tl.load(Slots + b).to(tl.int64)
    dst = KV + page * stride_p + h * stride_h + slot * stride_t + d
    k = tl.load(K + b * stride_kb + h * stride_kh + d, mask=ok)
    v = tl.load(V + b * stride_vb + h * stride_vh + d, mask=ok)
    tl.store(dst, k.to(KV.dtype.element_ty), mask=ok)
    tl.store(dst + stride_s, v.to(KV.dtype.element_ty), mask=ok)


def store_kv(kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Write each request's new K/V into its page slot in one launch (shapes as the ref)."""
    b, h, d = k.shape
    if v.shape != k.shape or kv.shape[2] != h or kv.shape[4] != d or pages.shape != (b,) \
            or slots.shape != (b,) or kv.stride(-1) != 1 or k.stride(-1) != 1 \
            or v.stride(-1) != 1:
        raise ValueError(f"want kv (P, 2, {h}, C, {d}) and k/v ({b}, {h}, {d}) contiguous in "
                         f"D, pages/slots ({b},); got {tuple(kv.shape)}, {tuple(k.shape)}")
    if b:
        _store_kv_kernel[(b, h)](kv, k, v, pages, slots, kv.stride(0), kv.stride(1),
                                 kv.stride(2), kv.stride(3), k.stride(0), k.stride(1),
                                 v.stride(0), v.stride(1), HEAD_DIM=d,
                                 D_PAD=triton.next_power_of_2(d), num_warps=1)
