"""The served system on CPU: a local Ray cluster (gloo transport) with one prefill worker, the
indexer and two decode workers on SmolLM2, behind the OpenAI-compatible Serve app. One cluster
for the whole module; the single-process engine is the reference."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import pytest

from flashmemory.cluster.client import ClusterClient
from flashmemory.cluster.config_io import cluster_config_from_dict
from flashmemory.cluster.launch import connect_workers
from flashmemory.config import LSAConfig, SamplingParams
from flashmemory.engine import LLM
from tests.helpers import free_port, worker_stats

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
NEEDLE = Path("examples/needle.txt").read_text()
MODEL = "smollm2-135m-instruct"
ARGS = {"num_prefill": 1, "num_decode": 2, "lsa": {"budget": 0.1}}


@pytest.fixture(scope="module")
def server():
    import ray
    from ray import serve

    from flashmemory.cluster.serve_app import build

    metrics_port, dashboard_port = free_port(), free_port()
    ray.init(num_cpus=4, include_dashboard=True, dashboard_port=dashboard_port,
             logging_level="WARNING", _metrics_export_port=metrics_port)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(dict(ARGS)), name="flashmemory", route_prefix="/")
    client = ClusterClient(connect_workers(cluster_config_from_dict(dict(ARGS))))
    yield (f"http://127.0.0.1:{port}", client, f"http://127.0.0.1:{metrics_port}/metrics",
           f"http://127.0.0.1:{dashboard_port}")
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM()


@pytest.fixture(scope="module")
def oai(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key="unused", timeout=300, max_retries=0)


def _stats(client: ClusterClient) -> dict:
    import ray

    return {**worker_stats(client), "indexer": ray.get(client.h.indexer.stats.remote())}


def _idle(s: dict) -> bool:
    """No decode page or table, prefill chunks, indexer embeddings or routed load is held."""
    return (all(d["tables"] == 0 and d["pages_in_use"] == 0 for d in s["decode"])
            and all(p["requests"] == 0 for p in s["prefill"])
            and s["indexer"]["requests_held"] == 0 and s["indexer"]["load"] == [0, 0])


def _wait_idle(client: ClusterClient, timeout: float = 30.0) -> dict:
    deadline = time.time() + timeout
    while True:
        s = _stats(client)
        if _idle(s) or time.time() > deadline:
            return s
        time.sleep(0.2)


def _assert_idle(s: dict) -> None:
    assert _idle(s), s


def test_chat_non_streaming_and_streaming(oai) -> None:
    msgs = [{"role": "user", "content": NEEDLE}]
    r = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=32, temperature=0)
    text = r.choices[0].message.content
    assert "6464353" in text and r.choices[0].finish_reason in ("stop", "length")
    u = r.usage.model_dump()
    assert 0 < u["kv_footprint_mean"] < 0.3 and 0 < u["transfer_ratio"] < 0.3
    assert u["chunks_selected"] > 0 and u["kv_bytes_transferred"] > 0
    # the split: prefill on its worker, the indexer's plans, the chunk transfers over gloo
    assert u["prefill_s"] > 0 and u["selection_s"] > 0 and u["transfer_s"] > 0
    assert 0 < u["admission_s"] <= u["selection_s"] + u["transfer_s"] + 1e-9
    parts, usage = [], None
    for chunk in oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=32,
                                             temperature=0, stream=True):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        usage = chunk.usage or usage
    assert "".join(parts) == text and usage is not None


def test_completions_models_health(server, oai) -> None:
    r = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5,
                               temperature=0)
    assert r.choices[0].text.strip()
    assert [m.id for m in oai.models.list().data] == [MODEL]
    assert httpx.get(f"{server[0]}/health").json() == {"status": "ok"}


@pytest.mark.parametrize("mode", ["full", "lsa"])
def test_cluster_answer_equals_engine(server, llm: LLM, mode: str) -> None:
    client = server[1]
    lsa = LSAConfig(mode=mode, budget=0.1)
    sp = SamplingParams(max_tokens=24)
    prompt = llm.tokenize(NEEDLE, chat=True)
    ref = llm.run_modes(prompt, sp, [lsa])[0]
    got = client.generate_sync([prompt], sp, lsa)[0]
    assert got.text == ref.text and "6464353" in got.text and got.token_ids == ref.token_ids
    assert got.stats.kv_bytes_transferred == ref.stats.kv_bytes_transferred
    assert got.stats.kv_footprint_mean == pytest.approx(ref.stats.kv_footprint_mean)


def test_only_selected_chunks_move(server, llm: LLM) -> None:
    client = server[1]
    before = sum(d["bytes_received"] for d in _stats(client)["decode"])
    prompt = llm.tokenize(NEEDLE, chat=True)
    out = client.generate_sync([prompt], SamplingParams(max_tokens=8), LSAConfig(budget=0.1))[0]
    after = sum(d["bytes_received"] for d in _stats(client)["decode"])
    page = _stats(client)["decode"][0]["page_bytes"]
    s = out.stats
    assert after - before == s.kv_bytes_transferred and s.kv_bytes_transferred % page == 0
    moved = s.kv_bytes_transferred // page
    assert moved < 0.25 * s.num_prompt_chunks  # selected + sink + tail only
    assert s.transfer_ratio == pytest.approx(moved / s.num_prompt_chunks)


def test_concurrent_requests_use_both_decode_workers(server, llm: LLM) -> None:
    client = server[1]
    _wait_idle(client)
    before = [d["bytes_received"] for d in _stats(client)["decode"]]
    p = llm.tokenize("Name two colours of the rainbow.", chat=True)
    outs = client.generate_sync([p, p], SamplingParams(max_tokens=8), LSAConfig(mode="full"))
    after = [d["bytes_received"] for d in _stats(client)["decode"]]
    assert outs[0].text == outs[1].text
    assert all(a > b for a, b in zip(after, before, strict=True))


def test_cancelled_stream_frees_chunks_everywhere(server, llm: LLM) -> None:
    client = server[1]
    prompt = llm.tokenize(NEEDLE, chat=True)

    async def read_one_then_leave() -> None:
        gen = client.stream(prompt, SamplingParams(max_tokens=200, ignore_eos=True))
        await gen.__anext__()
        await gen.aclose()

    asyncio.run(read_one_then_leave())
    _assert_idle(_wait_idle(client))


def test_http_disconnect_frees_chunks(server) -> None:
    url, client = server[0], server[1]
    body = {"model": MODEL, "messages": [{"role": "user", "content": NEEDLE}],
            "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # first token arrived: hang up
    _assert_idle(_wait_idle(client))


def test_hang_up_during_prefill_frees_everything(server, llm: LLM) -> None:
    """The client leaves while its prefill runs: the prefill ends on its worker afterwards and
    must drop its chunks and the embeddings it gave the indexer, with nobody left to ask."""
    import ray

    from flashmemory.cluster.faults import Fault

    client = server[1]
    prefill = client.h.prefills[0]
    before = ray.get(prefill.stats.remote())["cancelled"]
    prompt = llm.tokenize(NEEDLE, chat=True)
    # the prefill stalls 2 s before it starts: the client's free lands first, and the prefill's
    # register with the indexer after it
    ray.get(prefill.set_fault.remote(Fault("prefill", "stall", seconds=2.0)))

    async def leave_during_prefill() -> None:
        gen = client.stream(prompt, SamplingParams(max_tokens=8))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(gen.__anext__(), 0.5)

    asyncio.run(leave_during_prefill())
    deadline = time.time() + 60
    while ray.get(prefill.stats.remote())["cancelled"] == before and time.time() < deadline:
        time.sleep(0.2)
    assert ray.get(prefill.stats.remote())["cancelled"] == before + 1
    _assert_idle(_wait_idle(client))


@pytest.mark.parametrize("body,status,code", [
    ("{not json", 400, None),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "model_not_found"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400,
     None),
    ({"model": MODEL, "messages": []}, 400, None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 9000}]}, 400,
     "context_length_exceeded"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "kv_budget": 2}, 400,
     None),
])
def test_bad_requests_get_openai_errors_and_server_keeps_serving(server, body, status,
                                                                   code) -> None:
    url = server[0]
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{url}/v1/chat/completions", content=data,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error" and err["code"] == code
    ok = httpx.post(f"{url}/v1/completions", timeout=120,
                    json={"model": MODEL, "prompt": "One, two,", "max_tokens": 3})
    assert ok.status_code == 200


def test_eval_runs_through_the_live_cluster(server, llm: LLM, tmp_path) -> None:
    """Samples run two at a time and spread over both decode workers; every byte the rows count
    arrived at a decode worker; modes that need the backbone are refused before any request."""
    import pyarrow.parquet as pq

    from flashmemory.cluster.eval_backend import ClusterBackend
    from flashmemory.evaluation.runner import EvalConfig, run_eval

    backend = ClusterBackend(server[1], llm.tokenizer, llm.max_model_len)
    cfg = EvalConfig(out_dir=tmp_path, lengths=(1024,), modes=("full", "lsa"), samples=4,
                     max_tokens=16, value_kinds=("numbers",), lsa=LSAConfig(budget=0.1),
                     concurrency=2)
    before = [d["bytes_received"] for d in _stats(server[1])["decode"]]
    result = run_eval(backend, cfg, progress=False)
    rows = pq.read_table(result.results_path).to_pylist()
    assert len(rows) == 8 and {r["mode"] for r in rows} == {"full", "lsa"}
    after = [d["bytes_received"] for d in _stats(server[1])["decode"]]
    assert all(a > b for a, b in zip(after, before, strict=True))  # both workers decoded
    assert sum(after) - sum(before) == sum(r["kv_bytes_transferred"] for r in rows)
    assert "lsa" in result.summary_path.read_text()
    for mode in ("snapkv", "quest", "oracle"):
        with pytest.raises(ValueError, match=f"the {mode} mode reads the backbone"):
            run_eval(backend, EvalConfig(out_dir=tmp_path / mode, lengths=(1024,), samples=1,
                                         modes=("full", mode)), progress=False)


def test_longmemeval_judge_talks_to_a_live_openai_compatible_server(server) -> None:
    """The LongMemEval judge client against this project's own OpenAI-compatible endpoint (the
    official protocol's GPT-4o is out of reach here): a real chat completion, a yes/no verdict,
    and a clear error for a model the server does not serve."""
    from flashmemory.evaluation.longmemeval import OpenAIJudge
    from flashmemory.evaluation.niah import NiahSample

    sample = NiahSample("q1", "", "", ("Paris",), "single-session-user", 0.0,
                        "single-session-user", 1024, 0, (0, 0), ("single-session-user",),
                        "Where did I move last year?")
    judge = OpenAIJudge(f"{server[0]}/v1", MODEL, timeout=120)
    assert judge(sample, "You moved to Paris.") in (True, False)
    assert judge.complete("Reply with one word: yes or no?")  # a non-empty reply
    with pytest.raises(RuntimeError, match="HTTP 404"):
        OpenAIJudge(f"{server[0]}/v1", "gpt-4o", timeout=60)(sample, "Paris")


def test_metrics_exported_from_every_actor(server, oai) -> None:
    """After real traffic, Ray's Prometheus endpoint carries the ingress and worker metrics."""
    oai.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                messages=[{"role": "user", "content": NEEDLE}])
    want = {"ray_flashmemory_time_to_first_token_seconds_bucket",
            "ray_flashmemory_e2e_request_latency_seconds_count",
            "ray_flashmemory_prompt_tokens_total", "ray_flashmemory_generation_tokens_total",
            "ray_flashmemory_kv_footprint_ratio_bucket", "ray_flashmemory_transfer_bytes_total",
            "ray_flashmemory_chunk_pool_pages_total", "ray_flashmemory_chunk_store_bytes",
            "ray_flashmemory_repredictions_total", "ray_flashmemory_num_requests_running"}
    deadline, seen = time.time() + 60, set()
    while time.time() < deadline:
        text = httpx.get(server[2], timeout=10).text
        seen = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                if line.startswith("ray_flashmemory")}
        if want <= seen:
            break
        time.sleep(2)
    assert want <= seen, sorted(want - seen)


def test_ray_job_submit_evaluates_through_the_cluster(server, tmp_path) -> None:
    """The batch path users take: a Ray job running `flashmemory eval --cluster auto`."""
    import sys

    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(server[3])
    out = tmp_path / "job"
    deadline = time.time() + 60
    while True:  # Ray's job agent may still be starting on a busy machine ("No available agent")
        try:
            job = jobs.submit_job(
                entrypoint=f"{sys.executable} -m flashmemory eval --cluster auto --suite "
                           f"ruler-niah --lengths 1024 --modes full,lsa --samples 1 "
                           f"--value-kinds numbers --max-tokens 12 --out {out}",
                runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}})
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)
    deadline = time.time() + 300
    while jobs.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                           JobStatus.STOPPED} and time.time() < deadline:
        time.sleep(2)
    logs = jobs.get_job_logs(job)
    assert jobs.get_job_status(job) == JobStatus.SUCCEEDED, logs[-2000:]
    assert (out / "results.parquet").exists() and "| lsa |" in (out / "summary.md").read_text()
