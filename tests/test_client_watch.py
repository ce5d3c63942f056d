"""The server tells an app when the client of a request in progress leaves (`ClientWatch`), from its
`connection_lost`, and only for a request whose response had not ended; and lets it write the middle of a
chunked body straight to the connection (`DirectBody`), telling it when a full buffer drains. Driven through
the server's protocol with a transport that records."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from proxy.server import CLIENT_WATCH, ClientWatch, DirectBody, direct_body
from tests.test_answer_at_once import Connection

pytestmark = pytest.mark.anyio

REQUEST = b"GET /stream HTTP/1.1\r\nhost: test\r\n\r\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class App:
    """Answers each request's head, then its body once `finish` is set; keeps each request's watch."""

    def __init__(self) -> None:
        self.watches: list[ClientWatch] = []
        self.told: list[ClientWatch] = []
        self.finish = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        watch = scope[CLIENT_WATCH]
        self.watches.append(watch)
        watch.on_left = lambda: self.told.append(watch)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await self.finish.wait()
        await send({"type": "http.response.body", "body": b"ok"})


async def started(app: App) -> Connection:
    connection = Connection(app, ServerState())
    connection.send(REQUEST)
    for _ in range(100):
        if app.watches:
            return connection
        await asyncio.sleep(0.01)
    raise AssertionError("the app was not called")


async def test_a_client_that_leaves_during_its_response_is_told_to_the_app_at_once() -> None:
    app = App()
    connection = await started(app)

    connection.protocol.connection_lost(None)

    assert app.told == app.watches and app.watches[0].left
    app.finish.set()


async def test_a_client_that_leaves_after_its_response_ended_is_not_told() -> None:
    app = App()
    connection = await started(app)
    app.finish.set()
    await connection.until_answered(1)

    connection.protocol.connection_lost(None)

    assert app.told == [] and not app.watches[0].left


async def test_the_server_adds_at_most_two_attributes_to_a_connection_of_uvicorn_s() -> None:
    # Up to 29 attributes, Python keeps an instance's attributes in a table its class shares (300 bytes);
    # one more, and each connection has a table of its own (1.6 kB per connection, thousands of streams).
    ours = Connection(App(), ServerState()).protocol
    config = uvicorn.Config(App(), log_level="warning")
    config.load()
    loop = asyncio.get_running_loop()
    theirs = HttpToolsProtocol(config=config, server_state=ServerState(), app_state={}, _loop=loop)
    assert len(vars(ours)) - len(vars(theirs)) <= 2
    assert len(vars(ours)) <= 29


class StreamingApp:
    """Sends a head (chunked, or with `headers`), then writes `chunks` with the server's `DirectBody`, then
    ends the body as a message once `finish` is set."""

    def __init__(self, *chunks: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.chunks = chunks
        self.headers = headers if headers is not None else [(b"content-type", b"text/event-stream")]
        self.before_head: DirectBody | None = None
        self.direct: DirectBody | None = None
        self.watch: ClientWatch | None = None
        self.finish = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.watch = scope[CLIENT_WATCH]
        self.before_head = direct_body(scope)
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        self.direct = direct_body(scope)
        if self.direct is not None:
            for chunk in self.chunks:
                self.direct.write(chunk)
        await self.finish.wait()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def streaming(app: StreamingApp) -> Connection:
    connection = Connection(app, ServerState())
    connection.send(REQUEST)
    for _ in range(100):
        if app.watch is not None:
            return connection
        await asyncio.sleep(0.01)
    raise AssertionError("the app was not called")


async def test_a_chunked_body_written_straight_to_the_connection_is_framed_as_uvicorn_frames_it() -> None:
    app = StreamingApp(b"data: 1\n\n", b"", b"data: 2\n\n")
    connection = await streaming(app)
    app.finish.set()
    (answer,) = await connection.until_answered(1)

    assert app.before_head is None, "not before the head was sent"
    assert app.direct is not None
    assert answer.status == 200 and answer.body == b"data: 1\n\ndata: 2\n\n"
    assert connection.transport.written.endswith(b"\r\n\r\n9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n")


async def test_a_body_of_declared_length_is_not_written_straight_to_the_connection() -> None:
    app = StreamingApp(headers=[(b"content-length", b"0")])
    connection = await streaming(app)
    app.finish.set()
    await connection.until_answered(1)

    assert app.direct is None


async def test_a_full_buffer_is_told_and_its_draining_or_the_client_leaving_calls_back_once() -> None:
    app = StreamingApp()
    connection = await streaming(app)
    direct = app.direct
    assert direct is not None and not direct.paused
    called: list[str] = []

    connection.protocol.pause_writing()
    assert direct.paused
    direct.when_writable(lambda: called.append("writable"))
    connection.protocol.resume_writing()
    connection.protocol.resume_writing()
    assert called == ["writable"] and not direct.paused

    connection.protocol.pause_writing()
    direct.when_writable(lambda: called.append("left"))
    connection.protocol.connection_lost(None)
    assert called == ["writable", "left"]
    assert not direct.paused, "nothing waits on a client that left"
    direct.write(b"data: 3\n\n")
    assert b"data: 3" not in connection.transport.written
    app.finish.set()
