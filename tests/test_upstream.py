"""The upstream connection pools: which hosts count as nearby, and how long idle connections are kept."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import anyio
import httpx
import pytest

from proxy.upstream import UpstreamTransport, is_nearby
from tests.servers import SocketServer


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
    """Answers every request with a small JSON body and keeps the connection open."""

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
