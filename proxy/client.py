"""The client of one request, while the proxy works out and sends its answer: whether and when it leaves."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.types import Receive, Scope

from proxy.server import CLIENT_WATCH, ClientWatch

StopWatching = Callable[[], object]


class Client:
    """Tells the proxy when the client of a request leaves: from the proxy's own server (`ClientWatch`,
    no task at all), or under another server from a task waiting on `receive` for the disconnect."""

    __slots__ = ("receive", "watch")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.receive = receive
        self.watch: ClientWatch | None = scope.get(CLIENT_WATCH)

    def when_leaving(self, react: Callable[[], object]) -> StopWatching:
        """Call `react()` once if the client leaves (soon after this returns, when it left already), until
        the function returned is called. One reaction at a time per request."""
        loop = asyncio.get_running_loop()
        watch = self.watch
        if watch is None:
            waiting = loop.create_task(client_left(self.receive))

            def ended(done: asyncio.Task[None]) -> None:
                if not done.cancelled():
                    done.exception()  # a `receive` that failed cannot tell any more: taken as the client gone
                    react()

            waiting.add_done_callback(ended)
            return waiting.cancel
        if watch.left:
            return loop.call_soon(react).cancel
        watch.on_left = react
        return lambda: _unset(watch, react)


def _unset(watch: ClientWatch, react: Callable[[], object]) -> None:
    if watch.on_left is react:
        watch.on_left = None


async def client_left(receive: Receive) -> None:
    """Return once the client has disconnected (its request body already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
