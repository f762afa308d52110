"""kernels/fused (RMSNorm, rotary) against their references; interpreter on CPU, compiled on GPU."""

from __future__ import annotations

import pytest
import torch

from flashmemory.kernels.fused import rms_norm, rms_norm_ref, rotary, store_kv, store_kv_ref
from flashmemory.model.rope import apply_rotary

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any()
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 64), (1, 576), (2, 5, 48)])
def test_rms_norm(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(DEV)
    w = torch.randn(shape[-1], generator=g).to(dtype).to(DEV)
    got = rms_norm(x, w, 1e-5)
    ref = rms_norm_ref(x, w, 1e-5)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert rel(got, rms_norm_ref(x.double(), w.double(), 1e-5)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,d", [(1, 9, 64), (3, 4, 16), (2, 3, 128)])
def test_rotary_matches_apply_rotary(dtype, n, h, d):
    g = torch.Generator().manual_seed(1)
    x = torch.randn((n, h, d), generator=g).to(dtype).to(DEV)
    ang = torch.randn((n, 1, d // 2), generator=g)
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype).to(DEV)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype).to(DEV)
    ref = apply_rotary(x.double(), cos.double(), sin.double())
    assert rel(rotary(x, cos, sin), ref) < TOL[dtype]


def test_rejects_bad_shapes():
    x = torch.randn(2, 3, 8, device=DEV)
    with pytest.raises(ValueError, match="cos/sin"):
        rotary(x, torch.randn(2, 1, 4, device=DEV), torch.randn(2, 1, 4, device=DEV))
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.randn(4, device=DEV), 1e-6)


@pytest.mark.parametrize("d", [64, 48])
def test_store_kv_matches_index_put(d):
    g = torch.Generator().manual_seed(2)
    pool = torch.randn((6, 3, 2, 2, 16, d), generator=g).to(torch.bfloat16).to(DEV)
    want = pool.clone()
    k = torch.randn((3, 2, d), generator=g).to(torch.bfloat16).to(DEV)
    v = torch.randn((3, 2, d), generator=g).to(torch.bfloat16).to(DEV)
    pages = torch.tensor([4, 0, 4], device=DEV)
    slots = torch.tensor([15, 0, 3], device=DEV)
    store_kv(pool[:, 1], k, v, pages, slots)
    store_kv_ref(want[:, 1], k, v, pages, slots)
    assert torch.equal(pool, want)
