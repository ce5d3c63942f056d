"""The HTTP server under the app: uvicorn, with its own protocol errors answered in OpenAI's error shape, a
response's head written together with its body, and answers the app can give at once written without an
ASGI task."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import orjson
from starlette.types import ASGIApp, Scope
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from proxy.errors import error_body

logger = logging.getLogger("openai_proxy")

_RESPONSE_HEAD_START = b"HTTP/1.1 "
_RESPONSE_HEAD_END = b"\r\n\r\n"
# A request body up to this size is read whole before the app is asked for an answer at once: the hits
# worth answering that way have small bodies (`RecentRequests` keeps up to 16 kB), and it stays far below
# the size at which uvicorn stops reading until the app takes the body in.
READ_WHOLE_LIMIT = 16 * 1024
# What uvicorn refuses in a response header's name and value (it answers 500 instead).
_UNSAFE_NAME = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')
_UNSAFE_VALUE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")


class WholeAnswer(Protocol):
    status: int
    raw_headers: list[tuple[bytes, bytes]]  # lower-case names, Content-Length among them
    body: bytes
    # The same headers as written (`header_lines(raw_headers)`), when the app keeps them so; else None.
    head: bytes | None


def header_lines(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """Headers as written in a response's head, one `name: value` line each; None when uvicorn would refuse
    one of them."""
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    if _UNSAFE_NAME.search(b"".join(name for name, _ in headers)) or _UNSAFE_VALUE.search(
        b"".join(value for _, value in headers)
    ):
        return None
    return lines


# The server's default headers (uvicorn makes a new list each second, for the date) as written, kept for
# the list they were written from.
_written_defaults: tuple[list[tuple[bytes, bytes]], bytes | None] = ([], b"")


def _default_lines(defaults: list[tuple[bytes, bytes]]) -> bytes | None:
    global _written_defaults
    written = _written_defaults
    if written[0] is not defaults:
        written = _written_defaults = (defaults, header_lines(defaults))
    return written[1]


AnswerAtOnce = Callable[[Scope, bytes], WholeAnswer | None]

# Where an app finds, in a request's scope, the `ClientWatch` of that request (this server's protocol only).
CLIENT_WATCH = "openai_proxy.client_watch"


class ClientWatch:
    """Tells an app when the client of one request has left before its response was complete, from the
    server's `connection_lost`: an app that relays a long stream need not keep a task waiting on `receive`
    for it. `on_left` is called once, when set by then (set it after checking `left`). `on_writable` is
    called once, when set, as the connection's write buffer drains below its limit (or the client left)."""

    __slots__ = ("left", "on_left", "on_writable", "cycle")

    def __init__(self, cycle: RequestResponseCycle | None = None) -> None:
        self.left = False
        self.on_left: Callable[[], object] | None = None
        self.on_writable: Callable[[], object] | None = None
        self.cycle = cycle

    def leave(self) -> None:
        if self.left:
            return
        self.left = True
        if self.on_left is not None:
            try:
                self.on_left()
            except Exception:
                logger.exception("reacting to a client that left failed unexpectedly")
        self.writable()

    def writable(self) -> None:
        react, self.on_writable = self.on_writable, None
        if react is not None:
            try:
                react()
            except Exception:
                logger.exception("reacting to a client ready for more failed unexpectedly")


class DirectBody:
    """The middle of a response's body, written straight to its connection as uvicorn's `send` writes a body
    message with more to come, but with no ASGI message and nothing to await: a relayed stream's events go
    out from the upstream connection's own callbacks, with no task woken per event (bench/sustained.py
    streams). The head goes before, and the end after, through ASGI as usual."""

    __slots__ = ("_cycle", "_watch")

    def __init__(self, cycle: RequestResponseCycle, watch: ClientWatch) -> None:
        self._cycle = cycle
        self._watch = watch

    @property
    def paused(self) -> bool:
        """Whether the client's write buffer is full: write no more until `when_writable` calls back."""
        cycle = self._cycle
        return cycle.flow.write_paused and not cycle.disconnected

    def when_writable(self, react: Callable[[], object]) -> None:
        """Call `react()` once, when the client can take more or has left."""
        if self.paused:
            self._watch.on_writable = react
        else:
            asyncio.get_running_loop().call_soon(react)

    def write(self, chunk: bytes) -> None:
        """One chunk of the body (nothing once the client left)."""
        cycle = self._cycle
        if chunk and not cycle.disconnected:
            cycle.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))


