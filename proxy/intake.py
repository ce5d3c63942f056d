"""What the client sent: its body's framing and the body itself, read within MAX_REQUEST_BYTES."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import ClientDisconnect
from starlette.types import Receive

from proxy.errors import ProxyError
from proxy.headers import Headers


def too_large(limit: int) -> ProxyError:
    return ProxyError(413, f"The request body is larger than the proxy accepts ({limit} bytes).", "request_too_large")


def declared_length(headers: Headers) -> int | None:
    """The body's length the client announced, or None when it sends the body chunked (or none at all).

    Framing that could be read two ways (Content-Length beside Transfer-Encoding, several lengths that
    differ, a length that is not a number) is refused: a server behind us might read it the other way.
    """
    lengths: set[str] = set()
    chunked = False
    for name, value in headers:
        lowered = name.lower()
        if lowered == "content-length":
            lengths.update(part.strip() for part in value.split(","))
        elif lowered == "transfer-encoding":
            chunked = True
    if not lengths:
        return None
    if chunked:
        raise ProxyError(400, "The request has both Content-Length and Transfer-Encoding.", "invalid_framing")
    if len(lengths) > 1 or not all(length.isdigit() for length in lengths):
        raise ProxyError(400, "The request's Content-Length is not one valid number.", "invalid_framing")
    return int(lengths.pop())


def is_chunked(headers: Headers) -> bool:
    return any(name.lower() == "transfer-encoding" for name, _ in headers)


async def read_request_body(receive: Receive, limit: int) -> bytes:
    """The whole body, refused with a 413 as soon as it passes `limit`: nothing past it is kept."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def stream_request_body(receive: Receive) -> AsyncIterator[bytes]:
    """The body as it arrives; only for a body whose Content-Length was checked against the limit."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return
