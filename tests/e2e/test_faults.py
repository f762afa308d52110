"""Worker faults against a live cluster on CPU: a decode actor killed in the middle of a streaming
response ends that stream with an error event (no hang), a request on the other decode worker
finishes, and the dead request's chunks are freed on the prefill worker and the indexer.
Runs last in its module: the killed worker stays dead (actor restarts are not wired yet)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import httpx
import pytest

from tests.helpers import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
MODEL = "smollm2-135m-instruct"
ARGS = {"num_prefill": 1, "num_decode": 2, "lsa": {"budget": 0.1}, "transfer_timeout_s": 5.0}
COUNT = {"role": "user", "content": "Count from one to two hundred, one number per line."}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve

    from flashmemory.cluster.config_io import cluster_config_from_dict
    from flashmemory.cluster.launch import connect_workers
    from flashmemory.cluster.serve_app import build

    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(dict(ARGS)), name="flashmemory", route_prefix="/")
    yield f"http://127.0.0.1:{port}", connect_workers(cluster_config_from_dict(dict(ARGS)))
    serve.shutdown()
    ray.shutdown()


def _stream(url: str, events: list[dict], first: threading.Event) -> None:
    body = {"model": MODEL, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True, "messages": [COUNT]}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                first.set()
            elif line == "data: [DONE]":
                events.append({"done": True})


def _chat(url: str, max_tokens: int = 8) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
        "model": MODEL, "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": "Say hi."}]})


async def _both_decode_workers_serve(url: str) -> None:
    """Two concurrent requests: the indexer routes them to the two decode workers."""
    async with httpx.AsyncClient(timeout=300) as c:
        rs = await asyncio.gather(*(c.post(f"{url}/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": f"Say hi {i}."}]}) for i in range(2)))
    assert [r.status_code for r in rs] == [200, 200], [r.text for r in rs]


@pytest.mark.parametrize("kind", ["stall", "fail"])
def test_a_stalled_or_failing_transfer_fails_only_its_request(cluster, kind) -> None:
    """The prefill worker stalls (longer than transfer_timeout_s) or fails while staging the
    chunks of the next transfer: that request ends with a clear error in time; both decode
    workers and the prefill worker keep serving; nothing stays staged."""
    import ray

    from flashmemory.cluster.faults import Fault

    url, handles = cluster
    prefill = handles.prefills[0]
    ray.get(prefill.set_fault.remote(Fault("stage", kind, seconds=8.0)))
    t0 = time.time()
    r = _chat(url)
    assert r.status_code == 500, r.text
    msg = r.json()["error"]["message"]
    assert "TransferError" in msg and "could not be staged" in msg, msg
    assert ("Timeout" in msg) if kind == "stall" else ("injected fault" in msg), msg
    assert time.time() - t0 < 60
    asyncio.run(_both_decode_workers_serve(url))
    deadline = time.time() + 30  # a stalled stage wakes up after 8 s and must not stay staged
    while time.time() < deadline:
        staged = ray.get(prefill.staged_transfers.remote())
        held = ray.get(prefill.stats.remote())["requests"]
        if staged == 0 and held == 0:
            break
        time.sleep(1)
    assert staged == 0 and held == 0, (staged, held)


def test_killing_a_decode_worker_mid_stream_ends_that_stream_with_an_error(cluster) -> None:
    import ray

    url, handles = cluster
    events: list[dict] = []
    first = threading.Event()
    victim = threading.Thread(target=_stream, args=(url, events, first), daemon=True)
    victim.start()
    assert first.wait(120), "no token streamed"
    # a second request goes to the least-loaded decode worker, the other one
    other: dict = {}
    bystander = threading.Thread(target=lambda: other.update(r=httpx.post(
        f"{url}/v1/chat/completions", timeout=300, json={
            "model": MODEL, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Say hi."}]})), daemon=True)
    bystander.start()
    deadline = time.time() + 120
    while time.time() < deadline:
        active = [ray.get(d.stats.remote())["active"] for d in handles.decodes]
        if all(active):
            break
        time.sleep(0.2)
    assert all(active), active
    ray.kill(handles.decodes[0], no_restart=True)  # the victim's worker (routed first)
    t0 = time.time()
    victim.join(120)
    assert not victim.is_alive(), "the stream hung after its decode worker died"
    assert time.time() - t0 < 60
    errors = [e for e in events if "error" in e]
    assert errors and "decode failed" in errors[0]["error"]["message"], events[-3:]
    assert events[-1] == {"done": True}
    bystander.join(300)
    assert other["r"].status_code == 200, other["r"].text
    assert other["r"].json()["usage"]["completion_tokens"] == 24
    # nothing is kept for either request on the prefill worker
    deadline = time.time() + 30
    while time.time() < deadline:
        stats = ray.get(handles.prefills[0].stats.remote())
        if stats["requests"] == 0:
            break
        time.sleep(1)
    assert stats["requests"] == 0 and stats["store_bytes"] == 0, stats
    assert ray.get(handles.indexer.stats.remote())["requests_held"] == 0
