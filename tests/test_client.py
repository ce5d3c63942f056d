"""`Client.when_leaving`: the proxy learns that a request's client left from its own server (`ClientWatch`,
no task), or under another server from `receive`. Both ways react once, and not after watching stopped."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.client import Client
from proxy.server import CLIENT_WATCH, ClientWatch

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Connection:
    """A request's ASGI side whose client the test makes leave, told by the server when `watched`."""

    def __init__(self, watched: bool) -> None:
        self.watch = ClientWatch() if watched else None
        self.gone = asyncio.Event()
        self.receives = 0

    async def receive(self) -> dict[str, Any]:
        self.receives += 1
        await self.gone.wait()
        return {"type": "http.disconnect"}

    def client(self) -> Client:
        scope = {CLIENT_WATCH: self.watch} if self.watch is not None else {}
        return Client(scope, self.receive)

    def leave(self) -> None:
        self.gone.set()
        if self.watch is not None:
            self.watch.leave()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture(params=[False, True], ids=["told through receive", "told by the server"])
def connection(request: pytest.FixtureRequest) -> Connection:
    return Connection(watched=bool(request.param))


async def test_a_client_that_leaves_is_reacted_to_once(connection: Connection) -> None:
    reactions: list[str] = []
    stop = connection.client().when_leaving(lambda: reactions.append("left"))
    await settle()
    assert reactions == []

    connection.leave()
    await settle()
    stop()
    await settle()

    assert reactions == ["left"]
    if connection.watch is not None:
        assert connection.receives == 0, "a client the server watches is not waited for through receive"
        assert connection.watch.on_left is None


async def test_no_reaction_once_watching_stopped(connection: Connection) -> None:
    reactions: list[str] = []
    stop = connection.client().when_leaving(lambda: reactions.append("left"))
    await settle()
    stop()

    connection.leave()
    await settle()

    assert reactions == []


async def test_a_client_that_left_already_is_reacted_to_after_the_call_returns() -> None:
    connection = Connection(watched=True)
    connection.leave()
    reactions: list[str] = []

    connection.client().when_leaving(lambda: reactions.append("left"))
    assert reactions == [], "not from within the call: its caller has not yet set up what the reaction stops"
    await settle()

    assert reactions == ["left"]


async def test_stopping_before_a_reaction_to_a_client_that_left_already_prevents_it() -> None:
    connection = Connection(watched=True)
    connection.leave()
    reactions: list[str] = []

    connection.client().when_leaving(lambda: reactions.append("left"))()
    await settle()

    assert reactions == []


async def test_stopping_leaves_another_reaction_set_meanwhile_in_place() -> None:
    connection = Connection(watched=True)
    client = connection.client()
    reactions: list[str] = []
    stop_first = client.when_leaving(lambda: reactions.append("first"))
    stop_first()
    client.when_leaving(lambda: reactions.append("second"))
    stop_first()

    connection.leave()

    assert reactions == ["second"]


async def test_a_receive_that_fails_is_taken_as_the_client_gone() -> None:
    async def failing_receive() -> dict[str, Any]:
        raise RuntimeError("the server's receive broke")

    reactions: list[str] = []
    Client({}, failing_receive).when_leaving(lambda: reactions.append("left"))
    await settle()

    assert reactions == ["left"]
