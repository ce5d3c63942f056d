"""The upstream connection pools: which hosts count as nearby, and how long idle connections are kept."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import anyio
import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from providers import BUILTIN_PROVIDERS
from proxy.aws import AwsSigner
from proxy.settings import Settings
from proxy.upstream import BodyReader, UpstreamClient, UpstreamTransport, is_nearby, read_body
from tests.conftest import ProxyFactory
from tests.servers import FakeUpstream, Recorded, SocketServer, chat_chunks, chat_completion


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "::1",
        "[::1]",
        "localhost",
        "LOCALHOST.",
        "10.0.0.5",
        "172.17.0.2",
        "192.168.1.20",
        "100.100.1.1",  # shared address space (a tailnet, say)
        "169.254.1.1",
        "fe80::1",
        "vllm",  # a container's name on a compose network
        "ollama.local",
        "gpu-box.internal",
        "nas.lan",
        "llm.home.arpa",
    ],
)
def test_hosts_on_this_machine_or_a_private_network_are_nearby(host: str) -> None:
    assert is_nearby(host)


@pytest.mark.parametrize(
    "host", ["api.openai.com", "openrouter.ai", "api.anthropic.com.", "8.8.8.8", "2606:4700::1", "local.example.com"]
)
def test_public_hosts_are_remote(host: str) -> None:
    assert not is_nearby(host)


class KeepAliveServer(SocketServer):
    """Answers every request with a small JSON body and keeps the connection open; keeps each request's
    head and body."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[bytes, bytes]] = []

    def serve(self, connection: socket.socket) -> None:
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
            while b"\r\n\r\n" in data:
                head, _, rest = data.partition(b"\r\n\r\n")
                fields = (line.partition(b":") for line in head.split(b"\r\n")[1:])
                length = next((int(value) for name, _, value in fields if name.lower() == b"content-length"), 0)
                if len(rest) < length:
                    break
                data = rest[length:]
                self.requests.append((head, rest[:length]))
                connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")


@pytest.fixture
def server() -> Iterator[KeepAliveServer]:
    keep_alive = KeepAliveServer()
    yield keep_alive
    keep_alive.close()


async def post(transport: UpstreamTransport, base: str) -> None:
    request = httpx.Request("POST", f"{base}/v1/chat/completions", content=b'{"model": "m"}')
    response = await transport.handle_async_request(request)
    assert await response.aread() == b"{}"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_nearby_connection_is_reused_within_its_keepalive_and_never_after(
    server: KeepAliveServer, anyio_backend: str
) -> None:
    transport = UpstreamTransport(nearby_keepalive=0.3, remote_keepalive=60)
    try:
        await post(transport, server.url)
        await post(transport, server.url)
        assert server.connections == 1, "reused while it was fresh"
        await anyio.sleep(0.5)
        await post(transport, server.url)
        assert server.connections == 2, "idle past its keep-alive: a new connection, not one the server may be closing"
    finally:
        await transport.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(("method", "body"), [("POST", b'{"model": "m"}'), ("POST", b""), ("GET", None)])
async def test_a_request_goes_upstream_with_one_host_and_its_body_framed_by_its_length(
    server: KeepAliveServer, anyio_backend: str, method: str, body: bytes | None
) -> None:
    client = UpstreamClient(UpstreamTransport(), httpx.Timeout(5), AwsSigner(Settings(_env_file=None)))  # type: ignore[call-arg]
    provider = next(provider for provider in BUILTIN_PROVIDERS if provider.name == "openai")
    headers = [("content-type", "application/json"), ("x-client", "kept")]
    try:
        response = await client.open(provider, method, f"{server.url}/v1/models", headers, body)
        assert await read_body(response, provider) == b"{}"
    finally:
        await client.aclose()

    ((head, sent),) = server.requests
    lines = head.split(b"\r\n")
    assert lines[0] == f"{method} /v1/models HTTP/1.1".encode()
    fields = [(name.strip().lower(), value.strip()) for name, _, value in (line.partition(b":") for line in lines[1:])]
    port = server.url.rsplit(":", 1)[1].encode()
    assert [value for name, value in fields if name == b"host"] == [b"127.0.0.1:" + port]
    assert (b"x-client", b"kept") in fields
    assert sent == (body or b"")
    lengths = [value for name, value in fields if name == b"content-length"]
    assert lengths == ([b"%d" % len(body)] if method == "POST" and body is not None else [])
    assert b"transfer-encoding" not in dict(fields)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_body_is_read_from_aiohttps_own_stream_with_its_timer_for_every_chunk_off(
    upstream: FakeUpstream, anyio_backend: str
) -> None:
    # BodyReader reads the stream under httpx-aiohttp's and counts UPSTREAM_TIMEOUT itself (tests/test_hardening.py);
    # should httpx-aiohttp keep its response elsewhere, this fails rather than the relay quietly slowing down.
    chunks = chat_chunks(1, "m")

    async def paced(request: Request, recorded: Recorded) -> Response:
        return upstream.stream(chunks)

    upstream.handler, upstream.chunk_delay = paced, 0.05
    client = UpstreamClient(UpstreamTransport(), httpx.Timeout(5), AwsSigner(Settings(_env_file=None)))  # type: ignore[call-arg]
    provider = next(provider for provider in BUILTIN_PROVIDERS if provider.name == "openai")
    try:
        response = await client.open(provider, "POST", f"{upstream.url}/v1/chat/completions", [], b"{}")
        protocol = response.stream._aiohttp_response.connection.protocol  # type: ignore[attr-defined]
        assert protocol.read_timeout == 5
        body = BodyReader(response)
        assert protocol.read_timeout is None
        received = b""
        while chunk := await body.read():
            received += chunk
        assert received == b"".join(chunks)
        await body.close()
        assert response.is_closed
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("limit", "requests", "most_at_once"),
    [pytest.param(0, 40, 40, id="no-limit-by-default"), pytest.param(3, 9, 3, id="UPSTREAM_MAX_CONNECTIONS")],
)
def test_upstream_connections_are_limited_only_by_the_setting(
    start_proxy: ProxyFactory, upstream: FakeUpstream, limit: int, requests: int, most_at_once: int
) -> None:
    in_flight = {"now": 0, "most": 0}

    async def slow(request: Request, recorded: Recorded) -> Response:
        in_flight["now"] += 1
        in_flight["most"] = max(in_flight["most"], in_flight["now"])
        # Held until every request arrived (a busy machine may take a while to pass them all on), or, where
        # a limit keeps the rest back, for 0.3 s.
        waited = 0.0
        while in_flight["most"] < requests and waited < (5.0 if not limit else 0.3):
            await asyncio.sleep(0.01)
            waited += 0.01
        in_flight["now"] -= 1
        return JSONResponse(chat_completion(upstream.calls, "m"))

    upstream.handler = slow
    base = start_proxy(**({"upstream_max_connections": limit} if limit else {}))

    async def all_at_once() -> list[int]:
        async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=50)) as http:
            bodies = [{"model": "m", "messages": [{"role": "user", "content": f"q{n}"}]} for n in range(requests)]
            answers = await asyncio.gather(*(http.post(f"{base}/v1/chat/completions", json=b) for b in bodies))
            return [answer.status_code for answer in answers]

    assert asyncio.run(all_at_once()) == [200] * requests
    assert in_flight["most"] == most_at_once
