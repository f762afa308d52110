"""ClusterClient: drives one request through the cluster (prefill -> route -> decode stream) and
frees its chunks on every worker when it ends, fails or is cancelled. Used by the Serve ingress
and by batch evaluation."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from ray.exceptions import RayError

from flashmemory.cluster.launch import ClusterHandles
from flashmemory.cluster.messages import DecodeTask, PrefillTask, TokenEvent
from flashmemory.cluster.metrics import Metrics
from flashmemory.config import LSAConfig, SamplingParams
from flashmemory.types import Prompt, RequestOutput, RequestStats


class RequestFailedError(RuntimeError):
    """A request failed inside the cluster (the message says where)."""


class ClusterClient:
    def __init__(self, handles: ClusterHandles, metrics: Metrics | None = None) -> None:
        self.h = handles
        self.metrics = metrics
        self._rr = itertools.count()
        self._ids = itertools.count()
        self._num_waiting = 0

    async def stream(self, prompt: Prompt, sampling: SamplingParams, lsa: LSAConfig | None = None,
                     request_id: str | None = None) -> AsyncIterator[TokenEvent]:
        """Token events; the final one carries stats (TTFT / TPOT / E2E measured here)."""
        h, lsa = self.h, lsa or self.h.cfg.engine.lsa
        rid = request_id or f"req-{next(self._ids)}-{time.time_ns()}"
        prefill = h.prefills[next(self._rr) % len(h.prefills)]
        decode, final, t = None, None, _Timer(self.metrics)
        self._waiting(+1)
        stage = "prefill"
        try:
            # 1. prefill: chunk KV stays on the prefill worker; embeddings go to the indexer
            reply = await prefill.prefill.remote(PrefillTask(rid, prompt, sampling, lsa))
            # 2. the indexer picks the decode worker
            stage = "routing"
            decode = h.decodes[await h.indexer.route.remote(rid)]
            stage = "decode"
            await decode.submit.remote(DecodeTask(rid, prompt, sampling, lsa, reply.prefill_rank,
                                                  reply.first_token, time.time()))
            self._waiting(-1)
            # 3. stream tokens; the decode worker pulls selected chunks as it goes
            async for ref in decode.stream.remote(rid):
                ev: TokenEvent = await ref
                t.token()
                if ev.finish_reason is not None:
                    final = ev = replace(ev, stats=t.finish(ev.stats))
                yield ev
                if final is not None:
                    return
        except RayError as e:  # a worker died or raised: the stream ends with an error event
            final = TokenEvent(rid, "", finish_reason="error",
                               error=f"{stage} failed: {_first_line(e)}")
            yield final
        finally:
            if decode is None:
                self._waiting(-1)
            elif final is None or final.finish_reason == "error":
                decode.cancel.remote(rid)  # client went away or failed: free the decode pages
            prefill.free.remote(rid)
            h.indexer.forget.remote(rid)
            self._account(prompt, final)

    def count_error(self, error_type: str) -> None:
        """A request refused before it reached the cluster (e.g. ``overloaded``)."""
        if self.metrics:
            self.metrics.inc("flashmemory_request_errors_total", error_type=error_type)

    def _waiting(self, delta: int) -> None:
        self._num_waiting += delta
        if self.metrics:
            self.metrics.set("flashmemory_num_requests_waiting", self._num_waiting)

    def _account(self, prompt: Prompt, final: TokenEvent | None) -> None:
        m = self.metrics
        if m is None:
            return
        m.inc("flashmemory_prompt_tokens_total", len(prompt.token_ids))
        if final is None:
            m.inc("flashmemory_request_errors_total", error_type="cancelled")
        elif final.finish_reason == "error":
            m.inc("flashmemory_request_errors_total", error_type="worker_error")
        else:
            m.inc("flashmemory_request_success_total", finish_reason=final.finish_reason or "")
            if final.stats:
                m.inc("flashmemory_generation_tokens_total", final.stats.completion_tokens)

    async def generate(self, prompt: Prompt, sampling: SamplingParams,
                       lsa: LSAConfig | None = None) -> RequestOutput:
        text, final = "", None
        async for ev in self.stream(prompt, sampling, lsa):
            text += ev.text_delta
            final = ev
        assert final is not None
        if final.finish_reason == "error":
            raise RequestFailedError(final.error or "request failed")
        stats = final.stats or RequestStats()
        return RequestOutput(final.request_id, text, [], final.finish_reason or "length",
                             (lsa or self.h.cfg.engine.lsa).mode, stats)

    def generate_sync(self, prompts: list[Prompt], sampling: SamplingParams,
                      lsa: LSAConfig | None = None) -> list[RequestOutput]:
        """Run several requests concurrently from synchronous code."""

        async def all_() -> list[RequestOutput]:
            return await asyncio.gather(*(self.generate(p, sampling, lsa) for p in prompts))

        return asyncio.run(all_())


def _first_line(e: BaseException) -> str:
    """A Ray error's own message, without the remote traceback it carries."""
    cause = getattr(e, "cause", None)  # RayTaskError: the exception the task raised
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


class _Timer:
    """TTFT, inter-token latency and E2E of one request, as the client sees them."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last = self.start

    def token(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            if self.metrics:
                self.metrics.observe("flashmemory_time_to_first_token_seconds", now - self.start)
        elif self.metrics:
            self.metrics.observe("flashmemory_inter_token_latency_seconds", now - self.last)
        self.last = now

    def finish(self, stats: RequestStats | None) -> RequestStats:
        s = stats or RequestStats()
        end, first = time.perf_counter(), self.first or time.perf_counter()
        n = max(s.completion_tokens, 1)
        if self.metrics:
            self.metrics.observe("flashmemory_e2e_request_latency_seconds", end - self.start)
        return replace(s, ttft=first - self.start, e2e=end - self.start,
                       tpot=(end - first) / (n - 1) if n > 1 else 0.0)
