"""A relay pushed from the upstream connection's callbacks to the client's (`UpstreamBody.push`, `DirectBody`),
with a real upstream connection (aiohttp's pool, as the proxy's) and the server's side of one request as the
proxy's protocol gives it: the chunks pass without a task per chunk, a client whose buffer is full holds the
upstream back, and every end (whole, broken off, the client gone) ends the relay as the task-read one does.
The servers' tests drive it end to end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from providers import BUILTIN_PROVIDERS
from proxy.aws import AwsSigner
from proxy.exchange import SCOPE_KEY as EXCHANGE
from proxy.exchange import Exchange
from proxy.responses import RelayResponse, UpstreamBody
from proxy.server import CLIENT_WATCH, ClientWatch
from proxy.settings import Settings
from proxy.upstream import UpstreamClient, UpstreamTransport

pytestmark = pytest.mark.anyio

OPENAI = next(provider for provider in BUILTIN_PROVIDERS if provider.name == "openai")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class ChunkedUpstream:
    """An HTTP/1.1 server on loopback answering one request with a chunked event stream whose chunks the test
    releases (`send`); None ends the body, `break_off` closes the connection mid-body. `sent` counts the
    chunks it wrote; `drained` is set once its socket took them all."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.sent = 0
        self.broken = False
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1/chat/completions"

    def send(self, *chunks: bytes | None) -> None:
        for chunk in chunks:
            self.queue.put_nowait(chunk)

    def break_off(self) -> None:
        self.broken = True
        self.queue.put_nowait(b"")

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        while (chunk := await self.queue.get()) is not None:
            if self.broken:
                writer.transport.abort()
                return
            writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            await writer.drain()
            self.sent += 1
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


class Flow:
    write_paused = False


class Transport:
    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data


class Cycle:
    """The server's side of one request, as the proxy's protocol keeps it: a chunked response whose head was
    sent, its transport, whether the client's buffer is full (`flow.write_paused`) and whether it left."""

    def __init__(self) -> None:
        self.scope = {"method": "POST"}
        self.response_started = False
        self.response_complete = False
        self.chunked_encoding: bool | None = None
        self.disconnected = False
        self.flow = Flow()
        self.transport = Transport()


class Client:
    """The ASGI side of the relay: the messages sent, and the body as the client received it (the chunks
    written straight to the connection, then the end sent as a message)."""

    def __init__(self) -> None:
        self.cycle = Cycle()
        self.watch = ClientWatch(self.cycle)  # type: ignore[arg-type]
        self.exchange = Exchange("POST", "/v1/chat/completions", "127.0.0.1", "test", 0.0, 0.0)
        self.messages: list[dict[str, Any]] = []
        self.left = asyncio.Event()

    def scope(self) -> dict[str, Any]:
        return {CLIENT_WATCH: self.watch, EXCHANGE: self.exchange}

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        if message["type"] == "http.response.start":
            self.cycle.response_started, self.cycle.chunked_encoding = True, True
        elif not message.get("more_body", False):
            self.cycle.response_complete = True

    async def receive(self) -> dict[str, Any]:
        await self.left.wait()
        return {"type": "http.disconnect"}

    def leave(self) -> None:
        self.cycle.disconnected = True
        self.watch.leave()

    @property
    def body(self) -> bytes:
        """The chunks written straight to the connection, unframed."""
        data, chunks = self.cycle.transport.written, []
        while data:
            size, _, rest = data.partition(b"\r\n")
            chunks.append(rest[: int(size, 16)])
            data = rest[int(size, 16) + 2 :]
        return b"".join(chunks)

    @property
    def body_messages(self) -> list[dict[str, Any]]:
        return [message for message in self.messages if message["type"] == "http.response.body"]


@pytest.fixture
async def upstream() -> AsyncIterator[ChunkedUpstream]:
    server = ChunkedUpstream()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def http() -> AsyncIterator[UpstreamClient]:
    client = UpstreamClient(UpstreamTransport(), httpx.Timeout(5), AwsSigner(Settings(_env_file=None)))  # type: ignore[call-arg]
    yield client
    await client.aclose()


class Relaying:
    """A RelayResponse from the upstream to a `Client`, in a task of its own: the chunks the proxy saw
    (`on_chunk`), the ends it reported, and whether the upstream response was closed."""

    def __init__(self, response: httpx.Response, **options: Any) -> None:
        self.upstream_response = response
        self.client = Client()
        self.seen: list[bytes] = []
        self.ends: list[bool] = []
        body = UpstreamBody(response, "openai", on_chunk=self.seen.append)
        headers = [("content-type", "text/event-stream")]
        self.relay = RelayResponse(200, headers, body, on_end=self.ends.append, **options)
        self.task = asyncio.create_task(self.relay(self.client.scope(), self.client.receive, self.client.send))

    async def until(self, condition: Any, what: str) -> None:
        for _ in range(200):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"not within 2 s: {what}")

    async def ended(self) -> None:
        await asyncio.wait_for(self.task, 2)


