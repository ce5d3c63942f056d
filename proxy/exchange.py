"""One request and its response as the access log and the metrics see them, measured at the ASGI edge."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from starlette.types import Message, Scope, Send

from cache.stats import RequestRecord

# Client-chosen text kept for the access log and the dashboard is cut to this many characters.
RECORDED_TEXT_LIMIT = 200
KEY_PREFIX_LENGTH = 12

# Where the proxy's handler finds the exchange of the request it serves, to say what it was.
SCOPE_KEY = "openai_proxy.exchange"


@dataclass(slots=True)
class Exchange:
    method: str
    path: str
    client: str
    user_agent: str
    started: float  # time.perf_counter()
    at: float  # time.time(), for the log line
    provider: str | None = None
    endpoint: str | None = None
    model: str | None = None
    key: str | None = None
    status: int = 0
    cache_status: str | None = None
    coalesced: bool = False
    streamed: bool = False
    sent_bytes: int = 0
    first_byte: float | None = None
    ended: float | None = None

    def sent(self, size: int) -> None:
        """Note `size` bytes of the body sent."""
        if size:
            if self.first_byte is None:
                self.first_byte = time.perf_counter()
            self.sent_bytes += size

    @property
    def duration(self) -> float:
        return (self.ended if self.ended is not None else time.perf_counter()) - self.started

    @property
    def time_to_first_byte(self) -> float | None:
        return self.first_byte - self.started if self.first_byte is not None else None


def begin(scope: Scope) -> Exchange:
    user_agent = ""
    for name, value in scope.get("headers", ()):
        if name == b"user-agent":
            user_agent = value.decode("latin-1")
            break
    client = scope.get("client")
    # Positional: a request's exchange is made on every request, hits included.
    exchange = Exchange(
        scope.get("method", ""),
        scope.get("path", ""),
        client[0] if client else "-",
        user_agent,
        time.perf_counter(),  # started
        time.time(),  # at
    )
    scope[SCOPE_KEY] = exchange
    return exchange


def of(scope: Scope) -> Exchange | None:
    exchange: Exchange | None = scope.get(SCOPE_KEY)
    return exchange


def observing(send: Send, exchange: Exchange) -> Send:
    """`send`, noting the status, cache status, bytes and first body byte of the response on the way."""

    async def observed(message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            exchange.sent(len(message.get("body", b"")))
            if not message.get("more_body", False):
                exchange.ended = time.perf_counter()  # work done after the answer (storing it) is not its time
        elif kind == "http.response.start":
            exchange.status = message["status"]
            _note_headers(exchange, message.get("headers", ()))
        await send(message)

    return observed


def answered_at_once(exchange: Exchange, status: int, headers: Any, body: bytes) -> None:
    """Note a whole answer written in one piece (no ASGI messages), as `observing` notes one sent in them."""
    exchange.status = status
    _note_headers(exchange, headers)
    exchange.ended = time.perf_counter()
    if body:
        exchange.first_byte = exchange.ended
        exchange.sent_bytes = len(body)


def _note_headers(exchange: Exchange, headers: Any) -> None:
    # The handler sets what it decided (provider, key, cache status); the response's shape is seen here.
    for name, value in headers:
        if name == b"content-type" and value.startswith(b"text/event-stream"):
            exchange.streamed = True


def request_record(exchange: Exchange) -> RequestRecord:
    """What the dashboard keeps of a proxied request: never a credential, a body or the query string."""
    return RequestRecord(
        at=exchange.at,
        method=exchange.method[:RECORDED_TEXT_LIMIT],
        path=exchange.path[:RECORDED_TEXT_LIMIT],
        provider=exchange.provider,
        endpoint=exchange.endpoint,
        model=exchange.model[:RECORDED_TEXT_LIMIT] if exchange.model is not None else None,
        status=exchange.status,
        cache_status=exchange.cache_status,
        coalesced=exchange.coalesced,
        streamed=exchange.streamed,
        duration_ms=round(exchange.duration * 1000, 3),
        bytes=exchange.sent_bytes,
        key=exchange.key[:KEY_PREFIX_LENGTH] if exchange.key is not None else None,
    )
