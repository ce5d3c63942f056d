"""Talking to the provider: the upstream URL, and httpx failures turned into proxy errors."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
import anyio
import httpx

from providers import Provider
from proxy.errors import ProxyError
from proxy.headers import Headers

logger = logging.getLogger("openai_proxy.upstream")

RequestContent = bytes | AsyncIterator[bytes] | None


def upstream_url(provider: Provider, rest: bytes, query: bytes) -> httpx.URL:
    """`{provider base URL}/{rest}?{query}`. Only `rest` comes from the client, and only as a path,
    so no request can choose the host, port or scheme the proxy connects to."""
    base = httpx.URL(provider.base_url)
    path = base.raw_path.split(b"?", 1)[0].rstrip(b"/") + b"/" + rest.lstrip(b"/")
    return base.copy_with(raw_path=path + (b"?" + query if query else b""))


def is_timeout(exc: httpx.HTTPError) -> bool:
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ClientError):
        # The aiohttp transport maps every connection failure (a refused connection too) to a timeout;
        # its own exception says which it was.
        return isinstance(cause, TimeoutError)
    return isinstance(exc, httpx.TimeoutException)


def as_proxy_error(exc: httpx.HTTPError, provider: Provider) -> ProxyError:
    if is_timeout(exc):
        return ProxyError(504, f"The upstream provider '{provider.name}' timed out.", "upstream_timeout")
    return ProxyError(
        502,
        f"The upstream provider '{provider.name}' could not be reached ({type(exc).__name__}).",
        "upstream_unreachable",
    )


async def open_response(
    client: httpx.AsyncClient,
    provider: Provider,
    method: str,
    url: httpx.URL,
    headers: Headers,
    content: RequestContent,
) -> httpx.Response:
    """Send the request and return once the response headers arrived; the body is still to be read.

    Redirects are never followed: a 30x goes back to the client, so our key goes nowhere else.
    """
    request = client.build_request(method, url, headers=headers, content=content)
    try:
        return await client.send(request, stream=True, follow_redirects=False)
    except httpx.HTTPError as exc:
        raise as_proxy_error(exc, provider) from exc


async def read_body(response: httpx.Response, provider: Provider) -> bytes:
    try:
        return await response.aread()
    except httpx.HTTPError as exc:
        raise as_proxy_error(exc, provider) from exc
    finally:
        await close_quietly(response)


async def close_quietly(response: httpx.Response) -> None:
    # Shielded: this runs while a client disconnect cancels the relay, and must still release
    # the upstream connection (closing it is what tells the provider to stop generating).
    with anyio.CancelScope(shield=True):
        try:
            await response.aclose()
        except httpx.HTTPError as exc:
            logger.debug("closing an upstream response failed: %s", type(exc).__name__)
