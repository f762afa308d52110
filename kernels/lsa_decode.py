"""Paged sparse decode attention over each request's resident chunks (sink + selected + tail).

Called by the decode step's GPU backend (``decode.step``) and by ``flashmemory bench``. K/V are
read in place from the chunk pool (pages of (L, 2, Hkv, C, D)); nothing is gathered first. One
program handles all query heads of one KV head (GQA) over one split of a request's chunks
(flash-decoding); a second kernel merges the splits by their log-sum-exp.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


def lsa_decode_ref(q: torch.Tensor, kv: torch.Tensor, block_table: torch.Tensor,
                   seq_lens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Plain-torch reference, computed in fp32.

    q: (B, Hq, D); kv: (P, 2, Hkv, C, D) one layer of the pool; block_table: (B, M) int pages in
    chunk order (entries past a request's pages are ignored); seq_lens: (B,) valid tokens over a
    request's pages (all full but the last) -> (B, Hq, D) in q's dtype.
    """
    b, hq, d = q.shape
    c, hkv = kv.shape[3], kv.shape[2]
    scale = d ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    for i in range(b):
        n = int(seq_lens[i])
        pages = block_table[i, : -(-n // c)].long()
        sel = kv[pages].float()  # (n_pages, 2, Hkv, C, D)
        flat = sel.permute(1, 2, 0, 3, 4).reshape(2, hkv, -1, d)[:, :, :n]  # (2, Hkv, n, D)
        k = flat[0].repeat_interleave(hq // hkv, 0)  # (Hq, n, D)
        v = flat[1].repeat_interleave(hq // hkv, 0)
        p = torch.softmax((q[i].float()[:, None, :] @ k.transpose(1, 2)) * scale, dim=-1)
        out[i] = (p @ v)[:, 0].to(q.dtype)
    return out


if triton is not None:

    @triton.jit
    def _lsa_split_kernel(
        Q, KV, Table, SeqLens, OutPart, LsePart, Out,
        stride_qb, stride_qh,
        stride_kvp, stride_kvs, stride_kvh, stride_kvt,
        stride_tb,
        stride_ob, stride_oh, stride_os,
        stride_lb, stride_lh,
        stride_fb, stride_fh,
        qk_scale, num_splits, table_width,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        D_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr, DIRECT: tl.constexpr, PDL: tl.constexpr,
        PREFETCH: tl.constexpr, STRIDED: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        # The table and lengths are written before the previous kernel starts (the runner copies
        # them at the top of the step), so with PDL they are read before waiting for it: the
        # seq_len -> table chain overlaps the previous kernel's tail.
        seq_len = tl.load(SeqLens + b)
        n_blocks = tl.cdiv(seq_len, BLOCK_N)
        row = Table + b * stride_tb
        if STRIDED:  # split s takes blocks s, s + S, ...: its first page needs no seq_len
            start = s
            end = n_blocks
            step = num_splits
            first_ok = start * BLOCK_N // PAGE < table_width
        else:
            per_split = tl.cdiv(n_blocks, num_splits)  # each request splits its own chunks
            start = s * per_split
            end = tl.minimum(start + per_split, n_blocks)
            step = 1
            first_ok = start < end
        if PREFETCH:  # the next block's page index is loaded one iteration ahead
            nxt = tl.load(row + start * BLOCK_N // PAGE, mask=first_ok, other=0)
        if PDL:  # launched early (programmatic dependent launch): wait for the previous kernel
            gdc_wait()  # before reading Q and K/V, which it may have written
            gdc_launch_dependents()  # let the merge kernel launch and wait in turn

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, D_PAD)
        t = tl.arange(0, BLOCK_N)
        heads = h * GROUP + g
        g_ok = g < GROUP
        d_ok = d < HEAD_DIM
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # (G, D)
        q = q.to(tl.float32) * qk_scale  # scale folded in; scores in log2 units
        if not DOT_FP32:
            q = q.to(KV.dtype.element_ty)

        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
        kv_head = KV + h * stride_kvh
        for blk in range(start, end, step):
            tok0 = blk * BLOCK_N
            t_ok = tok0 + t < seq_len
            if PREFETCH:
                page = nxt.to(tl.int64)
                nxt = tl.load(row + (tok0 + step * BLOCK_N) // PAGE, mask=blk + step < end,
                              other=0)
                rows = (tok0 % PAGE) + t
                ptr = kv_head + page * stride_kvp + rows[:, None] * stride_kvt + d[None, :]
            elif BLOCK_N <= PAGE:  # the block lies in one page
                page = tl.load(row + tok0 // PAGE).to(tl.int64)
                rows = (tok0 % PAGE) + t
                ptr = kv_head + page * stride_kvp + rows[:, None] * stride_kvt + d[None, :]
            else:  # the block spans BLOCK_N // PAGE pages: look each row's page up
                pos = tok0 + t
                pages = tl.load(row + pos // PAGE, mask=t_ok, other=0)
                ptr = (kv_head + pages.to(tl.int64)[:, None] * stride_kvp
                       + (pos % PAGE)[:, None] * stride_kvt + d[None, :])
            k = tl.load(ptr, mask=t_ok[:, None] & d_ok[None, :], other=0.0)  # (N, D)
            v = tl.load(ptr + stride_kvs, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")  # (G, N) fp32, no tf32
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(t_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if DOT_FP32:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        has = l_i > 0.0  # an empty split (short request) contributes nothing to the merge
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        if DIRECT:  # one split: this is the answer, no merge
            o_ptr = Out + b * stride_fb + heads[:, None] * stride_fh + d[None, :]
            tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
        else:
            o_ptr = (OutPart + b * stride_ob + heads[:, None] * stride_oh + s * stride_os
                     + d[None, :])
            tl.store(o_ptr, out, mask=g_ok[:, None] & d_ok[None, :])
            tl.store(LsePart + b * stride_lb + heads * stride_lh + s, lse, mask=g_ok)

    @triton.jit
    def _lsa_merge_kernel(
        OutPart, LsePart, Out,
        stride_ob, stride_oh, stride_os,
        stride_lb, stride_lh,
        stride_fb, stride_fh, num_splits,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr, PDL: tl.constexpr,
        EARLY_NEXT: tl.constexpr,
    ):
        if PDL:
            gdc_wait()  # the split kernel's partials are complete and visible
            if EARLY_NEXT:
                gdc_launch_dependents()  # the next LSA call may launch and read its metadata
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, S_PAD)
        d = tl.arange(0, D_PAD)
        s_ok = s < num_splits
        lse = tl.load(LsePart + b * stride_lb + h * stride_lh + s, mask=s_ok,
                      other=float("-inf"))
        w = tl.exp2(lse - tl.max(lse, 0))  # (S,) the first split is never empty
        part = tl.load(OutPart + b * stride_ob + h * stride_oh + s[:, None] * stride_os
                       + d[None, :], mask=s_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
        out = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
        tl.store(Out + b * stride_fb + h * stride_fh + d, out.to(Out.dtype.element_ty),
                 mask=d < HEAD_DIM)


def _interpreting() -> bool:
    """Under TRITON_INTERPRET=1 (CPU tests) tl.dot on bf16 is wrong (Triton 3.9): dot in fp32."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def default_launch(batch: int, num_kv_heads: int, max_blocks: int, num_sms: int = 132,
                   head_dim: int = 128) -> tuple[int, int]:
    """(splits per (request, KV head), pipeline stages) for a launch of ``batch`` requests.

    While the (request, KV head) pairs are fewer than the GPU holds at three stages (about 2
    programs per SM at head_dim 128, 3 at 64), three blocks are kept in flight and the splits
    fill those slots without spilling into a second, partial wave (at most 256 splits, one per
    block). Beyond that (large batches) occupancy matters more than depth: two stages, and
    splits for about twice as many programs as those slots.

    Measured on the H200 (docs/BENCHMARKS.md section 4, ``benchmarks/kernel_probe.py --sweep``):
    Llama-3-8B shape (8 KV heads, D=128) at batch 1, 32 splits x 3 stages took 56.8 us at 52K
    resident tokens (50 splits x 2 stages: 58.3); at batch 8, 4 splits x 3 stages 389.8 us
    (5 splits: 412.2); at batch 64 and 13K tokens, 2 splits x 2 stages 774.6 us (1 split x 3
    stages: 903.2). SmolLM2 shape (3 KV heads, D=64): 128 splits at batch 1, 16 at batch 8 and
    2 at batch 64 were the fastest, all at 3 stages.
    """
    units = max(1, batch * num_kv_heads)
    slots = num_sms * (2 if head_dim >= 128 else 3)
    if units <= slots:
        return max(1, min(slots // units, max_blocks, 256)), 3
    return max(1, min(-(-2 * slots // units), max_blocks)), 2


# Round-robin blocks from this many splits on. Measured on the H200 (docs/BENCHMARKS.md
# section 4, `python benchmarks/kernel_probe.py --variants`, two runs): at batch 1 with 33 splits
# (Llama-3-8B shape) 0.6-1.3 us faster at 16K-26K resident tokens and 0.3-0.6 us at 52K, and
# 0.1-0.8 us faster on the SmolLM2 shape (66-132 splits); 0.8-0.9 us slower at batch 8 with the
# Llama-3-8B shape's 4 splits.
STRIDED_FROM = 16


def block_size(chunk_size: int) -> int:
    """Tokens per inner iteration: the largest power of two <= 64 dividing the chunk size."""
    n = 64
    while n > 16 and chunk_size % n:
        n //= 2
    if chunk_size % n:
        raise ValueError(f"chunk_size must be a multiple of 16 for the LSA kernel, "
                         f"got {chunk_size}")
    return n


def _check(q: torch.Tensor, kv: torch.Tensor, block_table: torch.Tensor,
           seq_lens: torch.Tensor) -> None:
    if q.dim() != 3 or kv.dim() != 5 or kv.shape[1] != 2:
        raise ValueError(f"want q (B, Hq, D) and kv (P, 2, Hkv, C, D); got {tuple(q.shape)} "
                         f"and {tuple(kv.shape)}")
    b, hq, d = q.shape
    hkv, dk = kv.shape[2], kv.shape[4]
    if d != dk:
        raise ValueError(f"head_dim of q ({d}) and kv ({dk}) differ")
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if q.dtype not in _DTYPES or kv.dtype not in _DTYPES:
        raise ValueError(f"dtypes must be fp16/bf16/fp32, got q {q.dtype} kv {kv.dtype}")
    if q.stride(-1) != 1 or kv.stride(-1) != 1:
        raise ValueError("the last (head_dim) dimension of q and kv must be contiguous")
    if block_table.dim() != 2 or block_table.shape[0] != b or block_table.dtype not in (
            torch.int32, torch.int64):
        raise ValueError(f"block_table must be (B={b}, M) int32/int64, got "
                         f"{tuple(block_table.shape)} {block_table.dtype}")
    if seq_lens.shape != (b,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seq_lens must be ({b},) int32/int64, got {tuple(seq_lens.shape)}")
    devs = {t.device for t in (q, kv, block_table, seq_lens)}
    if len(devs) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devs))}")


def lsa_decode(q: torch.Tensor, kv: torch.Tensor, block_table: torch.Tensor,
               seq_lens: torch.Tensor, scale: float | None = None, num_splits: int | None = None,
               num_warps: int = 4, num_stages: int | None = None, block_n: int | None = None,
               pdl: bool | None = None, prefetch: bool = True,
               early_next: bool = True, strided: bool | None = None) -> torch.Tensor:
    """Decode attention of q over resident pages, read in place; shapes as ``lsa_decode_ref``.

    Every seq_lens entry must be >= 1 and the table must hold ceil(seq_len / C) valid pages per
    request (not checked on the device: the launch never synchronizes, so it can be captured in a
    CUDA graph). ``num_splits`` is fixed per launch; each request divides its own chunks into that
    many splits, so ragged batches stay balanced. ``block_n`` tokens are read per iteration.
    ``pdl`` (default: on Hopper and newer) launches both kernels with programmatic dependent
    launch, so their launch overlaps the previous kernel's tail; each waits before reading Q
    and K/V. The table and seq_lens are read before that wait: they must be written before the
    previous kernel starts (the decode runner copies them at the top of the step).
    ``prefetch`` loads each block's page index one iteration ahead; ``early_next`` lets the next
    PDL kernel launch as soon as the merge starts. Both are on by default; the switches exist
    for ``benchmarks/kernel_probe.py``. ``strided`` (default: from ``STRIDED_FROM`` splits)
    deals blocks to splits round-robin (split s reads blocks s, s + S, ...) instead of in runs:
    each program's first page index is then known without the request's length.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check(q, kv, block_table, seq_lens)
    b, hq, d = q.shape
    hkv, c = kv.shape[2], kv.shape[3]
    group = hq // hkv
    bn = block_size(c) if block_n is None else block_n
    if bn < 16 or bn & (bn - 1) or (c % bn and bn % c):
        raise ValueError(f"block_n must be a power of two >= 16 that divides or is a multiple "
                         f"of the chunk size {c}, got {bn}")
    if num_splits is None or num_stages is None:
        max_blocks = -(-block_table.shape[1] * c // bn)
        sms = (torch.cuda.get_device_properties(q.device).multi_processor_count
               if q.is_cuda else 132)
        splits, stages = default_launch(b, hkv, max_blocks, sms, d)
        num_splits = splits if num_splits is None else num_splits
        # three blocks of D > 128 would not fit in shared memory
        num_stages = (stages if d <= 128 else 2) if num_stages is None else num_stages
    scale = d ** -0.5 if scale is None else scale
    if strided is None:
        strided = num_splits >= STRIDED_FROM
    if pdl is None:
        pdl = _pdl_ok(q.device)
    launch = {"launch_pdl": True} if pdl else {}
    direct = num_splits == 1
    part = torch.empty((b, hq, num_splits if not direct else 1, d), dtype=torch.float32,
                       device=q.device)
    lse = torch.empty((b, hq, num_splits), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    d_pad = triton.next_power_of_2(d)
    _lsa_split_kernel[(b, hkv, num_splits)](
        q, kv, block_table, seq_lens, part, lse, out,
        q.stride(0), q.stride(1),
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
        block_table.stride(0),
        part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        scale * _LOG2E, num_splits, block_table.shape[1],
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d,
        D_PAD=d_pad, PAGE=c, BLOCK_N=bn,
        DOT_FP32=kv.dtype == torch.float32 or _interpreting(), DIRECT=direct, PDL=pdl,
        PREFETCH=prefetch and bn <= c, STRIDED=strided,
        num_warps=num_warps, num_stages=num_stages, **launch,
    )
    if not direct:
        _lsa_merge_kernel[(b, hq)](
            part, lse, out,
            part.stride(0), part.stride(1), part.stride(2),
            lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1), num_splits,
            HEAD_DIM=d, D_PAD=d_pad,
            S_PAD=max(2, triton.next_power_of_2(num_splits)), PDL=pdl, EARLY_NEXT=early_next,
            num_warps=4, **launch,
        )
    return out


def _pdl_ok(device: torch.device) -> bool:
    """Programmatic dependent launch: compiled kernels on a Hopper-or-newer GPU."""
    if device.type != "cuda" or _interpreting() or os.environ.get("FLASHMEMORY_PDL") == "0":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def resident_bytes(seq_lens: torch.Tensor, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> int:
    """K and V bytes the kernel must read for one layer (the numerator of its bandwidth)."""
    size = torch.empty((), dtype=dtype).element_size()
    return int(seq_lens.sum()) * num_kv_heads * head_dim * 2 * size

