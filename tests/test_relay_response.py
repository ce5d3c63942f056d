"""RelayResponse on its own: how each way of stopping a relay ends it (the servers' tests drive it end to end).
A client's leaving reaches it either from the proxy's server (`ClientWatch`) or, under another server, through
`receive`; the tests of leaving run both ways."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from proxy.responses import RelayResponse
from proxy.server import CLIENT_WATCH, ClientWatch

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
    """The ASGI side: what was sent, and a disconnect the test can cause (`leave`), told through the server's
    `ClientWatch` when `watched`, else through `receive`."""

    def __init__(self, watched: bool) -> None:
        self.sent: list[dict[str, Any]] = []
        self.gone = asyncio.Event()
        self.watch = ClientWatch() if watched else None
        self.received = 0

    def leave(self) -> None:
        self.gone.set()
        if self.watch is not None:
            self.watch.leave()

    def scope(self) -> dict[str, Any]:
        return {CLIENT_WATCH: self.watch} if self.watch is not None else {}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def receive(self) -> dict[str, Any]:
        self.received += 1
        await self.gone.wait()
        return {"type": "http.disconnect"}

    @property
    def body(self) -> bytes:
        return b"".join(message.get("body", b"") for message in self.sent)

    @property
    def ended_cleanly(self) -> bool:
        return any(message.get("more_body") is False for message in self.sent)


class Relaying:
    """A relay between an `Upstream` and a `Client`, run in a task of its own, and the ends it reported."""

    def __init__(self, watched: bool = False, **options: Any) -> None:
        self.upstream, self.client, self.ends = Upstream(), Client(watched), list[bool]()

        def on_end(completed: bool) -> None:
            self.ends.append(completed)

        headers = [("content-type", "text/event-stream")]
        self.response = RelayResponse(200, headers, self.upstream.chunks(), on_end=on_end, **options)

    def start(self, *chunks: bytes | None) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self.response(self.client.scope(), self.client.receive, self.client.send))
        self.send(*chunks)
        return self.task

    def send(self, *chunks: bytes | None) -> None:
        """Chunks from the upstream; None ends its body."""
        for chunk in chunks:
            self.upstream.queue.put_nowait(chunk)

    async def relaying_a_first_chunk(self) -> None:
        self.start(b"a")
        await settle()

    async def ended(self) -> tuple[bytes, bool, list[bool], bool]:
        """What the client received, whether it ended cleanly, the ends reported, whether the upstream closed."""
        await asyncio.wait_for(self.task, 1)
        if self.client.watch is not None:
            assert self.client.received == 0, "a watched client is not waited for through receive"
            assert self.client.watch.on_left is None, "the watch no longer calls a relay that ended"
        return self.client.body, self.client.ended_cleanly, self.ends, self.upstream.closed


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture(params=[False, True], ids=["told through receive", "told by the server"])
def watched(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


async def test_a_whole_body_is_relayed_and_ends_cleanly() -> None:
    relay = Relaying()
    relay.start(b"a", b"b", None)

    assert await relay.ended() == (b"ab", True, [True], True)


async def test_a_client_that_leaves_stops_the_relay_and_closes_the_upstream(watched: bool) -> None:
    relay = Relaying(watched)
    await relay.relaying_a_first_chunk()

    relay.client.leave()

    assert await relay.ended() == (b"a", False, [False], True)


async def test_a_relay_reading_for_others_goes_on_after_its_client_left_and_sends_nothing_more(watched: bool) -> None:
    relay = Relaying(watched, on_client_left=lambda: False)
    await relay.relaying_a_first_chunk()

    relay.client.leave()
    await settle()
    relay.send(b"b", None)

    assert await relay.ended() == (b"a", False, [True], True)


async def test_cancelling_a_relay_stops_it_like_a_client_leaving() -> None:
    relay = Relaying()
    await relay.relaying_a_first_chunk()

    relay.response.cancel()

    assert await relay.ended() == (b"a", False, [False], True)
    assert relay.response.done()


async def test_a_relay_given_up_before_it_began_closes_its_upstream() -> None:
    relay = Relaying()
    relay.response.cancel()
    relay.start()

    assert await relay.ended() == (b"", False, [False], True)


async def test_a_relay_past_its_deadline_is_cut_off() -> None:
    relay = Relaying(deadline=asyncio.get_running_loop().time() + 0.05)
    relay.start(b"a")

    assert await relay.ended() == (b"a", False, [False], True)


async def test_a_cancellation_from_outside_goes_on_after_the_relay_ended() -> None:
    # A server cancelling the request's task (a shutdown) is not the relay stopping itself: the task ends
    # cancelled, and the end still runs.
    relay = Relaying()
    await relay.relaying_a_first_chunk()

    relay.task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await relay.ended()
    assert (relay.ends, relay.upstream.closed) == ([False], True)


async def test_a_cancellation_from_outside_at_the_moment_the_client_leaves_goes_on_too(watched: bool) -> None:
    relay = Relaying(watched)
    await relay.relaying_a_first_chunk()

    relay.client.leave()
    if not watched:
        await asyncio.sleep(0)  # the watching task runs and stops the relay (the server's watch does at once)
    relay.task.cancel()  # the relay's task has yet to see that it was stopped

    with pytest.raises(asyncio.CancelledError):
        await relay.ended()
    assert (relay.ends, relay.upstream.closed) == ([False], True)


async def test_a_client_the_server_saw_leave_before_the_relay_began_stops_it_at_once() -> None:
    relay = Relaying(watched=True)
    relay.client.leave()
    relay.start(b"a")

    body, ended_cleanly, ends, closed = await relay.ended()
    assert (ended_cleanly, ends, closed) == (False, [False], True)
