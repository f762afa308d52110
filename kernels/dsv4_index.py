"""DeepSeek-V4's lightning-indexer scores for a decode batch, read once from the key store.

score[b, e] = scale * sum_h w[b, h] * relu(q[b, h] . k[b, e]) for the rows e < count[b] of each
request's index-key store, -inf past them. Called by ``model.deepseek_v4.graph_step`` (the
CUDA-graph decode step) and its tests. The plain-torch form (``index_scores_ref``) materialises
the (B, heads, E) per-head scores; the Triton kernel keeps them in registers, so a step reads
each key once, which is what LSA shrinks: the resident keys only.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None


def index_scores_ref(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, count: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q (B, H, D), w (B, H) fp32 head weights, keys (B, E, D), count (B,) -> (B, E) fp32."""
    per_head = torch.relu(torch.einsum("bhd,bed->bhe", q.float(), keys.float()))
    scores = (per_head * w.float()[..., None]).sum(1) * scale
    rows = torch.arange(keys.shape[1], device=keys.device)
    return scores.masked_fill(rows[None, :] >= count[:, None], float("-inf"))


if triton is not None:

    @triton.jit
    def _index_kernel(Q, W, K, Count, Out, stride_qb, stride_qh, stride_wb, stride_kb,
                      stride_ke, stride_ob, scale, E,
                      HEADS: tl.constexpr, DIM: tl.constexpr, H_PAD: tl.constexpr,
                      D_PAD: tl.constexpr, BLOCK_E: tl.constexpr, DOT_FP32: tl.constexpr):
        b = tl.program_id(0)
        blk = tl.program_id(1)
        rows = blk * BLOCK_E + tl.arange(0, BLOCK_E)
        count = tl.load(Count + b)
        live = rows < count
        out_ptr = Out + b * stride_ob + rows
        if blk * BLOCK_E >= count:  # past this request's keys: nothing to read
            tl.store(out_ptr, tl.full([BLOCK_E], float("-inf"), tl.float32), mask=rows < E)
            return
        h = tl.arange(0, H_PAD)
        d = tl.arange(0, D_PAD)
        d_ok = d < DIM
        q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + d[None, :],
                    mask=(h < HEADS)[:, None] & d_ok[None, :], other=0.0)  # (H, D)
        k = tl.load(K + b * stride_kb + rows[:, None] * stride_ke + d[None, :],
                    mask=live[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_E, D)
        if DOT_FP32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))  # (H, BLOCK_E) fp32 accumulate
        w = tl.load(W + b * stride_wb + h, mask=h < HEADS, other=0.0).to(tl.float32)
        score = tl.sum(tl.maximum(s, 0.0) * w[:, None], 0) * scale
        tl.store(out_ptr, tl.where(live, score, float("-inf")), mask=rows < E)


def index_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, count: torch.Tensor,
                 scale: float, block_e: int = 128, num_warps: int = 4) -> torch.Tensor:
    """Shapes as ``index_scores_ref``; q and keys in one dtype (V4: 64 heads x 128). Never
    synchronizes (capturable in a CUDA graph); without Triton or on a CPU tensor outside the
    interpreter, the reference runs."""
    b, h, d = q.shape
    if keys.shape[0] != b or keys.shape[2] != d or w.shape != (b, h) or count.shape != (b,):
        raise ValueError(f"want q (B, H, D), w (B, H), keys (B, E, D), count (B,); got "
                         f"{tuple(q.shape)}, {tuple(w.shape)}, {tuple(keys.shape)}, "
                         f"{tuple(count.shape)}")
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if triton is None or not (q.is_cuda or interp):
        return index_scores_ref(q, w, keys, count, scale)
    if q.stride(-1) != 1 or keys.stride(-1) != 1 or w.stride(-1) != 1:
        raise ValueError("the last dimension of q, w and keys must be contiguous")
    e = keys.shape[1]
    out = torch.empty((b, e), dtype=torch.float32, device=q.device)
    if e == 0:
        return out
    _index_kernel[(b, triton.cdiv(e, block_e))](
        q, w, keys, count, out, q.stride(0), q.stride(1), w.stride(0), keys.stride(0),
        keys.stride(1), out.stride(0), scale, e, HEADS=h, DIM=d,
        H_PAD=max(16, triton.next_power_of_2(h)), D_PAD=max(16, triton.next_power_of_2(d)),
        BLOCK_E=block_e,
        DOT_FP32=interp or q.dtype == torch.float32, num_warps=num_warps)
    return out
