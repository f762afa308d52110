"""ClusterClient: drives one request through the cluster (prefill -> route -> decode stream) and
frees its chunks on every worker when it ends, fails or is cancelled. Used by the Serve ingress
and by batch evaluation."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError, RayError

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
        """Token events; the final one carries stats (TTFT / TPOT / E2E measured here).

        The request's resources are freed before the final event is yielded (and on any early
        exit), so a consumer that stops reading after it cannot hold them."""
        h, lsa = self.h, lsa or self.h.cfg.engine.lsa
        rid = request_id or f"req-{next(self._ids)}-{time.time_ns()}"
        decode = None
        sent: dict[str, Any] = {"prefill": None, "decode": None}  # called, maybe not answered
        index, final, t = -1, None, _Timer(self.metrics)
        ended = failed = False  # failed: a worker call raised here

        def end() -> None:  # once: free the request everywhere it has state
            nonlocal ended
            if ended:
                return
            ended = True
            if decode is None:
                self._waiting(-1)
            # A decode worker that took the request frees its chunks on the prefill worker and
            # its indexer state when it drops it (``decode.worker``); one that was sent it but
            # has not answered may have taken it. Cancel there when the client went away.
            if sent["decode"] is not None and (final is None or failed):
                sent["decode"].cancel.remote(rid)
            if sent["decode"] is None or failed:
                # no decode worker took it, or the one that did failed: free it here. A prefill
                # still running drops what it built when it ends (``prefill.worker``).
                if sent["prefill"] is not None:
                    sent["prefill"].free.remote(rid)
                h.indexer.forget.remote(rid)
            self._account(prompt, final)

        self._waiting(+1)
        stage = "prefill"
        try:
            # 1. prefill: chunk KV stays on the prefill worker; embeddings go to the indexer
            reply = await self._prefill(PrefillTask(rid, prompt, sampling, lsa), sent)
            # 2. the indexer picks the decode worker; one that is dead gets the request elsewhere
            stage = "decode"
            task = DecodeTask(rid, prompt, sampling, lsa, reply.prefill_rank, reply.first_token,
                              time.time(), reply.prefill_s, reply.state)
            index, decode = await self._submit(rid, task, sent)
            self._waiting(-1)
            # 3. stream tokens; the decode worker pulls selected chunks as it goes
            async for ref in decode.stream.remote(rid):
                ev: TokenEvent = await ref
                t.token()
                if ev.finish_reason is not None:
                    final = ev = replace(ev, stats=t.finish(ev.stats))
                    end()
                yield ev
                if final is not None:
                    return
        except RayError as e:  # a worker died or raised: the stream ends with an error event
            failed = True
            if isinstance(e, RayActorError) and decode is not None and stage == "decode":
                h.indexer.report_down.remote(index)
            final = TokenEvent(rid, "", finish_reason="error",
                               error=f"{stage} failed: {_first_line(e)}")
            end()
            yield final
        finally:
            end()

    async def _prefill(self, task: PrefillTask, sent: dict[str, Any]) -> Any:
        """Prefill on the next worker (round robin); a call refused because that worker is
        restarting did not run and goes to the next one, for up to ``restart_wait_s``. A call
        that was running when its worker died is not re-run (it may be what killed it).
        ``sent["prefill"]`` names the worker called, before its answer arrives."""
        h = self.h
        deadline = time.monotonic() + h.cfg.restart_wait_s
        while True:
            worker = sent["prefill"] = h.prefills[next(self._rr) % len(h.prefills)]
            try:
                return await worker.prefill.remote(task)
            except ActorUnavailableError as e:
                if not _refused_while_restarting(e) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def _submit(self, rid: str, task: DecodeTask,
                      sent: dict[str, Any]) -> tuple[int, Any]:
        """Route and submit; a decode worker that died is reported to the indexer (it routes
        around it until it answers again) and the request goes to another one; when every one
        failed, it waits for a restart for up to ``restart_wait_s``. Nothing has run on the
        decode side yet, so submitting again is safe. ``sent["decode"]`` names the worker a
        submit went to, before its answer arrives."""
        h, tried = self.h, []
        deadline = time.monotonic() + h.cfg.restart_wait_s
        while True:
            try:
                index = await h.indexer.route.remote(rid, tuple(tried))
            except RayError:  # the indexer is restarting: pick a worker here
                index = next(i for i in self._rr_decodes() if i not in tried)
            decode = sent["decode"] = h.decodes[index]
            try:
                await decode.submit.remote(task)
                return index, decode
            except RayActorError:
                h.indexer.report_down.remote(index)
                tried.append(index)
                if len(tried) == len(h.decodes):
                    if time.monotonic() > deadline:
                        raise
                    tried.clear()
                    await asyncio.sleep(0.5)

    def _rr_decodes(self) -> list[int]:
        n = len(self.h.decodes)
        start = next(self._rr) % n
        return [(start + k) % n for k in range(n)]

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
        text, ids, final = "", [], None
        async for ev in self.stream(prompt, sampling, lsa):
            text += ev.text_delta
            ids += ev.token_ids
            final = ev
        assert final is not None
        if final.finish_reason == "error":
            raise RequestFailedError(final.error or "request failed")
        stats = final.stats or RequestStats()
        return RequestOutput(final.request_id, text, ids, final.finish_reason or "length",
                             (lsa or self.h.cfg.engine.lsa).mode, stats)

    def generate_sync(self, prompts: list[Prompt], sampling: SamplingParams,
                      lsa: LSAConfig | None = None) -> list[RequestOutput]:
        """Run several requests concurrently from synchronous code."""

        async def all_() -> list[RequestOutput]:
            return await asyncio.gather(*(self.generate(p, sampling, lsa) for p in prompts))

        return asyncio.run(all_())


def _refused_while_restarting(e: ActorUnavailableError) -> bool:
    """Ray refuses calls to an actor it is restarting ("is restarting"): those did not run. A
    call in flight when the actor died reads "was restarted" and may have run."""
    return "is restarting" in str(e)


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
