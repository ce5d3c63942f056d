"""One proxied request: route it, answer it from the cache or the upstream, and store what may be stored."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

import anyio
import httpx
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from cache import CachedResponse, CacheError, CacheHealth, cache_key
from cache.bedrock import bedrock_call
from cache.control import ControlError, is_fresh, request_control
from cache.gemini import gemini_call
from cache.health import Operation
from cache.keys import cacheable_endpoint, credential_scope, is_storable, model_in_path
from cache.memory import TieredBackend
from cache.preview import prompt_preview
from cache.replay import Replay, is_event_stream, replay
from cache.stream_usage import ask_for_usage
from cache.usage import reported_model, reported_usage
from providers import AuthStyle, Provider
from proxy.access import presents_key, proxy_key_required
from proxy.client import Client
from proxy.clock import event_loop_time, within
from proxy.coalesce import Flight, FlightMirror, Flights, wait_while_listened
from proxy.errors import ProxyError, error_response
from proxy.exchange import Exchange
from proxy.exchange import of as exchange_of
from proxy.headers import Headers, client_response_headers, scope_headers, without_aws_signature
from proxy.hit_answers import HitAnswer, HitAnswers
from proxy.intake import declared_length, is_chunked, read_request_body, stream_request_body, too_large
from proxy.request import Asked, RecentRequests, Upstream, parse_json_object, resolve_route
from proxy.responses import (
    BufferedResponse,
    Recording,
    RelayResponse,
    UpstreamBody,
    as_asked,
)
from proxy.settings import Settings
from proxy.statistics import Statistics
from proxy.storing import Landed, StoreQueue
from proxy.upstream import RequestContent, UpstreamClient, close_quietly, read_body

if TYPE_CHECKING:
    from cache.redis_flights import Lease, RedisFlights, RemoteLeader

logger = logging.getLogger("openai_proxy")

T = TypeVar("T")
_FOLLOWERS_POLL_SECONDS = 0.25


class CacheStatus(StrEnum):
    HIT = "HIT"
    MISS = "MISS"
    BYPASS = "BYPASS"
    EXPIRED = "EXPIRED"
    REFRESH = "REFRESH"
    STALE = "STALE"


class Stale(NamedTuple):
    """An expired entry kept to answer with if the upstream fails (CACHE_STALE_IF_ERROR)."""

    entry: CachedResponse
    answer: Replay


class Lookup(NamedTuple):
    """What the cache says of a request: its status, the expired entry to fall back on, the hit's answer."""

    status: CacheStatus
    stale: Stale | None = None
    hit: BufferedResponse | None = None


@dataclass(slots=True)
class Miss:
    """A cacheable request on its way upstream."""

    asked: Asked
    upstream: Upstream
    status: CacheStatus
    stale: Stale | None = None
    flight: Flight | None = None  # its followers', when it leads (coalescing)
    storing: bool = False
    claim: Lease | RemoteLeader | None = None  # its cross-instance flight's, when its lookup took it


class Cancellable(Protocol):
    """An upstream request in progress, to give up: a task, or a relay that reads it."""

    def cancel(self) -> Any: ...

    def done(self) -> bool: ...


class Answer(NamedTuple):
    """An upstream answer (its body read, or still arriving), and when it was asked for and answered."""

    response: httpx.Response
    body: bytes | None
    asked_at: float  # anyio's clock
    answered_at: float  # the proxy's clock: the entry's age origin
    headers: Headers  # the response's, decoded once (httpx decodes them all again on every read)


def _failed_upstream(status: int) -> bool:
    """An upstream answer that CACHE_STALE_IF_ERROR replaces with an expired entry."""
    return status >= 500 or status == 429


