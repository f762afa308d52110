"""The batched fixed-shape DeepSeek-V4 decode attention (model/deepseek_v4/graph_step.py) against
the one-request ``Attention.forward`` on the same caches, and the lightning-indexer score kernel
(kernels/dsv4_index.py) against its reference; CPU, fp32, tests.helpers.TINY_DSV4 (layer 0
sliding, 1 and 3 CSA with top-8, 2 HCA at 32:1).

Two prompts of unequal length (1600 and 1201 tokens) form the batch; each decodes the token
after its prompt, a step in which no compressed window closes (the step the graph path runs).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from flashmemory.kernels.dsv4_fused import (
    NORM_NONE,
    NORM_UNWEIGHTED,
    NORM_WEIGHTED,
    norm_rope,
    norm_rope_ref,
)
from flashmemory.kernels.dsv4_index import index_scores, index_scores_ref
from flashmemory.model.deepseek_v4 import PageStore, fetch_pages, open_resident
from flashmemory.model.deepseek_v4.config import CSA
from flashmemory.model.deepseek_v4.graph_step import GraphAttention, step_rope
from flashmemory.model.deepseek_v4.layers import RMSNorm, apply_rope
from tests.helpers import TINY_DSV4, tiny_dsv4

LENGTHS = (1600, 1201)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def prefilled(tmp_path_factory):
    """(model, [full cache per prompt])."""
    model = tiny_dsv4(tmp_path_factory.mktemp("dsv4-graph"))
    caches = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(0, TINY_DSV4["vocab_size"], (n,),
                            generator=torch.Generator().manual_seed(10 + i))
        cache = model.new_cache()
        model(ids, torch.arange(n), cache)
        caches.append(cache)
    return model, caches


def resident_copy(model, cache, pages):
    """A decode-side cache holding only ``pages`` (64 entries each) of every CSA layer."""
    store = PageStore(model.config, model.dtype)
    store.add("r", cache)
    resident = open_resident(cache)
    fetch_pages(resident, store.read("r", pages))
    return resident


def check_layer(model, caches, layer: int, steps: int = 1,
                capacity: int | None = None) -> GraphAttention:
    """``steps`` batch steps of ``layer`` (each row's next positions, a fresh random input per
    step) against Attention.forward per request, output and ring after every step; returns the
    graph layer after its last step."""
    attn = model.layers[layer].attn
    positions = torch.tensor([c.length for c in caches])
    held = max((c.layers[layer].entries.valid_kv.shape[0] if c.layers[layer].entries is not None
                else 0) for c in caches)
    g = GraphAttention(attn, model.rope_compress, len(caches), capacity or held + steps,
                       torch.device("cpu"), torch.float32)
    for row, c in enumerate(caches):
        g.load(row, c.layers[layer])
    refs = [copy.deepcopy(c) for c in caches]
    gen = torch.Generator().manual_seed(layer)
    for _ in range(steps):
        x = torch.randn(len(caches), model.config.hidden_size, generator=gen)
        out = g.step(x, positions, step_rope(model.rope_main, model.rope_compress, positions,
                                             torch.float32))
        for row, ref_cache in enumerate(refs):
            step = model._step_inputs(positions[row:row + 1], positions[row:row + 1], ref_cache,
                                      None, None)
            want = attn(x[row:row + 1], step, ref_cache.layers[layer])[0]
            torch.testing.assert_close(out[row], want, rtol=1e-5, atol=1e-5)
            slot = int(positions[row]) % attn.window  # the ring took the token as the reference
            torch.testing.assert_close(g.ring[row, slot], ref_cache.layers[layer].window.kv[slot])
            assert int(g.ring_pos[row, slot]) == int(positions[row])
            if g.entries is not None:  # entries emitted as the reference's, at the same rows
                assert int(g.count[row]) == ref_cache.layers[layer].entries.valid_kv.shape[0]
        positions = positions + 1
    return g


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_batch_step_equals_the_one_request_path_on_full_caches(prefilled, layer):
    model, caches = prefilled
    g = check_layer(model, caches, layer)
    if model.config.layer_types[layer] != "sliding_attention":
        assert g.count.tolist() == [c.num_entries(layer) for c in caches]  # ragged rows


@pytest.mark.parametrize("layer", [1, 2])
def test_batch_steps_emit_entries_as_the_one_request_path(prefilled, layer):
    """40 steps: every row closes CSA windows (4:1) and an HCA window (32:1) along the way; the
    entries appear at the same steps with the same contents (the outputs depend on them)."""
    model, caches = prefilled
    g = check_layer(model, caches, layer, steps=40)
    ratio = 4 if layer == 1 else 32
    assert g.count.tolist() == [(c.length + 40) // ratio for c in caches]


@pytest.mark.parametrize("layer", [1, 3])
def test_batch_step_picks_among_resident_entries_only(prefilled, layer):
    """LSA: each request holds some pages; the top-8 over those rows matches the reference's,
    and differs from the full cache's (so residency changed what was attended)."""
    model, caches = prefilled
    resident = [resident_copy(model, caches[0], [0, 3, 6]), resident_copy(model, caches[1], [1, 4])]
    g = check_layer(model, resident, layer, steps=12)  # 3 new entries each, resident
    assert g.count.tolist() == [c.num_resident(layer) + 3 for c in resident]
    assert g.count.tolist()[0] < caches[0].num_entries(layer)
    full = check_layer(model, caches, layer, steps=12)
    x = torch.randn(2, model.config.hidden_size, generator=torch.Generator().manual_seed(layer))
    positions = torch.tensor([c.length + 12 for c in caches])
    rope = step_rope(model.rope_main, model.rope_compress, positions, torch.float32)
    assert not torch.allclose(g.step(x, positions, rope), full.step(x, positions, rope))


