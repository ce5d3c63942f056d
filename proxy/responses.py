"""Responses the proxy sends: buffered ones with exact headers, and live relays of upstream bodies."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
from collections.abc import AsyncGenerator, Callable
from typing import Any

import httpx
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from cache.stream_usage import UsageWithheld
from proxy.client import Client
from proxy.exchange import Exchange
from proxy.exchange import of as exchange_of
from proxy.headers import Headers
from proxy.recorded import RecordedBody
from proxy.server import DirectBody, direct_body
from proxy.upstream import BodyReader, close_quietly

logger = logging.getLogger("openai_proxy.relay")

# Set in a request's task when its response is cut off on purpose (the upstream broke off, or ran past
# UPSTREAM_TOTAL_TIMEOUT): the proxy logs why, and uvicorn's own complaint that the app returned without
# completing the response is then no error (`CutOffIsNoError`).
_CUT_OFF = contextvars.ContextVar("openai_proxy_cut_off", default=False)
_UNCOMPLETED = "ASGI callable returned without completing response."


class CutOffIsNoError(logging.Filter):
    """Drops uvicorn's error for a response the proxy cut off on purpose; any other stays an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == _UNCOMPLETED and _CUT_OFF.get())


def quiet_deliberate_cut_offs() -> None:
    server_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(existing, CutOffIsNoError) for existing in server_log.filters):
        server_log.addFilter(CutOffIsNoError())


