"""Request coalescing: identical misses in flight at once cost one upstream request."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from proxy.coalesce import Flights
from tests.conftest import ProxyFactory
from tests.servers import FakeUpstream, chat_chunks

pytestmark = pytest.mark.both_backends

CHAT = {"model": "m", "messages": [{"role": "user", "content": "everyone asks this at once"}]}


async def many(base: str, count: int, body: dict[str, Any]) -> list[tuple[httpx.Response, bytes]]:
    limits = httpx.Limits(max_connections=count + 10)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:

        async def one() -> tuple[httpx.Response, bytes]:
            async with http.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
                return response, await response.aread()

        return await asyncio.gather(*(one() for _ in range(count)))


def test_100_identical_misses_make_one_upstream_request(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    upstream.answer_slowly(1.0)  # long enough for all 100 to arrive while the first is in flight
    results = asyncio.run(many(start_proxy(), 100, CHAT))
    assert upstream.calls == 1
    statuses = sorted(response.headers["x-cache-status"] for response, _ in results)
    assert statuses == ["HIT"] * 99 + ["MISS"]
    assert sum(response.headers.get("x-cache-coalesced") == "true" for response, _ in results) == 99
    assert {body for _, body in results} == {results[0][1]}


def test_100_identical_streamed_misses_make_one_upstream_request_and_stream_live(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    upstream.chunk_delay = 0.2
    results = asyncio.run(many(start_proxy(), 100, {**CHAT, "stream": True}))
    assert upstream.calls == 1
    expected = b"".join(chat_chunks(1, "m"))
    assert all(body == expected for _, body in results), "every follower gets the same byte sequence"
    assert sorted(response.headers["x-cache-status"] for response, _ in results) == ["HIT"] * 99 + ["MISS"]


def test_followers_of_another_shape_are_answered_from_the_stored_answer(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    upstream.chunk_delay = 0.1
    base = start_proxy()

    async def mixed() -> list[tuple[httpx.Response, bytes]]:
        with_usage = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        streamed = asyncio.ensure_future(many(base, 1, with_usage))
        await asyncio.sleep(0.1)
        as_json = await many(base, 5, CHAT)
        return [*(await streamed), *as_json]

    results = asyncio.run(mixed())
    assert upstream.calls == 1
    for response, body in results[1:]:
        assert response.headers["x-cache-coalesced"] == "true"
        assert response.headers["content-type"] == "application/json"
        assert httpx.Response(200, content=body).json()["choices"][0]["message"]["content"] == "answer 1"


def test_when_the_leader_fails_followers_go_upstream_at_once(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    upstream.answer_slowly(1.0, first_fails=True)
    base = start_proxy()
    started = asyncio.get_event_loop_policy().new_event_loop()
    try:
        results = started.run_until_complete(many(base, 10, CHAT))
    finally:
        started.close()
    statuses = sorted(response.status_code for response, _ in results)
    assert statuses == [200] * 9 + [529]
    assert upstream.calls == 10, "each follower asked once, none waited on another"


def test_followers_stop_waiting_after_the_lock_timeout(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    upstream.answer_slowly(0.8)
    results = asyncio.run(many(start_proxy(cache_lock_timeout=0.2), 5, CHAT))
    assert upstream.calls == 5
    assert all(response.status_code == 200 for response, _ in results)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_coalescing_can_be_turned_off(start_proxy: ProxyFactory, upstream: FakeUpstream, stream: bool) -> None:
    upstream.answer_slowly(0.3) if not stream else setattr(upstream, "chunk_delay", 0.05)
    asyncio.run(many(start_proxy(cache_lock_timeout=0), 5, {**CHAT, "stream": stream}))
    assert upstream.calls == 5


def test_flights_remember_recent_stored_landings_only() -> None:
    flights = Flights()
    before = flights.landings
    flights.land("unstored", flights.lead("unstored", False, False), complete=False, stored=False)
    assert not flights.stored_since("unstored", before)
    for number in range(1100):
        key = f"k{number}"
        flights.land(key, flights.lead(key, False, False), complete=True, stored=True)
    assert flights.stored_since("k1099", before)
    assert not flights.stored_since("k1099", flights.landings), "landed before that count was read"
    assert not flights.stored_since("k0", before), "forgotten: only the latest landings are kept"


def test_a_request_sent_after_a_streamed_answer_ended_does_not_follow_its_flight(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    unfinished = chat_chunks(1, "m")[:-1]  # no `data: [DONE]`: an answer that is never stored

    async def answer(request: Any, recorded: Any) -> Any:
        return upstream.stream(unfinished)

    upstream.handler = answer
    body = {**CHAT, "stream": True}
    with httpx.Client(base_url=start_proxy(), timeout=10) as http:  # one connection: the next request at once
        statuses = [http.post("/v1/chat/completions", json=body).headers["x-cache-status"] for _ in range(30)]
    assert statuses == ["MISS"] * 30, "each went upstream: the one before had ended, and could not be stored"
    assert upstream.calls == 30


def test_identical_streamed_misses_sent_together_are_all_relayed_live(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    upstream.chunk_delay = 0.2
    base = start_proxy()

    async def first_bytes(count: int) -> list[float]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=count + 2)) as http:

            async def one() -> float:
                first = None
                async with http.stream("POST", f"{base}/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                    async for _ in r.aiter_raw():
                        first = first or time.perf_counter()
                assert first is not None
                return first

            return await asyncio.gather(*(one() for _ in range(count)))

    firsts = asyncio.run(first_bytes(5))
    assert upstream.calls == 1
    assert all(first < upstream.sent_at[-1] for first in firsts), "each got its first event while the upstream sent"
