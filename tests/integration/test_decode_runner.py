"""The Triton decode path (kernel in place, CUDA graphs on a GPU) gives the torch path's logits.

On CPU the kernel runs in Triton's interpreter, eagerly; on a GPU the same test replays captured
graphs, across batch sizes, sparse residency, a re-prediction (table rewritten) and pool growth.
"""

from __future__ import annotations

import pytest
import torch

from flashmemory.decode.chunk_pool import ChunkPool
from flashmemory.decode.runner import DecodeRunner
from flashmemory.model.loader import load_model, resolve
from flashmemory.prefill.chunk_store import ChunkStore
from flashmemory.prefill.runner import prefill
from tests.helpers import save_tiny

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CHUNK = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    path = save_tiny("llama", tmp_path_factory.mktemp("llama"))
    return load_model(resolve(str(path)), device=DEV)


def setup(model, lens: list[int], keep: list[list[int]], attention: str, graphs: bool = True):
    """Prefill each prompt, make the listed chunks plus the open tail resident, return runner."""
    c = model.config
    store = ChunkStore(c.num_layers, c.num_kv_heads, c.head_dim, CHUNK, model.dtype, DEV)
    pool = ChunkPool(store.shape, model.dtype, DEV, initial_pages=4)  # grows during the test
    g = torch.Generator().manual_seed(1)
    for i, n in enumerate(lens):
        ids = torch.randint(0, c.vocab_size, (n,), generator=g).tolist()
        prefill(model, store, f"r{i}", ids, [(j, j + 1) for j in range(n)], "x" * n)
        pool.open(f"r{i}", n)
        tail = (n // CHUNK,) if n % CHUNK else ()
        chunks = sorted(set(keep[i]) | set(tail))
        pool.load(f"r{i}", chunks, store.read(f"r{i}", chunks))
    return pool, DecodeRunner(model, pool, attention, cuda_graphs=graphs)


def run_steps(model, attention: str, steps: int = 5) -> list[torch.Tensor]:
    lens, keep = [37, 80, 16], [[0], [0, 2, 4], []]
    pool, runner = setup(model, lens, keep, attention)
    out = []
    for step in range(steps):
        batch = [(f"r{i}", 7 + step + i) for i in range(len(lens))]
        if step == 3:  # re-prediction for r1: drop chunk 2, fetch chunk 1 (random KV stands in)
            pool.evict("r1", [2])
            shape = (1, *pool.page_shape)
            pool.load("r1", [1], torch.randn(shape, generator=torch.Generator().manual_seed(2)))
        if step == 4:
            batch = batch[1:]  # r0 finished: a smaller batch replays a padded graph
        out.append(runner.step(batch).cpu())
    return out


def test_triton_path_matches_torch_path(tiny):
    ref = run_steps(tiny, "torch")
    got = run_steps(tiny, "triton")
    for r, g in zip(ref, got, strict=True):
        assert (r - g).abs().max().item() < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_graphs_are_replayed_and_recaptured_after_pool_growth(tiny):
    pool, runner = setup(tiny, [40], [[0]], "triton")
    runner.step([("r0", 1)])
    assert runner.replays == 1 and len(runner.graphs) == 1
    before = pool.kv.data_ptr()
    pool.alloc(pool.num_pages)  # force the pool to grow (reallocate)
    assert pool.kv.data_ptr() != before
    runner.step([("r0", 2)])
    assert runner.replays == 2 and all(g.kv_ptr == pool.kv.data_ptr()
                                       for g in runner.graphs.values())
    # again, with the graphs of the first re-capture dropped in turn (a served decode worker's
    # pool grows many times; each re-capture needs a live graph memory pool)
    for token in (3, 4):
        pool.alloc(pool.num_pages)
        runner.step([("r0", token)])
    assert runner.use_graphs and runner.replays == 4


class _Dense:
    """Causal attention over the forward's own tokens (a one-piece prefill)."""

    def attend(self, layer, q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            is_causal=True, enable_gqa=True)
        return out[0].transpose(0, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind", ["llama", "qwen3"])  # qwen3: q/k norms go through the kernel
@torch.no_grad()
def test_gpu_model_with_fused_kernels_matches_cpu(tmp_path, kind):
    path = resolve(str(save_tiny(kind, tmp_path / kind)))
    ids = torch.randint(0, 257, (45,), generator=torch.Generator().manual_seed(3))
    out = []
    for dev in ("cpu", "cuda"):
        m = load_model(path, device=dev)
        x = ids.to(dev)
        out.append(m.logits(m(x, torch.arange(45, device=dev), _Dense())).cpu())
    assert (out[0] - out[1]).abs().max().item() < 1e-4
