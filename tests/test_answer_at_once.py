"""Hits the server writes without an ASGI task: a request sent before byte for byte, whose entry is in memory,
is answered within the read that completed it, with the very bytes the app would have sent, and every other
request goes to the app as before. Driven through the server's protocol with a transport that records."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import pytest
import uvicorn
from uvicorn.server import ServerState

from openai_proxy import create_app
from proxy.server import READ_WHOLE_LIMIT, HttpProtocol
from proxy.settings import Settings
from tests import test_server
from tests.conftest import PROXY_OPENAI_KEY, FakeClock
from tests.servers import FakeUpstream

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Recorder(test_server.Recorder):
    """The server test's transport, with what a protocol asks of a connection's transport."""

    @property
    def written(self) -> bytes:
        return b"".join(self.writes)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((value for key, value in self.headers if key == name), None)


@dataclass
class ResponseReader:
    """httptools callbacks: the complete responses in what the server wrote."""

    complete: list[Response] = field(default_factory=list)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    parser: Any = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete.append(Response(self.parser.get_status_code(), self.headers, bytes(self.body)))
        self.headers, self.body = [], bytearray()


def responses(written: bytes) -> list[Response]:
    reader = ResponseReader()
    reader.parser = httptools.HttpResponseParser(reader)
    reader.parser.feed_data(written)
    return reader.complete


class Connection:
    """One client connection to the server's protocol."""

    def __init__(self, app: Any, state: ServerState) -> None:
        config = uvicorn.Config(app, http=HttpProtocol, log_level="warning", proxy_headers=False)
        config.load()
        self.state = state
        self.transport = Recorder()
        self.protocol = HttpProtocol(config=config, server_state=state, app_state={}, _loop=asyncio.get_running_loop())
        self.protocol.connection_made(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def answered(self) -> list[Response]:
        return responses(self.transport.written)

    async def until_answered(self, count: int) -> list[Response]:
        for _ in range(500):
            answered = self.answered()
            if len(answered) >= count and not self.state.tasks:
                return answered
            await asyncio.sleep(0.01)
        raise AssertionError(f"{len(self.answered())} answers, {count} expected")


def chat_request(prompt: str, *extra_headers: bytes, body: bytes | None = None) -> bytes:
    if body is None:
        body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"%s"}]}' % prompt.encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\ncontent-type: application/json\r\n"
    head += b"".join(header + b"\r\n" for header in extra_headers)
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


@pytest.fixture
async def server(upstream: FakeUpstream, tmp_path: Path) -> AsyncIterator[Callable[[], Connection]]:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        openai_base_url=upstream.url,
        openai_api_key=PROXY_OPENAI_KEY,
        cache_db=tmp_path / "cache.db",
    )
    app = create_app(settings, clock=FakeClock())
    state = ServerState()
    state.default_headers = [(b"date", b"Mon, 07 Dec 2026 07:00:00 GMT"), (b"server", b"uvicorn")]
    async with app.lifespan():
        yield lambda: Connection(app, state)


async def asked_once(connection: Connection, request: bytes) -> Response:
    """Ask through the app (a task), and wait for its answer."""
    before = len(connection.answered())
    connection.send(request)
    assert connection.state.tasks, "a request not seen before goes to the app"
    return (await connection.until_answered(before + 1))[-1]


async def test_a_request_sent_again_is_answered_within_the_read_that_completed_it(
    server: Callable[[], Connection], upstream: FakeUpstream
) -> None:
    connection = server()
    request = chat_request("at once")
    first = await asked_once(connection, request)
    assert first.header(b"x-cache-status") == b"MISS"

    connection.send(request)

    assert not connection.state.tasks, "no task was started"
    answered = connection.answered()
    assert len(answered) == 2, "the answer was written before the read returned"
    assert answered[1].header(b"x-cache-status") == b"HIT"
    assert answered[1].body == first.body
    assert len(upstream.requests) == 1


async def test_an_answer_at_once_has_the_bytes_the_app_would_have_sent(server: Callable[[], Connection]) -> None:
    connection = server()
    await asked_once(connection, chat_request("same bytes"))
    connection.send(chat_request("same bytes"))
    at_once = connection.answered()[-1]
    # Another header makes it another request to the server (not seen byte for byte): the app answers it.
    by_the_app = await asked_once(connection, chat_request("same bytes", b"x-trace: 1"))

    assert by_the_app.header(b"x-cache-status") == b"HIT"
    assert at_once.status == by_the_app.status == 200
    assert at_once.body == by_the_app.body
    assert at_once.headers == by_the_app.headers
    assert at_once.header(b"server") == b"uvicorn", "the server's own headers come first, as uvicorn writes them"


async def test_a_body_that_comes_in_pieces_is_answered_once_it_is_whole(server: Callable[[], Connection]) -> None:
    connection = server()
    request = chat_request("in pieces")
    await asked_once(connection, request)
    head_end = request.index(b"\r\n\r\n") + 4

    connection.send(request[:head_end])
    connection.send(request[head_end : head_end + 10])
    assert len(connection.answered()) == 1 and not connection.state.tasks, "waits for the body, with no task"
    connection.send(request[head_end + 10 :])

    answered = connection.answered()
    assert len(answered) == 2 and answered[1].header(b"x-cache-status") == b"HIT"


