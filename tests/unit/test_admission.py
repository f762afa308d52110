"""KV admission control (the ingress's accounting): first come first served, bounded waits and
queue, released bytes admit the next waiter; the KV estimate per LSA mode."""

from __future__ import annotations

import asyncio

import pytest

from flashmemory.cluster.admission import KVAdmission, Overloaded, estimate_kv_tokens
from flashmemory.config import LSAConfig


def test_estimate_follows_the_mode_and_budget() -> None:
    lsa = LSAConfig(budget=0.1, chunk_size=64, recent_tokens=128, sink_chunks=1)
    # 100 chunks: sink 1 + selected 10 + open 1 + tail 2 (+1) = 15 chunks, plus generated tokens
    assert estimate_kv_tokens(6400, 50, lsa) == 15 * 64 + 50
    assert estimate_kv_tokens(6400, 50, LSAConfig(mode="full")) == 6450
    assert estimate_kv_tokens(100, 10, lsa) == 2 * 64 + 10  # never more than the prompt's chunks


def test_waiters_are_admitted_in_order_as_bytes_are_released() -> None:
    async def run() -> list[str]:
        adm = KVAdmission(100, max_waiting=4, timeout_s=5, retry_after_s=1)
        order: list[str] = []
        await adm.acquire(60)

        async def want(name: str, need: int) -> None:
            await adm.acquire(need)
            order.append(name)

        tasks = [asyncio.create_task(want("a", 50)), asyncio.create_task(want("b", 10))]
        await asyncio.sleep(0.05)
        assert order == [] and adm.waiting == 2  # "b" would fit, but "a" came first
        adm.release(60)
        await asyncio.gather(*tasks)
        assert adm.admitted == 60
        return order

    assert asyncio.run(run()) == ["a", "b"]


def test_bounded_wait_full_queue_and_oversized_requests_are_refused() -> None:
    async def run() -> None:
        adm = KVAdmission(100, max_waiting=1, timeout_s=0.1, retry_after_s=7)
        await adm.acquire(100)
        with pytest.raises(Overloaded) as e:
            await adm.acquire(1)  # waits 0.1 s, then gives up
        assert e.value.retry_after_s == 7 and adm.waiting == 0
        waiter = asyncio.create_task(adm.acquire(1))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="already waiting"):
            await adm.acquire(1)  # the queue holds one
        with pytest.raises(Overloaded, match="MiB of KV"):
            await adm.acquire(101)  # can never fit
        adm.release(100)
        await waiter
        assert adm.admitted == 1

    asyncio.run(run())


@pytest.mark.parametrize("closing", [True, False])
def test_streaming_response_frees_the_request_when_the_client_hangs_up(closing: bool) -> None:
    """The client disconnects while a chunk is being sent (Starlette then cancels the sender
    there, outside the body generator): the ingress's response still closes the generator at
    once, so its ``finally`` (admission release, cluster cleanup) runs; Starlette's own does not
    (the generator stays suspended until garbage collection)."""
    from starlette.responses import StreamingResponse

    from flashmemory.cluster.serve_app import ClosingStreamingResponse

    freed: list[bool] = []

    async def body():
        try:
            while True:
                yield "data: x\n\n"
        finally:
            freed.append(True)

    async def run() -> None:
        sent = asyncio.Event()

        async def receive() -> dict:
            await sent.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body":
                sent.set()
                await asyncio.sleep(0.05)  # a slow socket: the cancel lands here

        gen = body()  # held here, so only an explicit close can run its finally
        released: list[bool] = []
        resp = (ClosingStreamingResponse(gen, lambda: released.append(True),
                                         media_type="text/event-stream") if closing else
                StreamingResponse(gen, media_type="text/event-stream"))
        await resp({"type": "http"}, receive, send)
        assert freed == ([True] if closing else [])
        assert released == ([True] if closing else [])
        await gen.aclose()

    asyncio.run(run())


def test_streaming_response_releases_admission_when_the_body_never_started() -> None:
    """A hang-up before the first chunk: the body generator never ran (so its ``finally``
    cannot free anything), yet the ingress's response still releases the admitted KV."""
    from flashmemory.cluster.serve_app import ClosingStreamingResponse

    started: list[bool] = []

    async def body():
        started.append(True)
        yield "data: x\n\n"

    async def run() -> list[bool]:
        async def receive() -> dict:
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            await asyncio.sleep(0.05)  # the cancel lands in sending the response start

        released: list[bool] = []
        await ClosingStreamingResponse(body(), lambda: released.append(True),
                                       media_type="text/event-stream")(
            {"type": "http"}, receive, send)
        return released

    assert asyncio.run(run()) == [True] and started == []