class Proxy:
    def __init__(
        self,
        settings: Settings,
        backend: TieredBackend,
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
        self.recent = RecentRequests()
        self.hit_answers = HitAnswers()
        self.stores = StoreQueue(backend, health, settings.store_backlog_bytes, statistics.store_skipped)
        self.shared_flights = shared_flights
        self._tasks: set[asyncio.Task[None]] = set()
        # Keys whose lookup is claiming their cross-instance flight now: done once that lookup returned (and its
        # request, on a miss, made its local flight, which an identical request then follows).
        self._claiming: dict[str, asyncio.Future[None]] = {}
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

    # Intake

    async def _handle(self, scope: Scope, receive: Receive) -> ASGIApp:
        client_headers = scope_headers(scope)
        length = declared_length(client_headers)
        if length is not None and length > self.settings.max_request_bytes:
            raise too_large(self.settings.max_request_bytes)
        if self.proxy_keys and not presents_key(client_headers, self.proxy_keys):
            raise proxy_key_required()
        provider, rest = resolve_route(scope.get("raw_path") or scope["path"].encode(), self.providers)
        query: bytes = scope.get("query_string", b"")
        strip_client_credentials = bool(self.proxy_keys)
        if provider.auth is AuthStyle.SIGV4:
            client_headers = without_aws_signature(client_headers)
            # The proxy's own signature, like a provider key of its own, replaces a client's Bedrock API key.
            strip_client_credentials |= self.http.signer.ready
        upstream = Upstream(provider, rest, query, client_headers, strip_client_credentials)
        endpoint = cacheable_endpoint(rest.decode("latin-1"), query)
        exchange = exchange_of(scope)
        if exchange is not None:
            exchange.provider, exchange.endpoint = provider.name, endpoint
        if scope["method"] != "POST" or endpoint is None:
            self._refuse_if_offline()
            return await self._pass_through(scope["method"], receive, upstream, length, exchange)
        body = await read_request_body(receive, self.settings.max_request_bytes)
        sent = self.recent.bytes_of(scope, body)
        asked = self.recent.get(sent)
        if asked is not None:
            return await self._cacheable(asked.for_exchange(exchange), upstream, Client(scope, receive))
        payload = parse_json_object(body)
        if payload is None:
            self._refuse_if_offline()
            return await self._relay_through(upstream, "POST", body, exchange)
        asked = self._asked(upstream, endpoint, body, payload, exchange)
        self.recent.add(sent, asked)
        return await self._cacheable(asked, upstream, Client(scope, receive))

    def _asked(
        self, upstream: Upstream, endpoint: str, body: bytes, payload: dict[str, Any], exchange: Exchange | None
    ) -> Asked:
        """What a cacheable request asks for: its key, entry description and answer shape."""
        provider, client_headers = upstream.provider, upstream.client_headers
        try:
            control = request_control(client_headers, offline=self.settings.cache_offline)
        except ControlError as exc:
            raise ProxyError(400, str(exc), "invalid_cache_control") from exc
        endpoint_path = upstream.endpoint_path
        credential = ""
        if upstream.forwards_client_credential:
            credential = credential_scope(client_headers, upstream.query_credential.decode("latin-1"))
        try:
            if self.settings.override_model and "model" in payload:
                payload["model"] = self.settings.override_model
                body = json.dumps(payload).encode()
            key = cache_key(
                provider.name, endpoint_path, payload, self.key_config, scope=credential, namespace=control.namespace
            )
        except RecursionError as exc:
            raise ProxyError(400, "The JSON body is nested too deeply.", "invalid_json") from exc
        model = model_in_path(endpoint_path) or payload.get("model")
        call = gemini_call(endpoint_path) or bedrock_call(endpoint_path)
        if call is not None:  # the path says whether to stream; usage comes with every answer
            wants_stream, wants_usage = call.streams, False
        else:
            wants_stream = payload.get("stream") is True
            options = payload.get("stream_options")
            wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        # The provider is asked for usage on every chat stream, so the recording can also answer a request
        # for JSON; a client that did not ask gets the stream without it.
        asks_usage = (
            wants_stream
            and not wants_usage
            and endpoint == "chat/completions"
            and provider.asks_stream_usage(upstream.rest.decode("latin-1"), upstream.query.decode("latin-1"))
        )
        if exchange is not None:
            exchange.model, exchange.key = (model if isinstance(model, str) else None), key
        return Asked(
            key=key,
            provider=provider.name,
            endpoint_path=endpoint_path,
            endpoint=endpoint,
            model=model if isinstance(model, str) else None,
            control=control,
            request=payload,
            body=ask_for_usage(body, payload) if asks_usage else body,
            wants_stream=wants_stream,
            wants_usage=wants_usage,
            asks_usage=asks_usage,
            exchange=exchange,
        )

    def _refuse_if_offline(self) -> None:
        if self.settings.cache_offline:
            raise ProxyError(
                504,
                "The proxy is offline (CACHE_OFFLINE=true) and this request is not cacheable,"
                " so it cannot be answered.",
                "not_cached",
            )

    # Cacheable requests

    async def _cacheable(self, asked: Asked, upstream: Upstream, client: Client) -> ASGIApp:
        landings = self.flights.landings
        lookup, claim = await self._look_up_or_claim(asked)
        if lookup.hit is not None:
            return lookup.hit
        if asked.control.only_if_cached:
            why = "offline (CACHE_OFFLINE=true)" if self.settings.cache_offline else "asked for only-if-cached"
            error = ProxyError(
                504, f"Not in the cache, and the proxy is {why}, so it did not ask the upstream.", "not_cached"
            )
            error.headers.update(self._cache_headers(asked, lookup.status))
            raise error
        miss = Miss(asked, upstream, lookup.status, lookup.stale, claim=claim)
        coalescing = self.settings.cache_lock_timeout > 0 and self.settings.respond_with_cache
        if coalescing and miss.status in (CacheStatus.MISS, CacheStatus.EXPIRED):
            followed = await self._coalesce(miss, landings, client)
            if followed is not None:
                return followed
        if miss.status is not CacheStatus.BYPASS:
            self.statistics.miss()
        control = asked.control
        miss.storing = self.settings.store_cache and not control.no_store and miss.status is not CacheStatus.BYPASS
        try:
            if asked.wants_stream:
                return await self._relay_miss(miss)
            return await self._fetch(miss, client)
        except BaseException:
            if miss.flight is not None:
                self.flights.land(asked.key, miss.flight, complete=False, stored=False)
            raise

    async def _look_up(self, asked: Asked) -> Lookup:
        """The request's cache status, the expired entry to serve if the upstream fails (stale-if-error),
        and the answer when it is a hit."""
        control = asked.control
        if not self.settings.respond_with_cache or control.no_cache:
            return Lookup(CacheStatus.REFRESH if control.no_cache else CacheStatus.MISS)
        try:
            entry = await self._stored_entry(asked.key)
        except CacheError as exc:
            self.health.failed(Operation.READ, exc)
            return Lookup(CacheStatus.BYPASS)
        self.health.succeeded(Operation.READ)
        return self._judged(asked, entry)

    async def _look_up_or_claim(self, asked: Asked) -> tuple[Lookup, Lease | RemoteLeader | None]:
        """`_look_up`; on Redis, for a request that would lead or follow a cross-instance flight when it
        misses, with that flight's claim taken in the same round trip (a miss then makes one before the
        upstream is asked, not two). The claim is None on a hit."""
        key, control = asked.key, asked.control
        if (
            self.shared_flights is None
            or self.settings.cache_lock_timeout <= 0
            or not self.settings.respond_with_cache
            or control.no_cache
            or control.only_if_cached
            or self.flights.get(key) is not None
            or self.stores.waiting_entry(key) is not None
            or self.backend.held(key) is not None
        ):
            return await self._look_up(asked), None
        claiming = self._claiming.get(key)
        if claiming is not None:  # an identical request's lookup is claiming: follow what it finds
            await asyncio.shield(claiming)
            return await self._look_up(asked), None
        claiming = self._claiming[key] = asyncio.get_running_loop().create_future()
        try:
            entry, claim = await self.shared_flights.read_or_claim(key)
        except CacheError as exc:
            self.health.failed(Operation.READ, exc)
            return Lookup(CacheStatus.BYPASS), None
        finally:
            del self._claiming[key]
            claiming.set_result(None)
        self.health.succeeded(Operation.READ)
        if entry is not None:
            self.backend.remember(key, entry)
        return self._judged(asked, entry), claim

    def _judged(self, asked: Asked, entry: CachedResponse | None) -> Lookup:
        """The lookup of a request whose entry (if any) was read: a hit, or why it is not one."""
        if entry is None:
            return Lookup(CacheStatus.MISS)
        now = self.clock()
        if not self._is_fresh(entry, now, asked.control.max_age):
            return Lookup(CacheStatus.EXPIRED, self._stale(asked, entry))
        return self._hit(asked, entry, now)

    def _hit(self, asked: Asked, entry: CachedResponse, now: float) -> Lookup:
        """The lookup of a request whose entry is fresh: a hit, or a miss when the entry cannot answer it."""
        answer = self.hit_answers.answer(asked.hit_shape, entry)
        if answer is None:
            return Lookup(CacheStatus.MISS)
        self.statistics.hit(asked.key, entry, now)
        _note(asked.exchange, CacheStatus.HIT)
        return Lookup(CacheStatus.MISS, hit=answer.response(_age(entry, now)))

    def answer_at_once(self, scope: Scope, body: bytes) -> BufferedResponse | None:
        """The hit answering a request sent before byte for byte (`RecentRequests`) whose entry is at hand in
        memory, worked out without waiting on anything, so the server can answer it without an ASGI task
        (proxy/server.py); None when the request needs the whole path (`__call__`), which then answers it
        exactly as it would have. Nothing is counted unless it answers."""
        if scope["method"] != "POST":
            return None
        asked = self.recent.get(self.recent.bytes_of(scope, body))
        if asked is None or not self.settings.respond_with_cache or asked.control.no_cache:
            return None
        key = asked.key
        entry = self.stores.waiting_entry(key) or self.backend.held(key)
        now = self.clock()
        if entry is None or not self._is_fresh(entry, now, asked.control.max_age):
            return None
        answer = self.hit_answers.answer(asked.hit_shape, entry)
        if answer is None or not answer.written_at_once:
            return None
        exchange = exchange_of(scope)
        if exchange is not None:
            exchange.provider, exchange.endpoint, exchange.model = asked.provider, asked.endpoint, asked.model
            exchange.key, exchange.cache_status = key, HIT_STATUS
        self.health.succeeded(Operation.READ)
        self.statistics.hit(key, entry, now)
        return answer.response(_age(entry, now))

    def _stale(self, asked: Asked, entry: CachedResponse) -> Stale | None:
        if not self.settings.cache_stale_if_error:
            return None
        answer = replay(entry, asked.endpoint, asked.wants_stream, asked.wants_usage)
        return Stale(entry, answer) if answer is not None else None

    def _is_fresh(self, entry: CachedResponse, now: float, max_age: int | None) -> bool:
        ttl = entry.ttl if entry.ttl is not None else self.settings.cache_ttl
        return is_fresh(entry.created_at, ttl, now, max_age)

    # Coalescing

    async def _coalesce(self, miss: Miss, landings: int, client: Client) -> ASGIApp | None:
        """Follow an identical request already in flight (its answer, or None to go upstream after all), or
        lead one: `miss.flight` is then the flight its followers wait on."""
        key = miss.asked.key
        claim, miss.claim = miss.claim, None
        try:
            leader = self.flights.get(key)
            if leader is None and self.flights.stored_since(key, landings):
                # The identical request that was in flight when this one looked stored its answer meanwhile.
                lookup = await self._look_up(miss.asked)
                if lookup.hit is not None:
                    return lookup.hit
                miss.status, miss.stale = lookup.status, lookup.stale
                leader = self.flights.get(key)
            if leader is None and miss.status is not CacheStatus.BYPASS:
                flight = self.flights.lead(key, miss.asked.wants_stream, miss.asked.upstream_usage)
                taken, claim = claim, None
                leader = await self._share(key, flight, taken)
                if leader is None:
                    flight.join()
                    miss.flight = flight
        finally:
            if claim is not None and claim.leads:
                # Taken with the lookup, then not needed (this instance's own flight came first): released.
                claim.finish(complete=False, stored=False)
        if leader is None:
            return None
        return await self._follow(leader, miss.asked, client)

    async def _share(self, key: str, flight: Flight, claim: Lease | RemoteLeader | None = None) -> Flight | None:
        """Coalesce across instances (Redis): None when this instance leads, its flight then mirrored for
        the others; else `flight`, now fed with another instance's answer, to follow like a local one.
        `claim`: the flight's, when the lookup took it; else it is claimed here."""
        if self.shared_flights is None:
            return None
        if claim is None:
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

        reading = self._spawn(relay())

        def stop_reading() -> None:  # the clients of this instance all left
            reading.cancel()

        flight.on_abandoned = stop_reading
        return flight

    async def _follow(self, flight: Flight, asked: Asked, client: Client) -> ASGIApp | None:
        """The answer of an identical request already in flight, or None to go upstream after all (also when
        the stored answer is already too old for this request). The client listens to the flight until it
        is answered or leaves (ClientDisconnect)."""
        flight.join()
        relaying = False
        try:
            deadline = event_loop_time() + self.settings.cache_lock_timeout
            # The leader's shape is known once it started (another instance's leader says so then).
            if not await wait_while_listened(flight, "started", deadline, client):
                return None
            live = flight.status == 200 and is_event_stream(_content_type(flight.headers))
            if live and flight.can_relay_to(asked.wants_stream, asked.wants_usage):
                relaying = True
                return self._relay_live(flight, asked)
            if not await wait_while_listened(flight, "done", deadline, client) or not flight.stored:
                return None
        finally:
            if not relaying:
                flight.leave()
        return await self._stored_answer(asked)

    async def _stored_answer(self, asked: Asked) -> ASGIApp | None:
        """The answer a finished flight stored, if it is fresh enough for this request."""
        try:
            entry = await self._stored_entry(asked.key)
        except CacheError:
            return None
        now = self.clock()
        if entry is None or not self._is_fresh(entry, now, asked.control.max_age):
            return None
        answer = replay(entry, asked.endpoint, asked.wants_stream, asked.wants_usage)
        if answer is None:
            return None
        self.statistics.hit(asked.key, entry, now)
        return self._answer(asked, entry, answer, CacheStatus.HIT, coalesced=True)

    def _relay_live(self, flight: Flight, asked: Asked) -> ASGIApp:
        """A follower's copy of the leader's stream, as it arrives."""
        headers = [*flight.headers, *self._cache_headers(asked, CacheStatus.HIT, coalesced=True)]

        def ended(completed: bool) -> None:
            flight.leave()
            if completed:
                self._spawn(self._count_hit(asked.key))

        withhold = flight.with_usage and not asked.wants_usage
        return RelayResponse(200, headers, as_asked(flight.live_chunks(), withhold), on_end=ended)

    async def _count_hit(self, key: str) -> None:
        try:
            entry = await self._stored_entry(key)
        except CacheError:
            return
        if entry is not None:
            self.statistics.hit(key, entry, self.clock())

    async def _stored_entry(self, key: str) -> CachedResponse | None:
        """The entry stored under `key`, or waiting to be: a request is a hit as soon as the answer was sent."""
        waiting = self.stores.waiting_entry(key)
        return waiting if waiting is not None else await self.backend.get(key)

    def _abandon(self, flight: Flight, upstream_request: Cancellable) -> None:
        """No client of this instance is left for `flight`: give its upstream request up, unless clients
        of other instances still follow it (then once they have gone too)."""
        if flight.mirror is None:
            upstream_request.cancel()
            return
        self._spawn(self._abandon_when_unfollowed(flight, flight.mirror, upstream_request))

    async def _abandon_when_unfollowed(
        self, flight: Flight, mirror: FlightMirror, upstream_request: Cancellable
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

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # Misses

    async def _fetch(self, miss: Miss, client: Client) -> ASGIApp:
        """A complete (not streamed) upstream answer, stored once it was sent, so storing never delays it."""
        asked, flight = miss.asked, miss.flight
        fetched = self._while_listened(
            self._ask_upstream(miss.upstream, "POST", asked.body, whole=True), flight, client
        )
        answer = await self._answer_or_stale(miss, fetched)
        if not isinstance(answer, Answer):
            return answer
        body = answer.body or b""

        def store() -> None:
            if flight is not None:
                self._store_and_land(miss, answer, body, flight)
            elif miss.storing:
                self._store(asked, answer, body)

        headers = [*client_response_headers(answer.headers), *self._cache_headers(asked, miss.status)]
        return BufferedResponse(answer.response.status_code, body, headers, on_sent=store)

    async def _relay_miss(self, miss: Miss) -> ASGIApp:
        """A streamed answer relayed as it arrives and recorded; with a flight, read for everyone listening
        (`_lead`). A client that did not ask for usage gets the stream without it."""
        asked = miss.asked
        answer = await self._answer_or_stale(miss, self._ask_upstream(miss.upstream, "POST", asked.body, whole=False))
        if not isinstance(answer, Answer):
            return answer
        status = answer.response.status_code
        relayed = client_response_headers(answer.headers)
        headers = [*relayed, *self._cache_headers(asked, miss.status)]
        deadline = answer.asked_at + self.total_timeout
        if miss.flight is not None:
            return self._lead(miss, miss.flight, answer, relayed, headers, deadline)
        provider = miss.upstream.provider.name
        if not miss.storing:
            chunks = UpstreamBody(answer.response, provider, withhold_usage=asked.asks_usage)
            return RelayResponse(status, headers, chunks, deadline=deadline)
        recording = Recording(self.settings.max_cache_entry_bytes)

        def ended(completed: bool) -> None:
            if completed and recording.whole:
                self._store(asked, answer, recording.body())

        chunks = UpstreamBody(answer.response, provider, on_chunk=recording.add, withhold_usage=asked.asks_usage)
        return RelayResponse(status, headers, chunks, on_end=ended, deadline=deadline)

    def _lead(
        self, miss: Miss, flight: Flight, answer: Answer, relayed: Headers, headers: Headers, deadline: float
    ) -> RelayResponse:
        """The leader's relay of a coalesced stream. Its own task reads the upstream into the flight (which
        keeps every chunk for followers that join late), for whoever listens and for as long as anyone
        does: when its client leaves, it reads on, sending nowhere, while followers listen, and it is given
        up when the last client left (`on_abandoned`). Then it stores the answer if it completed.

        Followers read the chunks as they are published, so they never wait for the leader's client; the
        leader's client, if it stopped reading, holds the upstream (and the chunks yet to come) back only
        once the socket buffers between them are full, far more than an answer of a model."""
        status = answer.response.status_code
        flight.started(status, relayed)
        key = miss.asked.key
        listening, landed = True, False

        def leave() -> bool:
            nonlocal listening
            if listening:
                listening = False
                flight.leave()
            return False  # the relay reads on; the flight gives it up when nobody listens any more

        def land(complete: bool) -> None:
            # As soon as the upstream ended, before the leader's client sees the end: an identical request
            # sent after that answer never follows its flight.
            nonlocal landed
            if landed:
                return
            landed, flight.on_abandoned = True, None  # nothing left to give up
            body = flight.recorded.joined() if complete else b""  # the flight holds every chunk anyway
            if complete and len(body) <= self.settings.max_cache_entry_bytes:
                self._store_and_land(miss, answer, body, flight)
            else:
                self.flights.land(key, flight, complete=complete, stored=False)

        def ended(completed: bool) -> None:
            land(completed)
            leave()

        provider = miss.upstream.provider.name
        chunks = UpstreamBody(
            answer.response,
            provider,
            on_chunk=flight.publish,
            on_complete=lambda: land(True),
            withhold_usage=miss.asked.asks_usage,
        )
        relay = RelayResponse(
            status,
            headers,
            chunks,
            on_end=ended,
            deadline=deadline,
            on_client_left=leave,
        )
        flight.on_abandoned = lambda: self._abandon(flight, relay)
        return relay

    async def _ask_upstream(self, upstream: Upstream, method: str, content: RequestContent, whole: bool) -> Answer:
        """The upstream's answer within UPSTREAM_TOTAL_TIMEOUT: its status and headers, and with `whole` its
        body too. Raises ProxyError when the upstream fails."""
        asked_at = event_loop_time()
        body = None
        deadline = within(self.total_timeout)
        try:
            async with deadline:
                response = await self.http.open(upstream.provider, method, upstream.url, upstream.headers, content)
                if whole:
                    body = await read_body(response, upstream.provider)
        except TimeoutError:
            if deadline.expired():
                raise self._past_total_timeout(upstream.provider) from None
            raise
        return Answer(response, body, asked_at, self.clock(), response.headers.multi_items())

    async def _answer_or_stale(self, miss: Miss, asking: Awaitable[Answer]) -> Answer | ASGIApp:
        """The upstream's answer; the expired entry instead when the upstream failed and stale-if-error
        applies; otherwise the upstream's failure, as an error with the request's cache headers."""
        try:
            answer = await asking
        except ProxyError as error:
            if miss.stale is not None:
                return self._serve_stale(miss)
            error.headers.update(self._cache_headers(miss.asked, miss.status))
            raise
        if miss.stale is not None and _failed_upstream(answer.response.status_code):
            if answer.body is None:
                await close_quietly(answer.response)
            return self._serve_stale(miss)
        return answer

    async def _while_listened(self, work: Awaitable[T], flight: Flight | None, client: Client) -> T:
        """The result of `work`, given up (ClientDisconnect) once no client is left to answer: when this
        request's client leaves, `work` goes on only for the followers of its `flight`."""
        task = asyncio.ensure_future(work)
        if flight is not None:
            flight.on_abandoned = lambda: self._abandon(flight, task)
        gone = False

        def left() -> None:
            nonlocal gone
            gone = True
            if not task.done():
                if flight is None:
                    task.cancel()
                else:
                    flight.leave()

        stop_watching = client.when_leaving(left)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not gone or (current is not None and current.cancelling()):
                raise
            raise ClientDisconnect() from None
        finally:
            stop_watching()
            task.cancel()
            if flight is not None:
                flight.on_abandoned = None  # nothing left to give up; the task is freed with its answer

    def _past_total_timeout(self, provider: Provider) -> ProxyError:
        return ProxyError(
            504,
            f"The upstream provider '{provider.name}' did not finish its answer within"
            f" {self.settings.upstream_total_timeout:g} s (UPSTREAM_TOTAL_TIMEOUT).",
            "upstream_timeout",
        )

    def _serve_stale(self, miss: Miss) -> ASGIApp:
        """The expired entry in place of a failed upstream answer (CACHE_STALE_IF_ERROR)."""
        assert miss.stale is not None
        if miss.flight is not None:
            self.flights.land(miss.asked.key, miss.flight, complete=False, stored=False)
        self.statistics.stale()
        return self._answer(miss.asked, miss.stale.entry, miss.stale.answer, CacheStatus.STALE)

    def _store_and_land(self, miss: Miss, answer: Answer, body: bytes, flight: Flight) -> None:
        """Store a complete answer and land its flight, whose followers then read it from the cache (or go
        upstream themselves). This instance's followers can read it while it waits to be stored, so its
        flight lands at once; one mirrored to other instances lands once Redis has the entry."""
        key = miss.asked.key
        if not miss.storing:
            self.flights.land(key, flight, complete=True, stored=False)
        elif flight.mirror is None:
            queued = self._store(miss.asked, answer, body)
            self.flights.land(key, flight, complete=True, stored=queued)
        else:
            self._store(miss.asked, answer, body, lambda stored: self.flights.land(key, flight, True, stored))

    def _store(self, asked: Asked, answer: Answer, body: bytes, landed: Landed | None = None) -> bool:
        """Queue the answer to be stored if it may be stored; True when it was. `landed` is told whether the
        store has it."""
        try:
            entry = self._entry(asked, answer, body)
        except Exception:
            # A rule that fails on an answer it did not foresee must not fail the request, nor leave its
            # flight's followers waiting: the answer is just not stored.
            logger.exception("judging an answer for the cache failed unexpectedly; it was not stored")
            entry = None
        if entry is None:
            if landed is not None:
                landed(False)
            return False
        return self.stores.put(asked.key, entry, landed)

    def _entry(self, asked: Asked, answer: Answer, body: bytes) -> CachedResponse | None:
        """The entry to store for the answer, or None when it may not be stored. Its age counts from when the
        provider answered, so a store that runs late does not make it younger."""
        status, headers = answer.response.status_code, answer.headers
        if len(body) > self.settings.max_cache_entry_bytes or not is_storable(status, headers, body, asked.endpoint):
            return None
        content_type = _content_type(headers)
        usage = reported_usage(asked.endpoint, content_type, body)
        model = asked.model
        if self.providers[asked.provider].model_from_answer:
            model = reported_model(asked.endpoint, content_type, body) or model
        return CachedResponse(
            status=status,
            content_type=content_type,
            body=body,
            created_at=answer.answered_at,
            provider=asked.provider,
            endpoint=asked.endpoint_path,
            model=model,
            namespace=asked.control.namespace,
            ttl=asked.control.ttl,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            upstream_seconds=event_loop_time() - answer.asked_at,
            prompt_preview=prompt_preview(asked.request),
        )

    # Answers

    def _answer(
        self, asked: Asked, entry: CachedResponse, answer: Replay, status: CacheStatus, coalesced: bool = False
    ) -> BufferedResponse:
        """A stored entry's answer (a coalesced hit, or a stale fallback), with its age. A plain hit's is
        made by `hit_answers`, which keeps it for the next."""
        made = HitAnswer.made(entry, answer, self._raw_cache_headers(asked, status, coalesced))
        return made.response(_age(entry, self.clock()))

    @classmethod
    def _cache_headers(cls, asked: Asked, status: CacheStatus, coalesced: bool = False) -> Headers:
        return [(name.decode(), value.decode()) for name, value in cls._raw_cache_headers(asked, status, coalesced)]

    @staticmethod
    def _raw_cache_headers(asked: Asked, status: CacheStatus, coalesced: bool = False) -> list[tuple[bytes, bytes]]:
        """The cache headers of the request's answer; its exchange learns the same facts here, once."""
        _note(asked.exchange, status, coalesced)
        headers = [(b"x-cache-status", status.value.encode()), (b"x-cache-key", asked.key.encode("latin-1"))]
        if coalesced:
            headers.append(COALESCED)
        return headers

    # Not cacheable

    async def _pass_through(
        self, method: str, receive: Receive, upstream: Upstream, length: int | None, exchange: Exchange | None
    ) -> ASGIApp:
        """`length`: the body's declared length (checked against the limit), None when chunked or absent."""
        content: RequestContent = None
        extra_headers: Headers = []
        if length and upstream.provider.auth is AuthStyle.SIGV4:
            content = await read_request_body(receive, self.settings.max_request_bytes)  # signed with the request
        elif length:
            content = stream_request_body(receive)
            extra_headers = [("content-length", str(length))]
        elif is_chunked(upstream.client_headers):
            # Read (within the limit) before forwarding, so a 413 can still be answered.
            content = await read_request_body(receive, self.settings.max_request_bytes)
        return await self._relay_through(upstream, method, content, exchange, extra_headers)

    async def _relay_through(
        self,
        upstream: Upstream,
        method: str,
        content: RequestContent,
        exchange: Exchange | None,
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> ASGIApp:
        """Relay what the upstream answers as it arrives, storing nothing (BYPASS)."""
        _note(exchange, CacheStatus.BYPASS)
        headers = [*upstream.headers, *extra_headers]
        deadline = event_loop_time() + self.total_timeout
        waited = within(self.total_timeout)
        try:
            try:
                async with waited:
                    response = await self.http.open(upstream.provider, method, upstream.url, headers, content)
            except TimeoutError:
                if waited.expired():
                    raise self._past_total_timeout(upstream.provider) from None
                raise
        except ProxyError as error:
            error.headers.update([("x-cache-status", CacheStatus.BYPASS.value)])
            raise
        relayed = [*client_response_headers(response.headers.multi_items()), ("x-cache-status", "BYPASS")]
        chunks = UpstreamBody(response, upstream.provider.name)
        return RelayResponse(response.status_code, relayed, chunks, deadline=deadline)


COALESCED = (b"x-cache-coalesced", b"true")
HIT_STATUS = CacheStatus.HIT.value


def _age(entry: CachedResponse, now: float) -> int:
    return max(0, int(now - entry.created_at))


def _note(exchange: Exchange | None, status: CacheStatus, coalesced: bool = False) -> None:
    if exchange is not None:
        exchange.cache_status, exchange.coalesced = status.value, coalesced


def _content_type(headers: Headers) -> str:
    return next((value for name, value in headers if name.lower() == "content-type"), "")
