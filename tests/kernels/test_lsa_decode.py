"""kernels/lsa_decode against its plain-torch reference on awkward sizes.

On CPU the kernel runs in Triton's interpreter (tests/conftest.py) at tiny shapes; on a GPU the
same tests run compiled, and the ``gpu``-marked ones add real model shapes and CUDA graph capture.
"""

from __future__ import annotations

import pytest
import torch

from flashmemory.kernels.lsa_decode import block_size, default_launch, lsa_decode, lsa_decode_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# relative L2 error allowed against the fp32 reference: ~2x the output rounding of each dtype
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_case(lens: list[int], hq: int, hkv: int, d: int, c: int, dtype: torch.dtype,
              layers: int = 2, seed: int = 0, device: str = DEV):
    """Random pool (P, L, 2, Hkv, C, D) and a shuffled block table covering ``lens`` tokens."""
    g = torch.Generator().manual_seed(seed)
    pages_needed = [-(-n // c) for n in lens]
    num_pages = sum(pages_needed) + 3  # spare pages that nobody reads
    pool = torch.randn((num_pages, layers, 2, hkv, c, d), generator=g).to(dtype).to(device)
    perm = torch.randperm(num_pages, generator=g)
    width = max(pages_needed) + 1  # padded table: entries past a request's pages are junk
    table = torch.full((len(lens), width), 10**6, dtype=torch.int32)  # junk would fault if read
    i = 0
    for r, n in enumerate(pages_needed):
        table[r, :n] = perm[i:i + n].to(torch.int32)
        i += n
    q = torch.randn((len(lens), hq, d), generator=g).to(dtype).to(device)
    return q, pool, table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in kernel output"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def check(lens, hq, hkv, d, c, dtype, splits=None, layer=1, strided=None):
    q, pool, table, seq = make_case(lens, hq, hkv, d, c, dtype)
    kv = pool[:, layer]  # one layer of the pool: a strided view, read in place
    out = lsa_decode(q, kv, table, seq, num_splits=splits, strided=strided)
    ref = lsa_decode_ref(q.float(), kv.float(), table, seq)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"rel err {err:.2e} for lens={lens} dtype={dtype}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ragged_batch_of_unequal_requests(dtype):
    # one token, a partial chunk, exactly one chunk, chunk + 1, several chunks with a partial end
    check([1, 7, 16, 17, 75], hq=4, hkv=2, d=64, c=16, dtype=dtype)


def test_tail_only_one_page():
    # empty selection: only the open page with the recency tail (fewer tokens than a chunk)
    check([5], hq=8, hkv=8, d=64, c=32, dtype=torch.bfloat16)


def test_single_full_chunk_mha():
    check([32], hq=2, hkv=2, d=64, c=32, dtype=torch.float16)


@pytest.mark.parametrize("hq,hkv", [(9, 3), (32, 8), (8, 1)])
def test_gqa_groups(hq, hkv):
    check([40, 3], hq=hq, hkv=hkv, d=64, c=16, dtype=torch.bfloat16)


@pytest.mark.parametrize("d", [64, 128, 96])
def test_head_dims(d):
    check([33, 50], hq=4, hkv=2, d=d, c=16, dtype=torch.bfloat16)


@pytest.mark.parametrize("strided", [False, True])  # blocks to splits in runs / round-robin
@pytest.mark.parametrize("splits", [1, 2, 5, 40])
def test_split_counts_including_more_splits_than_chunks(splits, strided):
    check([100, 9, 64], hq=4, hkv=2, d=64, c=16, dtype=torch.float32, splits=splits,
          strided=strided)


@pytest.mark.parametrize("strided", [False, True])
def test_chunk_larger_than_block(strided):
    # 128-token chunks are read in 64-token blocks: two blocks per page
    check([300, 129], hq=4, hkv=2, d=64, c=128, dtype=torch.bfloat16, splits=3, strided=strided)


def test_writes_every_output_and_ignores_spare_pages():
    q, pool, table, seq = make_case([20, 45], 4, 2, 64, 16, torch.float32)
    kv = pool[:, 0]
    before = lsa_decode(q, kv, table, seq)
    used = set(table[0, :2].tolist()) | set(table[1, :3].tolist())
    spare = [p for p in range(pool.shape[0]) if p not in used]
    pool[spare] = float("nan")  # pages outside the table must not be touched
    after = lsa_decode(q, pool[:, 0], table, seq)
    assert torch.equal(before, after)


def test_launcher_rejects_bad_inputs():
    q, pool, table, seq = make_case([20], 4, 2, 64, 16, torch.float32)
    kv = pool[:, 0]
    with pytest.raises(ValueError, match="head_dim"):
        lsa_decode(q[..., :32].contiguous(), kv, table, seq)
    with pytest.raises(ValueError, match="multiple"):
        lsa_decode(torch.randn(1, 3, 64, device=q.device), kv, table, seq)
    with pytest.raises(ValueError, match="block_table"):
        lsa_decode(q, kv, table.float(), seq)
    with pytest.raises(ValueError, match="seq_lens"):
        lsa_decode(q, kv, table, seq[None])
    with pytest.raises(ValueError, match="contiguous"):
        lsa_decode(q, torch.cat([kv, kv], dim=-1)[..., ::2], table, seq)
    with pytest.raises(ValueError, match="multiple of 16"):
        block_size(24)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (9, 3, 64)])  # Llama-3-8B, SmolLM2