def test_capacity_is_checked(prefilled):
    model, caches = prefilled
    g = GraphAttention(model.layers[1].attn, model.rope_compress, 1, 10, torch.device("cpu"),
                       torch.float32)
    with pytest.raises(ValueError, match="capacity"):
        g.load(0, caches[0].layers[1])
    assert model.config.layer_types[1] == CSA


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_index_kernel_matches_reference(dtype):
    """Triton kernel (compiled on a GPU, TRITON_INTERPRET=1 on CPU: tests/conftest.py) vs the
    torch form: ragged counts, a partial last block, an empty request and a block past every
    count; 12 heads (padded to 16 in the kernel)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernel runs on a GPU or under TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(0)
    b, h, d, e = 3, 12, 32, 300
    q = torch.randn(b, h, d, generator=g).to(dtype).to(dev)
    keys = torch.randn(b, e, d, generator=g).to(dtype).to(dev)
    w = torch.randn(b, h, generator=g).to(dev)
    count = torch.tensor([300, 77, 0], device=dev)
    got = index_scores(q, w, keys, count, 0.25, block_e=64)
    want = index_scores_ref(q, w, keys, count, 0.25)
    assert torch.isneginf(got[1, 77:]).all() and torch.isneginf(got[2]).all()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_index_kernel_rejects_bad_shapes():
    q = torch.zeros(2, 16, 32)
    with pytest.raises(ValueError, match="want q"):
        index_scores(q, torch.zeros(2, 16), torch.zeros(3, 8, 32), torch.zeros(2), 1.0)


@pytest.mark.gpu
def test_graph_step_replays_in_a_cuda_graph(prefilled):
    """The step captures (no host sync) and a replay equals an eager step."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    model, caches = prefilled
    model = copy.deepcopy(model).cuda()
    model.build_rotary()
    dev = torch.device("cuda")
    g = GraphAttention(model.layers[1].attn, model.rope_compress, 2, 512, dev, torch.float32)
    for row, c in enumerate(caches):
        layer = copy.deepcopy(c.layers[1])
        layer.window.kv, layer.window.pos = layer.window.kv.cuda(), layer.window.pos.cuda()
        layer.entries.kv = layer.entries.kv.cuda()
        layer.entries.index_keys = layer.entries.index_keys.cuda()
        g.load(row, layer)
    positions = torch.tensor([c.length for c in caches], device=dev)
    x = torch.randn(2, model.config.hidden_size, device=dev)
    rope = step_rope(model.rope_main, model.rope_compress, positions, torch.float32)
    ring, ring_pos = g.ring.clone(), g.ring_pos.clone()
    eager = g.step(x, positions, rope)
    g.ring.copy_(ring)
    g.ring_pos.copy_(ring_pos)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        g.step(x, positions, rope)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    g.ring.copy_(ring)
    g.ring_pos.copy_(ring_pos)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = g.step(x, positions, rope)
    g.ring.copy_(ring)
    g.ring_pos.copy_(ring_pos)
    graph.replay()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", [NORM_NONE, NORM_WEIGHTED, NORM_UNWEIGHTED])
