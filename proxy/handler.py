"""One proxied request: route it, answer it from the cache or the upstream, and store what may be stored."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Mapping, Sequence
from enum import StrEnum
from functools import cached_property
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import anyio
import httpx
import orjson
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from cache import CacheBackend, CachedResponse, CacheError, CacheHealth, cache_key, generation_endpoint
from cache.control import ControlError, RequestControl, is_fresh, request_control
from cache.health import Operation
from cache.keys import credential_scope, is_storable
from cache.preview import prompt_preview
from cache.replay import Replay, is_event_stream, replay
from cache.stream_usage import UsageWithheld, ask_for_usage
from cache.usage import reported_usage
from providers import Provider
from proxy.access import presents_key
from proxy.coalesce import Flight, FlightMirror, Flights
from proxy.errors import ProxyError, error_response
from proxy.exchange import of as exchange_of
from proxy.headers import Headers, client_response_headers, scope_headers, upstream_request_headers
from proxy.intake import declared_length, is_chunked, read_request_body, stream_request_body, too_large
from proxy.responses import BufferedResponse, RelayResponse, UpstreamBrokeOff, upstream_chunks
from proxy.settings import Settings
from proxy.statistics import Statistics
from proxy.upstream import RequestContent, UpstreamClient, close_quietly, read_body, upstream_url

if TYPE_CHECKING:
    from cache.redis_flights import RedisFlights

logger = logging.getLogger("openai_proxy")

DEFAULT_PROVIDER = "openai"
T = TypeVar("T")


class PendingEntry(NamedTuple):
    """Where and how the answer to one cacheable request will be stored (a tuple: built on every request)."""

    key: str
    provider: str
    endpoint_path: str
    endpoint: str
    model: str | None
    namespace: str
    ttl: int | None
    request: dict[str, Any]  # the parsed body, for the entry's prompt line


class Stale(NamedTuple):
    """An expired entry kept to answer with if the upstream fails (CACHE_STALE_IF_ERROR)."""

    entry: CachedResponse
    answer: Replay
    pending: PendingEntry


class CacheStatus(StrEnum):
    HIT = "HIT"
    MISS = "MISS"
    BYPASS = "BYPASS"
    EXPIRED = "EXPIRED"
    REFRESH = "REFRESH"
    STALE = "STALE"


def _failed_upstream(status: int) -> bool:
    """An upstream answer that CACHE_STALE_IF_ERROR replaces with an expired entry."""
    return status >= 500 or status == 429


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
        self._rest = rest
        self._query = query
        self._client_headers = client_headers
        self._strip = strip_client_credentials

    @cached_property
    def url(self) -> str:
        return upstream_url(self.provider, self._rest, self._query)

    @cached_property
    def headers(self) -> Headers:
        return upstream_request_headers(self._client_headers, self.provider, strip_client_credentials=self._strip)


class Proxy:
    def __init__(
        self,
        settings: Settings,
        backend: CacheBackend,
        health: CacheHealth,
        http: UpstreamClient,
        statistics: Statistics,
        clock: Callable[[], float] = time.time,
        shared_flights: RedisFlights | None = None,
    ) -> None:
        """`shared_flights`: coalescing across instances, when they share a Redis."""
        self.settings = settings
        self.providers = settings.providers()
        self.key_config = settings.key_config()
        self.proxy_keys = [key.get_secret_value() for key in settings.proxy_api_keys]
        self.backend = backend
        self.health = health
        self.http = http
        self.statistics = statistics
        self.clock = clock
        self.flights = Flights()
        self.shared_flights = shared_flights
        self._relays: set[asyncio.Task[None]] = set()
        self.total_timeout = settings.upstream_total_timeout or math.inf

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The proxy as an ASGI application: no framework routing on the way to a hit."""
        try:
            response = await self._handle(scope, receive)
        except ProxyError as error:
            response = error_response(error)
        except ClientDisconnect:
            return
        except Exception:
            # The boundary of the application: a bug becomes a logged 500, not a dropped connection.
            logger.exception("unexpected error while serving %s %s", scope["method"], scope["path"])
            response = error_response(ProxyError(500, "The proxy failed unexpectedly; see its log.", "internal_error"))
        await response(scope, receive, send)

    async def _handle(self, scope: Scope, receive: Receive) -> ASGIApp:
        client_headers = scope_headers(scope)
        length = declared_length(client_headers)
        if length is not None and length > self.settings.max_request_bytes:
            raise too_large(self.settings.max_request_bytes)
        if self.proxy_keys and not presents_key(client_headers, self.proxy_keys):
            raise ProxyError(
                401, "A valid proxy API key is required (Authorization: Bearer or x-api-key).", "invalid_api_key"
            )
        provider, rest = resolve_route(scope.get("raw_path") or scope["path"].encode(), self.providers)
        exchange = exchange_of(scope)
        query: bytes = scope.get("query_string", b"")
        strip_client_key = bool(self.proxy_keys)
        upstream = Upstream(provider, rest, query, client_headers, strip_client_key)
        endpoint_path = rest.decode("latin-1")
        endpoint = generation_endpoint(endpoint_path)
        if exchange is not None:
            exchange.provider, exchange.endpoint = provider.name, endpoint
        method: str = scope["method"]
        if method != "POST" or endpoint is None:
            self._refuse_if_offline()
            return await self._pass_through(method, receive, upstream, client_headers, length)

        body = await read_request_body(receive, self.settings.max_request_bytes)
        payload = parse_json_object(body)
        if payload is None:
            self._refuse_if_offline()
            return await self._relay(upstream, "POST", body, CacheStatus.BYPASS)
        try:
            control = request_control(client_headers, offline=self.settings.cache_offline)
        except ControlError as exc:
            raise ProxyError(400, str(exc), "invalid_cache_control") from exc
        if query:
            endpoint_path += "?" + query.decode("latin-1")
        credential = "" if provider.api_key is not None or strip_client_key else credential_scope(client_headers)
        try:
            if self.settings.override_model and "model" in payload:
                payload["model"] = self.settings.override_model
                body = json.dumps(payload).encode()
            key = cache_key(
                provider.name, endpoint_path, payload, self.key_config, scope=credential, namespace=control.namespace
            )
        except RecursionError as exc:
            raise ProxyError(400, "The JSON body is nested too deeply.", "invalid_json") from exc
        model = payload.get("model")
        if exchange is not None:
            exchange.model, exchange.key = (model if isinstance(model, str) else None), key
        pending = PendingEntry(
            key=key,
            provider=provider.name,
            endpoint_path=endpoint_path,
            endpoint=endpoint,
            model=model if isinstance(model, str) else None,
            namespace=control.namespace,
            ttl=control.ttl,
            request=payload,
        )
        return await self._cacheable(upstream, body, payload, pending, control, receive)

    async def _cacheable(
        self,
        upstream: Upstream,
        body: bytes,
        payload: dict[str, Any],
        pending: PendingEntry,
        control: RequestControl,
        receive: Receive,
    ) -> ASGIApp:
        wants_stream = payload.get("stream") is True
        stream_options = payload.get("stream_options")
        wants_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        # The provider is asked for usage on every chat stream, so the recording can also answer a request
        # for JSON; the client that did not ask gets the stream without it.
        asks_usage = (
            wants_stream
            and not wants_usage
            and pending.endpoint == "chat/completions"
            and upstream.provider.stream_usage
        )
        if asks_usage:
            body = ask_for_usage(body, payload)

        landings = self.flights.landings
        status, stale, hit = await self._look_up(pending, control, wants_stream, wants_usage)
        if hit is not None:
            return hit
        if control.only_if_cached:
            why = "offline (CACHE_OFFLINE=true)" if self.settings.cache_offline else "asked for only-if-cached"
            error = ProxyError(
                504, f"Not in the cache, and the proxy is {why}, so it did not ask the upstream.", "not_cached"
            )
            error.headers.update(self._cache_headers(status, pending.key))
            raise error

        flight: Flight | None = None
        looked_up = self.settings.respond_with_cache and status in (CacheStatus.MISS, CacheStatus.EXPIRED)
        if looked_up and self.settings.cache_lock_timeout > 0:
            leader = self.flights.get(pending.key)
            if leader is None and self.flights.stored_since(pending.key, landings):
                # The identical request that was in flight when this one looked stored its answer meanwhile.
                status, stale, hit = await self._look_up(pending, control, wants_stream, wants_usage)
                if hit is not None:
                    return hit
                leader = self.flights.get(pending.key)
            if leader is None and status is not CacheStatus.BYPASS:
                flight = self.flights.lead(pending.key, wants_stream, wants_usage or asks_usage)
                leader = await self._share(pending.key, flight)
                if leader is None:
                    flight.join()
                else:
                    flight = None
            if leader is not None:
                followed = await self._follow(leader, pending, wants_stream, wants_usage, control.max_age, receive)
                if followed is not None:
                    return followed
        if status is not CacheStatus.BYPASS:
            self.statistics.miss()
        storing = self.settings.store_cache and not control.no_store and status is not CacheStatus.BYPASS
        try:
            if wants_stream:
                return await self._relay(
                    upstream,
                    "POST",
                    body,
                    status,
                    pending=pending,
                    store=storing,
                    flight=flight,
                    stale=stale,
                    withhold_usage=asks_usage,
                )
            return await self._fetch(upstream, body, status, pending, storing, flight, stale, receive)
        except BaseException:
            if flight is not None:
                self.flights.land(pending.key, flight, complete=False, stored=False)
            raise

    async def _look_up(
        self, pending: PendingEntry, control: RequestControl, wants_stream: bool, wants_usage: bool
    ) -> tuple[CacheStatus, Stale | None, ASGIApp | None]:
        """The request's cache status, the expired entry to serve if the upstream fails (stale-if-error),
        and the answer when it is a hit."""
        if not self.settings.respond_with_cache or control.no_cache:
            return (CacheStatus.REFRESH if control.no_cache else CacheStatus.MISS), None, None
        try:
            entry = await self.backend.get(pending.key)
        except CacheError as exc:
            self.health.failed(Operation.READ, exc)
            return CacheStatus.BYPASS, None, None
        self.health.succeeded(Operation.READ)
        if entry is None:
            return CacheStatus.MISS, None, None
        now = self.clock()
        if not self._is_fresh(entry, now, control.max_age):
            if not self.settings.cache_stale_if_error:
                return CacheStatus.EXPIRED, None, None
            answer = replay(entry, pending.endpoint, wants_stream, wants_usage)
            return CacheStatus.EXPIRED, (Stale(entry, answer, pending) if answer is not None else None), None
        answer = replay(entry, pending.endpoint, wants_stream, wants_usage)
        if answer is None:
            return CacheStatus.MISS, None, None
        self.statistics.hit(pending.key, entry, now)
        return CacheStatus.MISS, None, self._hit(entry, answer, pending.key, now)

    async def _fetch(
        self,
        upstream: Upstream,
        body: bytes,
        status: CacheStatus,
        pending: PendingEntry,
        storing: bool,
        flight: Flight | None,
        stale: Stale | None,
        receive: Receive,
    ) -> ASGIApp:
        """A complete (not streamed) upstream answer, stored once it was sent, so storing never delays it."""
        asked_at = anyio.current_time()
        try:
            response, answer_body = await self._while_listened(self._fetched(upstream, body), flight, receive)
            upstream_seconds = anyio.current_time() - asked_at
            answered_at = self.clock()
        except ProxyError as error:
            if stale is not None:
                return self._serve_stale(stale, flight)
            error.headers.update(self._cache_headers(status, pending.key))
            raise
        if stale is not None and _failed_upstream(response.status_code):
            return self._serve_stale(stale, flight)
        response_headers = response.headers.multi_items()

        async def store() -> None:
            stored = storing and await self._store(
                pending, response.status_code, response_headers, answer_body, upstream_seconds, answered_at
            )
            if flight is not None:
                self.flights.land(pending.key, flight, complete=True, stored=stored)

        return BufferedResponse(
            response.status_code,
            answer_body,
            [*client_response_headers(response_headers), *self._cache_headers(status, pending.key)],
            background=store,
        )

    async def _fetched(self, upstream: Upstream, body: bytes) -> tuple[httpx.Response, bytes]:
        with anyio.move_on_after(self.total_timeout) as deadline:
            response = await self.http.open(upstream.provider, "POST", upstream.url, upstream.headers, body)
            answer_body = await read_body(response, upstream.provider)
        if deadline.cancelled_caught:
            raise self._past_total_timeout(upstream.provider)
        return response, answer_body

    async def _while_listened(self, work: Awaitable[T], flight: Flight | None, receive: Receive) -> T:
        """The result of `work`, given up (ClientDisconnect) once no client is left to answer: when this
        request's client leaves, `work` goes on only for the followers of its `flight`."""
        task = asyncio.ensure_future(work)
        if flight is not None:
            flight.on_abandoned = lambda: self._abandon(flight, task)
        left = asyncio.ensure_future(client_left(receive))
        try:
            await asyncio.wait((task, left), return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                if flight is None:
                    task.cancel()
                else:
                    flight.leave()
            try:
                return await task
            except asyncio.CancelledError:
                if not left.done():
                    raise
                raise ClientDisconnect() from None
        except BaseException:
            task.cancel()
            raise
        finally:
            left.cancel()

    def _abandon(self, flight: Flight, upstream_request: asyncio.Future[Any]) -> None:
        """No client of this instance is left for `flight`: give its upstream request up, unless clients
        of other instances still follow it (then once they have gone too)."""
        if flight.mirror is None:
            upstream_request.cancel()
            return
        self._spawn(self._abandon_when_unfollowed(flight, flight.mirror, upstream_request))

    async def _abandon_when_unfollowed(
        self, flight: Flight, mirror: FlightMirror, upstream_request: asyncio.Future[Any]
    ) -> None:
        while flight.listeners <= 0 and not upstream_request.done():
            try:
                followers = await mirror.followers()
            except CacheError:
                followers = 0  # they cannot read the flight either
            if followers <= 0:
                if flight.listeners <= 0:
                    upstream_request.cancel()
                return
            await asyncio.sleep(_FOLLOWERS_POLL_SECONDS)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)

    def _past_total_timeout(self, provider: Provider) -> ProxyError:
        return ProxyError(
            504,
            f"The upstream provider '{provider.name}' did not finish its answer within"
            f" {self.settings.upstream_total_timeout:g} s (UPSTREAM_TOTAL_TIMEOUT).",
            "upstream_timeout",
        )

    def _serve_stale(self, stale: Stale, flight: Flight | None) -> ASGIApp:
        """The expired entry in place of a failed upstream answer (CACHE_STALE_IF_ERROR)."""
        if flight is not None:
            self.flights.land(stale.pending.key, flight, complete=False, stored=False)
        self.statistics.stale()
        now = self.clock()
        return self._answer(stale.entry, stale.answer, stale.pending.key, now, CacheStatus.STALE)

    async def _share(self, key: str, flight: Flight) -> Flight | None:
        """Coalesce across instances (Redis): None when this instance leads, its flight then mirrored for
        the others; else `flight`, now fed with another instance's answer, to follow like a local one."""
        if self.shared_flights is None:
            return None
        try:
            claim = await self.shared_flights.claim(key)
        except CacheError:
            return None  # Redis fails: coalesce within this instance only
        if claim.leads:
            flight.mirror = claim
            return None
        flight.streamed = flight.with_usage = False  # until the leader's start says what it streams

        async def relay() -> None:
            complete = stored = False
            try:
                with anyio.move_on_after(self.settings.cache_lock_timeout):
                    complete, stored = await claim.relay_into(flight)
            except CacheError:
                pass
            finally:
                self.flights.land(key, flight, complete=complete, stored=stored)

        task = asyncio.create_task(relay())
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)

        def stop_reading() -> None:  # the clients of this instance all left
            task.cancel()

        flight.on_abandoned = stop_reading
        return flight

    async def _follow(
        self,
        flight: Flight,
        pending: PendingEntry,
        wants_stream: bool,
        wants_usage: bool,
        max_age: int | None,
        receive: Receive,
    ) -> ASGIApp | None:
        """The answer of an identical request already in flight, or None to go upstream after all (also when
        the stored answer is already too old for this request). The client listens to the flight until it
        is answered or leaves (ClientDisconnect)."""
        flight.join()
        relaying = False
        try:
            deadline = anyio.current_time() + self.settings.cache_lock_timeout
            # The leader's shape is known once it started (another instance's leader says so then).
            if not await _wait_while_listened(flight, "started", deadline, receive):
                return None
            if flight.can_relay_to(wants_stream, wants_usage):
                if flight.status == 200 and is_event_stream(_content_type(flight.headers)):
                    relaying = True
                    return self._relay_live(flight, pending.key, withhold_usage=flight.with_usage and not wants_usage)
            if not await _wait_while_listened(flight, "done", deadline, receive) or not flight.stored:
                return None
        finally:
            if not relaying:
                flight.leave()
        try:
            entry = await self.backend.get(pending.key)
        except CacheError:
            return None
        now = self.clock()
        if entry is None or not self._is_fresh(entry, now, max_age):
            return None
        answer = replay(entry, pending.endpoint, wants_stream, wants_usage)
        if answer is None:
            return None
        self.statistics.hit(pending.key, entry, now)
        return self._hit(entry, answer, pending.key, now, coalesced=True)

    def _relay_live(self, flight: Flight, key: str, withhold_usage: bool) -> ASGIApp:
        """A follower's copy of the leader's stream, as it arrives."""
        headers = [*flight.headers, *self._cache_headers(CacheStatus.HIT, key), COALESCED]

        async def ended(completed: bool) -> None:
            flight.leave()
            if completed:
                await self._count_hit(key)

        return RelayResponse(200, headers, _as_asked(flight.live_chunks(), withhold_usage), on_end=ended)

    def _is_fresh(self, entry: CachedResponse, now: float, max_age: int | None) -> bool:
        ttl = entry.ttl if entry.ttl is not None else self.settings.cache_ttl
        return is_fresh(entry.created_at, ttl, now, max_age)

    async def _count_hit(self, key: str) -> None:
        try:
            entry = await self.backend.get(key)
        except CacheError:
            return
        if entry is not None:
            self.statistics.hit(key, entry, self.clock())

    def _refuse_if_offline(self) -> None:
        if self.settings.cache_offline:
            raise ProxyError(
                504,
                "The proxy is offline (CACHE_OFFLINE=true) and this request is not cacheable,"
                " so it cannot be answered.",
                "not_cached",
            )

    async def _store(
        self,
        pending: PendingEntry,
        status: int,
        headers: Headers,
        body: bytes,
        upstream_seconds: float,
        answered_at: float,
    ) -> bool:
        """Store the answer if it may be stored; True when the store has it. `answered_at` (the clock when
        the provider answered) is the entry's age origin, so a store that runs late does not make it younger."""
        if len(body) > self.settings.max_cache_entry_bytes or not is_storable(status, headers, body, pending.endpoint):
            return False
        content_type = _content_type(headers)
        usage = reported_usage(pending.endpoint, content_type, body)
        entry = CachedResponse(
            status=status,
            content_type=content_type,
            body=body,
            created_at=answered_at,
            provider=pending.provider,
            endpoint=pending.endpoint_path,
            model=pending.model,
            namespace=pending.namespace,
            ttl=pending.ttl,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            upstream_seconds=upstream_seconds,
            prompt_preview=prompt_preview(pending.request),
        )
        try:
            await self.backend.set(pending.key, entry)
        except CacheError as exc:
            self.health.failed(Operation.WRITE, exc)
            return False
        self.health.succeeded(Operation.WRITE)
        return True

    def _hit(self, entry: CachedResponse, answer: Replay, key: str, now: float, coalesced: bool = False) -> ASGIApp:
        return self._answer(entry, answer, key, now, CacheStatus.HIT, coalesced)

    def _answer(
        self, entry: CachedResponse, answer: Replay, key: str, now: float, status: CacheStatus, coalesced: bool = False
    ) -> ASGIApp:
        headers = [
            ("content-type", answer.content_type),
            ("age", str(max(0, int(now - entry.created_at)))),
            *self._cache_headers(status, key),
        ]
        if coalesced:
            headers.append(COALESCED)
        return BufferedResponse(entry.status, answer.body, headers)

    @staticmethod
    def _cache_headers(status: CacheStatus, key: str | None) -> Headers:
        headers = [("x-cache-status", status.value)]
        if key is not None:
            headers.append(("x-cache-key", key))
        return headers

    async def _pass_through(
        self, method: str, receive: Receive, upstream: Upstream, client_headers: Headers, length: int | None
    ) -> ASGIApp:
        """`length`: the body's declared length (checked against the limit), None when chunked or absent."""
        content: RequestContent = None
        extra_headers: Headers = []
        if length:
            content = stream_request_body(receive)
            extra_headers = [("content-length", str(length))]
        elif is_chunked(client_headers):
            # Read (within the limit) before forwarding, so a 413 can still be answered.
            content = await read_request_body(receive, self.settings.max_request_bytes)
        return await self._relay(upstream, method, content, CacheStatus.BYPASS, extra_headers=extra_headers)

    async def _relay(
        self,
        upstream: Upstream,
        method: str,
        content: RequestContent,
        status: CacheStatus,
        *,
        pending: PendingEntry | None = None,
        store: bool = False,
        flight: Flight | None = None,
        stale: Stale | None = None,
        withhold_usage: bool = False,
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> ASGIApp:
        """Relay the upstream answer as it arrives. With `store`, record it and store it once it completed;
        with a `flight`, the upstream is read for everyone listening (see `_pump`). `withhold_usage`: the
        proxy asked for usage the client did not, so the client's copy goes without it."""
        key = pending.key if pending is not None else None
        provider = upstream.provider
        headers = [*upstream.headers, *extra_headers]
        asked_at = anyio.current_time()
        deadline = asked_at + self.total_timeout
        try:
            with anyio.move_on_after(self.total_timeout) as waited:
                response = await self.http.open(provider, method, upstream.url, headers, content)
            if waited.cancelled_caught:
                raise self._past_total_timeout(provider)
        except ProxyError as error:
            if stale is not None:
                return self._serve_stale(stale, flight)
            error.headers.update(self._cache_headers(status, key))
            raise
        if stale is not None and _failed_upstream(response.status_code):
            await close_quietly(response)
            return self._serve_stale(stale, flight)
        answered_at = self.clock()
        upstream_headers = response.headers.multi_items()
        relayed_headers = client_response_headers(upstream_headers)
        response_headers = [*relayed_headers, *self._cache_headers(status, key)]
        if pending is None or not (store or flight):
            chunks = _as_asked(upstream_chunks(response, provider.name), withhold_usage)
            return RelayResponse(response.status_code, response_headers, chunks, deadline=deadline)
        answer = Answer(response, upstream_headers, asked_at, answered_at)
        if flight is not None:
            flight.started(response.status_code, relayed_headers)
            pump = asyncio.create_task(self._pump(answer, pending, store, flight, deadline, provider))
            self._relays.add(pump)
            pump.add_done_callback(self._relays.discard)
            flight.on_abandoned = lambda: self._abandon(flight, pump)

            async def leave(completed: bool) -> None:
                flight.leave()

            chunks = _as_asked(flight.live_chunks(), withhold_usage)
            return RelayResponse(response.status_code, response_headers, chunks, on_end=leave)

        recording = Recording(self.settings.max_cache_entry_bytes)

        async def ended(completed: bool) -> None:
            if completed and store and recording.whole:
                await self._store_answer(pending, answer, recording.body())

        chunks = upstream_chunks(response, provider.name, on_chunk=recording.add)
        return RelayResponse(
            response.status_code, response_headers, _as_asked(chunks, withhold_usage), on_end=ended, deadline=deadline
        )

    async def _pump(
        self, answer: Answer, pending: PendingEntry, store: bool, flight: Flight, deadline: float, provider: Provider
    ) -> None:
        """Read a coalesced stream from the upstream into its flight, whoever listens and for as long as
        anyone does (cancelled when the last client left), then store it if it completed."""
        size = 0
        completed = stored = False
        try:
            with anyio.CancelScope(deadline=deadline) as scope:
                async for chunk in upstream_chunks(answer.response, provider.name):
                    flight.publish(chunk)  # the flight keeps every chunk for followers that join late
                    size += len(chunk)
                completed = True
            if scope.cancelled_caught:
                logger.warning("the upstream did not finish its answer within UPSTREAM_TOTAL_TIMEOUT; it was cut off")
        except UpstreamBrokeOff as exc:
            logger.warning("%s; the client's response was cut off the same way", exc)
        finally:
            with anyio.CancelScope(shield=True):
                if completed and store and size <= self.settings.max_cache_entry_bytes:
                    stored = await self._store_answer(pending, answer, b"".join(flight.chunks))
                self.flights.land(pending.key, flight, complete=completed, stored=stored)

    async def _store_answer(self, pending: PendingEntry, answer: Answer, body: bytes) -> bool:
        upstream_seconds = anyio.current_time() - answer.asked_at
        status = answer.response.status_code
        return await self._store(pending, status, answer.headers, body, upstream_seconds, answer.answered_at)


class Answer(NamedTuple):
    """An upstream answer whose body is still arriving, and when it was asked for and answered."""

    response: httpx.Response
    headers: Headers
    asked_at: float  # anyio's clock
    answered_at: float  # the proxy's clock: the entry's age origin


class Recording:
    """A body kept as it passes, until it grows past `limit` (then it is too large to store)."""

    __slots__ = ("_chunks", "_size", "_limit")

    def __init__(self, limit: int) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit

    def add(self, chunk: bytes) -> None:
        if self._size <= self._limit:
            self._size += len(chunk)
            self._chunks.append(chunk)
            if self._size > self._limit:
                self._chunks.clear()  # keep relaying, stop holding it

    @property
    def whole(self) -> bool:
        return self._size <= self._limit

    def body(self) -> bytes:
        return b"".join(self._chunks)


def _as_asked(chunks: AsyncGenerator[bytes, None], withhold_usage: bool) -> AsyncGenerator[bytes, None]:
    """The stream in the shape the client asked for: without the usage the proxy asked for on its own."""
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


async def _wait_while_listened(flight: Flight, ready: str, deadline: float, receive: Receive) -> bool:
    """`flight.wait_until(ready)` until `deadline` (anyio's clock); ClientDisconnect if the client leaves."""
    waited = asyncio.ensure_future(flight.wait_until(ready, deadline - anyio.current_time()))
    left = asyncio.ensure_future(client_left(receive))
    try:
        await asyncio.wait((waited, left), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waited.cancel()
        left.cancel()
    if not waited.done() or waited.cancelled():
        raise ClientDisconnect()
    return waited.result()


async def client_left(receive: Receive) -> None:
    """Return once the client has disconnected (the request body already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


_FOLLOWERS_POLL_SECONDS = 0.25


COALESCED = ("x-cache-coalesced", "true")


def _content_type(headers: Headers) -> str:
    return next((value for name, value in headers if name.lower() == "content-type"), "")