def test_real_shapes_on_gpu(hq, hkv, d):
    lens = [65536, 1, 4097, 20000]
    q, pool, table, seq = make_case(lens, hq, hkv, d, 64, torch.bfloat16, layers=1)
    kv = pool[:, 0]
    out = lsa_decode(q, kv, table, seq)
    ref = lsa_decode_ref(q, kv, table, seq)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_replay_follows_table_updates():
    q, pool, table, seq = make_case([3000, 700], 32, 8, 128, 64, torch.bfloat16, layers=1)
    kv = pool[:, 0]
    lsa_decode(q, kv, table, seq, num_splits=24)  # compile outside the capture (round-robin)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lsa_decode(q, kv, table, seq, num_splits=24)
    # a re-prediction rewrites the table and the lengths in place, outside the graph
    new_table = table.clone()
    new_table[0, :10] = table[1, :10]
    table.copy_(new_table)
    seq.copy_(torch.tensor([640, 700], dtype=torch.int32))
    graph.replay()
    ref = lsa_decode_ref(q, kv, table, seq)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("block_n", [32, 64])
def test_blocks_spanning_several_pages(block_n, strided):
    # 16-token chunks read 32 or 64 tokens at a time: each row looks its page up
    q, pool, table, seq = make_case([100, 7, 33], 4, 2, 64, 16, torch.bfloat16)
    kv = pool[:, 1]
    out = lsa_decode(q, kv, table, seq, block_n=block_n, num_splits=2, strided=strided)
    assert rel_err(out, lsa_decode_ref(q, kv, table, seq)) < TOL[torch.bfloat16]


def test_default_launch_fills_one_wave_then_trades_depth_for_occupancy():
    assert default_launch(1, 8, 10_000, 132, 128) == (33, 3)  # D=128: 2 programs per SM
    assert default_launch(8, 8, 10_000, 132, 128) == (4, 3)  # 256 programs: one wave, not 1.2
    assert default_launch(1, 3, 10_000, 132, 64) == (132, 3)  # D=64: 3 per SM
    assert default_launch(8, 3, 10_000, 132, 64) == (16, 3)
    assert default_launch(64, 3, 10_000, 132, 64) == (2, 3)
    assert default_launch(1, 1, 10_000, 132, 64) == (256, 3)  # capped
    assert default_launch(1, 8, 10, 132, 128) == (10, 3)  # at most one split per block
    assert default_launch(64, 8, 10_000, 132, 128) == (2, 2)  # past one wave: occupancy
    assert default_launch(256, 8, 10_000, 132, 128) == (1, 2)
