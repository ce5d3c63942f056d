"""One proxied request: route it, answer it from the cache or the upstream, and store what may be stored."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response

from cache import CacheBackend, CachedResponse, CacheError, CacheHealth, cache_key, generation_endpoint
from cache.health import Operation
from cache.keys import credential_scope, is_storable
from cache.replay import Replay, replay
from providers import Provider
from proxy.errors import ProxyError, error_response
from proxy.headers import Headers, client_response_headers, upstream_request_headers
from proxy.responses import RelayResponse, buffered_response, upstream_chunks
from proxy.settings import Settings
from proxy.upstream import RequestContent, open_response, read_body, upstream_url

logger = logging.getLogger("openai_proxy")

DEFAULT_PROVIDER = "openai"


@dataclass(frozen=True)
class PendingEntry:
    """Where and how the answer to one cacheable request will be stored."""

    key: str
    provider: str
    endpoint_path: str
    endpoint: str
    model: str | None


class CacheStatus(StrEnum):
    HIT = "HIT"
    MISS = "MISS"
    BYPASS = "BYPASS"


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
        raise ProxyError(
            404, f"Unknown route. The proxy serves /healthz and these prefixes: {known}", "unknown_route"
        )
    return provider, rest


def parse_json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _client_headers(request: Request) -> Headers:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in request.headers.raw]


def _has_body(headers: Headers) -> bool:
    for name, value in headers:
        lowered = name.lower()
        if lowered == "transfer-encoding" or (lowered == "content-length" and value.strip() != "0"):
            return True
    return False


class Proxy:
    def __init__(
        self,
        settings: Settings,
        backend: CacheBackend,
        health: CacheHealth,
        http: httpx.AsyncClient,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.providers = settings.providers()
        self.key_config = settings.key_config()
        self.backend = backend
        self.health = health
        self.http = http
        self.clock = clock

    async def handle(self, request: Request) -> Response:
        try:
            return await self._handle(request)
        except ProxyError as error:
            return error_response(error)

    async def _handle(self, request: Request) -> Response:
        provider, rest = resolve_route(
            request.scope.get("raw_path") or request.url.path.encode(), self.providers
        )
        query: bytes = request.scope.get("query_string", b"")
        url = upstream_url(provider, rest, query)
        client_headers = _client_headers(request)
        headers = upstream_request_headers(client_headers, provider)
        endpoint_path = rest.decode("latin-1")
        endpoint = generation_endpoint(endpoint_path)
        if request.method != "POST" or endpoint is None:
            return await self._pass_through(request, provider, url, headers, client_headers)

        body = await request.body()
        payload = parse_json_object(body)
        if payload is None:
            return await self._relay(provider, "POST", url, headers, body, CacheStatus.BYPASS)
        if self.settings.override_model and "model" in payload:
            payload["model"] = self.settings.override_model
            body = json.dumps(payload).encode()
        if query:
            endpoint_path += "?" + query.decode("latin-1")
        scope = "" if provider.api_key is not None else credential_scope(client_headers)
        model = payload.get("model")
        pending = PendingEntry(
            key=cache_key(provider.name, endpoint_path, payload, self.key_config, scope=scope),
            provider=provider.name,
            endpoint_path=endpoint_path,
            endpoint=endpoint,
            model=model if isinstance(model, str) else None,
        )
        wants_stream = payload.get("stream") is True
        stream_options = payload.get("stream_options")
        wants_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True

        status = CacheStatus.MISS
        if self.settings.respond_with_cache:
            try:
                entry = await self.backend.get(pending.key)
            except CacheError as exc:
                self.health.failed(Operation.READ, exc)
                status = CacheStatus.BYPASS
            else:
                self.health.succeeded(Operation.READ)
                answer = replay(entry, endpoint, wants_stream, wants_usage) if entry is not None else None
                if entry is not None and answer is not None:
                    return self._hit(entry, answer, pending.key)
        storing = self.settings.store_cache and status is not CacheStatus.BYPASS
        if wants_stream:
            return await self._relay(
                provider, "POST", url, headers, body, status, pending=pending, store=storing
            )

        try:
            upstream = await open_response(self.http, provider, "POST", url, headers, body)
            answer_body = await read_body(upstream, provider)
        except ProxyError as error:
            error.headers.update(self._cache_headers(status, pending.key))
            raise
        upstream_headers = upstream.headers.multi_items()
        if storing:
            await self._store(pending, upstream.status_code, upstream_headers, answer_body)
        return buffered_response(
            upstream.status_code,
            answer_body,
            [*client_response_headers(upstream_headers), *self._cache_headers(status, pending.key)],
        )

    async def _store(self, pending: PendingEntry, status: int, headers: Headers, body: bytes) -> None:
        if not is_storable(status, headers, body, pending.endpoint):
            return
        content_type = next((value for name, value in headers if name.lower() == "content-type"), "")
        entry = CachedResponse(
            status=status,
            content_type=content_type,
            body=body,
            created_at=self.clock(),
            provider=pending.provider,
            endpoint=pending.endpoint_path,
            model=pending.model,
        )
        try:
            await self.backend.set(pending.key, entry)
        except CacheError as exc:
            self.health.failed(Operation.WRITE, exc)
        else:
            self.health.succeeded(Operation.WRITE)

    def _hit(self, entry: CachedResponse, answer: Replay, key: str) -> Response:
        age = max(0, int(self.clock() - entry.created_at))
        headers = [
            ("content-type", answer.content_type),
            ("age", str(age)),
            *self._cache_headers(CacheStatus.HIT, key),
        ]
        return buffered_response(entry.status, answer.body, headers)

    @staticmethod
    def _cache_headers(status: CacheStatus, key: str | None) -> Headers:
        headers = [("x-cache-status", status.value)]
        if key is not None:
            headers.append(("x-cache-key", key))
        return headers

    async def _pass_through(
        self, request: Request, provider: Provider, url: httpx.URL, headers: Headers, client_headers: Headers
    ) -> Response:
        content: RequestContent = None
        if _has_body(client_headers):
            content = request.stream()
            headers = [*headers, *((n, v) for n, v in client_headers if n.lower() == "content-length")]
        return await self._relay(provider, request.method, url, headers, content, CacheStatus.BYPASS)

    async def _relay(
        self,
        provider: Provider,
        method: str,
        url: httpx.URL,
        headers: Headers,
        content: RequestContent,
        status: CacheStatus,
        *,
        pending: PendingEntry | None = None,
        store: bool = False,
    ) -> Response:
        """Relay the upstream answer as it arrives; with `store`, record it and store it once it completed."""
        key = pending.key if pending is not None else None
        try:
            upstream = await open_response(self.http, provider, method, url, headers, content)
        except ProxyError as error:
            error.headers.update(self._cache_headers(status, key))
            raise
        upstream_headers = upstream.headers.multi_items()
        response_headers = [*client_response_headers(upstream_headers), *self._cache_headers(status, key)]
        if pending is None or not store:
            return RelayResponse(
                upstream.status_code, response_headers, upstream_chunks(upstream, provider.name)
            )

        recorded: list[bytes] = []

        async def store_recording() -> None:
            await self._store(pending, upstream.status_code, upstream_headers, b"".join(recorded))

        chunks = upstream_chunks(upstream, provider.name, record=recorded)
        return RelayResponse(upstream.status_code, response_headers, chunks, on_complete=store_recording)