async def relaying(http: UpstreamClient, upstream: ChunkedUpstream, **options: Any) -> Relaying:
    response = await http.open(OPENAI, "POST", upstream.url, [("content-type", "application/json")], b"{}")
    return Relaying(response, **options)


EVENTS = [b'data: {"n": %d}\n\n' % number for number in range(5)]


async def test_every_chunk_goes_straight_to_the_connection_and_the_end_as_a_message(
    http: UpstreamClient, upstream: ChunkedUpstream
) -> None:
    relay = await relaying(http, upstream)
    upstream.send(*EVENTS, None)
    await relay.ended()

    assert relay.client.body == b"".join(EVENTS)
    assert relay.client.body_messages == [{"type": "http.response.body", "body": b"", "more_body": False}], (
        "no chunk was sent as an ASGI message"
    )
    assert b"".join(relay.seen) == b"".join(EVENTS)
    assert relay.ends == [True]
    assert relay.client.exchange.sent_bytes == len(b"".join(EVENTS))
    assert relay.upstream_response.is_closed


async def test_a_client_whose_buffer_is_full_holds_the_upstream_back_until_it_can_take_more(
    http: UpstreamClient, upstream: ChunkedUpstream
) -> None:
    relay = await relaying(http, upstream)
    cycle = relay.client.cycle
    upstream.send(EVENTS[0])
    await relay.until(lambda: relay.client.body == EVENTS[0], "the first event relayed")
    cycle.flow.write_paused = True
    upstream.send(EVENTS[1])
    await relay.until(lambda: relay.client.body == EVENTS[0] + EVENTS[1], "the event written as the buffer filled")

    upstream.send(*EVENTS[2:])
    await relay.until(lambda: upstream.sent == len(EVENTS), "the upstream sent the rest")
    await asyncio.sleep(0.2)
    assert relay.client.body == EVENTS[0] + EVENTS[1], "nothing more is written while the client's buffer is full"
    assert len(relay.seen) == 2, "nor read from the upstream"

    cycle.flow.write_paused = False
    relay.client.watch.writable()
    upstream.send(None)
    await relay.ended()
    assert relay.client.body == b"".join(EVENTS)
    assert relay.ends == [True]


async def test_an_upstream_that_breaks_off_ends_the_relay_without_a_clean_end(
    http: UpstreamClient, upstream: ChunkedUpstream
) -> None:
    relay = await relaying(http, upstream)
    upstream.send(*EVENTS[:2])
    await relay.until(lambda: relay.client.body == EVENTS[0] + EVENTS[1], "two events relayed")

    upstream.break_off()
    await relay.ended()

    assert relay.client.body_messages == [], "no clean end: the client can tell the answer is incomplete"
    assert relay.ends == [False]
    assert relay.upstream_response.is_closed


async def test_a_client_that_leaves_stops_the_relay_and_closes_the_upstream(
    http: UpstreamClient, upstream: ChunkedUpstream
) -> None:
    relay = await relaying(http, upstream)
    upstream.send(EVENTS[0])
    await relay.until(lambda: relay.client.body == EVENTS[0], "the first event relayed")

    relay.client.leave()
    await relay.ended()

    assert relay.ends == [False]
    assert relay.upstream_response.is_closed


async def test_a_relay_reading_for_others_reads_on_after_its_client_left_with_its_buffer_full(
    http: UpstreamClient, upstream: ChunkedUpstream
) -> None:
    relay = await relaying(http, upstream, on_client_left=lambda: False)
    upstream.send(EVENTS[0])
    await relay.until(lambda: relay.client.body == EVENTS[0], "the first event relayed")
    relay.client.cycle.flow.write_paused = True
    upstream.send(EVENTS[1])
    await relay.until(lambda: len(relay.seen) == 2, "the event read as the buffer filled")

    relay.client.leave()
    upstream.send(*EVENTS[2:], None)
    await relay.ended()

    assert b"".join(relay.seen) == b"".join(EVENTS), "read to the end for the others"
    assert relay.client.body == EVENTS[0] + EVENTS[1], "nothing more sent to the client that left"
    assert relay.ends == [True]
