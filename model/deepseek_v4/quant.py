"""Dequantization of DeepSeek-V4 checkpoint weights, used by ``loader`` at load time.

Formats the reference's config / conversion declare (transformers ``FineGrainedFP8Config``):
FP8 e4m3 weights with per-block inverse scales (``weight_scale_inv``, or ``scale`` in upstream
naming) stored as fp32 (``scale_fmt: float``) or as powers of two (``ue8m0``: float8_e8m0fnu, or
raw exponent bytes); and FP4 e2m1 experts (``expert_dtype: fp4``) packed two per int8 byte,
low nibble first, with one scale per 32 input columns of each row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_PACKED_FP4 = (torch.int8, torch.uint8, getattr(torch, "float4_e2m1fn_x2", torch.int8))
QUANTIZED_DTYPES = (torch.float8_e4m3fn, *_PACKED_FP4)


@dataclass(frozen=True)
class QuantConfig:
    """What ``quantization_config`` (plus top-level ``expert_dtype``) declares."""

    weight_block_size: tuple[int, int] = (128, 128)
    scale_fmt: Literal["float", "ue8m0"] = "float"
    expert_dtype: Literal["fp8", "fp4"] = "fp8"

    def __post_init__(self) -> None:
        if len(self.weight_block_size) != 2 or min(self.weight_block_size) <= 0:
            raise ValueError(f"quantization_config.weight_block_size must be two positive "
                             f"integers, got {self.weight_block_size!r}")
        if self.scale_fmt not in ("float", "ue8m0"):
            raise ValueError(f"quantization_config.scale_fmt {self.scale_fmt!r} not supported; "
                             "allowed: float, ue8m0")
        if self.expert_dtype not in ("fp8", "fp4"):
            raise ValueError(f"expert_dtype {self.expert_dtype!r} not supported; allowed: fp8, fp4")

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> QuantConfig | None:
        qc = hf.get("quantization_config")
        if qc is None:
            return None
        method = qc.get("quant_method", "fp8")
        if method != "fp8":
            raise ValueError(f"quantization_config.quant_method {method!r} not supported; "
                             "allowed: fp8")
        if qc.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"quantization_config.fmt {qc['fmt']!r} not supported; allowed: e4m3")
        block = qc.get("weight_block_size") or (128, 128)
        return cls(tuple(int(b) for b in block), qc.get("scale_fmt", "float"),  # type: ignore[arg-type]
                   qc.get("expert_dtype", hf.get("expert_dtype", "fp8")))


def is_quantized(t: torch.Tensor) -> bool:
    return t.dtype in QUANTIZED_DTYPES


def dequantize(weight: torch.Tensor, scale: torch.Tensor,
               block: tuple[int, int] | None = None) -> torch.Tensor:
    """weight (..., R, C) FP8 or (..., R, C/2) packed FP4, scale (..., SR, SC) -> fp32 (..., R, C).

    The block is ``block`` when the scale grid is its ceil-division of (R, C) (partial blocks at
    the edges, as in the reference's FP8 linear), else the exact division of (R, C) by the grid
    (FP4 experts: (1, 32)).
    """
    values = unpack_fp4(weight) if weight.dtype in _PACKED_FP4 else weight.float()
    rows, cols = values.shape[-2:]
    if scale.dim() < 2:  # one scale for the whole tensor
        return values * scale_values(scale).reshape(())
    srows, scols = scale.shape[-2:]
    bm, bn = _block_shape(rows, cols, srows, scols, block)
    s = scale_values(scale)
    s = s.repeat_interleave(bm, dim=-2)[..., :rows, :].repeat_interleave(bn, dim=-1)[..., :cols]
    return values * s


def scale_values(scale: torch.Tensor) -> torch.Tensor:
    """fp32 scales from fp32 / bf16 / float8_e8m0fnu, or raw e8m0 exponent bytes (uint8)."""
    if scale.dtype == torch.uint8:
        return torch.exp2(scale.float() - 127.0)
    return scale.float()


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """(..., C/2) bytes holding two e2m1 values each (low nibble first) -> fp32 (..., C)."""
    table = torch.tensor(_FP4_VALUES, dtype=torch.float32, device=packed.device)
    u8 = packed.contiguous().view(torch.uint8).long()
    pairs = torch.stack([table[u8 & 0xF], table[(u8 >> 4) & 0xF]], dim=-1)  # (..., C/2, 2)
    return pairs.flatten(-2)


def _block_shape(rows: int, cols: int, srows: int, scols: int,
                 block: tuple[int, int] | None) -> tuple[int, int]:
    if block is not None and -(-rows // block[0]) == srows and -(-cols // block[1]) == scols:
        return block
    if rows % srows == 0 and cols % scols == 0:
        return rows // srows, cols // scols
    raise ValueError(f"scale grid ({srows}, {scols}) does not tile a ({rows}, {cols}) weight "
                     f"with block {block}")