def direct_body(scope: Scope) -> DirectBody | None:
    """The request's `DirectBody`, once its head was sent, when its body is written in chunks (the way a
    stream of unknown length is); None under another server or for another response."""
    watch: ClientWatch | None = scope.get(CLIENT_WATCH)
    cycle = watch.cycle if watch is not None else None
    if cycle is None or not cycle.response_started or cycle.response_complete or not cycle.chunked_encoding:
        return None
    if cycle.scope["method"] == "HEAD":
        return None
    return DirectBody(cycle, watch)  # type: ignore[arg-type]


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, whose one answer of its own (a 400 for a request that is not valid
    HTTP/1.1, such as Content-Length beside Transfer-Encoding) is JSON like every other error, whose
    responses go out in as few socket writes as they can (`HeadWithBody`), and which asks an app that can
    answer some requests at once (`answer_at_once(scope, body)`, the proxy's hits on requests it has seen)
    before it starts an ASGI task for a small request read whole: such an answer is written straight away,
    with no task, no ASGI messages and none of uvicorn's per-message response writing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Two attributes at most besides uvicorn's: up to 29 in all, Python keeps an instance's attributes
        # in a table shared by the class (300 bytes); past that, each connection has its own (1.6 kB).
        self._reading_whole: tuple[RequestResponseCycle, ASGIApp] | None = None
        # The request whose ASGI task runs (one at a time on a connection), and its watch.
        self._watched: tuple[RequestResponseCycle, ClientWatch] | None = None

    @property
    def _answer_at_once(self) -> AnswerAtOnce | None:
        answer_at_once: AnswerAtOnce | None = getattr(self.app, "answer_at_once", None)
        return answer_at_once

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(HeadWithBody(transport, self.loop))

    def connection_lost(self, exc: Exception | None) -> None:
        self._reading_whole = None
        super().connection_lost(exc)
        watched, self._watched = self._watched, None
        if watched is not None:
            watched[1].cycle = None  # the scope holds the watch: no reference cycle outlives the request
            if not watched[0].response_complete:
                watched[1].leave()

    def on_response_complete(self) -> None:
        if self._watched is not None:
            self._watched[1].cycle = None
        self._watched = None
        super().on_response_complete()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._watched is not None:
            self._watched[1].writable()

    def send_400_response(self, msg: str) -> None:
        body = orjson.dumps(error_body(400, "The request is not valid HTTP/1.1 and was not forwarded.", "invalid_http"))
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        head.extend(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers)
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    # Answers at once

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGIApp) -> None:  # type: ignore[override]
        if app is not self.app or self._answer_at_once is None or not _small_and_whole_once_read(cycle):
            self._start_task(cycle, app)
        elif not cycle.more_body:
            self._answer_or_start(cycle, app)
        elif cycle is self.cycle:
            self._reading_whole = (cycle, app)  # until `on_message_complete`
        else:
            self._start_task(cycle, app)

    def _start_task(self, cycle: RequestResponseCycle, app: ASGIApp) -> None:
        watch = cycle.scope[CLIENT_WATCH] = ClientWatch(cycle)  # type: ignore[literal-required]
        self._watched = (cycle, watch)
        super()._start_asgi_task(cycle, app)  # type: ignore[arg-type]

    def on_message_complete(self) -> None:
        super().on_message_complete()
        reading, self._reading_whole = self._reading_whole, None
        if reading is not None:
            self._answer_or_start(*reading)

    def _answer_or_start(self, cycle: RequestResponseCycle, app: ASGIApp) -> None:
        answer = None
        answer_at_once = self._answer_at_once
        if not cycle.disconnected and not self.flow.write_paused and answer_at_once is not None:
            try:
                answer = answer_at_once(cycle.scope, bytes(cycle.body))  # type: ignore[arg-type]
            except Exception:
                logger.exception("answering a request at once failed unexpectedly; it is served as usual")
        if answer is None or not self._write_whole(cycle, answer):
            self._start_task(cycle, app)

    def _write_whole(self, cycle: RequestResponseCycle, answer: WholeAnswer) -> bool:
        """Write `answer` as uvicorn would write it (its default headers first, `connection: close` when the
        connection is not kept), then end the exchange as uvicorn ends one; False for a status uvicorn does
        not know or a header it would refuse (the task then answers, as uvicorn does: the proxy never gives
        such an answer at once, so it is never counted twice)."""
        status_line = STATUS_LINE.get(answer.status)
        defaults = _default_lines(self.server_state.default_headers)
        head = answer.head if answer.head is not None else header_lines(answer.raw_headers)
        if status_line is None or defaults is None or head is None:
            return False
        closing = b"" if cycle.keep_alive else b"connection: close\r\n"
        cycle.response_started = cycle.response_complete = True
        cycle.waiting_for_100_continue = False
        self.transport.write(b"".join((status_line, defaults, head, closing, b"\r\n", answer.body)))
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()
        return True


def _small_and_whole_once_read(cycle: RequestResponseCycle) -> bool:
    """A request whose body (declared, and small) can be read whole before an answer is looked for."""
    if cycle.scope["method"] != "POST" or cycle.waiting_for_100_continue:
        return False
    length = None
    for name, value in cycle.scope["headers"]:
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return False
            length = int(value)
        elif name == b"transfer-encoding":
            return False
    return length is not None and length <= READ_WHOLE_LIMIT


class HeadWithBody(asyncio.Transport):
    """A connection's transport that holds a response's head (uvicorn writes it on its own) until the body
    is written, and writes both at once: one system call per answer instead of two, a tenth of a hit's
    cost. A head with no body written by the end of this turn of the event loop (a stream whose first
    event is yet to come) goes out then. Every other write goes straight through, in order."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._head is not None:
            data = self._head + data
            self._head = None
        elif isinstance(data, bytes) and data.startswith(_RESPONSE_HEAD_START) and data.endswith(_RESPONSE_HEAD_END):
            self._head = data
            self._loop.call_soon(self._write_head)
            return
        self._transport.write(data)

    def _write_head(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            if not self._transport.is_closing():
                self._transport.write(head)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        self._write_head()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def close(self) -> None:
        self._write_head()
        self._transport.close()

    def abort(self) -> None:
        self._head = None
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            # uvicorn asks for the socket only to read the two addresses, and uvloop builds a socket object
            # on first use (9 us a connection); without one, uvicorn reads them as "sockname" and "peername".
            return default
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + (len(self._head) if self._head is not None else 0)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()
