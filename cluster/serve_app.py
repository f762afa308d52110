"""Ray Serve ingress with an OpenAI-compatible API over the FlashMemory cluster.

(No ``from __future__ import annotations`` here: FastAPI resolves route signatures at runtime.)

``build(args)`` is the Serve application builder (``serve run flashmemory.cluster.serve_app:build``
or a Serve config's ``import_path``); ``args`` map onto ClusterConfig / EngineConfig / LSAConfig.
The ingress replica starts the workers (one replica per cluster).
"""


import asyncio
import hmac
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from flashmemory.cluster.admission import KVAdmission, Overloaded, estimate_kv_tokens
from flashmemory.cluster.client import ClusterClient
from flashmemory.cluster.config import ClusterConfig
from flashmemory.cluster.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    now,
    openapi_request,
    usage,
)
from flashmemory.config import SamplingParams
from flashmemory.types import Prompt, PromptTooLongError, tokenize_prompt

logger = logging.getLogger(__name__)
API_KEY_ENV = "FLASHMEMORY_API_KEY"  # when set, /v1/* needs "Authorization: Bearer <key>"
app = FastAPI(title="FlashMemory", description="OpenAI-compatible LSA serving")


def sse_event(obj: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj)}\n\n"


class BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_response(e: BadRequest) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(error_body(e.message, param=e.param, code=e.code), e.status,
                        headers=headers)


def _overloaded_response(e: Overloaded) -> JSONResponse:
    return JSONResponse(error_body(str(e), "overloaded_error", code="kv_capacity_exceeded"),
                        429, headers={"Retry-After": str(e.retry_after_s)})


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that, however the response ends, closes its body generator and then
    calls ``on_close``.

    When the client hangs up, Starlette cancels the task sending the body. If that lands while a
    chunk is being sent rather than inside the generator, the generator stays suspended at its
    ``yield`` until garbage collection: the request's decode pages, prefill chunks and indexer
    state would stay held until then. Closing it runs its ``finally`` blocks now. ``on_close``
    runs even when the generator never started (a hang-up before the first chunk) and when the
    response was cancelled, where Starlette's ``background`` task does not run."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                self.on_close()


