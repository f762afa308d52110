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


def pool_window_ref(kv: torch.Tensor, gate: torch.Tensor, ape: torch.Tensor,
                    prev_kv: torch.Tensor | None, prev_gate: torch.Tensor | None,
                    positions: torch.Tensor) -> torch.Tensor:
    """The entry each row's open window pools into, before its norm (``Compressor.forward``).

    kv / gate (B, r, width) raw projections of the window's tokens, ape (r, width) fp32; for an
    overlapping compressor (width = 2 x dim) prev_kv (B, r, dim) / prev_gate (B, r, dim, fp32,
    position bias included) are the previous window's first halves, replaced in place by this
    window's where a row's window closes ((position + 1) % r == 0). Returns (B, dim) in kv's
    dtype."""
    g = gate + ape
    if prev_kv is not None and prev_gate is not None:
        d = kv.shape[2] // 2
        first_kv, first_gate = kv[..., :d], g[..., :d]
        kv = torch.cat([prev_kv, kv[..., d:]], dim=1)
        g = torch.cat([prev_gate, g[..., d:]], dim=1)
        shut = ((positions + 1) % ape.shape[0] == 0)[:, None, None]
        prev_kv.copy_(torch.where(shut, first_kv, prev_kv))
        prev_gate.copy_(torch.where(shut, first_gate, prev_gate))
    weights = g.softmax(dim=1, dtype=torch.float32).to(kv.dtype)
    return (kv * weights).sum(dim=1)


if triton is not None:

    @triton.jit
    def _pool_kernel(KV, Gate, Ape, PrevKV, PrevGate, Pos, Out, stride_kb, stride_kr,
                     stride_pb, stride_pr, stride_ob, DIM: tl.constexpr, R: tl.constexpr,
                     BLOCK_D: tl.constexpr, OVERLAP: tl.constexpr):
        b = tl.program_id(0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        j = tl.arange(0, R)
        ok = (d < DIM)[None, :]
        dtype = KV.dtype.element_ty
        off = DIM if OVERLAP else 0  # the window's own half of an overlapping projection
        at = b * stride_kb + j[:, None] * stride_kr + off + d[None, :]
        k2 = tl.load(KV + at, mask=ok, other=0.0).to(tl.float32)
        g2 = (tl.load(Gate + at, mask=ok, other=0.0).to(tl.float32)
              + tl.load(Ape + j[:, None] * (DIM * (2 if OVERLAP else 1)) + off + d[None, :],
                        mask=ok, other=0.0))
        m = tl.max(g2, 0)
        if OVERLAP:
            pat = b * stride_pb + j[:, None] * stride_pr + d[None, :]
            k1 = tl.load(PrevKV + pat, mask=ok, other=0.0).to(tl.float32)
            g1 = tl.load(PrevGate + pat, mask=ok, other=float("-inf"))
            m = tl.maximum(m, tl.max(g1, 0))
            e1 = tl.exp(g1 - m[None, :])
            e2 = tl.exp(g2 - m[None, :])
            s = tl.sum(e1, 0) + tl.sum(e2, 0)
            w1 = (e1 / s[None, :]).to(dtype).to(tl.float32)
            w2 = (e2 / s[None, :]).to(dtype).to(tl.float32)
            acc = (tl.sum((k1 * w1).to(dtype).to(tl.float32), 0)
                   + tl.sum((k2 * w2).to(dtype).to(tl.float32), 0))
            pos = tl.load(Pos + b)
            if (pos + 1) % R == 0:  # this window closes: its first halves pool with the next
                first = b * stride_kb + j[:, None] * stride_kr + d[None, :]
                tl.store(PrevKV + pat, tl.load(KV + first, mask=ok, other=0.0), mask=ok)
                g0 = (tl.load(Gate + first, mask=ok, other=0.0).to(tl.float32)
                      + tl.load(Ape + j[:, None] * (2 * DIM) + d[None, :], mask=ok, other=0.0))
                tl.store(PrevGate + pat, g0, mask=ok)
        else:
            e2 = tl.exp(g2 - m[None, :])
            w2 = (e2 / tl.sum(e2, 0)[None, :]).to(dtype).to(tl.float32)
            acc = tl.sum((k2 * w2).to(dtype).to(tl.float32), 0)
        tl.store(Out + b * stride_ob + d, acc.to(dtype), mask=d < DIM)


def pool_window(kv: torch.Tensor, gate: torch.Tensor, ape: torch.Tensor,
                prev_kv: torch.Tensor | None, prev_gate: torch.Tensor | None,
                positions: torch.Tensor, block_d: int = 64) -> torch.Tensor:
    """As ``pool_window_ref`` in one launch (a GPU or TRITON_INTERPRET=1; the reference
    otherwise). r must be a power of two (V4: 4 and 128)."""
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if triton is None or not (kv.is_cuda or interp):
        return pool_window_ref(kv, gate, ape, prev_kv, prev_gate, positions)
    b, r, width = kv.shape
    overlap = prev_kv is not None
    dim = width // 2 if overlap else width
    if r & (r - 1) or kv.stride(-1) != 1 or gate.stride() != kv.stride() or not ape.is_contiguous():
        raise ValueError("pool_window wants a power-of-two window and contiguous buffers")
    out = torch.empty((b, dim), dtype=kv.dtype, device=kv.device)
    pk = prev_kv if prev_kv is not None else kv
    pg = prev_gate if prev_gate is not None else gate
    _pool_kernel[(b, triton.cdiv(dim, block_d))](
        kv, gate, ape, pk, pg, positions, out, kv.stride(0), kv.stride(1), pk.stride(0),
        pk.stride(1), out.stride(0), DIM=dim, R=r, BLOCK_D=block_d, OVERLAP=overlap,
        num_warps=4)
    return out
