"""Faults and hostile input: each protection here has a test that fails without it."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tests.conftest import (
    CANARIES,
    PROXY_ANTHROPIC_KEY,
    PROXY_CLIENT_KEY,
    FakeClock,
    ProxyFactory,
    wait_until_stored,
)
from tests.servers import FakeUpstream, Recorded, SocketServer, chat_chunks, chat_completion
from tests.test_admin import run_cli

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}


def post(base: str, body: dict[str, Any] = CHAT, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=10, **kwargs)


def raw_exchange(port: int, request: bytes, *, read_timeout: float = 5) -> bytes:
    """Send raw bytes and read until a whole response with a Content-Length arrived, the server closes,
    or it stops sending."""
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(request)
        connection.settimeout(read_timeout)
        received = b""
        try:
            while not _whole_response(received) and (chunk := connection.recv(65536)):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return received


def _whole_response(received: bytes) -> bool:
    head, separator, body = received.partition(b"\r\n\r\n")
    if not separator:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


class HangUpServer(SocketServer):
    """An upstream that reads each request and closes the connection without answering."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def serve(self, connection: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data and (chunk := connection.recv(65536)):
            data += chunk
        if data:
            self.requests += 1


@pytest.fixture
def hang_up() -> Iterator[HangUpServer]:
    server = HangUpServer()
    yield server
    server.close()