class _Admitted:
    """KV bytes admitted for one request; released exactly once."""

    def __init__(self, admission: KVAdmission, need: int) -> None:
        self.admission, self.need = admission, need

    def release(self) -> None:
        if self.need:
            self.admission.release(self.need)
            self.need = 0


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, cfg: ClusterConfig, served_name: str) -> None:
        from flashmemory.cluster.launch import start_workers
        from flashmemory.cluster.runtime import setup_process
        from flashmemory.model.loader import load_tokenizer, resolve

        setup_process(cfg)
        self.cfg, self.served_name = cfg, served_name
        self.tokenizer = load_tokenizer(resolve(cfg.engine.model))
        self.handles = start_workers(cfg)
        from flashmemory.cluster.metrics import Metrics

        self.client = ClusterClient(self.handles, Metrics({"model": served_name}))
        import ray

        self.max_model_len = ray.get(self.handles.prefills[0].max_model_len.remote())
        self.api_key = os.environ.get(API_KEY_ENV) or None
        caps = ray.get([d.kv_capacity.remote() for d in self.handles.decodes])
        self.kv_per_token = caps[0][1]
        self.admission = KVAdmission(sum(c for c, _ in caps), cfg.max_waiting_requests,
                                     cfg.admission_timeout_s, cfg.retry_after_s)
        if self.api_key is None:
            logger.warning("%s is not set: the API accepts requests without a key", API_KEY_ENV)

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request) -> Any:
        try:
            self._authorize(request)
        except BadRequest as e:
            return _error_response(e)
        return {"object": "list", "data": [{
            "id": self.served_name, "object": "model", "created": now(),
            "owned_by": "flashmemory", "max_model_len": self.max_model_len}]}

    @app.post("/v1/chat/completions", openapi_extra=openapi_request(ChatCompletionRequest))
    async def chat(self, request: Request) -> Any:
        return await self._handle(request, chat=True)

    @app.post("/v1/completions", openapi_extra=openapi_request(CompletionRequest))
    async def completions(self, request: Request) -> Any:
        return await self._handle(request, chat=False)

    async def _handle(self, request: Request, chat: bool) -> Any:
        try:
            self._authorize(request)
            req, prompt, sp, lsa = await self._parse(request, chat)
        except BadRequest as e:
            return _error_response(e)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        need = estimate_kv_tokens(len(prompt.token_ids), sp.max_tokens, lsa) * self.kv_per_token
        try:
            await self.admission.acquire(need)
        except Overloaded as e:
            self.client.count_error("overloaded")
            return _overloaded_response(e)
        held = _Admitted(self.admission, need)
        if req.stream:
            return ClosingStreamingResponse(self._sse_events(rid, prompt, sp, lsa, chat),
                                            held.release, media_type="text/event-stream")
        text, final = "", None
        try:
            async with aclosing(self.client.stream(prompt, sp, lsa, rid)) as events:
                async for ev in events:
                    text += ev.text_delta
                    final = ev
        finally:
            held.release()
        if final is None or final.finish_reason == "error":
            msg = final.error if final else "no output"
            return JSONResponse(error_body(f"request failed: {msg}", "server_error"), 500)
        choice: dict[str, Any] = {"index": 0, "finish_reason": final.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": now(), "model": self.served_name, "choices": [choice],
                "usage": usage(final.stats)}

    async def _sse_events(self, rid: str, prompt: Prompt, sp: SamplingParams, lsa: Any,
                          chat: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        first = True
        async with aclosing(self.client.stream(prompt, sp, lsa, rid)) as events:
            async for ev in events:
                if ev.finish_reason == "error":
                    yield sse_event(error_body(f"request failed: {ev.error}", "server_error"))
                    break
                if chat:
                    delta: dict[str, Any] = {"content": ev.text_delta}
                    if first:
                        delta["role"] = "assistant"
                    choice: dict[str, Any] = {"index": 0, "delta": delta,
                                              "finish_reason": ev.finish_reason}
                else:
                    choice = {"index": 0, "text": ev.text_delta, "finish_reason": ev.finish_reason}
                chunk: dict[str, Any] = {"id": rid, "object": obj, "created": now(),
                                         "model": self.served_name, "choices": [choice]}
                if ev.stats is not None:
                    chunk["usage"] = usage(ev.stats)
                first = False
                yield sse_event(chunk)
        yield "data: [DONE]\n\n"

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self.api_key.encode()):
            raise BadRequest(401, "missing or invalid API key: send 'Authorization: Bearer "
                             "<key>'", code="invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        """The request body, refused past ``max_request_bytes`` or ``request_read_timeout_s``."""
        limit = self.cfg.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BadRequest(413, f"request body is {declared} bytes; this server takes at "
                             f"most {limit} (max_request_bytes)")
        parts: list[bytes] = []

        async def read() -> None:
            size = 0
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise BadRequest(413, f"request body exceeds {limit} bytes "
                                     "(max_request_bytes)")
                parts.append(part)

        try:
            await asyncio.wait_for(read(), self.cfg.request_read_timeout_s)
        except TimeoutError:
            raise BadRequest(408, f"request body not received within "
                             f"{self.cfg.request_read_timeout_s:g} s") from None
        return b"".join(parts)

    async def _parse(self, request: Request, chat: bool) -> tuple[Any, Prompt, Any, Any]:
        raw = await self._body(request)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(400, f"request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise BadRequest(400, "request body must be a JSON object")
        try:
            req = (ChatCompletionRequest if chat else CompletionRequest).model_validate(body)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err.get("loc", ()))
            raise BadRequest(400, f"{param}: {err.get('msg')}", param) from e
        if req.model != self.served_name:
            raise BadRequest(404, f"the model '{req.model}' does not exist; this server serves "
                             f"'{self.served_name}'", "model", "model_not_found")
        prompt = self._prompt(req, chat)
        return req, prompt, self._sampling(req, len(prompt.token_ids)), self._lsa(req)

    def _prompt(self, req: Any, chat: bool) -> Prompt:
        src = [m.model_dump() for m in req.messages] if chat else req.prompt
        try:
            return tokenize_prompt(self.tokenizer, src, chat, self.max_model_len)
        except PromptTooLongError as e:
            raise BadRequest(400, str(e), "messages" if chat else "prompt",
                             "context_length_exceeded") from e
        except ValueError as e:
            raise BadRequest(400, str(e)) from e

    def _sampling(self, req: Any, prompt_tokens: int) -> SamplingParams:
        if req.n != 1:
            raise BadRequest(400, "only n=1 is supported", "n")
        max_tokens = req.max_completion_tokens or req.max_tokens
        room = self.max_model_len - prompt_tokens
        if max_tokens is not None and max_tokens > room:  # vLLM's rule: refuse, don't truncate
            raise BadRequest(400, f"this model's context is {self.max_model_len} tokens; the "
                             f"prompt has {prompt_tokens} and max_tokens asks for {max_tokens}",
                             "max_tokens", "context_length_exceeded")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > self.cfg.max_stop_sequences:
            raise BadRequest(400, f"at most {self.cfg.max_stop_sequences} stop sequences "
                             f"(max_stop_sequences); got {len(stop)}", "stop")
        if any(not s or len(s) > 1024 for s in stop):
            raise BadRequest(400, "each stop sequence must have 1-1024 characters", "stop")
        try:
            return SamplingParams(max_tokens=min(256, room) if max_tokens is None else max_tokens,
                                  temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                  seed=req.seed, stop=stop, ignore_eos=req.ignore_eos)
        except ValueError as e:
            raise BadRequest(400, str(e), str(e).split(" ")[0]) from e

    def _lsa(self, req: Any) -> Any:
        lsa = self.cfg.engine.lsa
        try:
            if req.lsa_mode is not None:
                lsa = replace(lsa, mode=req.lsa_mode)
            if req.kv_budget is not None:
                lsa = replace(lsa, budget=req.kv_budget, budget_tokens=None)
        except ValueError as e:
            raise BadRequest(400, str(e), "kv_budget") from e
        return lsa


def build(args: dict[str, Any] | None = None) -> Any:
    """Serve application builder: ``args`` are ClusterConfig fields plus ``engine`` / ``lsa``."""
    from flashmemory.cluster.config_io import cluster_config_from_dict

    cfg = cluster_config_from_dict(dict(args or {}))
    name = (args or {}).get("served_model_name") or cfg.engine.model
    return OpenAIIngress.bind(cfg, name)
