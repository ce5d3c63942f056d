"""Request coalescing across proxy instances that share one Redis.

The first instance to miss a key takes a short-lived lock (`SET NX PX`) and becomes the leader. An
instance that finds the lock taken asks the leader's instance to share the flight (it pushes the flight's
stream name onto that instance's list of follow requests, named in the lock's token) and reads the
flight's Redis Stream with blocking `XREAD` from its first entry. From that request on, the leader
appends its answer's start, the chunks so far and every chunk after to the stream, so the follower's
clients get the same bytes, live; a flight nobody follows writes only its end (most flights: mirroring
every chunk of every stream to Redis cost more than relaying it). The lock is released only by its owner
(a script compares the token), and it expires by itself after `CACHE_LOCK_TIMEOUT` if the leader dies;
waiters give up after the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Literal, Protocol

import anyio
import orjson
from redis.exceptions import NoScriptError, RedisError
from redis.typing import EncodableT, FieldT

from cache.base import CachedResponse, CacheError
from cache.redis_backend import RedisBackend, RedisClient, connect

logger = logging.getLogger("openai_proxy.cache")

# How long a finished flight's stream stays readable, for waiters that are still reading it.
FINISHED_KEPT_FOR_MS = 30_000
# Each blocking read waits at most this long, so a lost connection is noticed.
_BLOCK_MS = 1000
# Events mirrored in one round trip, at most.
_MIRROR_BATCH = 1000

# KEYS: the flight's stream, its lock. ARGV: the owner's token, complete, stored, ms the stream stays.
# The end and the release in one step, so no instance finds the lock held by a flight that is over.
_END_SCRIPT = """
local stream, lock = KEYS[1], KEYS[2]
local token, complete, stored, kept_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
redis.call('XADD', stream, '*', 'e', 'end', 'complete', complete, 'stored', stored)
redis.call('PEXPIRE', stream, kept_ms)
if redis.call('GET', lock) == token then redis.call('DEL', lock) end
return 1
"""

# KEYS: an entry, the lock of its key's flight. ARGV: a new owner's token, the lock's lifetime in ms.
# The entry's hash when there is one; else the lock, taken unless another instance holds it (its token).
_READ_OR_CLAIM_SCRIPT = """
local fields = redis.call('HGETALL', KEYS[1])
if #fields > 0 then return {1, fields} end
return {0, redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2], 'GET')}
"""


# One event of a flight, as stored in its Redis Stream.
Event = dict[FieldT, EncodableT]


class FlightReceiver(Protocol):
    """What a remote leader's events are delivered to (a local `Flight`), with its answer's shape."""

    streamed: bool
    with_usage: bool

    def started(self, status: int, headers: list[tuple[str, str]]) -> None: ...

    def publish(self, chunk: bytes) -> None: ...


class Lease:
    """This instance leads the flight of one key. Once another instance follows it (`mirror`), what passes
    is mirrored to Redis, in order, by the instance's one mirror writer (`RedisFlights.post`), so the
    request path never waits for Redis; until then it is only kept (references to the flight's chunks)."""

    leads: Literal[True] = True

    def __init__(self, flights: RedisFlights, key: str, token: str) -> None:
        self._flights = flights
        self._key = key
        self.token = token
        self.stream = flights.stream_key(key, token)
        self.failed = False  # a write to Redis failed: nothing more is mirrored, and the end says incomplete
        self.mirroring = False
        self._start: Event | None = None
        self._so_far: Callable[[], bytes] | None = None
        self._finishing = False
        self._end = (False, False)
        self._ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def started(
        self,
        status: int,
        headers: Sequence[tuple[str, str]],
        streamed: bool,
        with_usage: bool,
        so_far: Callable[[], bytes],
    ) -> None:
        """`so_far()`: the flight's chunks published until now, joined (the flight keeps them, compressed;
        this mirror keeps none of its own)."""
        self._so_far = so_far
        self._start = {
            "e": "start",
            "status": status,
            "headers": orjson.dumps(list(headers)),
            "streamed": int(streamed),
            "usage": int(with_usage),
        }
        if self.mirroring:
            self._flights.post(self, self._start)

    def publish(self, chunk: bytes) -> None:
        if self.mirroring:
            self._flights.post(self, {"e": "chunk", "d": chunk})

    def mirror(self) -> None:
        """Another instance follows: mirror the flight from its start (the chunks so far in one event),
        then each chunk as it passes. Too late once the flight is finishing: its end alone tells."""
        if self.mirroring or self._finishing:
            return
        self.mirroring = True
        if self._start is not None:
            self._flights.post(self, self._start)
        so_far = self._so_far() if self._so_far is not None else b""
        if so_far:
            self._flights.post(self, {"e": "chunk", "d": so_far})

    def finish(self, complete: bool, stored: bool) -> None:
        self._finishing = True
        self._so_far = None
        self._end = (complete, stored)
        self._flights.post(self, None)

    async def followers(self) -> int:
        """Clients of other instances reading this flight now. Raises CacheError when Redis fails."""
        redis, key = self._flights.redis, listeners_key(self.stream)

        async def count() -> Any:
            return await redis.get(key)

        return int(await self._flights.run("coalescing", count) or 0)

    async def finished(self) -> None:
        """Return once the flight's end is in Redis and its lock released (or that failed)."""
        await asyncio.shield(self._ended)

    def abandon(self) -> None:
        """Done with, whether or not its end reached Redis (at shutdown it does not: followers time out)."""
        if not self._ended.done():
            self._ended.set_result(None)

    def ending(self) -> tuple[str, str, bool, bool]:
        """What its end says: its key, its token, whether the flight completed (and nothing failed to be
        mirrored), and whether its answer was stored."""
        complete, stored = self._end
        return self._key, self.token, complete and not self.failed, stored


class RemoteLeader:
    """Another instance leads the flight of one key; its events are read from Redis."""

    leads: Literal[False] = False

    def __init__(self, flights: RedisFlights, stream: str, holder: str) -> None:
        self._flights = flights
        self._stream = stream
        self._holder = holder

    async def relay_into(self, flight: FlightReceiver) -> tuple[bool, bool]:
        """Deliver the leader's start and chunks to `flight` as they arrive; return (complete, stored).
        While it reads, the leader knows this instance listens (its upstream request goes on for it).
        Raises CacheError when Redis fails; the caller bounds the wait."""
        await self._count_listener(+1)
        try:
            return await self._relay_into(flight)
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(CacheError):
                await self._count_listener(-1)

    async def _count_listener(self, change: int) -> None:
        """Count this instance in (asking the leader's instance to mirror the flight) or out."""
        redis, key = self._flights.redis, listeners_key(self._stream)
        lifetime = self._flights.lock_ms + FINISHED_KEPT_FOR_MS
        requests = self._flights.follow_key(instance_of(self._holder))

        async def count() -> None:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.incrby(key, change)
                pipe.pexpire(key, lifetime)  # an instance that dies without leaving is forgotten in time
                if change > 0:
                    pipe.rpush(requests, self._stream)
                    pipe.pexpire(requests, lifetime)  # nor are the requests to an instance that died
                await pipe.execute()

        await self._flights.run("coalescing", count)

    async def _relay_into(self, flight: FlightReceiver) -> tuple[bool, bool]:
        last = "0-0"
        while True:

            async def read(last: str = last) -> Any:
                return await self._flights.reader.xread({self._stream: last}, count=512, block=_BLOCK_MS)

            answer = await self._flights.run("coalescing", read)
            messages = [message for _, stream_messages in answer or [] for message in stream_messages]
            if last == "0-0" and messages and messages[-1][1][b"e"] == b"end":
                # The flight ended before this instance looked: its answer is stored, or it failed and this
                # instance must ask the upstream itself; its bytes are not replayed.
                return False, messages[-1][1][b"stored"] == b"1"
            for message_id, fields in messages:
                last = message_id.decode() if isinstance(message_id, bytes) else str(message_id)
                kind = fields[b"e"]
                if kind == b"chunk":
                    flight.publish(fields[b"d"])
                elif kind == b"start":
                    flight.streamed = fields[b"streamed"] == b"1"
                    flight.with_usage = fields[b"usage"] == b"1"
                    headers = [(name, value) for name, value in orjson.loads(fields[b"headers"])]
                    flight.started(int(fields[b"status"]), headers)
                elif kind == b"end":
                    return fields[b"complete"] == b"1", fields[b"stored"] == b"1"


def instance_of(holder: str) -> str:
    """The instance named in a lock's token (`<instance>-<flight>`)."""
    return holder.partition("-")[0]


def listeners_key(stream: str) -> str:
    """How many instances read a flight's stream now (each counts itself in and out)."""
    return f"{stream}:listeners"


def connect_reader(url: str, *, cluster: bool, timeout: float) -> RedisClient:
    """The client for a flight's blocking reads: its socket timeout is longer than a read's block, and
    connecting is as quick as for any other command (`timeout`)."""
    return connect(url, cluster=cluster, timeout=_BLOCK_MS / 1000 + timeout, connect_timeout=timeout)


class RedisFlights:
    """Cross-instance coalescing on the Redis of a `RedisBackend`, whose client and failure handling
    (`run`) it shares; `reader` (`connect_reader`) is its own for blocking reads."""

    def __init__(self, backend: RedisBackend, reader: RedisClient, lock_timeout: float) -> None:
        self.backend = backend
        self.redis = backend.redis
        self.run = backend.run
        self.reader = reader
        self.lock_ms = max(1, int(lock_timeout * 1000))
        self._end = self.redis.register_script(_END_SCRIPT)
        self._read_or_claim = self.redis.register_script(_READ_OR_CLAIM_SCRIPT)
        self.instance = secrets.token_hex(8)
        # The flights this instance leads, by key and by stream, until their end is in Redis.
        self._leases: dict[str, Lease] = {}
        self._by_stream: dict[str, Lease] = {}
        self._follow_requests: asyncio.Task[None] | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        # What the leases mirror, in order, for one writer: each round trip to Redis carries every event
        # posted meanwhile, of every flight (a thousand streams relaying at once cost a few pipelines a
        # turn of the loop, not one each per chunk). A lease's end is marked by None.
        self._outbox: list[tuple[Lease, Event | None]] = []
        self._posted = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    def lock_key(self, key: str) -> str:
        return f"{self.backend.entry_key(key)}:lock"

    def stream_key(self, key: str, token: str) -> str:
        return f"{self.backend.entry_key(key)}:live:{token}"

    def follow_key(self, instance: str) -> str:
        """The list of follow requests to one instance: the streams of its flights others want mirrored."""
        return f"{self.backend.prefix}:follow:{instance}"

    async def claim(self, key: str, again: bool = False) -> Lease | RemoteLeader:
        """Lead the flight of `key`, or learn which other instance's flight to follow.
        Raises CacheError when Redis fails (the caller then leads for this instance only)."""
        token = await self._new_token(key)
        lock = self.lock_key(key)

        async def take() -> Any:
            return await self.redis.set(lock, token, nx=True, px=self.lock_ms, get=True)

        return await self._claimed(key, token, await self.run("coalescing", take), again=again)

    async def read_or_claim(self, key: str) -> tuple[CachedResponse | None, Lease | RemoteLeader | None]:
        """The entry of `key` when Redis holds one; else, as `claim` gives it, the flight to lead or follow:
        one round trip where a lookup and a claim take two (both keys are in the entry's hash slot).
        Raises CacheError when Redis fails."""
        token = await self._new_token(key)
        keys = [self.backend.entry_key(key), self.lock_key(key)]

        async def read() -> Any:
            return await self._read_or_claim(keys=keys, args=[token, self.lock_ms])

        found, value = await self.run("cache read", read)
        if found:
            return self.backend.entry_from(dict(zip(value[::2], value[1::2], strict=True))), None
        return None, await self._claimed(key, token, value)

    async def _new_token(self, key: str) -> str:
        previous = self._leases.get(key)
        if previous is not None:
            await previous.finished()  # this instance's last flight of the key is still being wound up
        return f"{self.instance}-{secrets.token_hex(8)}"

    async def _claimed(self, key: str, token: str, holder: bytes | None, again: bool = False) -> Lease | RemoteLeader:
        """The lease of `key` when the lock was taken with `token`; else the flight of its `holder`."""
        if holder is None:
            lease = self._leases[key] = Lease(self, key, token)
            self._by_stream[lease.stream] = lease
            if self._follow_requests is None and not self._closed:
                self._follow_requests = self._spawn(self._serve_follow_requests())
            return lease
        held_by = holder.decode()
        current = self._leases.get(key)
        if not again and instance_of(held_by) == self.instance and (current is None or current.token != held_by):
            # A claim of this instance that never came back (Redis timed out, then ran it): no flight is
            # behind it. Its end tells whoever follows it, and the key is claimed again, once.
            await self.end(key, held_by, complete=False, stored=False)
            return await self.claim(key, again=True)
        return RemoteLeader(self, self.stream_key(key, held_by), held_by)

    async def _serve_follow_requests(self) -> None:
        """Mirror each flight another instance asks to follow, for as long as this instance runs."""
        requests = self.follow_key(self.instance)
        while True:
            # Not through `run`: this loop's failures are no request's, and must not start or prolong the
            # window in which requests skip Redis.
            try:
                popped = await self.reader.blpop([requests], timeout=_BLOCK_MS / 1000)
            except (RedisError, OSError) as exc:
                logger.debug("could not read follow requests from Redis: %s", exc)
                await asyncio.sleep(_BLOCK_MS / 1000)  # their followers time out meanwhile
                continue
            if popped is not None:
                stream = popped[1]
                lease = self._by_stream.get(stream.decode() if isinstance(stream, bytes) else stream)
                if lease is not None:
                    lease.mirror()

    def post(self, lease: Lease, event: Event | None) -> None:
        """Mirror `event` of `lease` to Redis (None: the lease's end), after every event posted before it."""
        if self._closed:  # shutting down: nothing more is mirrored, and the lock expires by itself
            lease.failed = True
            if event is None:
                lease.abandon()
            return
        if event is not None and lease.failed:
            return
        self._outbox.append((lease, event))
        self._posted.set()
        if self._writer is None or self._writer.done():
            self._writer = self._spawn(self._write_posted())

    async def _write_posted(self) -> None:
        while True:
            await self._posted.wait()
            self._posted.clear()
            while self._outbox:
                batch, self._outbox = self._outbox[:_MIRROR_BATCH], self._outbox[_MIRROR_BATCH:]
                await self._write(batch)

    async def _write(self, batch: list[tuple[Lease, Event | None]]) -> None:
        events = [(lease, event) for lease, event in batch if event is not None and not lease.failed]
        if events:
            lifetime = self.lock_ms + FINISHED_KEPT_FOR_MS

            async def append() -> None:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for lease, event in events:
                        pipe.xadd(lease.stream, event)
                    for stream in dict.fromkeys(lease.stream for lease, _ in events):
                        pipe.pexpire(stream, lifetime)
                    await pipe.execute()

            try:
                await self.run("coalescing", append)
            except CacheError as exc:
                logger.debug("could not share flights through Redis: %s", exc)
                for lease, _ in events:
                    lease.failed = True  # its waiters time out and go upstream themselves
        ended = [lease for lease, event in batch if event is None]
        if ended:
            self._spawn(self._end_leases(ended))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _end_leases(self, leases: list[Lease]) -> None:
        """End `leases` (`end_all`): the mirror writer calls it once every event before them is written. Each
        is done with afterwards, whether or not its end reached Redis."""
        try:
            await self.end_all([lease.ending() for lease in leases])
        finally:
            for lease in leases:
                lease.abandon()

    async def end(self, key: str, token: str, complete: bool, stored: bool) -> None:
        await self.end_all([(key, token, complete, stored)])

    async def end_all(self, ends: list[tuple[str, str, bool, bool]]) -> None:
        """Write the end of each flight (key, token, complete, stored) and release its lock, all in one round
        trip. One that fails is let be: its lock expires by itself, and its followers time out."""
        try:
            await self.run("coalescing", lambda: self._run_ends(ends))
        except CacheError:
            pass
        finally:
            for key, token, _, _ in ends:
                self._forget(key, token)

    async def _run_ends(self, ends: list[tuple[str, str, bool, bool]]) -> None:
        if self.backend.cluster:  # a cluster refuses scripts in a pipeline: a round trip each, side by side
            calls = (self._end(keys=keys, args=args) for keys, args in map(self._end_call, ends))
            results = await asyncio.gather(*calls, return_exceptions=True)
            failed = next((result for result in results if isinstance(result, BaseException)), None)
            if failed is not None:
                raise failed
            return
        for loaded in (False, True):
            async with self.redis.pipeline(transaction=False) as pipe:
                for keys, args in map(self._end_call, ends):
                    # EVALSHA itself: a registered script would have the pipeline ask SCRIPT EXISTS first.
                    pipe.evalsha(self._end.sha, len(keys), *keys, *args)
                results = await pipe.execute(raise_on_error=False)
            unscripted = [end for end, result in zip(ends, results, strict=True) if isinstance(result, NoScriptError)]
            if loaded or not unscripted:
                return
            await self.redis.script_load(self._end.script)  # the first ends, or a restarted or flushed server
            ends = unscripted

    def _end_call(self, end: tuple[str, str, bool, bool]) -> tuple[list[str], list[str | int]]:
        """The end script's keys and arguments for one flight's end."""
        key, token, complete, stored = end
        return [self.stream_key(key, token), self.lock_key(key)], [
            token,
            int(complete),
            int(stored),
            FINISHED_KEPT_FOR_MS,
        ]

    def _forget(self, key: str, token: str) -> None:
        """No longer lead the flight of `key` under `token` (a later lease of the key stays)."""
        lease = self._leases.get(key)
        if lease is not None and lease.token == token:
            del self._leases[key]
            self._by_stream.pop(lease.stream, None)

    async def close(self) -> None:
        """Write what is still to be mirrored (a second at most), then stop."""
        deadline = asyncio.get_running_loop().time() + 1.0
        while self._outbox and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        self._closed = True
        for task in (self._writer, self._follow_requests):
            if task is not None:
                task.cancel()
        for lease, event in self._outbox:  # not written within the second: the locks expire by themselves
            if event is None:
                lease.abandon()
        self._outbox.clear()
        for task in list(self.tasks):
            await asyncio.wait([task], timeout=1.0)
        await self.reader.aclose()
