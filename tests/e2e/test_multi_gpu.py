"""Prefill and decode workers on separate GPUs (issue 10). A local Ray cluster over every GPU of
the machine: one prefill worker on one GPU, a decode worker on each other GPU, chunks moving over
NCCL, behind the Serve app. The reference is the single-process engine on one GPU. A tiny random
Llama and a tiny random dual encoder (both generated here), so the test needs no hub and no
packaged model; run on a machine with 2+ GPUs (`benchmarks/multi_gpu.sh`)."""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import pytest
import torch

from flashmemory.cluster.client import ClusterClient
from flashmemory.cluster.config_io import cluster_config_from_dict
from flashmemory.cluster.launch import connect_workers
from flashmemory.config import EngineConfig, LSAConfig, SamplingParams
from flashmemory.engine import LLM
from tests.helpers import (
    free_port,
    save_tiny_indexer,
    save_tiny_servable,
    wait_workers_idle,
    worker_stats,
)

N_GPUS = torch.cuda.device_count()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(N_GPUS < 2, reason="needs 2+ GPUs (prefill and decode apart)")]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
WORDS = ["river", "stone", "cloud", "lamp", "paper", "window", "garden", "alpha", "beta",
         "gamma"]
TEXT = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(500)) + " The code is 4417."


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("multi-gpu")
    return str(save_tiny_servable(d / "model")), str(save_tiny_indexer(d / "indexer"))


@pytest.fixture(scope="module")
def args(paths) -> dict:
    model, indexer = paths
    return {"num_prefill": 1, "num_decode": N_GPUS - 1, "num_gpus_per_worker": 1,
            "served_model_name": "tiny",
            "engine": {"model": model, "indexer": indexer, "device": "cuda",
                       "dtype": "float32"},
            "lsa": {"budget": 0.1}}


@pytest.fixture(scope="module")
def server(args):
    import ray
    from ray import serve

    from flashmemory.cluster.serve_app import build

    ray.init(num_gpus=N_GPUS, num_cpus=16, logging_level="WARNING")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(dict(args)), name="flashmemory", route_prefix="/")
    client = ClusterClient(connect_workers(cluster_config_from_dict(dict(args))))
    yield f"http://127.0.0.1:{port}", client
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def llm(args) -> LLM:
    e = args["engine"]
    return LLM(config=EngineConfig(model=e["model"], indexer=e["indexer"], device="cuda",
                                   dtype=e["dtype"]))


def test_workers_sit_on_separate_gpus_and_move_chunks_over_nccl(server) -> None:
    s = worker_stats(server[1])
    gpus = [w["gpu"] for w in s["prefill"] + s["decode"]]
    assert len(gpus) == N_GPUS and len(set(gpus)) == N_GPUS and None not in gpus
    assert {w["transport"] for w in s["prefill"] + s["decode"]} == {"nccl"}


@pytest.mark.parametrize("mode", ["full", "lsa"])
def test_answers_equal_the_single_gpu_engine(server, llm: LLM, mode: str) -> None:
    lsa = LSAConfig(mode=mode, budget=0.1)
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    prompt = llm.tokenize(TEXT, chat=False)
    ref = llm.run_modes(prompt, sp, [lsa])[0]
    got = server[1].generate_sync([prompt], sp, lsa)[0]
    assert got.token_ids == ref.token_ids and len(got.token_ids) == 24
    assert got.stats.kv_bytes_transferred == ref.stats.kv_bytes_transferred
    assert got.stats.transfers == ref.stats.transfers >= 1
    assert got.stats.kv_footprint_mean == pytest.approx(ref.stats.kv_footprint_mean)


def test_bytes_moved_equal_the_selected_chunks(server, llm: LLM) -> None:
    client = server[1]
    before = worker_stats(client)
    prompt = llm.tokenize(TEXT, chat=False)
    out = client.generate_sync([prompt], SamplingParams(max_tokens=16, ignore_eos=True),
                               LSAConfig(budget=0.1))[0]
    after = worker_stats(client)
    received = sum(a["bytes_received"] - b["bytes_received"]
                   for a, b in zip(after["decode"], before["decode"], strict=True))
    sent = after["prefill"][0]["bytes_sent"] - before["prefill"][0]["bytes_sent"]
    s, page = out.stats, after["decode"][0]["page_bytes"]
    assert received == sent == s.kv_bytes_transferred and s.kv_bytes_transferred % page == 0
    moved = s.kv_bytes_transferred // page
    assert s.transfer_ratio == pytest.approx(moved / s.num_prompt_chunks)
    assert moved < 0.5 * s.num_prompt_chunks  # the selected chunks, sink and tail: not the KV


def test_streaming_http_request_reports_the_split(server) -> None:
    body = {"model": "tiny", "prompt": TEXT, "max_tokens": 8, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    usage = {}
    with httpx.stream("POST", f"{server[0]}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    assert usage["completion_tokens"] == 8 and usage["transfers"] >= 1
    assert usage["prefill_s"] > 0 and usage["transfer_s"] > 0 and usage["kv_bytes_transferred"] > 0
    bad = httpx.post(f"{server[0]}/v1/completions", json={**body, "kv_budget": 2.0}, timeout=30)
    assert bad.status_code == 400  # a bad request is refused; the cluster keeps serving


@pytest.mark.skipif(N_GPUS < 3, reason="needs 3+ GPUs (two decode workers)")
def test_a_second_request_goes_to_the_idle_decode_gpu(server, llm: LLM) -> None:
    """While one request decodes on one GPU, the indexer routes the next one to another."""
    client = server[1]
    before = [d["bytes_received"] for d in worker_stats(client)["decode"]]
    p = llm.tokenize(TEXT, chat=False)

    async def both() -> tuple[list[int], list[int]]:
        long = client.stream(p, SamplingParams(max_tokens=2000, ignore_eos=True), LSAConfig())
        first = await long.__anext__()  # admitted: its decode worker now holds one request
        short = await client.generate(p, SamplingParams(max_tokens=8, ignore_eos=True),
                                      LSAConfig())
        rest = [ev async for ev in long]
        return first.token_ids + [t for ev in rest for t in ev.token_ids], short.token_ids

    long_ids, short_ids = asyncio.run(both())
    after = [d["bytes_received"] for d in worker_stats(client)["decode"]]
    assert long_ids[:8] == short_ids
    assert sum(a > b for a, b in zip(after, before, strict=True)) == 2


def test_nothing_left_behind(server) -> None:
    idle, s = wait_workers_idle(server[1])
    assert idle, s
