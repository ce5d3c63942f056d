"""The server tells an app when the client of a request in progress leaves (`ClientWatch`), from its
`connection_lost`, and only for a request whose response had not ended. Driven through the server's
protocol with a transport that records."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from proxy.server import CLIENT_WATCH, ClientWatch
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
