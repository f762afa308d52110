"""Hostile and malformed input, and access control, against a live cluster on CPU: a Serve app
with an API key, raw HTTP (httpx and sockets) for what well-behaved clients never send. Every
bad request gets a 4xx with an OpenAI-style error body, and the server keeps answering."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import httpx
import pytest

from tests.helpers import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
MODEL = "smollm2-135m-instruct"
KEY = "test-key-0123456789"
LIMITS = {"max_request_bytes": 256 * 1024, "request_read_timeout_s": 3.0,
          "max_stop_sequences": 8,
          # KV admission: SmolLM2 in fp32 holds 45 KiB of KV per token, so 60 MiB takes one
          # 3K-token LSA request generating 160 tokens (~41 MiB), and small ones beside it
          "kv_capacity_gb": 60 / 1024, "admission_timeout_s": 2.0, "retry_after_s": 3}
ARGS = {"num_prefill": 1, "num_decode": 1, "lsa": {"budget": 0.1}, **LIMITS}


@pytest.fixture(scope="module")
def url():
    import ray
    from ray import serve

    from flashmemory.cluster.serve_app import API_KEY_ENV, build

    old = os.environ.get(API_KEY_ENV)
    os.environ[API_KEY_ENV] = KEY  # the local cluster's processes inherit it
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(dict(ARGS)), name="flashmemory", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    if old is None:
        os.environ.pop(API_KEY_ENV, None)
    else:
        os.environ[API_KEY_ENV] = old


AUTH = {"Authorization": f"Bearer {KEY}"}


def _chat(**over) -> dict:
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hi."}]}
    body.update(over)
    return body


def _still_serving(url: str) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", json=_chat(), headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and "type" in err
    return err


# -- access control ---------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}])
def test_missing_or_wrong_api_key_is_401(url, headers) -> None:
    for path, method in (("/v1/chat/completions", "POST"), ("/v1/completions", "POST"),
                         ("/v1/models", "GET")):
        r = httpx.request(method, f"{url}{path}", headers=headers, timeout=30,
                          json=_chat() if method == "POST" else None)
        err = _error(r, 401)
        assert err["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"


def test_right_key_is_served_and_health_stays_open(url) -> None:
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200  # liveness probes
    r = httpx.get(f"{url}/v1/models", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL
    _still_serving(url)


def test_server_binds_loopback_by_default() -> None:
    from flashmemory.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.api_key is None


# -- malformed bodies ---------------------------------------------------------------------------
def test_oversized_body_is_413(url) -> None:
    big = "word " * (LIMITS["max_request_bytes"] // 4)
    r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=60,
                   json=_chat(messages=[{"role": "user", "content": big}]))
    assert "max_request_bytes" in _error(r, 413)["message"]
    _still_serving(url)


def test_invalid_utf8_and_invalid_json_are_400(url) -> None:
    for raw in (b'{"model": "x", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
                b"{not json", b"[1, 2]", b""):
        r = httpx.post(f"{url}/v1/chat/completions", content=raw, timeout=30,
                       headers={**AUTH, "content-type": "application/json"})
        _error(r, 400)
    _still_serving(url)


ABSURD = [
    {"max_tokens": 1e9}, {"max_tokens": 10**30}, {"max_tokens": -5}, {"max_tokens": "many"},
    {"temperature": -1}, {"temperature": "NaN"}, {"top_p": 0}, {"top_p": 7}, {"top_k": -7},
    {"seed": 10**30}, {"n": 3}, {"stop": ["x"] * 1000}, {"stop": ["y" * 100_000]},
    {"stop": [""]}, {"kv_budget": 0}, {"kv_budget": 1.5}, {"kv_budget": -0.1},
    {"lsa_mode": "everything"}, {"messages": []}, {"messages": [{"role": "wizard",
                                                                 "content": "x"}]},
    {"messages": [{"role": "user", "content": None}]}, {"model": "gpt-9"},
]


@pytest.mark.parametrize("over", ABSURD, ids=lambda o: json.dumps(o)[:40])
def test_absurd_parameters_are_4xx(url, over) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", json=_chat(**over), headers=AUTH, timeout=60)
    assert 400 <= r.status_code < 500, (over, r.status_code, r.text[:300])
    _error(r, r.status_code)


def test_nonfinite_numbers_are_400(url) -> None:
    """Python's json module writes NaN / Infinity; the server must not accept them."""
    for value in ("NaN", "Infinity", "-Infinity"):
        raw = json.dumps(_chat()).replace('"temperature": 0', f'"temperature": {value}')
        r = httpx.post(f"{url}/v1/chat/completions", content=raw, timeout=30,
                       headers={**AUTH, "content-type": "application/json"})
        _error(r, 400)
    _still_serving(url)


