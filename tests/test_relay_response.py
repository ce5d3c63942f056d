"""RelayResponse on its own: how each way of stopping a relay ends it (the servers' tests drive it end to end)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from proxy.responses import RelayResponse

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Upstream:
    """Chunks handed out as the test releases them; whether the relay closed it."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.closed = False

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        try:
            while (chunk := await self.queue.get()) is not None:
                yield chunk
        finally:
            self.closed = True


class Client:
    """The ASGI side: what was sent, and a disconnect the test can cause."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.gone = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    @property
    def body(self) -> bytes:
        return b"".join(message.get("body", b"") for message in self.sent)

    @property
    def ended_cleanly(self) -> bool:
        return any(message.get("more_body") is False for message in self.sent)


def relay(upstream: Upstream, ends: list[bool], **options: Any) -> RelayResponse:
    async def on_end(completed: bool) -> None:
        ends.append(completed)

    return RelayResponse(200, [("content-type", "text/event-stream")], upstream.chunks(), on_end=on_end, **options)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_whole_body_is_relayed_and_ends_cleanly() -> None:
    upstream, client, ends = Upstream(), Client(), []
    running = asyncio.create_task(relay(upstream, ends)({}, client.receive, client.send))
    for chunk in (b"a", b"b", None):
        upstream.queue.put_nowait(chunk)

    await asyncio.wait_for(running, 1)

    assert (client.body, client.ended_cleanly, ends, upstream.closed) == (b"ab", True, [True], True)


async def test_a_client_that_leaves_stops_the_relay_and_closes_the_upstream() -> None:
    upstream, client, ends = Upstream(), Client(), []
    running = asyncio.create_task(relay(upstream, ends)({}, client.receive, client.send))
    upstream.queue.put_nowait(b"a")
    await settle()

    client.gone.set()
    await asyncio.wait_for(running, 1)

    assert (client.body, client.ended_cleanly, ends, upstream.closed) == (b"a", False, [False], True)


async def test_a_relay_reading_for_others_goes_on_after_its_client_left_and_sends_nothing_more() -> None:
    upstream, client, ends = Upstream(), Client(), []
    running = asyncio.create_task(relay(upstream, ends, on_client_left=lambda: False)({}, client.receive, client.send))
    upstream.queue.put_nowait(b"a")
    await settle()

    client.gone.set()
    await settle()
    for chunk in (b"b", None):
        upstream.queue.put_nowait(chunk)
    await asyncio.wait_for(running, 1)

    assert (client.body, client.ended_cleanly, ends, upstream.closed) == (b"a", False, [True], True)


async def test_cancelling_a_relay_stops_it_like_a_client_leaving() -> None:
    upstream, client, ends = Upstream(), Client(), []
    response = relay(upstream, ends)
    running = asyncio.create_task(response({}, client.receive, client.send))
    upstream.queue.put_nowait(b"a")
    await settle()

    response.cancel()
    await asyncio.wait_for(running, 1)

    assert (client.body, ends, upstream.closed, response.done()) == (b"a", [False], True, True)


async def test_a_relay_given_up_before_it_began_closes_its_upstream() -> None:
    upstream, client, ends = Upstream(), Client(), []
    response = relay(upstream, ends)
    response.cancel()

    await asyncio.wait_for(response({}, client.receive, client.send), 1)

    assert (client.body, client.ended_cleanly, ends, upstream.closed) == (b"", False, [False], True)


async def test_a_relay_past_its_deadline_is_cut_off() -> None:
    upstream, client, ends = Upstream(), Client(), []
    deadline = asyncio.get_running_loop().time() + 0.05
    running = asyncio.create_task(relay(upstream, ends, deadline=deadline)({}, client.receive, client.send))
    upstream.queue.put_nowait(b"a")

    await asyncio.wait_for(running, 1)

    assert (client.body, client.ended_cleanly, ends, upstream.closed) == (b"a", False, [False], True)


async def test_a_cancellation_from_outside_goes_on_after_the_relay_ended() -> None:
    # A server cancelling the request's task (a shutdown) is not the relay stopping itself: the task ends
    # cancelled, and the end still runs.
    upstream, client, ends = Upstream(), Client(), []
    running = asyncio.create_task(relay(upstream, ends)({}, client.receive, client.send))
    upstream.queue.put_nowait(b"a")
    await settle()

    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 1)

    assert (ends, upstream.closed) == ([False], True)


async def test_a_cancellation_from_outside_at_the_moment_the_client_leaves_goes_on_too() -> None:
    upstream, client, ends = Upstream(), Client(), []
    running = asyncio.create_task(relay(upstream, ends)({}, client.receive, client.send))
    upstream.queue.put_nowait(b"a")
    await settle()

    client.gone.set()
    await asyncio.sleep(0)  # the watcher runs and stops the relay; the task has yet to see it
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 1)

    assert (ends, upstream.closed) == ([False], True)