class TestUpstreamFaults:
    def test_a_post_is_never_retried_once_sent(self, start_proxy: ProxyFactory, hang_up: HangUpServer) -> None:
        response = post(start_proxy(openai_base_url=hang_up.url))
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "upstream_unreachable"
        assert hang_up.requests == 1

    def test_a_trickling_answer_meets_the_total_deadline(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        async def trickle(request: Request, recorded: Recorded) -> Response:
            async def bytes_slowly() -> Any:
                for byte in json.dumps(chat_completion(1, "m")).encode():
                    await asyncio.sleep(0.05)  # each read well inside UPSTREAM_TIMEOUT
                    yield bytes([byte])

            return StreamingResponse(bytes_slowly(), media_type="application/json")

        upstream.handler = trickle
        base = start_proxy(upstream_timeout=1, upstream_total_timeout=0.5)
        response = post(base)
        assert response.status_code == 504
        assert "UPSTREAM_TOTAL_TIMEOUT" in response.json()["error"]["message"]
        upstream.handler = None
        assert post(base).headers["x-cache-status"] == "MISS", "nothing was stored"

    def test_a_trickling_stream_is_cut_off_at_the_total_deadline(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        upstream.chunk_delay = 0.2
        base = start_proxy(upstream_timeout=1, upstream_total_timeout=0.5)
        with pytest.raises(httpx.RemoteProtocolError):
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=STREAM, timeout=10) as response:
                assert response.status_code == 200
                for _ in response.iter_bytes():
                    pass
        upstream.chunk_delay = 0
        assert post(base, STREAM).headers["x-cache-status"] == "MISS", "the cut-off stream was not stored"

    def test_a_follower_of_a_stream_cut_off_at_the_total_deadline_is_cut_off_too(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        upstream.chunk_delay = 0.2
        base = start_proxy(upstream_timeout=1, upstream_total_timeout=0.5)

        async def read(http: httpx.AsyncClient) -> str:
            try:
                async with http.stream("POST", f"{base}/v1/chat/completions", json=STREAM) as response:
                    async for _ in response.aiter_bytes():
                        pass
                return response.headers["x-cache-status"]
            except httpx.RemoteProtocolError:
                return "cut off"

        async def leader_and_follower() -> list[str]:
            async with httpx.AsyncClient(timeout=10) as http:
                leader = asyncio.ensure_future(read(http))
                await asyncio.sleep(0.1)
                return list(await asyncio.gather(leader, read(http)))

        assert asyncio.run(leader_and_follower()) == ["cut off", "cut off"]
        assert upstream.calls == 1, "the follower followed the leader's flight"
        upstream.chunk_delay = 0
        assert post(base, STREAM).headers["x-cache-status"] == "MISS", "the cut-off stream was not stored"

    def test_a_stream_silent_for_upstream_timeout_mid_answer_is_cut_off_and_not_stored(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        chunks = chat_chunks(1, "m")

        async def stalls(request: Request, recorded: Recorded) -> Response:
            async def events() -> Any:
                yield chunks[0]
                await asyncio.sleep(0.2)  # the silence follows bytes that came after the relay began
                yield chunks[1]
                await asyncio.sleep(4)
                for chunk in chunks[2:]:
                    yield chunk

            return StreamingResponse(events(), media_type="text/event-stream")

        upstream.handler = stalls
        base = start_proxy(upstream_timeout=0.4)
        received = b""
        started = time.monotonic()
        with pytest.raises(httpx.RemoteProtocolError):
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=STREAM, timeout=10) as response:
                for part in response.iter_bytes():
                    received += part
        assert received == chunks[0] + chunks[1]
        assert time.monotonic() - started < 3, "cut off once UPSTREAM_TIMEOUT passed, not when the upstream went on"
        upstream.handler = None
        assert post(base, STREAM).headers["x-cache-status"] == "MISS", "the cut-off stream was not stored"

    def test_a_json_answer_silent_for_upstream_timeout_mid_body_is_a_504(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        body = json.dumps(chat_completion(1, "m")).encode()

        async def stalls(request: Request, recorded: Recorded) -> Response:
            async def parts() -> Any:
                yield body[:10]
                await asyncio.sleep(0.2)  # the silence follows bytes that came after the body began to be read
                yield body[10:20]
                await asyncio.sleep(4)
                yield body[20:]

            return StreamingResponse(parts(), media_type="application/json")

        upstream.handler = stalls
        response = post(start_proxy(upstream_timeout=0.4))
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "upstream_timeout"

    def test_a_stream_whose_every_pause_is_shorter_than_upstream_timeout_completes(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        upstream.chunk_delay = 0.2  # six events: over a second in all, more than twice UPSTREAM_TIMEOUT
        base = start_proxy(upstream_timeout=0.5)
        response = post(base, STREAM)
        assert response.status_code == 200
        assert response.content.endswith(b"data: [DONE]\n\n")
        upstream.chunk_delay = 0
        wait_until_stored(base, 1)
        assert post(base, STREAM).headers["x-cache-status"] == "HIT"

    def test_a_client_that_stops_reading_longer_than_upstream_timeout_still_gets_the_whole_stream(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        # Far more than the socket buffers between them hold: the proxy waits to send, not for the upstream,
        # and that wait is not the upstream's silence.
        text = "x" * 4000
        event = b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}).encode() + b"\n\n"
        events = [event] * 6000 + [b"data: [DONE]\n\n"]

        async def large(request: Request, recorded: Recorded) -> Response:
            return upstream.stream(events)

        upstream.handler = large
        base = start_proxy(upstream_timeout=0.4)
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=STREAM, timeout=10) as response:
            time.sleep(1.5)
            body = response.read()
        assert body == b"".join(events)

    def test_a_stream_whose_headers_miss_the_total_deadline_is_a_504(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        async def late(request: Request, recorded: Recorded) -> Response:
            await asyncio.sleep(1)
            return upstream.stream(chat_chunks(1, "m"))

        upstream.handler = late
        response = post(start_proxy(upstream_timeout=5, upstream_total_timeout=0.3), STREAM)
        assert response.status_code == 504
        assert "UPSTREAM_TOTAL_TIMEOUT" in response.json()["error"]["message"]

    def test_a_request_passed_through_whose_answer_misses_the_total_deadline_is_a_504_bypass(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        async def late(request: Request, recorded: Recorded) -> Response:
            await asyncio.sleep(1)
            return JSONResponse({"object": "list", "data": []})

        upstream.handler = late
        base = start_proxy(upstream_timeout=5, upstream_total_timeout=0.3)
        response = httpx.get(f"{base}/v1/models", timeout=10)
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "upstream_timeout"
        assert "UPSTREAM_TOTAL_TIMEOUT" in response.json()["error"]["message"]
        assert response.headers["x-cache-status"] == "BYPASS"

    def test_stored_answers_never_replay_another_requests_date_or_server(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        async def stamped(request: Request, recorded: Recorded) -> Response:
            headers = {"date": "Mon, 01 Jan 2001 00:00:00 GMT", "server": "upstream-7", "x-request-id": "req-1"}
            return JSONResponse(chat_completion(1, "m"), headers=headers)

        upstream.handler = stamped
        base = start_proxy()
        assert post(base).headers["x-request-id"] == "req-1"
        hit = post(base)
        assert hit.headers["x-cache-status"] == "HIT"
        assert "upstream-7" not in hit.headers.get("server", "")
        assert "2001" not in hit.headers.get("date", "")
        assert "x-request-id" not in hit.headers


FAILURES = {
    "500": lambda: JSONResponse({"error": {"message": "boom"}}, status_code=500),
    "503": lambda: JSONResponse({"error": {"message": "overloaded"}}, status_code=503),
    "429": lambda: JSONResponse({"error": {"message": "slow down"}}, status_code=429),
}


@pytest.mark.both_backends
class TestStaleIfError:
    def expired_entry(self, start_proxy: ProxyFactory, clock: FakeClock, body: dict[str, Any], **settings: Any) -> str:
        base = start_proxy(clock=clock, cache_ttl=60, **settings)
        assert post(base, body).headers["x-cache-status"] == "MISS"
        wait_until_stored(base, 1)
        clock.advance(120)
        return base

    @pytest.mark.parametrize("failure", sorted(FAILURES))
    def test_an_upstream_error_serves_the_expired_entry(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, clock: FakeClock, failure: str
    ) -> None:
        base = self.expired_entry(start_proxy, clock, CHAT, cache_stale_if_error=True)

        async def failing(request: Request, recorded: Recorded) -> Response:
            return FAILURES[failure]()

        upstream.handler = failing
        response = post(base)
        assert response.status_code == 200
        assert response.headers["x-cache-status"] == "STALE"
        assert response.json()["id"] == "chatcmpl-1"
        assert int(response.headers["age"]) >= 120
        assert httpx.get(f"{base}/cache/stats").json()["stale"] == 1

    def test_an_unreachable_upstream_serves_the_expired_entry(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, clock: FakeClock, hang_up: HangUpServer
    ) -> None:
        base = self.expired_entry(start_proxy, clock, CHAT)
        start_proxy.stop(base)
        # The same cache file, behind a proxy whose upstream hangs up on every request.
        broken = start_proxy(clock=clock, cache_ttl=60, cache_stale_if_error=True, openai_base_url=hang_up.url)
        response = post(broken)
        assert response.headers["x-cache-status"] == "STALE"
        assert response.json()["id"] == "chatcmpl-1"
        assert hang_up.requests == 1

    def test_a_timeout_serves_the_expired_stream(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, clock: FakeClock
    ) -> None:
        base = self.expired_entry(start_proxy, clock, STREAM, cache_stale_if_error=True, upstream_timeout=0.3)

        async def slow(request: Request, recorded: Recorded) -> Response:
            await asyncio.sleep(1)
            return JSONResponse(chat_completion(9, "m"))

        upstream.handler = slow
        response = post(base, STREAM)
        assert response.headers["x-cache-status"] == "STALE"
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.text.rstrip().endswith("data: [DONE]")

    def test_off_by_default_the_error_is_passed_on(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, clock: FakeClock
    ) -> None:
        base = self.expired_entry(start_proxy, clock, CHAT)

        async def failing(request: Request, recorded: Recorded) -> Response:
            return FAILURES["503"]()

        upstream.handler = failing
        response = post(base)
        assert response.status_code == 503
        assert response.headers["x-cache-status"] == "EXPIRED"

    def test_a_success_replaces_the_expired_entry(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, clock: FakeClock
    ) -> None:
        base = self.expired_entry(start_proxy, clock, CHAT, cache_stale_if_error=True)
        refreshed = post(base)
        assert refreshed.headers["x-cache-status"] == "EXPIRED"
        assert refreshed.json()["id"] == "chatcmpl-2"
        assert post(base).json()["id"] == "chatcmpl-2"


class TestRequestSize:
    def test_a_declared_length_over_the_limit_is_a_413(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        base = start_proxy(max_request_bytes=1000)
        body = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
        response = post(base, body)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
        assert upstream.calls == 0
        assert post(base).status_code == 200

    @pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/files"], ids=["cacheable", "pass-through"])
    def test_a_chunked_body_is_refused_before_it_is_all_read(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, path: str
    ) -> None:
        base = start_proxy(max_request_bytes=100_000)
        chunk = b"x" * 65536
        head = f"POST {path} HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
        head += "Transfer-Encoding: chunked\r\n\r\n"
        # Two chunks pass the limit; the body's end never comes, so only an early refusal answers at all.
        request = head.encode() + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 2
        answer = raw_exchange(port_of(base), request, read_timeout=3)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b'"request_too_large"' in answer
        assert upstream.calls == 0

    def test_a_chunked_body_within_the_limit_is_forwarded(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        base = start_proxy(max_request_bytes=100_000)

        def pieces() -> Iterator[bytes]:
            yield b"part one, "
            yield b"part two"

        response = httpx.post(f"{base}/v1/files", content=pieces())
        assert response.status_code == 200
        assert upstream.requests[0].body == b"part one, part two"


class TestCacheEntrySize:
    def test_a_large_answer_is_delivered_not_stored(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        base = start_proxy(max_cache_entry_bytes=200)
        first = post(base)
        assert first.status_code == 200 and first.json()["id"] == "chatcmpl-1"
        assert post(base).headers["x-cache-status"] == "MISS"

    def test_a_large_stream_is_delivered_not_stored(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        base = start_proxy(max_cache_entry_bytes=300)
        first = post(base, STREAM)
        assert first.text.encode() == b"".join(chat_chunks(1, "m"))
        assert post(base, STREAM).headers["x-cache-status"] == "MISS"

    def test_an_answer_within_the_limit_is_stored(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        base = start_proxy(max_cache_entry_bytes=100_000)
        post(base, STREAM)
        assert post(base, STREAM).headers["x-cache-status"] == "HIT"


BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


@pytest.mark.parametrize(
    "framing",
    [
        pytest.param(b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(BODY), id="length-and-chunked"),
        pytest.param(b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n" % len(BODY), id="chunked-and-length"),
        pytest.param(b"Content-Length: %d\r\nContent-Length: 5\r\n" % len(BODY), id="two-lengths"),
    ],
)
def test_ambiguous_framing_is_a_400_and_nothing_is_forwarded(
    start_proxy: ProxyFactory, upstream: FakeUpstream, framing: bytes
) -> None:
    base = start_proxy()
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n" + framing + b"\r\n" + BODY
    answer = raw_exchange(port_of(base), request)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert upstream.calls == 0


@pytest.mark.parametrize("field", ["api_base", "base_url", "api_url", "url"])
def test_body_fields_never_choose_the_upstream(start_proxy: ProxyFactory, upstream: FakeUpstream, field: str) -> None:
    elsewhere = HangUpServer()
    try:
        response = post(start_proxy(), {**CHAT, field: f"{elsewhere.url}/v1"})
        assert response.status_code == 200
        assert upstream.calls == 1
        assert elsewhere.requests == 0
    finally:
        elsewhere.close()


def test_a_crafted_host_changes_neither_route_nor_upstream(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    base = start_proxy(admin_api_key="admin-key")
    for host in ("127.0.0.1", "localhost", "evil.example"):
        assert httpx.get(f"{base}/cache/stats", headers={"host": host}).status_code == 401
        post(base, headers={"host": host})
    assert upstream.calls == 1, "the second and third were hits: the Host header is not part of anything"
    assert upstream.requests[0].header("host") == upstream.url.removeprefix("http://")


def test_the_keys_appear_in_no_answer_entry_admin_output_or_export(
    start_proxy: ProxyFactory, upstream: FakeUpstream, tmp_path: Path, hang_up: HangUpServer
) -> None:
    database = tmp_path / "canary.db"
    base = start_proxy(cache_db=database, proxy_api_keys=PROXY_CLIENT_KEY)
    authorized = {"authorization": f"Bearer {PROXY_CLIENT_KEY}"}
    seen: list[httpx.Response] = [
        post(base, headers=authorized),
        post(base, STREAM, headers=authorized),
        httpx.post(
            f"{base}/anthropic/v1/messages", json={"model": "c", "max_tokens": 5, "messages": []}, headers=authorized
        ),
        post(base),  # 401
        httpx.post(f"{base}/nowhere/v1/x", headers=authorized),  # 404
        post(start_proxy(cache_db=database, openai_base_url=hang_up.url), {**CHAT, "n": 2}),  # 502
        httpx.get(f"{base}/cache/stats", headers=authorized),
        httpx.get(f"{base}/cache/entries", headers=authorized),
        httpx.get(f"{base}/healthz"),
    ]
    seen.append(post(start_proxy(cache_db=database, max_request_bytes=1000), {**CHAT, "pad": "x" * 2000}))
    assert {answer.status_code for answer in seen} >= {200, 401, 404, 413, 502}
    start_proxy.stop(base)
    exported = run_cli("export", "out.jsonl", cwd=tmp_path, env={"CACHE_DB": str(database)})
    assert exported.returncode == 0
    stored = b"".join(path.read_bytes() for path in tmp_path.glob("canary.db*"))
    assert b"answer 1" in stored, "the store was looked at after the entries were written"
    places = {
        "answers": "".join(answer.text + str(answer.headers) for answer in seen),
        "export": (tmp_path / "out.jsonl").read_text() + exported.stdout + exported.stderr,
        "store": stored.decode("latin-1"),
    }
    for place, text in places.items():
        for canary in CANARIES:
            assert canary not in text, f"{canary} in the {place}"


@pytest.mark.parametrize("listed", ["X-Api-Key", "x-api-key, Authorization", "Authorization"])
def test_connection_cannot_strip_the_injected_anthropic_key(
    start_proxy: ProxyFactory, upstream: FakeUpstream, listed: str
) -> None:
    headers = {"connection": listed, "x-api-key": "sk-client-anthropic", "authorization": "Bearer sk-client"}
    body = {"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    httpx.post(f"{start_proxy()}/anthropic/v1/messages", json=body, headers=headers)
    sent = upstream.requests[0]
    assert sent.header_values("x-api-key") == [PROXY_ANTHROPIC_KEY]
    assert sent.header("authorization") is None