def test_prompt_beyond_the_context_is_400(url) -> None:
    long = "lorem ipsum " * 6000  # ~12K tokens, over SmolLM2's 8K context
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=120,
                   json={"model": MODEL, "prompt": long, "max_tokens": 4})
    assert _error(r, 400)["code"] == "context_length_exceeded"


# -- schema-driven fuzzing -----------------------------------------------------------------------
# per operation and generation mode; FM_FUZZ_EXAMPLES=1000 for a longer hunt
FUZZ_EXAMPLES = int(os.environ.get("FM_FUZZ_EXAMPLES", "100"))


def _fuzz_document(url: str) -> dict:
    """The app's own OpenAPI document, narrowed so that valid cases stay cheap: the served model
    name, at most 4 new tokens, short texts (the server's limits are tested above)."""
    doc = httpx.get(f"{url}/openapi.json", timeout=30).json()
    for path in ("/v1/chat/completions", "/v1/completions"):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        props = body["properties"]
        props["model"] = {"type": "string", "enum": [MODEL]}
        for name in ("max_tokens", "max_completion_tokens"):  # (absent: 256 new tokens)
            props[name] = {"type": "integer", "minimum": 1, "maximum": 4}
        body["required"] = sorted({*body.get("required", []), "max_tokens"})
        if "messages" in props:
            props["messages"]["maxItems"] = 4
            props["messages"]["items"]["properties"]["content"]["maxLength"] = 200
        else:
            props["prompt"]["maxLength"] = 200
    return doc


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_schema_driven_fuzzing_finds_no_server_error(url, path, mode) -> None:
    """schemathesis generates bodies from the app's OpenAPI document: valid ones (positive) and
    ones that break it (negative, e.g. wrong types, missing fields). No 5xx, every refusal is a
    4xx with an OpenAI error body, and the server keeps serving."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.generation.modes import GenerationMode

    op = schemathesis.openapi.from_dict(_fuzz_document(url))[path]["POST"]
    seen: dict[int, int] = {}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(GenerationMode(mode)))
    def run(case) -> None:
        r = case.call(base_url=url, headers=AUTH, timeout=120)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (case.body, r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert r.json()["error"]["message"], r.text[:300]

    run()
    assert sum(seen.values()) >= FUZZ_EXAMPLES // 2, seen
    if mode == "positive":
        assert seen.get(200, 0) > 0, seen  # valid cases do reach generation
    else:
        assert any(400 <= code < 500 for code in seen), seen
    _still_serving(url)


# -- slow and vanished clients ------------------------------------------------------------------
def test_slow_body_times_out_and_the_server_keeps_serving(url) -> None:
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(_chat()).encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
                  .encode() + body[:10])
        t0 = time.time()
        s.settimeout(60)
        reply = s.recv(4096).decode(errors="replace")  # the rest of the body never comes
        waited = time.time() - t0
    assert reply.startswith("HTTP/1.1 408"), reply[:200]
    assert waited < 30
    _still_serving(url)


def test_client_that_vanishes_mid_stream_does_not_hurt_others(url) -> None:
    with httpx.Client(timeout=120) as c, c.stream(
            "POST", f"{url}/v1/chat/completions", headers=AUTH,
            json=_chat(max_tokens=64, stream=True)) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    _still_serving(url)


# -- overload ----------------------------------------------------------------------------------
async def _long_requests(url: str, n: int) -> list[httpx.Response]:
    body = {"model": MODEL, "max_tokens": 160, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": "lorem ipsum dolor " * 600}]}
    async with httpx.AsyncClient(timeout=600, headers=AUTH) as c:
        return await asyncio.gather(*(c.post(f"{url}/v1/chat/completions", json=body)
                                      for _ in range(n)))


def test_overload_is_429_with_retry_after_and_admitted_requests_finish(url) -> None:
    """Three requests that each need most of the decode worker's KV capacity: one is admitted
    and finishes, the others wait admission_timeout_s and get 429 + Retry-After; afterwards the
    capacity is free again."""
    rs = asyncio.run(_long_requests(url, 3))
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 429, 429], [(r.status_code, r.text[:200]) for r in rs]
    for r in rs:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "3"
            assert _error(r, 429)["code"] == "kv_capacity_exceeded"
        else:
            assert r.json()["usage"]["completion_tokens"] == 160
    (again,) = asyncio.run(_long_requests(url, 1))  # nothing stayed admitted
    assert again.status_code == 200, again.text
    _still_serving(url)


def test_a_request_larger_than_the_whole_capacity_is_429_at_once(url) -> None:
    body = {"model": MODEL, "max_tokens": 1000, "lsa_mode": "full",
            "messages": [{"role": "user", "content": "lorem ipsum dolor " * 600}]}
    t0 = time.time()
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert "MiB of KV" in _error(r, 429)["message"]
    assert time.time() - t0 < 2.0  # refused without waiting
