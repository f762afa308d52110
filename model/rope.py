"""Rotary position embeddings with the scaling variants of Llama 3, Qwen2 (YaRN) and linear.

Used by ``model.llama``; K is cached post-RoPE, so positions must be absolute token positions.
"""

from __future__ import annotations

import math

import torch

from flashmemory.model.config import RopeConfig


def inv_frequencies(rope: RopeConfig, dim: int) -> torch.Tensor:
    """Inverse frequencies (dim/2,) fp32 for the configured rope type."""
    exps = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv = 1.0 / (rope.theta**exps)
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type == "llama3":
        return _llama3(rope, inv)
    if rope.rope_type == "yarn":
        return _yarn(rope, dim)
    return inv


def _llama3(rope: RopeConfig, inv: torch.Tensor) -> torch.Tensor:
    old_len = rope.original_max_position_embeddings
    assert old_len is not None
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
    span = rope.high_freq_factor - rope.low_freq_factor
    smooth = (old_len / wavelen - rope.low_freq_factor) / span
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(rope: RopeConfig, dim: int) -> torch.Tensor:
    old_len = rope.original_max_position_embeddings
    assert old_len is not None

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (rope.factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # share of extrapolated (unscaled) frequency per dimension
    return interpolation * (1 - keep) + extrapolation * keep


class RotaryEmbedding(torch.nn.Module):
    """Computes cos/sin for absolute positions and applies them (rotate-half convention)."""

    def __init__(self, rope: RopeConfig, head_dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_frequencies(rope, head_dim), persistent=False)
        self.scale = rope.yarn_attention_factor()

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """positions: (N,) int64 -> cos, sin: (N, 1, head_dim) in ``dtype``."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (N, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (N, 1, D)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (N, H, D); cos/sin: (N, 1, D) with equal halves -> rotate-half RoPE of x.

    Written as two fused multiply-adds per half into one output buffer: the textbook
    ``x * cos + rotate_half(x) * sin`` makes four full-size temporaries and was ~10x slower on
    CPU for a 4K-token prefill.
    """
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    c, s = cos[..., :h], sin[..., :h]
    out = torch.empty_like(x)
    o1, o2 = out[..., :h], out[..., h:]
    torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-1.0)  # x1 cos - x2 sin
    torch.mul(x2, c, out=o2).addcmul_(x1, s)  # x2 cos + x1 sin
    return out