@pytest.mark.parametrize("rope", [True, False])
def test_norm_rope_kernel_matches_the_layers_it_fuses(dtype, mode, rope):
    """One launch of norm + partial interleaved RoPE vs RMSNorm / rms_unweighted / apply_rope
    (kernel compiled on a GPU, interpreted on CPU), heads and none, a non-power-of-two dim."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernel runs on a GPU or under TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(mode)
    for shape in ((3, 5, 48), (4, 40)):
        x = (3 * torch.randn(shape, generator=g)).to(dtype).to(dev)
        w = (1 + torch.randn(shape[-1], generator=g)).to(dev)
        cos = sin = None
        if rope:
            ang = torch.randn(shape[0], 6, generator=g)
            cos, sin = ang.cos().to(dtype).to(dev), ang.sin().to(dtype).to(dev)
        got = norm_rope(x, mode, w, 1e-6, cos, sin)
        want = norm_rope_ref(x, mode, w, 1e-6, cos, sin)
        if mode == NORM_WEIGHTED:  # the reference is the model's own module
            ref = RMSNorm(shape[-1], 1e-6).to(dev)
            ref.weight.data.copy_(w)
            plain = ref(x)
            want2 = plain if cos is None else apply_rope(plain, cos, sin)
            torch.testing.assert_close(want, want2)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("keys", [3, 8, 11])
def test_long_key_blocks_are_summed_in_pieces_like_one_product(keys):
    from flashmemory.model.deepseek_v4.graph_step import _weighted_sum

    g = torch.Generator().manual_seed(keys)
    p, k = torch.randn(2, 5, keys, generator=g), torch.randn(2, keys, 6, generator=g)
    torch.testing.assert_close(_weighted_sum(p, k, piece=4), torch.bmm(p, k))
    torch.testing.assert_close(_weighted_sum(p[:1], k[:1], piece=4), torch.bmm(p[:1], k[:1]))


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_kernel_matches_the_compressor(overlap, dtype):
    """One launch of the window pooling vs the torch form: rows that close (their previous-
    window halves replaced) and rows that do not, one row with no previous window (-inf gate);
    a dim that is not a multiple of the block."""
    from flashmemory.kernels.dsv4_fused import pool_window, pool_window_ref

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernel runs on a GPU or under TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(5)
    b, r, dim = 3, 4, 80
    width = 2 * dim if overlap else dim
    kv = torch.randn(b, r, width, generator=g).to(dtype).to(dev)
    gate = torch.randn(b, r, width, generator=g).to(dtype).to(dev)
    ape = torch.randn(r, width, generator=g).to(dev)
    positions = torch.tensor([7, 9, 11], device=dev)  # rows 0 and 2 close a 4-token window
    prev = [None, None]
    if overlap:
        prev = [torch.randn(b, r, dim, generator=g).to(dtype).to(dev),
                torch.randn(b, r, dim, generator=g).to(dev)]
        prev[1][2] = float("-inf")
    mine = [t.clone() if t is not None else None for t in prev]
    got = pool_window(kv, gate, ape, *mine, positions, block_d=32)
    want = pool_window_ref(kv, gate, ape, *prev, positions)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    if overlap:
        torch.testing.assert_close(mine[0], prev[0])
        torch.testing.assert_close(mine[1], prev[1])
        torch.testing.assert_close(mine[0][0], kv[0, :, :dim])  # a closing row took its halves
