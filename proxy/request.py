"""What one proxied request asks for: the provider and path it names, and for a cacheable request, its
entry's key and description and the shape of answer it wants."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import orjson

from cache.control import RequestControl
from providers import Provider
from proxy.errors import ProxyError
from proxy.exchange import Exchange
from proxy.headers import Headers, upstream_request_headers
from proxy.upstream import upstream_url

if TYPE_CHECKING:
    from proxy.hit_answers import HitShape

DEFAULT_PROVIDER = "openai"


def resolve_route(raw_path: bytes, providers: Mapping[str, Provider]) -> tuple[Provider, bytes]:
    """The provider a request path names and the path to forward below its base URL.

    `/v1/...` is the default provider's `/v1/...`; `/{provider}/...` is that provider's `/...`.
    """
    prefix, _, rest = raw_path.lstrip(b"/").partition(b"/")
    if prefix == b"v1":
        return providers[DEFAULT_PROVIDER], raw_path.lstrip(b"/")
    provider = providers.get(prefix.decode("latin-1"))
    if provider is None:
        known = ", ".join(f"/{name}/" for name in ["v1", *providers])
        raise ProxyError(404, f"Unknown route. The proxy serves /healthz and these prefixes: {known}", "unknown_route")
    return provider, rest


def parse_json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class Upstream:
    """Where one request goes. The URL and headers are worked out only if it does go (not on a hit)."""

    def __init__(
        self, provider: Provider, rest: bytes, query: bytes, client_headers: Headers, strip_client_credentials: bool
    ) -> None:
        self.provider = provider
        self.rest = rest  # the path below the provider's base URL
        # The query without the credential a provider may take in it (Gemini's `key`), which is kept
        # apart: it goes upstream only when the client's credential is forwarded.
        self.query, self.query_credential = split_query_credential(query, provider.query_credential)
        self.client_headers = client_headers
        self._strip = strip_client_credentials

    @property
    def forwards_client_credential(self) -> bool:
        return self.provider.api_key is None and not self._strip

    @cached_property
    def url(self) -> str:
        query = self.query
        if self.query_credential and self.forwards_client_credential:
            query = b"&".join(part for part in (self.query, self.query_credential) if part)
        return upstream_url(self.provider, self.rest, query)

    @cached_property
    def headers(self) -> Headers:
        return upstream_request_headers(self.client_headers, self.provider, strip_client_credentials=self._strip)

    @property
    def endpoint_path(self) -> str:
        """The path below the provider, with its query (never a credential): what an entry records as its
        endpoint."""
        path = self.rest.decode("latin-1")
        return path + "?" + self.query.decode("latin-1") if self.query else path


def split_query_credential(query: bytes, name: str | None) -> tuple[bytes, bytes]:
    """`query` without its `name=...` parameters, and those parameters (b"" when none): byte for byte, so
    what is forwarded is what the client sent."""
    if name is None or not query:
        return query, b""
    prefix = name.encode() + b"="
    kept: list[bytes] = []
    credential: list[bytes] = []
    for part in query.split(b"&"):
        (credential if part.startswith(prefix) or part == name.encode() else kept).append(part)
    return b"&".join(kept), b"&".join(credential)


@dataclass(slots=True)
class Asked:
    """One cacheable request: its entry's key and description, its cache directives, the body to forward,
    and the shape of answer it wants."""

    key: str
    provider: str
    endpoint_path: str  # the path below the provider, with its query: the entry's `endpoint`
    endpoint: str  # the generation endpoint (`chat/completions`)
    model: str | None
    control: RequestControl
    request: dict[str, Any]  # the parsed body, for the entry's prompt line
    body: bytes  # as forwarded
    wants_stream: bool
    wants_usage: bool
    # The proxy asks the provider for usage this client did not ask for (withheld from its answer).
    asks_usage: bool
    exchange: Exchange | None  # what the access log and metrics learn of the request

    @property
    def hit_shape(self) -> HitShape:
        """What a hit's answer depends on besides its entry (`HitShape`): the key, the endpoint, whether a
        stream is wanted, and usage."""
        return self.key, self.endpoint, self.wants_stream, self.wants_usage

    @property
    def upstream_usage(self) -> bool:
        """Whether the upstream's answer carries usage."""
        return self.wants_usage or self.asks_usage

    def for_exchange(self, exchange: Exchange | None) -> Asked:
        """The same request, asked again in another exchange (`RecentRequests`)."""
        if exchange is not None:
            exchange.model, exchange.key = self.model, self.key
        return Asked(
            self.key,
            self.provider,
            self.endpoint_path,
            self.endpoint,
            self.model,
            self.control,
            self.request,
            self.body,
            self.wants_stream,
            self.wants_usage,
            self.asks_usage,
            exchange,
        )


# Exactly what a request sent: its raw path, query, headers and body.
RequestBytes = tuple[bytes, bytes, tuple[tuple[bytes, bytes], ...], bytes]


class RecentRequests:
    """What the last few cacheable requests asked, by their exact bytes. A request sent again byte for byte
    (the usual hit: a test suite or an evaluation run asking what it asked before) skips parsing its body
    and computing its key, two fifths of the proxy's own work on a hit.

    `Asked` is a function of those bytes and the settings alone, so a request found here is asked exactly
    as if it had been worked out again. A client whose headers change on every request (a request id)
    is never found, and is worked out as before. Bodies over `max_body` bytes are not kept."""

    def __init__(self, entries: int = 256, max_body: int = 16 * 1024) -> None:
        self._entries = entries
        self._max_body = max_body
        self._asked: dict[RequestBytes, Asked] = {}

    def bytes_of(self, scope: Mapping[str, Any], body: bytes) -> RequestBytes | None:
        if len(body) > self._max_body:
            return None
        return (scope.get("raw_path") or b"", scope.get("query_string", b""), tuple(scope["headers"]), body)

    def get(self, request: RequestBytes | None) -> Asked | None:
        if request is None:
            return None
        try:
            return self._asked.get(request)
        except TypeError:  # a server that gives headers as lists (ASGI allows it): never kept
            return None

    def add(self, request: RequestBytes | None, asked: Asked) -> None:
        if request is None or self._entries <= 0:
            return
        try:
            hash(request)
        except TypeError:
            return
        if len(self._asked) >= self._entries:
            del self._asked[next(iter(self._asked))]  # the oldest
        self._asked[request] = asked
