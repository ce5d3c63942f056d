"""Talking to the provider: the upstream URL, the connection pools, and httpx failures turned into proxy errors."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable
from functools import lru_cache
from typing import Any

import aiohttp
import httpx
import yarl
from httpx_aiohttp import AiohttpTransport

from providers import AuthStyle, Provider
from proxy.aws import AwsSigner
from proxy.errors import ProxyError
from proxy.headers import Headers
from proxy.shielded import shielded

logger = logging.getLogger("openai_proxy.upstream")

RequestContent = bytes | AsyncIterator[bytes] | None

# How long an idle upstream connection is kept for reuse. A connection the upstream closes just as the
# proxy sends on it fails that request with a 502 (a POST is never retried), so the proxy must give up
# on it first. Servers nearby are often uvicorn (vLLM, most Python servers), which closes after 5 s, and a
# new connection to them costs next to nothing; public providers keep theirs a minute or more, and a new
# one costs a TLS handshake.
NEARBY_KEEPALIVE_SECONDS = 4.0
REMOTE_KEEPALIVE_SECONDS = 30.0
_NEARBY_SUFFIXES = (".localhost", ".local", ".internal", ".lan", ".home.arpa")


def upstream_url(provider: Provider, rest: bytes, query: bytes) -> str:
    """`{provider base URL}/{rest}?{query}`. Only `rest` comes from the client, and only after the base
    URL's own path, so no request can choose the host, port or scheme the proxy connects to."""
    if not provider.base_url:
        setting = provider.base_url_setting.upper()
        if provider.regional_base_url:
            setting = f"AWS_REGION (or {setting})"
        raise ProxyError(
            503,
            f"The proxy has no upstream for '{provider.name}': set {setting} (see the README's Providers).",
            "provider_not_configured",
            error_type="configuration_error",
        )
    url = provider.base_url + "/" + rest.decode("latin-1").lstrip("/")
    return url + "?" + query.decode("latin-1") if query else url


@lru_cache(maxsize=4096)
def parsed_url(url: str) -> httpx.URL:
    # Parsing a URL is a third of building an httpx.Request; a proxy sends the same few URLs again and again.
    return httpx.URL(url)


@lru_cache(maxsize=256)
def is_nearby(host: str) -> bool:
    """On this machine or a private network: an address that is not global (loopback, private, link-local,
    shared), `localhost`, a name with no dot (a container or a host on the LAN) or a private-use suffix."""
    host = host.strip("[]").rstrip(".").lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost" or "." not in host or host.endswith(_NEARBY_SUFFIXES)
    return not address.is_global


class UpstreamTransport(httpx.AsyncBaseTransport):
    """aiohttp's connection pool under httpx (measured in bench/throughput.py: httpx's own pool serves a
    few hundred misses a second at 32 concurrent clients, aiohttp's several times more), with one pool
    for upstreams nearby and one for remote ones, each keeping idle connections as long as suits them."""

    def __init__(
        self,
        max_connections: int = 0,
        nearby_keepalive: float = NEARBY_KEEPALIVE_SECONDS,
        remote_keepalive: float = REMOTE_KEEPALIVE_SECONDS,
    ) -> None:
        """`max_connections`: open upstream connections per pool, at most (0: no limit); requests beyond
        it wait for a connection (UPSTREAM_MAX_CONNECTIONS)."""
        self.nearby = _pooled_transport(nearby_keepalive, max_connections)
        self.remote = _pooled_transport(remote_keepalive, max_connections)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        transport = self.nearby if is_nearby(request.url.host) else self.remote
        return await transport.handle_async_request(request)

    async def aclose(self) -> None:
        try:
            await self.nearby.aclose()
        finally:
            await self.remote.aclose()


def _pooled_transport(keepalive: float, max_connections: int) -> AiohttpTransport:
    def session() -> aiohttp.ClientSession:
        # Built on first use, inside the event loop. One session serves every client, so it must not keep
        # one upstream answer's cookies and send them on behalf of the next client.
        connector = aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=keepalive)
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    return AiohttpTransport(client=session)


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


