"""Coalescing through Redis, at the level of its flights: a lease mirrors nothing but its end until another
instance follows it, then everything from its start; every lease's events reach its own stream in order,
however many leases mirror at once (one writer for all of them), and a lease ends even when Redis cannot
be reached."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from redis.asyncio import Redis

from cache.base import CacheError
from cache.redis_backend import RedisBackend
from cache.redis_flights import Lease, RedisFlights, RemoteLeader, connect_reader
from proxy.coalesce import Flight
from tests.redis_servers import RedisCluster as RedisTestCluster
from tests.redis_servers import RedisServer

pytestmark = pytest.mark.anyio

T = TypeVar("T")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def flights_at(url: str) -> RedisFlights:
    backend = RedisBackend.at(url, timeout=2.0, prefix=f"test-flights-{uuid.uuid4().hex}")
    return RedisFlights(backend, connect_reader(url, cluster=False, timeout=1.0), lock_timeout=5.0)


def flight_of(lease: Lease, with_usage: bool = False) -> Flight:
    """A streamed flight mirrored to `lease` and started, as the proxy's handler leads one."""
    flight = Flight(streamed=True, with_usage=with_usage)
    flight.mirror = lease
    flight.started(200, [("content-type", "text/event-stream")])
    return flight


def round_trips(flights: RedisFlights) -> list[str]:
    """What each of the flights' Redis operations from now on was for, one per round trip."""
    trips: list[str] = []
    run = flights.run

    async def counted(what: str, operation: Callable[[], Awaitable[T]]) -> T:
        trips.append(what)
        return await run(what, operation)

    flights.run = counted
    return trips


async def test_many_leases_mirror_their_events_in_order_each_to_its_own_stream(redis_server: RedisServer) -> None:
    flights = flights_at(redis_server.url)
    try:
        leases = [await flights.claim(f"key-{number}") for number in range(50)]
        assert all(isinstance(lease, Lease) for lease in leases)
        for lease in leases:
            lease.mirror()  # as when another instance follows each
        trips = round_trips(flights)
        flights_mirrored = [flight_of(lease) for lease in leases]  # type: ignore[arg-type]
        for chunk in range(20):  # interleaved, as streams relaying at once publish
            for number, flight in enumerate(flights_mirrored):
                flight.publish(b"lease %d chunk %d" % (number, chunk))
        for lease in leases:
            lease.finish(complete=True, stored=True)
        await asyncio.wait_for(asyncio.gather(*(lease.finished() for lease in leases)), 10)  # type: ignore[union-attr]
        # The 1,050 events in a round trip or two, and the 50 ends (and lock releases) in one or two: not a
        # round trip per lease.
        assert len(trips) <= 4, trips

        redis = Redis.from_url(redis_server.url)
        try:
            for number, lease in enumerate(leases):
                assert isinstance(lease, Lease)
                events = [fields for _, fields in await redis.xrange(lease.stream)]
                assert [event[b"e"] for event in events] == [b"start", *[b"chunk"] * 20, b"end"]
                assert [event[b"d"] for event in events[1:-1]] == [
                    b"lease %d chunk %d" % (number, c) for c in range(20)
                ]
                assert (events[-1][b"complete"], events[-1][b"stored"]) == (b"1", b"1")
                assert await redis.get(flights.lock_key(f"key-{number}")) is None, "the lock is released"
        finally:
            await redis.aclose()
    finally:
        await flights.close()
        await flights.backend.close()


async def test_a_lease_ends_even_when_redis_cannot_be_reached() -> None:
    server = RedisServer().start()
    flights = flights_at(server.url)
    try:
        lease = await flights.claim("key")
        assert isinstance(lease, Lease)
        lease.mirror()  # another instance follows
        server.stop()
        flight_of(lease).publish(b"chunk")
        lease.finish(complete=True, stored=True)

        await asyncio.wait_for(lease.finished(), 10)

        assert lease.failed, "what could not be mirrored makes the flight incomplete for its followers"
    finally:
        await flights.close()
        await flights.backend.close()
        server.stop()
        server.remove()


async def test_a_lease_that_ends_after_shutdown_began_is_not_waited_for(redis_server: RedisServer) -> None:
    flights = flights_at(redis_server.url)
    try:
        lease = await flights.claim("key")
        assert isinstance(lease, Lease)
        await flights.close()
        lease.publish(b"late")
        lease.finish(complete=True, stored=True)

        await asyncio.wait_for(lease.finished(), 1)

        assert lease.failed
        assert not flights.tasks, "nothing left running after shutdown"
    finally:
        await flights.backend.close()


