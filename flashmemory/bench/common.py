"""Shared pieces of the benchmarks: model shapes, random-weight models, timing, tables."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: no programmatic dependent launch (PDL)
    gdc_launch_dependents = gdc_wait = None

from flashmemory.model.config import ModelConfig, RopeConfig

SHAPES: dict[str, dict[str, Any]] = {  # real layer shapes; weights are random
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                      rope=RopeConfig(theta=500000.0)),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                    num_heads=9, num_kv_heads=3, head_dim=64,
                    rope=RopeConfig(theta=100000.0), tie_word_embeddings=True),
}


def model_config(shape: str, max_len: int) -> ModelConfig:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return ModelConfig(architecture="llama", max_position_embeddings=max_len, rms_norm_eps=1e-5,
                       **SHAPES[shape])


def random_model(cfg: ModelConfig, device: str = "cuda",
                 dtype: torch.dtype = torch.bfloat16) -> Any:
    """A CausalLM of ``cfg``'s shape with N(0, 0.02) weights (timings are real, text is not)."""
    from flashmemory.model.llama import CausalLM

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = CausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
            elif "bias" in name:
                p.zero_()
    model.requires_grad_(False)
    return model.fuse()


def time_ms(fn: Callable[[], Any]) -> float:
    """Median milliseconds per call; L2 is flushed before each call (triton's do_bench)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def time_graph_ms(fn: Callable[[], Any]) -> float:
    """Like ``time_ms`` but replays ``fn`` captured in a CUDA graph, as the decode step runs it:
    host launch overhead is out of the number, the GPU's own time stays in."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay)


def hbm_read_bandwidth(device: str = "cuda", gib: int = 4) -> dict[str, float]:
    """Measured HBM bandwidth in bytes/s: the best of a streaming-read Triton kernel and a torch
    reduction (read-only), and a copy (read + write bytes)."""
    x = torch.randn(gib * 2**29, dtype=torch.bfloat16, device=device)  # gib GiB
    t_stream = time_graph_ms(stream_reader(x))
    t_sum = time_graph_ms(lambda: x.sum(dtype=torch.float32))
    y = torch.empty_like(x)
    copy = 2 * x.nbytes / (time_graph_ms(lambda: y.copy_(x)) / 1e3)
    return {"read": x.nbytes / (min(t_stream, t_sum) / 1e3), "copy": copy}


_READ_BLOCK = 8192


def stream_reader(x: torch.Tensor) -> Callable[[], Any]:
    """A launch of the streaming-read kernel over ``x`` (bf16, a multiple of 8192 elements;
    16 KiB per program): what one kernel reading those bytes can reach."""
    out = torch.empty(x.numel() // _READ_BLOCK, dtype=torch.float32, device=x.device)
    return lambda: _stream_read[(out.numel(),)](x, out, BLOCK=_READ_BLOCK, num_warps=8)


@triton.jit
def _stream_read(X, Out, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """One tile per program; with ``PDL`` (launched with ``launch_pdl``) it waits for the
    previous kernel before reading and lets the next one launch, as the LSA split kernel does."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    i = tl.program_id(0)
    x = tl.load(X + i.to(tl.int64) * BLOCK + tl.arange(0, BLOCK))
    tl.store(Out + i, tl.sum(x.to(tl.float32), 0))


def command(argv: Sequence[str]) -> str:
    return "flashmemory " + " ".join(shlex.quote(a) for a in argv)


def markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def gpu_name() -> str:
    if not torch.cuda.is_available():
        return "no GPU"
    p = torch.cuda.get_device_properties(0)
    return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"


def require_gpu() -> None:
    if not torch.cuda.is_available():
        sys.exit("error: flashmemory bench needs a CUDA GPU (none is visible)")