class UpstreamClient:
    """The proxy's one HTTP client: httpx requests and responses over a transport chosen by measurement.

    It calls the transport directly. A proxy wants none of AsyncClient's client-side features (a cookie
    jar shared by every client, redirects, auth, default headers), and skipping them is most of the
    cost of a miss (bench/throughput.py). Redirects are never followed: a 30x goes back to the client,
    so our key goes nowhere else.
    """

    def __init__(self, transport: httpx.AsyncBaseTransport, timeout: httpx.Timeout, signer: AwsSigner) -> None:
        self.transport = transport
        self.timeout = timeout.as_dict()
        self.signer = signer

    async def open(
        self, provider: Provider, method: str, url: str, headers: Headers, content: RequestContent
    ) -> httpx.Response:
        """Send the request and return once the response headers arrived; the body is still to be read.
        A request to a SigV4 provider without a credential of its own is signed here (its body in hand)."""
        if provider.auth is AuthStyle.SIGV4 and not any(name.lower() == "authorization" for name, _ in headers):
            if not isinstance(content, bytes | None):
                raise TypeError("a request to be signed needs its whole body")
            # Signed as it will be sent: aiohttp requotes a URL (a model id's `%3A` goes out as `:`).
            url = str(yarl.URL(url))
            headers = await self.signer.sign(method, url, headers, content or b"")
        request = _request(method, parsed_url(url), headers, content, {"timeout": self.timeout})
        try:
            response = await self.transport.handle_async_request(request)
        except httpx.HTTPError as exc:
            raise as_proxy_error(exc, provider) from exc
        response.request = request
        return response

    async def aclose(self) -> None:
        await self.transport.aclose()


def _request(
    method: str, url: httpx.URL, headers: Headers, content: RequestContent, extensions: dict[str, Any]
) -> httpx.Request:
    """The httpx request to send. A whole body goes as a stream already read, which skips httpx's framing
    headers: aiohttp sets `Host` and `Content-Length` itself as it sends, and httpx's own pass over the
    headers to add them (several scans of every header, and a second copy of them) was most of the cost
    of building a request: 20-25 us of CPU per request, measured alone against aiohttp with the same options."""
    if content is None or isinstance(content, bytes):
        request = httpx.Request(
            method, url, headers=headers, stream=httpx.ByteStream(content or b""), extensions=extensions
        )
        request.read()
        return request
    return httpx.Request(method, url, headers=headers, content=content, extensions=extensions)