class Receiver:
    """A local flight, as a follower's instance feeds it from another instance's lease."""

    def __init__(self) -> None:
        self.streamed = self.with_usage = False
        self.status: int | None = None
        self.chunks: list[bytes] = []

    def started(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.status = status

    def publish(self, chunk: bytes) -> None:
        self.chunks.append(chunk)


async def followed_until_a_chunk_came(
    remote: Lease | RemoteLeader,
) -> tuple[Receiver, asyncio.Task[tuple[bool, bool]]]:
    """Another instance's flight, relayed into a receiver in a task of its own, once its first chunk came."""
    assert isinstance(remote, RemoteLeader)
    receiver = Receiver()
    relaying = asyncio.create_task(remote.relay_into(receiver))
    for _ in range(200):
        if receiver.chunks:
            break
        await asyncio.sleep(0.02)
    return receiver, relaying


async def test_a_lease_mirrors_nothing_until_another_instance_follows_then_everything_from_the_start(
    redis_server: RedisServer,
) -> None:
    leading, following = flights_at(redis_server.url), flights_at(redis_server.url)
    following.backend = leading.backend  # one cache: the same keys
    redis = Redis.from_url(redis_server.url)
    try:
        lease = await leading.claim("key")
        assert isinstance(lease, Lease)
        flight = flight_of(lease, with_usage=True)
        for number in range(3):
            flight.publish(b"chunk %d;" % number)
        await asyncio.sleep(0.2)
        assert await redis.xlen(lease.stream) == 0, "nobody follows: nothing is mirrored"

        remote = await following.claim("key")
        receiver, relaying = await followed_until_a_chunk_came(remote)
        flight.publish(b"chunk 3;")
        lease.finish(complete=True, stored=True)

        assert await asyncio.wait_for(relaying, 5) == (True, True)
        assert (receiver.status, receiver.streamed, receiver.with_usage) == (200, True, True)
        assert b"".join(receiver.chunks) == b"chunk 0;chunk 1;chunk 2;chunk 3;"
    finally:
        await redis.aclose()
        await following.close()
        await leading.close()
        await leading.backend.close()


async def test_a_lease_nobody_follows_writes_only_its_end_and_releases_its_lock(redis_server: RedisServer) -> None:
    flights = flights_at(redis_server.url)
    redis = Redis.from_url(redis_server.url)
    try:
        lease = await flights.claim("key")
        assert isinstance(lease, Lease)
        flight_of(lease).publish(b"chunk")
        lease.finish(complete=True, stored=False)
        lease.mirror()  # a follow request that came too late: the end alone tells the follower
        await asyncio.wait_for(lease.finished(), 5)

        events = [fields for _, fields in await redis.xrange(lease.stream)]
        assert [event[b"e"] for event in events] == [b"end"]
        assert await redis.get(flights.lock_key("key")) is None
    finally:
        await redis.aclose()
        await flights.close()
        await flights.backend.close()


async def end_every_other_stored(flights: RedisFlights, leases: list[Any], redis: Any) -> None:
    """Finish `leases` (key-0, key-1, ...), every other one stored, and check that each wrote its end, saying
    whether it was stored, and released its lock."""
    for number, lease in enumerate(leases):
        assert isinstance(lease, Lease)
        lease.finish(complete=True, stored=number % 2 == 0)
    await asyncio.wait_for(asyncio.gather(*(lease.finished() for lease in leases)), 5)

    for number, lease in enumerate(leases):
        events = [fields for _, fields in await redis.xrange(lease.stream)]
        assert [(event[b"e"], event[b"stored"]) for event in events] == [(b"end", b"%d" % (number % 2 == 0))]
        assert await redis.get(flights.lock_key(f"key-{number}")) is None, "the lock is released"


async def test_leases_end_and_release_their_locks_even_after_redis_forgot_the_scripts(
    redis_server: RedisServer,
) -> None:
    flights = flights_at(redis_server.url)
    redis = Redis.from_url(redis_server.url)
    try:
        leases = [await flights.claim(f"key-{number}") for number in range(5)]
        await redis.script_flush()  # as a restarted server would have
        trips = round_trips(flights)
        await end_every_other_stored(flights, leases, redis)
        assert trips == ["coalescing"], "the five ends in one go, the script loaded again on the way"
        assert not flights._leases, "no flight is led any more"
    finally:
        await redis.aclose()
        await flights.close()
        await flights.backend.close()


async def test_leases_on_a_redis_cluster_end_and_release_their_locks(redis_cluster: RedisTestCluster) -> None:
    """A cluster takes no script in a pipeline: the ends that go together there each take a round trip."""
    backend = RedisBackend.at(redis_cluster.url, cluster=True, timeout=2.0, prefix=f"test-flights-{uuid.uuid4().hex}")
    flights = RedisFlights(backend, connect_reader(redis_cluster.url, cluster=True, timeout=1.0), lock_timeout=5.0)
    try:
        leases = [await flights.claim(f"key-{number}") for number in range(6)]  # spread over the nodes
        await end_every_other_stored(flights, leases, backend.redis)
        assert not flights._leases, "no flight is led any more"
    finally:
        await flights.close()
        await backend.close()


async def claimed(flights: RedisFlights, key: str) -> Lease | RemoteLeader:
    for _ in range(20):
        try:
            return await flights.claim(key)
        except CacheError:
            await asyncio.sleep(0.1)
    raise AssertionError("Redis did not answer a claim")


async def test_follow_requests_are_served_again_once_redis_is_back() -> None:
    server = RedisServer().start()
    leading, following = flights_at(server.url), flights_at(server.url)
    following.backend = leading.backend
    try:
        first = await leading.claim("before")  # starts serving follow requests
        assert isinstance(first, Lease)
        server.stop()
        await asyncio.sleep(1.5)  # its reads of follow requests fail meanwhile
        server.start()  # the same port, empty

        lease = await claimed(leading, "after")  # its pooled connections went with the old server
        assert isinstance(lease, Lease)
        flight_of(lease).publish(b"chunk;")
        remote = await claimed(following, "after")
        receiver, relaying = await followed_until_a_chunk_came(remote)
        lease.finish(complete=True, stored=True)

        assert await asyncio.wait_for(relaying, 5) == (True, True)
        assert b"".join(receiver.chunks) == b"chunk;"
    finally:
        await following.close()
        await leading.close()
        await leading.backend.close()
        server.stop()
        server.remove()


async def test_a_lookup_either_reads_the_entry_or_claims_the_flight_in_one_round_trip(
    redis_server: RedisServer,
) -> None:
    from cache.base import CachedResponse

    flights = flights_at(redis_server.url)
    trips = round_trips(flights)
    redis = Redis.from_url(redis_server.url)
    try:
        entry, lease = await flights.read_or_claim("missing")
        assert entry is None and isinstance(lease, Lease) and len(trips) == 1
        assert (await redis.get(flights.lock_key("missing"))).decode() == lease.token
        another_instance = RedisFlights(
            flights.backend, connect_reader(redis_server.url, cluster=False, timeout=1.0), 5.0
        )
        entry, other = await another_instance.read_or_claim("missing")
        assert entry is None and isinstance(other, RemoteLeader), "held by a flight that exists: followed"
        await another_instance.close()
        lease.finish(complete=False, stored=False)
        await asyncio.wait_for(lease.finished(), 5)

        stored = CachedResponse(200, "application/json", b'{"ok": true}', 1.0, "openai", "v1/chat/completions")
        await flights.backend.set("present", stored)
        trips.clear()
        entry, claim = await flights.read_or_claim("present")
        assert (entry, claim, len(trips)) == (stored, None, 1)
        assert await redis.get(flights.lock_key("present")) is None, "a hit takes no lock"
    finally:
        await redis.aclose()
        await flights.close()
        await flights.backend.close()


async def test_a_lock_of_this_instance_that_no_flight_holds_is_ended_and_claimed_again(
    redis_server: RedisServer,
) -> None:
    # A claim whose answer never came back (Redis timed out, then ran it) left the lock held with no flight.
    flights = flights_at(redis_server.url)
    redis = Redis.from_url(redis_server.url)
    try:
        orphan = f"{flights.instance}-dead"
        await redis.set(flights.lock_key("k"), orphan, px=60_000)

        entry, claim = await flights.read_or_claim("k")

        assert entry is None and isinstance(claim, Lease), "led, not followed for a lock timeout"
        ended = [fields for _, fields in await redis.xrange(flights.stream_key("k", orphan))]
        assert [(event[b"e"], event[b"complete"]) for event in ended] == [(b"end", b"0")], "its followers are told"
        claim.finish(complete=False, stored=False)
        await asyncio.wait_for(claim.finished(), 5)
    finally:
        await redis.aclose()
        await flights.close()
        await flights.backend.close()