async def test_pipelined_requests_are_answered_in_order(server: Callable[[], Connection]) -> None:
    connection = server()
    seen = chat_request("pipelined")
    await asked_once(connection, seen)

    connection.send(seen + chat_request("pipelined, new") + seen)

    answered = await connection.until_answered(4)
    assert [response.header(b"x-cache-status") for response in answered[1:]] == [b"HIT", b"MISS", b"HIT"]


async def test_a_connection_the_client_closes_is_closed_after_the_answer(server: Callable[[], Connection]) -> None:
    connection = server()
    request = chat_request("closing", b"connection: close")
    await asked_once(server(), request)  # the answer is stored; that connection is done

    connection.send(request)

    answered = connection.answered()
    assert len(answered) == 1 and answered[0].header(b"x-cache-status") == b"HIT"
    assert answered[0].header(b"connection") == b"close"
    assert connection.transport.closed


async def test_only_small_declared_bodies_wait_to_be_read_whole(server: Callable[[], Connection]) -> None:
    large = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"%s"}]}' % (b"x" * READ_WHOLE_LIMIT)
    for request in (chat_request("", body=large), chat_request("continue", b"expect: 100-continue")):
        connection = server()
        connection.send(request[: request.index(b"\r\n\r\n") + 4])
        assert connection.state.tasks, "the app starts at once, as uvicorn starts it"
        connection.send(request[request.index(b"\r\n\r\n") + 4 :])
        await connection.until_answered(1)

    small = server()
    request = chat_request("small")
    small.send(request[: request.index(b"\r\n\r\n") + 4])
    assert not small.state.tasks, "a small body is read whole first"
    small.send(request[request.index(b"\r\n\r\n") + 4 :])
    assert (await small.until_answered(1))[0].status == 200


async def test_a_client_that_leaves_before_its_body_is_whole_costs_nothing(
    server: Callable[[], Connection], upstream: FakeUpstream
) -> None:
    connection = server()
    request = chat_request("left")
    connection.send(request[:-5])
    connection.protocol.connection_lost(None)
    await asyncio.sleep(0.05)
    assert not connection.state.tasks and connection.answered() == []
    assert upstream.requests == []


class BrokenAnswers:
    """An app whose answers at once fail: the request must still be answered, by the app itself."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    def answer_at_once(self, scope: Any, body: bytes) -> None:
        raise RuntimeError("a bug")


async def test_an_answer_at_once_that_fails_leaves_the_request_to_the_app(caplog: pytest.LogCaptureFixture) -> None:
    connection = Connection(BrokenAnswers(), ServerState())
    with caplog.at_level(logging.ERROR, logger="openai_proxy"):
        connection.send(chat_request("broken"))
        answered = await connection.until_answered(1)
    assert answered[0].body == b"ok"
    assert "answering a request at once failed" in caplog.text


@dataclass
class Unwritable:
    status: int = 200
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=lambda: [(b"x-bad", b"a\x01b")])
    body: bytes = b"{}"
    head: bytes | None = None


class UnwritableAnswers(BrokenAnswers):
    def __init__(self, answer: Unwritable) -> None:
        self.answer = answer

    def answer_at_once(self, scope: Any, body: bytes) -> Unwritable:  # type: ignore[override]
        return self.answer


@pytest.mark.parametrize(
    "answer",
    [Unwritable(), Unwritable(status=700, raw_headers=[(b"content-length", b"2")])],
    ids=["a header uvicorn refuses", "a status uvicorn does not know"],
)
async def test_an_answer_uvicorn_would_not_write_is_left_to_the_app(answer: Unwritable) -> None:
    connection = Connection(UnwritableAnswers(answer), ServerState())
    connection.send(chat_request("unwritable"))
    answered = await connection.until_answered(1)
    assert answered[0].status == 200 and answered[0].body == b"ok" and answered[0].header(b"x-bad") is None


async def test_an_entry_the_server_could_not_write_is_not_answered_at_once(server: Callable[[], Connection]) -> None:
    connection = server()
    request = chat_request("odd content type")
    first = await asked_once(connection, request)
    proxy = connection.protocol.app.proxy
    key = first.header(b"x-cache-key").decode()  # type: ignore[union-attr]
    while proxy.stores.waiting_entry(key) is not None:
        await asyncio.sleep(0.01)
    entry = proxy.backend.held(key)
    assert entry is not None
    proxy.backend.hot.put(key, dataclasses.replace(entry, content_type="application/json\x01"))

    connection.send(request)

    assert connection.state.tasks, "left to the app"
    while connection.state.tasks:
        await asyncio.sleep(0.01)
    assert connection.transport.closed, "uvicorn refuses the header and drops the connection, as before"
    await proxy.statistics.flush()
    assert (await proxy.statistics.figures()).hits == 1, "the hit is counted once"