class BodyReader:
    """An upstream response's body, read chunk by chunk as it arrives (decoded if it has a content encoding),
    either with `read` or, without a task, pushed to callbacks (`push`).

    Read straight from aiohttp's stream under httpx-aiohttp's: two iterator layers less on every event of
    every stream. And UPSTREAM_TIMEOUT between chunks is counted here, lazily: aiohttp's own read timer is
    made again and cancelled on every chunk received (7 us of a relayed event's 60 on this machine), while
    this one is looked at once per UPSTREAM_TIMEOUT and counts only the time a read waits for the upstream,
    never the time the proxy spends sending to a slow client, as aiohttp's does not either. aiohttp's timer
    still covers the wait for the response's head.
    """

    __slots__ = (
        "_response",
        "_content",
        "_chunks",
        "_silence",
        "_loop",
        "_waiting_since",
        "_watch",
        "_pushed_to",
        "_ready",
        "_paused",
    )

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        stream = response.stream
        raw: aiohttp.ClientResponse | None = getattr(stream, "_aiohttp_response", None)
        self._content: aiohttp.StreamReader | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        if raw is None or "content-encoding" in response.headers or not isinstance(raw, aiohttp.ClientResponse):
            # httpx's decoder (or another transport's stream); its chunks pass httpx's re-chunker only then.
            self._chunks = response.aiter_bytes().__aiter__()
        else:
            self._content = raw.content
            if raw.connection is not None and raw.connection.protocol is not None:
                raw.connection.protocol.read_timeout = None
        self._silence: float | None = response.request.extensions.get("timeout", {}).get("read")
        self._loop = asyncio.get_running_loop()
        self._waiting_since: float | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._pushed_to: tuple[Callable[[bytes], None], Callable[[BaseException | None], None]] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._paused = False

    async def read(self) -> bytes:
        """The next chunk; b"" once the body is whole. A failure is an httpx.HTTPError (httpx.ReadTimeout when
        the upstream sent nothing for UPSTREAM_TIMEOUT)."""
        content = self._content
        if content is None:
            assert self._chunks is not None
            return await anext(self._chunks, b"")
        self._await_upstream()
        try:
            return await content.readany()
        except aiohttp.ClientError as exc:
            raise _as_httpx_error(exc) from exc
        finally:
            self._waiting_since = None

    def push(self, on_chunk: Callable[[bytes], None], on_end: Callable[[BaseException | None], None]) -> bool:
        """Read the rest of the body with no task: `on_chunk(chunk)` for each chunk as it arrives, called from
        the event loop's callbacks, then `on_end(None)` once the body is whole, or `on_end(error)` when reading
        fails (an httpx.HTTPError, as `read` raises) or `on_chunk` raised `error`; nothing more after that,
        nor after `close`. False, with nothing done, for a body that only `read` can read (a decoded one)."""
        if self._content is None or self._pushed_to is not None:
            return False
        self._pushed_to = (on_chunk, on_end)
        self._loop.call_soon(self._pump)
        return True

    def pause(self) -> None:
        """Pass nothing more to `on_chunk` until `resume` (the upstream is held back once aiohttp's buffer is
        full). Not waiting for the upstream meanwhile, the reader's silence is not counted."""
        self._paused = True
        self._waiting_since = None

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self._loop.call_soon(self._pump)

    def _pump(self, ready: asyncio.Future[None] | None = None) -> None:
        """Pass on what aiohttp holds, then wait (`_ready`) for more, without a task."""
        if ready is not None:
            if ready is not self._ready:
                return  # one let go of (`_let_go`)
            self._ready = None
            if not ready.cancelled():
                ready.exception()  # an error is read from the stream below
        pushed_to, content = self._pushed_to, self._content
        if pushed_to is None or content is None or self._paused:
            return
        self._let_go()
        self._waiting_since = None
        on_chunk, on_end = pushed_to
        try:
            while not self._paused and self._pushed_to is not None:
                chunk = content.read_nowait(-1)
                if chunk:
                    on_chunk(chunk)
                elif content.is_eof():
                    self._end(None)
                    return
                else:
                    break
        except aiohttp.ClientError as exc:
            self._end(_as_httpx_error(exc))
            return
        except Exception as exc:
            self._end(exc)
            return
        if self._pushed_to is None or self._paused:
            return
        # As aiohttp's own `readany` waits: its stream wakes the future it finds on more data, the end or an error.
        ready = self._ready = self._loop.create_future()
        ready.add_done_callback(self._pump)
        content._waiter = ready
        self._await_upstream()

    def _end(self, error: BaseException | None) -> None:
        pushed_to, self._pushed_to = self._pushed_to, None
        self._let_go()
        if pushed_to is not None:
            pushed_to[1](error)

    def _let_go(self) -> None:
        ready, self._ready = self._ready, None
        if ready is not None and self._content is not None and self._content._waiter is ready:
            self._content._waiter = None

    def _await_upstream(self) -> None:
        self._waiting_since = since = self._loop.time()
        if self._watch is None and self._silence is not None:
            self._watch = self._loop.call_at(since + self._silence, self._check_silence)

    def _check_silence(self) -> None:
        assert self._silence is not None and self._content is not None
        since, now = self._waiting_since, self._loop.time()
        if since is not None and now - since >= self._silence:
            self._watch = None
            self._content.set_exception(aiohttp.SocketTimeoutError("the upstream sent nothing for UPSTREAM_TIMEOUT"))
        else:
            self._watch = self._loop.call_at((now if since is None else since) + self._silence, self._check_silence)

    async def close(self) -> None:
        """Stop watching for silence and pushing, and close the response (`close_quietly`), however the reading
        ended."""
        self._pushed_to = None
        self._let_go()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        await close_quietly(self._response)


def _as_httpx_error(exc: aiohttp.ClientError) -> httpx.HTTPError:
    timed_out = isinstance(exc, TimeoutError)
    error = (httpx.ReadTimeout if timed_out else httpx.ReadError)(str(exc) or type(exc).__name__)
    error.__cause__ = exc
    return error


async def read_body(response: httpx.Response, provider: Provider) -> bytes:
    body = BodyReader(response)
    chunks = []
    try:
        while chunk := await body.read():
            chunks.append(chunk)
        return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise as_proxy_error(exc, provider) from exc
    finally:
        await body.close()


async def close_quietly(response: httpx.Response) -> None:
    # Shielded: this runs while a client disconnect cancels the relay, and must still release
    # the upstream connection (closing it is what tells the provider to stop generating).
    try:
        await shielded(response.aclose())
    except httpx.HTTPError as exc:
        logger.debug("closing an upstream response failed: %s", type(exc).__name__)
