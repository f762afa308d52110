"""Worker and transfer faults against a live cluster on CPU (1 prefill, 2 decode workers):
- a transfer that stalls or fails fails only its request;
- a decode actor killed mid-stream ends that stream with an error event (no hang), the other
  worker's request finishes, Ray restarts the actor, requests go around it meanwhile and to it
  again afterwards, and no pool, store or indexer keeps anything for the dead request;
- a prefill actor killed during a prefill fails that request and serves again after its restart;
- the indexer killed mid-stream: the stream finishes (decode keeps the resident chunks), the
  fallback is counted, and the restarted indexer serves new requests."""

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
ARGS = {"num_prefill": 1, "num_decode": 2, "lsa": {"budget": 0.1, "repredict_every": 8},
        "transfer_timeout_s": 5.0}
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


def _start_stream(url: str) -> tuple[threading.Thread, list[dict]]:
    events: list[dict] = []
    first = threading.Event()
    t = threading.Thread(target=_stream, args=(url, events, first), daemon=True)
    t.start()
    assert first.wait(120), "no token streamed"
    return t, events


def _wait_for(what: str, check, timeout: float = 120):
    deadline = time.time() + timeout
    while True:
        value = check()
        if value or time.time() > deadline:
            assert value, f"timed out waiting for {what}"
            return value
        time.sleep(0.5)


def _nothing_held(handles) -> None:
    """No pool, store or indexer keeps anything once every request ended."""
    import ray

    def idle() -> bool:
        pre = ray.get(handles.prefills[0].stats.remote())
        dec = [ray.get(d.stats.remote()) for d in handles.decodes]
        idx = ray.get(handles.indexer.stats.remote())
        return (pre["requests"] == 0 and pre["store_bytes"] == 0 and idx["requests_held"] == 0
                and sum(idx["load"]) == 0
                and all(d["pages_in_use"] == 0 and d["tables"] == 0 for d in dec))

    _wait_for("workers to hold nothing", idle, 30)


def test_a_killed_decode_worker_fails_its_stream_restarts_and_serves_again(cluster) -> None:
    import ray

    url, handles = cluster
    victim, events = _start_stream(url)
    # a second request goes to the least-loaded decode worker, the other one
    other: dict = {}
    bystander = threading.Thread(target=lambda: other.update(r=httpx.post(
        f"{url}/v1/chat/completions", timeout=300, json={
            "model": MODEL, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Say hi."}]})), daemon=True)
    bystander.start()
    _wait_for("both decode workers to be busy",
              lambda: all(ray.get(d.stats.remote())["active"] for d in handles.decodes))
    ray.kill(handles.decodes[0], no_restart=False)  # the victim's worker (routed first); Ray
    t0 = time.time()                                 # restarts it
    victim.join(120)
    assert not victim.is_alive(), "the stream hung after its decode worker died"
    assert time.time() - t0 < 60
    errors = [e for e in events if "error" in e]
    assert errors and "decode failed" in errors[0]["error"]["message"], events[-3:]
    assert events[-1] == {"done": True}
    # while decode-0 restarts, new requests are served (by decode-1, or decode-0 once back)
    assert _chat(url).status_code == 200
    bystander.join(300)
    assert other["r"].status_code == 200, other["r"].text
    assert other["r"].json()["usage"]["completion_tokens"] == 24
    # the restarted worker is probed back into the rotation and serves again
    _wait_for("decode-0 back in rotation", lambda: not ray.get(handles.indexer.stats.remote())[
        "down"])
    asyncio.run(_both_decode_workers_serve(url))
    assert ray.get(handles.decodes[0].stats.remote())["bytes_received"] > 0
    _nothing_held(handles)


def test_a_killed_prefill_worker_fails_its_request_and_serves_after_restart(cluster) -> None:
    import ray

    from flashmemory.cluster.faults import Fault

    url, handles = cluster
    prefill = handles.prefills[0]
    ray.get(prefill.set_fault.remote(Fault("prefill", "stall", seconds=60)))  # hold it there
    result: dict = {}
    victim = threading.Thread(target=lambda: result.update(r=_chat(url)), daemon=True)
    victim.start()
    time.sleep(3)  # the request is inside the stalled prefill
    assert victim.is_alive()
    ray.kill(prefill, no_restart=False)
    victim.join(60)
    assert not victim.is_alive(), "the request hung after its prefill worker died"
    r = result["r"]
    assert r.status_code == 500 and "prefill failed" in r.json()["error"]["message"], r.text
    asyncio.run(_both_decode_workers_serve(url))  # the restarted prefill worker (fault gone)
    _nothing_held(handles)


def test_a_killed_indexer_mid_stream_falls_back_and_the_stream_finishes(cluster) -> None:
    import ray

    url, handles = cluster
    before = sum(ray.get(d.stats.remote())["indexer_fallbacks"] for d in handles.decodes)
    victim, events = _start_stream(url)
    ray.kill(handles.indexer, no_restart=False)
    victim.join(300)
    assert not victim.is_alive()
    assert not [e for e in events if "error" in e], events[-3:]
    finish = [e["choices"][0].get("finish_reason") for e in events if "choices" in e]
    assert finish[-1] == "length", events[-3:]
    after = sum(ray.get(d.stats.remote())["indexer_fallbacks"] for d in handles.decodes)
    assert after > before  # re-predictions planned by the decode worker itself
    r = _chat(url)  # the restarted indexer takes new requests' embeddings and plans them
    assert r.status_code == 200, r.text
    assert ray.get(handles.indexer.stats.remote())["repredictions"] > 0
    _nothing_held(handles)
