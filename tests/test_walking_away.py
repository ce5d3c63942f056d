"""The upstream request lives as long as anyone listens: a leader's client that leaves never breaks its
followers, and when every client has left the upstream request is closed at once."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tests.conftest import ProxyFactory, wait_until_stored
from tests.redis_servers import RedisServer
from tests.servers import FakeUpstream, Recorded, chat_chunks, chat_completion
from tests.test_access_log import read_lines

CHAT = {"model": "m", "messages": [{"role": "user", "content": "who stays to the end?"}]}
FOLLOWERS = 12


async def leave_after_first_bytes(http: httpx.AsyncClient, url: str, body: dict[str, Any], linger: float) -> None:
    """Lead: read the first bytes, hold the stream `linger` seconds (followers join), then leave."""
    async with http.stream("POST", url, json=body) as response:
        assert response.headers["x-cache-status"] == "MISS"
        async for _ in response.aiter_raw():
            await asyncio.sleep(linger)
            break  # closing the response now closes the connection: the client is gone


async def leave_before_the_answer(http: httpx.AsyncClient, url: str, body: dict[str, Any], after: float) -> None:
    request = asyncio.ensure_future(http.post(url, json=body))
    await asyncio.sleep(after)
    request.cancel()  # the connection is dropped with the request in flight


async def follow(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[httpx.Response, bytes]:
    async with http.stream("POST", url, json=body) as response:
        return response, await response.aread()


async def leader_leaves(leader_url: str, follower_url: str, stream: bool) -> list[tuple[httpx.Response, bytes]]:
    body = {**CHAT, "stream": stream}
    async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=FOLLOWERS + 5)) as http:
        if stream:
            leader = asyncio.ensure_future(leave_after_first_bytes(http, leader_url, body, linger=0.4))
        else:
            leader = asyncio.ensure_future(leave_before_the_answer(http, leader_url, body, after=0.4))
        await asyncio.sleep(0.15)  # the leader is upstream; everyone else follows it
        followers = await asyncio.gather(*(follow(http, follower_url, body) for _ in range(FOLLOWERS)))
        await leader
        return followers


def slow_stream(upstream: FakeUpstream) -> None:
    upstream.chunk_delay = 0.15


@pytest.mark.both_backends
def test_followers_of_a_stream_get_it_whole_when_the_leaders_client_leaves(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    slow_stream(upstream)
    base = start_proxy()
    url = f"{base}/v1/chat/completions"
    followers = asyncio.run(leader_leaves(url, url, stream=True))
    expected = b"".join(chat_chunks(1, "m"))
    assert [body for _, body in followers] == [expected] * FOLLOWERS, "every follower got the complete stream"
    assert all(response.headers["x-cache-status"] == "HIT" for response, _ in followers)
    assert upstream.calls == 1
    wait_until_stored(base, 1)
    assert httpx.post(url, json=CHAT).headers["x-cache-status"] == "HIT", "the answer was stored"


@pytest.mark.both_backends
def test_followers_of_a_json_answer_get_it_when_the_leaders_client_leaves(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    upstream.answer_slowly(1.0)
    base = start_proxy()
    url = f"{base}/v1/chat/completions"
    followers = asyncio.run(leader_leaves(url, url, stream=False))
    assert all(response.status_code == 200 for response, _ in followers)
    assert all(httpx.Response(200, content=body).json() == chat_completion(1, "m") for _, body in followers)
    assert upstream.calls == 1
    wait_until_stored(base, 1)
    assert httpx.post(url, json=CHAT).headers["x-cache-status"] == "HIT", "the answer was stored"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_followers_on_another_instance_keep_the_upstream_request_alive(
    start_proxy: ProxyFactory, upstream: FakeUpstream, redis_server: RedisServer, tmp_path: Path, stream: bool
) -> None:
    slow_stream(upstream) if stream else upstream.answer_slowly(1.0)
    shared = {"cache_backend": "redis", "redis_url": redis_server.url, "redis_key_prefix": f"away-{tmp_path.name}"}
    leading, following = start_proxy(**shared), start_proxy(**shared)
    path = "/v1/chat/completions"
    followers = asyncio.run(leader_leaves(f"{leading}{path}", f"{following}{path}", stream=stream))
    if stream:
        assert all(body == b"".join(chat_chunks(1, "m")) for _, body in followers)
    else:
        assert all(httpx.Response(200, content=body).json() == chat_completion(1, "m") for _, body in followers)
    assert upstream.calls == 1


class ClosedWatch:
    """An upstream answer that takes seconds, noting when the proxy closed its request."""

    def __init__(self, upstream: FakeUpstream, stream: bool) -> None:
        self.closed_at: float | None = None
        upstream.handler = self.streamed if stream else self.complete

    async def streamed(self, request: Request, recorded: Recorded) -> Response:
        async def events() -> Any:
            try:
                for chunk in chat_chunks(1, "m"):
                    yield chunk
                    await asyncio.sleep(1.0)
            finally:
                self.closed_at = time.monotonic()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def complete(self, request: Request, recorded: Recorded) -> Response:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if await request.is_disconnected():
                self.closed_at = time.monotonic()
                break
            await asyncio.sleep(0.02)
        return JSONResponse(chat_completion(1, "m"))

    def seconds_after(self, left_at: float) -> float:
        deadline = time.monotonic() + 3
        while self.closed_at is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.closed_at is not None, "the upstream request went on with nobody listening"
        return self.closed_at - left_at


@pytest.mark.both_backends
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_when_every_client_leaves_the_upstream_request_is_closed_within_a_second(
    start_proxy: ProxyFactory, upstream: FakeUpstream, stream: bool
) -> None:
    watch = ClosedWatch(upstream, stream)
    url = f"{start_proxy()}/v1/chat/completions"
    body = {**CHAT, "stream": stream}

    async def everyone_leaves() -> float:
        async with httpx.AsyncClient(timeout=20) as http:
            if stream:
                leader = asyncio.ensure_future(leave_after_first_bytes(http, url, body, linger=0.5))
                await asyncio.sleep(0.2)
                await asyncio.gather(leader, *(leave_after_first_bytes_as_follower(http, url, body) for _ in range(3)))
            else:
                leader = asyncio.ensure_future(leave_before_the_answer(http, url, body, after=0.6))
                await asyncio.sleep(0.2)
                await asyncio.gather(leader, *(leave_before_the_answer(http, url, body, after=0.4) for _ in range(3)))
        return time.monotonic()

    left_at = asyncio.run(everyone_leaves())
    assert watch.seconds_after(left_at) < 1.0
    assert upstream.calls == 1


async def leave_after_first_bytes_as_follower(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> None:
    async with http.stream("POST", url, json=body) as response:
        assert response.headers["x-cache-coalesced"] == "true"
        async for _ in response.aiter_raw():
            break


@pytest.mark.both_backends
def test_a_follower_that_leaves_affects_no_other_client(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    slow_stream(upstream)
    url = f"{start_proxy()}/v1/chat/completions"
    body = {**CHAT, "stream": True}

    async def one_follower_leaves() -> list[tuple[httpx.Response, bytes]]:
        async with httpx.AsyncClient(timeout=20) as http:
            leader = asyncio.ensure_future(follow(http, url, body))
            await asyncio.sleep(0.15)
            stays = [asyncio.ensure_future(follow(http, url, body)) for _ in range(3)]
            await leave_after_first_bytes_as_follower(http, url, body)
            return await asyncio.gather(leader, *stays)

    answers = asyncio.run(one_follower_leaves())
    assert [body for _, body in answers] == [b"".join(chat_chunks(1, "m"))] * 4
    assert [response.headers["x-cache-status"] for response, _ in answers] == ["MISS", "HIT", "HIT", "HIT"]
    assert upstream.calls == 1


@pytest.mark.both_backends
def test_without_coalescing_a_json_client_that_leaves_closes_its_upstream_request(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    watch = ClosedWatch(upstream, stream=False)
    url = f"{start_proxy(cache_lock_timeout=0)}/v1/chat/completions"

    async def leave() -> float:
        async with httpx.AsyncClient(timeout=20) as http:
            await leave_before_the_answer(http, url, CHAT, after=0.3)
        return time.monotonic()

    left_at = asyncio.run(leave())
    assert watch.seconds_after(left_at) < 1.0
    assert upstream.calls == 1


def test_a_leader_whose_client_left_is_logged_with_what_its_client_received(
    start_proxy: ProxyFactory, upstream: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    slow_stream(upstream)
    marker = uuid.uuid4().hex
    base = start_proxy(log_format="json")
    url = f"{base}/v1/chat/completions"
    body = {**CHAT, "model": f"m-{marker}", "stream": True}

    async def leader_leaves_early() -> list[tuple[httpx.Response, bytes]]:
        async with httpx.AsyncClient(timeout=20) as http:
            leader = asyncio.ensure_future(leave_after_first_bytes(http, url, body, linger=0.4))
            await asyncio.sleep(0.15)
            followers = await asyncio.gather(*(follow(http, url, body) for _ in range(2)))
            await leader
            return followers

    followers = asyncio.run(leader_leaves_early())
    whole = len(followers[0][1])
    assert [len(answer) for _, answer in followers] == [whole, whole]
    records = [json.loads(line) for line in read_lines(capsys, marker, 3)]
    leader = next(record for record in records if record["cache_status"] == "MISS")
    assert 0 < leader["bytes"] < whole, "the leader's line counts what reached its client, not what was read on"
