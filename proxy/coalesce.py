"""Request coalescing (single flight): identical misses in flight at once cost one upstream request.

The first request for a key (the leader) goes upstream; the others (followers) wait for it. A
follower that asked for the same shape of streamed answer receives the leader's chunks live, as
they arrive; any other follower waits for the leader's answer to be stored and is answered from the
cache in its own shape. When the leader fails, followers that have received nothing yet go upstream
themselves at once (never forming a new queue).

The upstream request belongs to everyone listening, not to the client that happened to come first:
each client (the leader's, every follower's) joins its flight and leaves it when it is answered or goes
away, and the upstream request is given up only when the last one left (`on_abandoned`).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Protocol

from starlette.requests import ClientDisconnect

from proxy.client import Client
from proxy.clock import event_loop_time
from proxy.headers import Headers
from proxy.recorded import RecordedBody
from proxy.responses import UpstreamBrokeOff

_STORED_LANDINGS_KEPT = 1024


class FlightMirror(Protocol):
    """Where a leader's flight is also published, for followers in other proxy instances."""

    def started(
        self,
        status: int,
        headers: Sequence[tuple[str, str]],
        streamed: bool,
        with_usage: bool,
        so_far: Callable[[], bytes],
    ) -> None:
        """The flight's answer began. `so_far()` is all of it published until then, for a follower that
        joins late: the mirror keeps no chunks of its own."""

    def publish(self, chunk: bytes) -> None: ...

    def finish(self, complete: bool, stored: bool) -> None: ...

    async def followers(self) -> int:
        """Clients of other instances following the flight now. Raises CacheError when that is unknown."""
        ...


class Flight:
    """One upstream request in progress, as its followers see it."""

    def __init__(self, streamed: bool, with_usage: bool) -> None:
        self.streamed = streamed
        self.with_usage = with_usage
        self.status: int | None = None
        self.headers: Headers = []
        self.recorded = RecordedBody()  # every chunk so far, for followers that join late and for storing
        self.done = False
        self.complete = False
        self.stored = False
        self.mirror: FlightMirror | None = None
        # Clients waiting for or receiving this flight's answer; when the last leaves before it is done,
        # `on_abandoned` gives the upstream request up.
        self.listeners = 0
        self.on_abandoned: Callable[[], None] | None = None
        self._changed: asyncio.Event | None = None  # made when someone waits for a change

    def join(self) -> None:
        self.listeners += 1

    def leave(self) -> None:
        self.listeners -= 1
        if self.listeners <= 0 and not self.done and self.on_abandoned is not None:
            self.on_abandoned()

    def can_relay_to(self, streamed: bool, with_usage: bool) -> bool:
        """Whether a follower asking for this shape can take the leader's bytes live (its usage withheld
        when the follower did not ask for it)."""
        return self.streamed and streamed and (self.with_usage or not with_usage)

    def started(self, status: int, headers: Headers) -> None:
        self.status, self.headers = status, headers
        if self.mirror is not None:
            self.mirror.started(status, headers, self.streamed, self.with_usage, self.recorded.joined)
        self._wake()

    def publish(self, chunk: bytes) -> None:
        self.recorded.add(chunk)
        if self.mirror is not None:
            self.mirror.publish(chunk)
        self._wake()

    def finish(self, complete: bool, stored: bool) -> None:
        """`complete`: the whole answer arrived. `stored`: followers can be answered from the cache."""
        self.done, self.complete, self.stored = True, complete, stored
        # Its callback refers to the flight (and to the task reading it): dropped, the flight is freed by
        # reference counting when its last reader is done, not left for a full garbage collection.
        self.on_abandoned = None
        if self.mirror is not None:
            self.mirror.finish(complete, stored)
        self._wake()

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _change(self) -> asyncio.Event:
        """What is set at the next change (a chunk, the start, the end)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    async def wait_until(self, ready: str, timeout: float) -> bool:
        """Wait for `started` (a status arrived) or `done`; False when `timeout` passed first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (self.done or (ready == "started" and self.status is not None)):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._change().wait(), remaining)
            except TimeoutError:
                return False
        return True

    async def live_chunks(self) -> AsyncGenerator[bytes, None]:
        """Every chunk of the leader's answer, from the first, as they arrive."""
        sent = 0
        while True:
            while sent < self.recorded.size:
                for chunk in self.recorded.since(sent):
                    sent += len(chunk)
                    yield chunk
            if self.done:
                if not self.complete:
                    raise UpstreamBrokeOff("the coalesced request's upstream answer broke off", reported=True)
                return
            await self._change().wait()


class Flights:
    """The flights of one process, by cache key."""

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}
        # Landings so far, and the latest stored landing of each key (the last few hundred keys): a request
        # that looked in the cache just before an identical one stored its answer can tell, and look again.
        self.landings = 0
        self._stored: OrderedDict[str, int] = OrderedDict()

    def get(self, key: str) -> Flight | None:
        return self._flights.get(key)

    def stored_since(self, key: str, landings: int) -> bool:
        """Whether a flight for `key` landed with its answer stored after `landings` was read."""
        return self._stored.get(key, -1) >= landings

    def lead(self, key: str, streamed: bool, with_usage: bool) -> Flight:
        flight = Flight(streamed, with_usage)
        self._flights[key] = flight
        return flight

    def land(self, key: str, flight: Flight, complete: bool, stored: bool) -> None:
        flight.finish(complete, stored)
        if self._flights.get(key) is flight:
            del self._flights[key]
        if stored:
            self._stored[key] = self.landings
            self._stored.move_to_end(key)
            if len(self._stored) > _STORED_LANDINGS_KEPT:
                self._stored.popitem(last=False)
        self.landings += 1


async def wait_while_listened(flight: Flight, ready: str, deadline: float, client: Client) -> bool:
    """`flight.wait_until(ready)` until `deadline` (anyio's clock); ClientDisconnect if the client leaves."""
    waited = asyncio.ensure_future(flight.wait_until(ready, deadline - event_loop_time()))
    stop_watching = client.when_leaving(waited.cancel)
    try:
        return await waited
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
        raise ClientDisconnect() from None
    finally:
        stop_watching()
        waited.cancel()
