"""Locust user for long-context streaming chat against ``/v1/chat/completions``.

Besides Locust's own entry for the whole request (its latency is E2E), every request adds a
``TTFT`` entry and one ``ITL`` entry per gap between streamed chunks, and appends one JSON line
per request to ``FM_RECORDS`` for the vLLM-style summary. Configured by environment variables
(set by ``flashmemory loadtest``): FM_PROMPTS (JSON lines), FM_MODEL, FM_MAX_TOKENS, FM_RECORDS,
FM_KV_BUDGET (optional), FM_API_KEY (optional).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

from locust import HttpUser, events, task

from flashmemory.loadtest.prompts import read_prompts

PROMPTS = read_prompts(Path(os.environ["FM_PROMPTS"]))
_NEXT = itertools.count()  # prompts in order, shared by this process's users
_RECORDS = os.environ.get("FM_RECORDS", "")


def _fire(kind: str, name: str, seconds: float, length: int = 0,
          exc: BaseException | None = None) -> None:
    events.request.fire(request_type=kind, name=name, response_time=seconds * 1000.0,
                        response_length=length, exception=exc, context={})


class LongContextChatUser(HttpUser):
    wait_time = staticmethod(lambda: 0.0)  # closed loop: each user sends the next at once

    @task
    def chat(self) -> None:
        prompt = PROMPTS[next(_NEXT) % len(PROMPTS)]
        body: dict[str, Any] = {"model": os.environ["FM_MODEL"], "messages": prompt["messages"],
                                "max_tokens": int(os.environ.get("FM_MAX_TOKENS", "32")),
                                "temperature": 0.0, "stream": True,
                                "stream_options": {"include_usage": True}}
        if os.environ.get("FM_KV_BUDGET"):
            body["kv_budget"] = float(os.environ["FM_KV_BUDGET"])
        headers = {}
        if os.environ.get("FM_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['FM_API_KEY']}"
        name = f"chat {prompt.get('context_tokens', '?')} tok"
        rec: dict[str, Any] = {"id": prompt.get("id"), "context_tokens":
                               prompt.get("context_tokens"), "start": time.time()}
        t0 = time.perf_counter()
        chunks: list[float] = []
        error = None
        with self.client.post("/v1/chat/completions", json=body, headers=headers, stream=True,
                              name=name, catch_response=True) as resp:
            try:
                rec["status"] = resp.status_code
                if resp.status_code != 200:
                    raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
                usage = self._read_stream(resp, t0, chunks, rec)
                rec["output_tokens"] = int(usage.get("completion_tokens", 0))
                rec["kv_footprint_mean"] = usage.get("kv_footprint_mean")
                resp.success()
            except Exception as e:  # a failed request is a Locust failure and a record
                error = f"{type(e).__name__}: {e}"
                resp.failure(error)
        rec["e2e"] = time.perf_counter() - t0
        rec["error"] = error
        if chunks and error is None:
            rec["ttft"] = chunks[0]
            rec["itl"] = [b - a for a, b in itertools.pairwise(chunks)]
            _fire("TTFT", name, chunks[0])
            for gap in rec["itl"]:
                _fire("ITL", name, gap)
        if _RECORDS:
            with open(_RECORDS, "a") as f:
                f.write(json.dumps(rec) + "\n")

    @staticmethod
    def _read_stream(resp: Any, t0: float, chunks: list[float],
                     rec: dict[str, Any]) -> dict[str, Any]:
        """Consume the SSE stream; chunk arrival times (since t0) go to ``chunks``."""
        usage: dict[str, Any] = {}
        done = False
        for raw in resp.iter_lines():
            line = raw.decode() if isinstance(raw, bytes) else raw
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(obj["error"].get("message", "stream error"))
            usage = obj.get("usage") or usage
            for choice in obj.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    chunks.append(time.perf_counter() - t0)
                if choice.get("finish_reason"):
                    rec["finish_reason"] = choice["finish_reason"]
        if not done:
            raise RuntimeError("stream ended without [DONE]")
        return usage