def _encode(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1").lower(), value.encode("latin-1")) for name, value in headers]


def carries_length(status: int) -> bool:
    """Whether a response of this status has a body, and so a Content-Length."""
    return status >= 200 and status not in (204, 304)


class BufferedResponse:
    """A complete response with exactly `headers` (repeats kept) plus its Content-Length, sent as two
    ASGI messages; `on_sent` runs once it was sent, or once sending it failed (the client left): the answer
    is complete either way, and others may be waiting for it to be stored."""

    __slots__ = ("status", "body", "raw_headers", "head", "on_sent")

    def __init__(
        self,
        status: int,
        body: bytes,
        headers: Headers,
        on_sent: Callable[[], None] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.raw_headers = _encode(headers)
        if carries_length(status):
            self.raw_headers.append((b"content-length", b"%d" % len(body)))
        self.head: bytes | None = None
        self.on_sent = on_sent

    @classmethod
    def complete(
        cls, status: int, body: bytes, raw_headers: list[tuple[bytes, bytes]], head: bytes | None = None
    ) -> BufferedResponse:
        """The same response from all its headers, already encoded (lower-case names, the length among them);
        `head`: the same headers as the server writes them (`header_lines`), when the caller keeps them so."""
        response = cls.__new__(cls)
        response.status, response.body, response.raw_headers = status, body, raw_headers
        response.head, response.on_sent = head, None
        return response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": self.body})
        finally:
            if self.on_sent is not None:
                self.on_sent()


class UpstreamBrokeOff(Exception):
    """The upstream body ended before it was complete. `reported`: whoever read the upstream logged it
    already (a coalesced flight's reader), so each client cut off need not say it again."""

    def __init__(self, message: str, reported: bool = False) -> None:
        super().__init__(message)
        self.reported = reported


class UpstreamBody:
    """An upstream body to relay, each chunk also given to `on_chunk` as it came; `on_complete` runs once the
    whole body arrived, before the end is passed on. With `withhold_usage`, the chat stream is passed on as
    a client that did not ask for usage gets it (`as_asked`), here rather than in a generator of its own:
    this runs for every event of every stream.

    Read by a task (`chunks`), or pushed from the upstream connection's callbacks with no task (`push`);
    the upstream response is closed however the reading ends (`close`, for a push).
    """

    __slots__ = ("_reader", "_response", "_provider", "_on_chunk", "_on_complete", "_withheld")

    def __init__(
        self,
        response: httpx.Response,
        provider: str,
        on_chunk: Callable[[bytes], None] | None = None,
        on_complete: Callable[[], None] | None = None,
        withhold_usage: bool = False,
    ) -> None:
        self._reader: BodyReader | None = None
        self._response = response
        self._provider = provider
        self._on_chunk = on_chunk
        self._on_complete = on_complete
        self._withheld = UsageWithheld() if withhold_usage else None

    def _broke_off(self, exc: httpx.HTTPError) -> UpstreamBrokeOff:
        error = UpstreamBrokeOff(f"upstream {self._provider} broke off its response ({type(exc).__name__})")
        error.__cause__ = exc
        return error

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The chunks to pass on, as they arrive."""
        on_chunk, withheld = self._on_chunk, self._withheld
        body = self._reader = BodyReader(self._response)
        try:
            while chunk := await body.read():
                if on_chunk is not None:
                    on_chunk(chunk)
                if withheld is None:
                    yield chunk
                else:
                    passed = withheld.feed(chunk)
                    if passed:
                        yield passed
            if self._on_complete is not None:
                self._on_complete()
        except httpx.HTTPError as exc:
            raise self._broke_off(exc) from exc
        finally:
            await body.close()
        if withheld is not None:
            rest = withheld.end()
            if rest:
                yield rest

    def push(self, deliver: Callable[[bytes], None], ended: Callable[[BaseException | None], None]) -> bool:
        """Pass each chunk on to `deliver` as it arrives, with no task (`BodyReader.push`), then call
        `ended(None)` once the body was whole and passed on, or `ended(error)`: an `UpstreamBrokeOff`, or what
        a callback raised. False, with nothing done, for a body that a task must read (`chunks`)."""
        if self._reader is not None:
            return False
        on_chunk, withheld, on_complete = self._on_chunk, self._withheld, self._on_complete

        def arrived(chunk: bytes) -> None:
            if on_chunk is not None:
                on_chunk(chunk)
            passed = chunk if withheld is None else withheld.feed(chunk)
            if passed:
                deliver(passed)

        def over(error: BaseException | None) -> None:
            if isinstance(error, httpx.HTTPError):
                error = self._broke_off(error)
            elif error is None:
                try:
                    if on_complete is not None:
                        on_complete()
                    rest = withheld.end() if withheld is not None else b""
                    if rest:
                        deliver(rest)
                except Exception as exc:
                    error = exc
            ended(error)

        reader = BodyReader(self._response)
        if not reader.push(arrived, over):
            return False
        self._reader = reader
        return True

    def pause(self) -> None:
        if self._reader is not None:
            self._reader.pause()

    def resume(self) -> None:
        if self._reader is not None:
            self._reader.resume()

    async def close(self) -> None:
        """Stop a push and close the upstream response."""
        if self._reader is not None:
            await self._reader.close()
        else:
            await close_quietly(self._response)


class RelayResponse(Response):
    """Relays an upstream body chunk by chunk, without buffering.

    A client that disconnects cancels the relay at once (not only when the next chunk fails to
    send), which closes the upstream request, unless the relay reads for other clients too. An
    upstream that breaks off ends the client's response the same way: the connection is closed
    without a clean end of body, so the client can tell the answer is incomplete.

    It runs in the request's task with plain asyncio: the client's leaving (`Client`) and a timer for the
    deadline each stop the relay by cancelling that task once (an anyio task group
    and its cancel scopes cost a long stream's first event ten times as much).
    """

    def __init__(
        self,
        status: int,
        headers: Headers,
        chunks: UpstreamBody | AsyncGenerator[bytes, None],
        on_end: Callable[[bool], None] | None = None,
        deadline: float = math.inf,
        on_client_left: Callable[[], bool] | None = None,
    ) -> None:
        """`on_end(completed)` runs however the relay ends; `completed` says whether the whole body was read
        (and sent, unless the client had left). Past `deadline` (the event loop's clock) the relay is cut off
        like an upstream that broke off. `on_client_left()` runs when the client leaves before the end: the
        relay stops then unless it returns False (it reads on for others, sending nothing more, until
        `cancel`)."""
        self.status_code = status
        self.raw_headers = _encode(headers)
        self.chunks = chunks
        self.on_end = on_end
        self.deadline = deadline
        self.on_client_left = on_client_left
        self.background = None
        self._task: asyncio.Task[Any] | None = None
        self._relaying = False
        self._stopped = False
        self._given_up = False
        self._client_gone = False
        self._done = False

    def cancel(self) -> None:
        """Stop relaying (the upstream request is closed), as when the client leaves."""
        self._given_up = True
        self._stop()

    def done(self) -> bool:
        return self._done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        stop_watching = Client(scope, receive).when_leaving(self._client_left)
        timer = loop.call_at(self.deadline, self._stop) if self.deadline < math.inf else None
        completed = False
        try:
            if self._given_up:
                # Given up before it began: it still opens the upstream's body, only to close it properly.
                loop.call_soon(self._stop)
            completed = await self._relay_until_stopped(scope, send)
            if not completed:
                _CUT_OFF.set(True)
            if not completed and loop.time() >= self.deadline:
                logger.warning(
                    "the upstream did not finish its answer within UPSTREAM_TOTAL_TIMEOUT;"
                    " the client's response was cut off"
                )
        finally:
            stop_watching()
            if timer is not None:
                timer.cancel()
            self._task, self._done = None, True
            # Not awaited, so nothing (a shutdown) can cut short what must happen at the end: queueing the
            # answer to be stored, releasing the flight's followers.
            if self.on_end is not None:
                self.on_end(completed)

    async def _relay_until_stopped(self, scope: Scope, send: Send) -> bool:
        """`_relay`, False when `_stop` cut it short; any other cancellation goes on."""
        self._relaying = True
        try:
            return await self._relay(scope, send)
        except asyncio.CancelledError:
            # `_stop` cancels only while the task waits in `_relay`'s reading or sending, so it arrives here.
            if self._stopped and self._task is not None and self._task.uncancel() == 0:
                return False
            raise
        finally:
            self._relaying = False

    def _stop(self) -> None:
        if self._relaying and not self._stopped and self._task is not None:
            self._stopped = True
            self._task.cancel()

    async def _relay(self, scope: Scope, send: Send) -> bool:
        """Relay every chunk; True when the whole body reached the client. An upstream body goes straight
        from the upstream's connection to the client's where the server allows (`direct_body`)."""
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        chunks, pushed = self.chunks, None
        if isinstance(chunks, UpstreamBody):
            direct = direct_body(scope)
            pushed = self._push(chunks, direct, exchange_of(scope)) if direct is not None else None
        try:
            if pushed is not None:
                await pushed
            else:
                if isinstance(chunks, UpstreamBody):
                    chunks = chunks.chunks()
                async for chunk in chunks:
                    if not self._client_gone:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamBrokeOff as exc:
            if not exc.reported:
                logger.warning("%s; the client's response was cut off the same way", exc)
            return False
        finally:
            self._relaying = False  # closing the upstream is not to be cut short
            await (chunks.close() if isinstance(chunks, UpstreamBody) else chunks.aclose())
        if not self._client_gone:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True

    def _push(self, body: UpstreamBody, direct: DirectBody, exchange: Exchange | None) -> asyncio.Future[None] | None:
        """Pass the body on with no task woken per chunk: each is written to the client from the upstream
        connection's callbacks (`UpstreamBody.push`), and reading stops while the client's buffer is full.
        The future ends with the body (an `UpstreamBrokeOff` if it broke off); None when it cannot be pushed."""
        finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def deliver(chunk: bytes) -> None:
            if self._client_gone:
                return
            direct.write(chunk)
            if exchange is not None:
                exchange.sent(len(chunk))
            if direct.paused:
                body.pause()
                direct.when_writable(body.resume)

        def ended(error: BaseException | None) -> None:
            if finished.done():
                return
            if error is None:
                finished.set_result(None)
            else:
                finished.set_exception(error)

        return finished if body.push(deliver, ended) else None

    def _client_left(self) -> None:
        if self.on_client_left is None or self.on_client_left():
            self._stop()
        else:
            self._client_gone = True  # reading on for others: nothing more is sent


class Recording:
    """A body kept as it passes, until it grows past `limit` (then it is too large to store)."""

    __slots__ = ("_recorded", "_size", "_limit")

    def __init__(self, limit: int) -> None:
        self._recorded: RecordedBody | None = RecordedBody()
        self._size = 0
        self._limit = limit

    def add(self, chunk: bytes) -> None:
        if self._recorded is not None:
            self._size += len(chunk)
            if self._size > self._limit:
                self._recorded = None  # keep relaying, stop holding it
            else:
                self._recorded.add(chunk)

    @property
    def whole(self) -> bool:
        return self._recorded is not None

    def body(self) -> bytes:
        return self._recorded.joined() if self._recorded is not None else b""


def as_asked(chunks: AsyncGenerator[bytes, None], withhold_usage: bool) -> AsyncGenerator[bytes, None]:
    """A chat stream in the shape the client asked for: without the usage the proxy asked for on its own."""
    return _without_usage(chunks) if withhold_usage else chunks


async def _without_usage(chunks: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    withheld = UsageWithheld()
    try:
        async for chunk in chunks:
            passed = withheld.feed(chunk)
            if passed:
                yield passed
    finally:
        await chunks.aclose()
    rest = withheld.end()
    if rest:
        yield rest
