"""The shared cache store: Redis (or Valkey), one server or a Redis Cluster, for many proxy instances.

Keys, with `P` the key prefix (REDIS_KEY_PREFIX):

- `P:{<cache key>}`: one entry, a hash holding its body and what is known of it. Written whole by one
  script, so no reader ever sees half an entry. Redis expires it a grace period (`EXPIRED_KEPT_FOR`)
  after its own time to live ends: until then it answers EXPIRED, or STALE if the upstream fails.
- `P:{<cache key>}:lock` and `P:{<cache key>}:live:<token>`: the cross-instance flight of a miss (see
  `SharedFlights`). The braces are a hash tag, so an entry's keys live on one cluster node.
- `{P}:...`: the index: sizes, creation and use times (LRU order), Redis expiry times, what the admin
  API lists, hit counts and their ranking, totals, counters, savings, the invalidation feed, and what the
  dashboard shows over time (activity per minute and hour, the latest requests). All in one hash slot,
  so each change to it is one atomic script; each script touches a bounded number of entries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import astuple
from typing import Any, NamedTuple, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import anyio
import hiredis
import orjson
from redis.asyncio import Connection, ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig

from cache.base import (
    ENTRY_FIELDS,
    CachedResponse,
    CacheError,
    EntryFilter,
    EntryInfo,
    StoreBusy,
    entry_from_values,
    entry_values,
)
from cache.stats import (
    ACTIVITY_KEPT_SECONDS,
    RECENT_REQUESTS_KEPT,
    SAVING_FIGURES,
    ActivityPoint,
    CacheStatistics,
    RequestRecord,
    SavedFigures,
    Saving,
    Tally,
    activity_buckets,
)

logger = logging.getLogger("openai_proxy.cache")

# An entry stays in Redis this long after its TTL ended, to be served if the upstream fails.
EXPIRED_KEPT_FOR = 24 * 3600.0
# After this many connection failures in a row, requests skip Redis for RETRY_AFTER seconds instead of
# each waiting for a timeout. One failure alone may be a slow moment of this process's own event loop.
FAILURES_TO_SKIP = 3
RETRY_AFTER = 1.0
# How often the maintenance loop drops entries Redis expired from the index.
PRUNE_INTERVAL = 1.0
# Connections to one Redis server per process (blocking XREADs of coalescing have a pool of their own).
# A burst of requests queues for these instead of opening a connection each: a command takes well under
# a millisecond, while a hundred connects at once on a busy event loop can outlast REDIS_TIMEOUT.
MAX_CONNECTIONS = 32
# Connections opened at start-up, so the first burst finds them ready.
WARM_CONNECTIONS = 8
_PRUNE_BATCH = 1000
_PAGE = 500
_INVALIDATIONS_KEPT = 10_000

RedisClient = Redis | RedisCluster
T = TypeVar("T")


def masked_url(url: str) -> str:
    """The URL with its password (and a user's name, if alone) replaced by `***`, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username if parts.password is not None else None
    credentials = f"{user}:***" if user else "***"
    return urlunsplit((parts.scheme, f"{credentials}@{host}", parts.path, parts.query, parts.fragment))


def connect(url: str, *, cluster: bool, timeout: float, connect_timeout: float | None = None) -> RedisClient:
    """A client that never retries by itself: a failure must reach the caller within `timeout`. Past
    `MAX_CONNECTIONS` busy connections, a command waits up to `timeout` for one (a plain pool fails)."""
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": connect_timeout if connect_timeout is not None else timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if cluster:
        return RedisCluster.from_url(url, **options)
    # With maintenance notifications on (redis-py's default, "auto"), its pool hands out a connection the
    # server closed (a restarted Redis) without checking it, so its next command fails.
    pool = WaitingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        wait=timeout,
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
        connection_class=HiredisPackingConnection,
        **options,
    )
    return Redis(connection_pool=pool)


class HiredisPackingConnection(Connection):
    """redis-py's asyncio connection, its commands packed by hiredis as its synchronous client packs them:
    the same bytes, eight times faster than its pure-Python packer (54 against 6.5 us for a cache write's
    index script), which was a tenth of a Redis miss's CPU. (A cluster's client takes no connection class.)"""

    def pack_command(self, *args: Any) -> list[bytes]:
        # As redis-py's packers do: a command name of several words goes as several arguments.
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            packed: bytes = hiredis.pack_command(args)
        except TypeError:
            # A bytearray, which hiredis takes as bytes only; or a bool, None or other value Redis has no
            # form for, refused as redis-py refuses it.
            try:
                as_bytes = tuple(bytes(arg) if isinstance(arg, bytearray) else arg for arg in args)
                packed = hiredis.pack_command(cast(Any, as_bytes))  # (its stub types a tuple of one item)
            except TypeError as exc:
                raise DataError(str(exc)) from exc
        return [packed]


class PoolBusy(RedisConnectionError):
    """No connection of the pool came free in time: Redis may be well, its connections are all in use."""


class WaitingConnectionPool(ConnectionPool):
    """redis-py's plain pool, which fails a command when every connection is busy, made to wait up to `wait`
    seconds for one instead, as its BlockingConnectionPool does. That one takes a condition variable and a
    timeout on every command, which cost a third of a command's CPU (160 against 117 us a GET, measured):
    here a command waits, with its timeout, only when none is free."""

    def __init__(self, *, wait: float, **options: Any) -> None:
        super().__init__(**options)
        self._wait = wait
        self._free = asyncio.Semaphore(self.max_connections)
        self._holding: set[Any] = set()  # connections handed out, each holding one of `_free`

    async def get_connection(self, *_: Any, **__: Any) -> Any:
        if self._free.locked():
            try:
                async with asyncio.timeout(self._wait):
                    await self._free.acquire()
            except TimeoutError:
                raise PoolBusy(
                    f"no Redis connection came free within {self._wait:g} s ({self.max_connections} busy)"
                ) from None
        else:
            await self._free.acquire()  # free: returns at once
        try:
            connection = await super().get_connection()  # type: ignore[no-untyped-call]
        except BaseException:
            self._free.release()  # (a connection it could not ready, it released itself: not one of ours)
            raise
        self._holding.add(connection)
        return connection

    async def release(self, connection: Any) -> None:
        try:
            await super().release(connection)
        finally:
            if connection in self._holding:
                self._holding.discard(connection)
                self._free.release()


class IndexKeys(NamedTuple):
    """The index's keys, all in one hash slot. Every index script gets them all, as Lua locals of the same
    names (`_LUA_INDEX_KEYS`)."""

    sizes: str  # hash: key -> body size
    created: str  # sorted set: keys by creation time (the admin API's order)
    used: str  # sorted set: keys by last use (the LRU order)
    expires: str  # sorted set: keys by the time Redis expires their entry
    meta: str  # hash: key -> JSON [provider, endpoint, model, namespace, created_at, size, prompt_preview]
    hits: str  # hash: key -> hit count
    lasthit: str  # hash: key -> time of the last hit
    totals: str  # hash: entries, bytes
    counters: str  # hash: hits, misses, stale, stores_skipped, evictions
    seq: str  # string: the invalidation feed's latest position
    feed: str  # sorted set: "<seq>:<key>" by seq ("<seq>:" for a purge)
    savings: str  # hash: "provider\x1fmodel\x1f<figure number>" -> total
    ranking: str  # sorted set: keys by hit count (beside `hits`, which older versions made)
    activity: str  # hash: "<step>:<start>:<figure number>" -> count
    periods: str  # sorted set: "<step>:<start>" by start
    recent: str  # list: the latest requests' JSON records, newest first

    @classmethod
    def under(cls, prefix: str) -> IndexKeys:
        return cls(*(f"{{{prefix}}}:{name}" for name in cls._fields))


_LUA_INDEX_KEYS = (
    f"local {', '.join(IndexKeys._fields)} = "
    + ", ".join(f"KEYS[{number}]" for number in range(1, len(IndexKeys._fields) + 1))
    + "\n"
)
_RECORD_FIGURES = 3

# Helpers shared by the index scripts: forget an entry (returns whether it was indexed) and append a key to
# the invalidation feed ("" for a purge of many).
_INDEX_FUNCTIONS = (
    _LUA_INDEX_KEYS
    + """
local function invalidate(key)
  local position = redis.call('INCR', seq)
  redis.call('ZADD', feed, position, position .. ':' .. key)
  redis.call('ZREMRANGEBYSCORE', feed, '-inf', position - tonumber(ARGV[1]))
end
local function forget(key)
  local size = redis.call('HGET', sizes, key)
  if not size then return false end
  redis.call('HDEL', sizes, key)
  redis.call('ZREM', created, key)
  redis.call('ZREM', used, key)
  redis.call('ZREM', expires, key)
  redis.call('HDEL', meta, key)
  redis.call('HDEL', hits, key)
  redis.call('HDEL', lasthit, key)
  redis.call('ZREM', ranking, key)
  redis.call('HINCRBY', totals, 'entries', -1)
  redis.call('HINCRBY', totals, 'bytes', -tonumber(size))
  return true
end
"""
)

# ARGV: kept, key, size, created_at, used_at, expires_at ("" for never), meta, max_entries, max_bytes.
# Returns the keys evicted to make room; their entries are deleted after.
_ADD_SCRIPT = (
    _INDEX_FUNCTIONS
    + """
local key, size = ARGV[2], tonumber(ARGV[3])
if forget(key) then invalidate(key) end
redis.call('HSET', sizes, key, size)
redis.call('ZADD', created, ARGV[4], key)
redis.call('ZADD', used, ARGV[5], key)
if ARGV[6] ~= '' then redis.call('ZADD', expires, ARGV[6], key) end
redis.call('HSET', meta, key, ARGV[7])
redis.call('HINCRBY', totals, 'entries', 1)
redis.call('HINCRBY', totals, 'bytes', size)
local max_entries, max_bytes = tonumber(ARGV[8]), tonumber(ARGV[9])
local evicted = {}
while max_entries > 0 or max_bytes > 0 do
  local entries = tonumber(redis.call('HGET', totals, 'entries') or '0')
  local bytes = tonumber(redis.call('HGET', totals, 'bytes') or '0')
  if entries <= 1 or not ((max_entries > 0 and entries > max_entries) or (max_bytes > 0 and bytes > max_bytes)) then
    break
  end
  local oldest = redis.call('ZRANGE', used, 0, 0)[1]
  if not oldest then break end
  forget(oldest)
  invalidate(oldest)
  evicted[#evicted + 1] = oldest
end
if #evicted > 0 then redis.call('HINCRBY', counters, 'evictions', #evicted) end
return evicted
"""
)

# ARGV: kept, then the keys to forget. Returns those that were indexed.
_FORGET_SCRIPT = (
    _INDEX_FUNCTIONS
    + """
local forgotten = {}
for index = 2, #ARGV do
  if forget(ARGV[index]) then
    invalidate(ARGV[index])
    forgotten[#forgotten + 1] = ARGV[index]
  end
end
return forgotten
"""
)

# ARGV: kept. Marks a purge in the feed: every memory tier drops everything.
_PURGED_SCRIPT = _INDEX_FUNCTIONS + "invalidate('')\nreturn 1\n"

# ARGV: kept, now. Forgets entries whose Redis expiry passed; returns how many.
_PRUNE_SCRIPT = (
    _INDEX_FUNCTIONS
    + f"""
local expired = redis.call('ZRANGEBYSCORE', expires, '-inf', ARGV[2], 'LIMIT', 0, {_PRUNE_BATCH})
for _, key in ipairs(expired) do
  if forget(key) then invalidate(key) end
end
return #expired
"""
)

# ARGV: kept, the oldest activity period to keep, recent requests kept, then the number of counters, entry hits,
# savings, activity periods and recent requests, then each group: name and amount of each counter; key, hits,
# at for each entry; provider, model and the SAVING_FIGURES of each saving (stored as fields
# "provider\\x1fmodel\\x1f<figure number>"); step, start and requests, hits, misses of each period; each request's
# JSON record.
_RECORD_SCRIPT = (
    _INDEX_FUNCTIONS
    + f"local FIGURES = {len(SAVING_FIGURES)}\n"
    + """
local oldest, recent_kept = ARGV[2], tonumber(ARGV[3])
local counter_count, entry_count, saving_count = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local period_count, request_count = tonumber(ARGV[7]), tonumber(ARGV[8])
local at = 9
for _ = 1, counter_count do
  redis.call('HINCRBY', counters, ARGV[at], ARGV[at + 1])
  at = at + 2
end
for _ = 1, entry_count do
  local key, count, last = ARGV[at], ARGV[at + 1], ARGV[at + 2]
  if redis.call('HEXISTS', sizes, key) == 1 then
    redis.call('HINCRBY', hits, key, count)
    redis.call('ZINCRBY', ranking, count, key)
    local previous = tonumber(redis.call('HGET', lasthit, key) or '0')
    if tonumber(last) > previous then redis.call('HSET', lasthit, key, last) end
    redis.call('ZADD', used, 'XX', 'GT', last, key)
  end
  at = at + 3
end
for _ = 1, saving_count do
  local group = ARGV[at] .. '\\31' .. ARGV[at + 1] .. '\\31'
  for index = 1, FIGURES do
    redis.call('HINCRBY', savings, group .. index, ARGV[at + 1 + index])
  end
  at = at + 2 + FIGURES
end
for _ = 1, period_count do
  local period = ARGV[at] .. ':' .. ARGV[at + 1]
  for index = 1, 3 do
    redis.call('HINCRBY', activity, period .. ':' .. index, ARGV[at + 1 + index])
  end
  redis.call('ZADD', periods, ARGV[at + 1], period)
  at = at + 5
end
for _, period in ipairs(redis.call('ZRANGEBYSCORE', periods, '-inf', '(' .. oldest)) do
  redis.call('HDEL', activity, period .. ':1', period .. ':2', period .. ':3')
end
redis.call('ZREMRANGEBYSCORE', periods, '-inf', '(' .. oldest)
for _ = 1, request_count do
  redis.call('LPUSH', recent, ARGV[at])
  at = at + 1
end
if request_count > 0 then redis.call('LTRIM', recent, 0, recent_kept - 1) end
return 1
"""
)

# KEYS: the entry. ARGV: milliseconds to live (0: forever), then field, value pairs.
_WRITE_ENTRY_SCRIPT = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
if tonumber(ARGV[1]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 1
"""


class RedisBackend:
    name = "redis"

    def __init__(
        self,
        redis: RedisClient,
        *,
        where: str,
        prefix: str = "openai-proxy",
        default_ttl: float = 0.0,
        max_entries: int = 0,
        max_bytes: int = 0,
    ) -> None:
        """`redis`: the client of its server or cluster (`connect`); `where`: that server, as messages name it
        (no password). `default_ttl` (CACHE_TTL) sets when Redis may drop an entry that has no TTL of its
        own; `max_entries` and `max_bytes` bound the store (0: unbounded); past them, LRU entries go."""
        self.redis = redis
        self.where = where
        self.cluster = isinstance(redis, RedisCluster)
        self.prefix = prefix
        self.default_ttl = default_ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._index = IndexKeys.under(prefix)
        self._scripts: dict[str, AsyncScript] = {
            name: self.redis.register_script(source)
            for name, source in (
                ("add", _ADD_SCRIPT),
                ("forget", _FORGET_SCRIPT),
                ("purged", _PURGED_SCRIPT),
                ("prune", _PRUNE_SCRIPT),
                ("record", _RECORD_SCRIPT),
                ("write", _WRITE_ENTRY_SCRIPT),
            )
        }
        self._failures = 0
        self._retry_at = 0.0
        self._down_reason = ""
        self._closed = False

    @classmethod
    def at(cls, url: str, *, cluster: bool = False, timeout: float = 0.5, **options: Any) -> RedisBackend:
        """A backend on the server (or cluster node) at `url`; nothing connects before the first command."""
        where = f"redis{' cluster' if cluster else ''} at {masked_url(url)}"
        return cls(connect(url, cluster=cluster, timeout=timeout), where=where, **options)

    def describe(self) -> str:
        return self.where

    def entry_key(self, key: str) -> str:
        return f"{self.prefix}:{{{key}}}"

    async def run(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation, turning its failures into CacheError. After `FAILURES_TO_SKIP`
        connection failures in a row (refused, reset, timed out), operations fail at once for
        `RETRY_AFTER` seconds, so an outage costs requests no waiting; one success ends it."""
        if self._closed:
            raise CacheError(f"{self.describe()}: closed")
        if self._failures >= FAILURES_TO_SKIP and time.monotonic() < self._retry_at:
            raise CacheError(self._down_reason)
        try:
            result = await operation()
        except (RedisError, OSError) as exc:
            message = f"{self.describe()}: {what} failed: {exc}"
            if isinstance(exc, PoolBusy):  # not a sign that Redis is down: no reason to skip it
                raise StoreBusy(message) from exc
            if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)):
                self._failures += 1
                self._retry_at = time.monotonic() + RETRY_AFTER
                self._down_reason = message
            raise CacheError(message) from exc
        self._failures = 0
        return result

    async def _script(self, name: str, args: list[Any], keys: list[str] | None = None) -> Any:
        script = self._scripts[name]
        return await self.run(
            f"cache {name}", lambda: script(keys=keys or list(self._index), args=[_INVALIDATIONS_KEPT, *args])
        )

    async def open(self) -> None:
        """Check that Redis answers, and open a few connections. When it does not answer, the backend
        stays usable: it connects as soon as Redis is back."""
        await self.ping()
        if not self.cluster:
            await asyncio.gather(*(self.ping() for _ in range(WARM_CONNECTIONS)))

    async def ping(self) -> None:
        await self.run("ping", self.redis.ping)

    async def get(self, key: str) -> CachedResponse | None:
        async def read() -> dict[bytes, bytes]:
            return cast(dict[bytes, bytes], await self.redis.hgetall(self.entry_key(key)))

        return self.entry_from(await self.run("cache read", read))

    @staticmethod
    def entry_from(fields: dict[bytes, bytes]) -> CachedResponse | None:
        """The entry an entry key's hash holds (None when there is none)."""
        return _entry(fields) if fields else None

    async def set(self, key: str, entry: CachedResponse) -> None:
        size = len(entry.body)
        if self.max_bytes and size > self.max_bytes:
            await self.delete(key)  # it would evict everything and still not fit; what it replaces is outdated
            return
        ttl = entry.ttl if entry.ttl is not None else self.default_ttl
        lifetime = ttl + EXPIRED_KEPT_FOR if ttl > 0 else 0.0
        meta = orjson.dumps(
            [entry.provider, entry.endpoint, entry.model, entry.namespace, entry.created_at, size, entry.prompt_preview]
        )
        indexed = [
            key,
            size,
            repr(entry.created_at),
            repr(entry.created_at),
            repr(time.time() + lifetime) if lifetime else "",
            meta,
            self.max_entries,
            self.max_bytes,
        ]
        written = [int(lifetime * 1000), *_fields(entry)]
        if self.cluster:
            evicted = await self._index_then_write(key, indexed, written)
        else:
            evicted = await self.run("cache write", lambda: self._index_and_write(key, indexed, written))
        if evicted:
            await self._delete_entries([name.decode() for name in evicted])

    async def _index_then_write(self, key: str, indexed: list[Any], written: list[Any]) -> list[bytes]:
        """The index first: if the entry write then fails, the index names an entry that is not there, which
        lists and purges tolerate; the other order could leave an entry no purge can find. What the index
        dropped to make room comes back."""
        evicted: list[bytes] = await self._script("add", indexed)
        try:
            await self._script_on_entry(key, written)
        except CacheError:
            await self._forget_quietly([key])
            raise
        return evicted

    async def _index_and_write(self, key: str, indexed: list[Any], written: list[Any]) -> list[bytes]:
        """`_index_then_write` in one round trip, where one server holds the index and the entry: both
        scripts go in one pipeline, in that order (a store costs the proxy half the Redis work)."""
        add, write = self._scripts["add"], self._scripts["write"]
        index, entry_key = list(self._index), self.entry_key(key)
        for loaded in (False, True):
            async with self.redis.pipeline(transaction=False) as pipe:
                # EVALSHA itself: a registered script would have the pipeline ask SCRIPT EXISTS first.
                pipe.evalsha(add.sha, len(index), *index, _INVALIDATIONS_KEPT, *indexed)
                pipe.evalsha(write.sha, 1, entry_key, *written)
                added, stored = await pipe.execute(raise_on_error=False)
            if loaded or not any(isinstance(result, NoScriptError) for result in (added, stored)):
                break
            for script in (add, write):  # a restarted or flushed server: load them, then once more
                await self.redis.script_load(script.script)
        if isinstance(stored, Exception):
            await self._forget_quietly([key])
            raise stored
        if isinstance(added, Exception):
            await self._delete_entries([key])  # written but not indexed: no purge could find it
            raise added
        return cast(list[bytes], added)

    async def _script_on_entry(self, key: str, args: list[Any]) -> None:
        script = self._scripts["write"]
        await self.run("cache write", lambda: script(keys=[self.entry_key(key)], args=args))

    async def _forget_quietly(self, keys: list[str]) -> None:
        try:
            await self._script("forget", keys)
        except CacheError:
            pass

    async def _delete_entries(self, keys: list[str]) -> int:
        """Delete entry hashes; one command per key, as they live on different cluster nodes."""

        async def delete_all() -> int:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.delete(self.entry_key(key))
                return sum(await pipe.execute())

        return await self.run("cache delete", delete_all) if keys else 0

    async def delete(self, key: str) -> bool:
        forgotten = await self._script("forget", [key])
        deleted = await self._delete_entries([key])
        return bool(forgotten) or deleted > 0

    async def purge(self, which: EntryFilter) -> int:
        """In batches (HSCAN over the index), so a large purge never holds Redis for long."""
        purged = 0
        async for page in self._index_pages("cache purge"):
            matched = [key for key, raw in page if _matches(_meta(raw), which)]
            if matched:
                forgotten: list[bytes] = await self._script("forget", matched)
                await self._delete_entries(matched)
                purged += len(forgotten)
        await self._script("purged", [])
        return purged

    async def list_entries(self, which: EntryFilter, offset: int, limit: int) -> list[EntryInfo]:
        found: list[EntryInfo] = []
        skipped = 0
        start = 0
        while len(found) < limit:
            page = await self._index_page(start, _PAGE)
            if not page:
                break
            for info in page:
                if not _matches((info.provider, info.endpoint, info.model, info.namespace, info.created_at), which):
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                found.append(info)
                if len(found) == limit:
                    break
            start += _PAGE
        return found

    async def _index_page(self, start: int, count: int) -> list[EntryInfo]:
        """Indexed entries, newest first, from rank `start`."""
        created, meta, hits, lasthit = self._index.created, self._index.meta, self._index.hits, self._index.lasthit

        async def read() -> list[Any]:
            keys: list[bytes] = cast(list[bytes], await self.redis.zrevrange(created, start, start + count - 1))
            if not keys:
                return []
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hmget(meta, keys)
                pipe.hmget(hits, keys)
                pipe.hmget(lasthit, keys)
                metas, hit_counts, last_hits = await pipe.execute()
            return list(zip(keys, metas, hit_counts, last_hits, strict=True))

        # Without the metadata: forgotten since the range was read.
        return [_info(*row) for row in await self.run("cache read", read) if row[1] is not None]

    async def most_hit(self, limit: int) -> list[EntryInfo]:
        ranking, meta, lasthit = self._index.ranking, self._index.meta, self._index.lasthit

        async def read() -> list[Any]:
            ranked = cast(list[tuple[bytes, float]], await self.redis.zrevrange(ranking, 0, limit - 1, withscores=True))
            if not ranked:
                return []
            keys = [key for key, _ in ranked]
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hmget(meta, keys)
                pipe.hmget(lasthit, keys)
                metas, last_hits = await pipe.execute()
            return list(zip(keys, metas, [int(hits) for _, hits in ranked], last_hits, strict=True))

        return [_info(*row) for row in await self.run("cache read", read) if row[1] is not None]

    async def activity(self, step: int, since: int) -> list[ActivityPoint]:
        now = int(time.time())
        since = max(since, now - ACTIVITY_KEPT_SECONDS)  # nothing older is kept
        first = since + -since % step  # the first period that starts at `since` or after it
        starts = range(first, now + 1, step)
        if not starts:
            return []
        fields = [f"{step}:{start}:{figure}" for start in starts for figure in range(1, _RECORD_FIGURES + 1)]

        async def read() -> list[bytes | None]:
            return cast(list[bytes | None], await self.redis.hmget(self._index.activity, fields))

        values = await self.run("cache read", read)
        points = []
        for index, start in enumerate(starts):
            counts = values[index * _RECORD_FIGURES : (index + 1) * _RECORD_FIGURES]
            if any(count is not None for count in counts):
                points.append(ActivityPoint(start, *(int(count or 0) for count in counts)))
        return points

    async def recent_requests(self) -> list[RequestRecord]:
        recent = self._index.recent

        async def read() -> list[bytes]:
            return cast(list[bytes], await self.redis.lrange(recent, 0, RECENT_REQUESTS_KEPT - 1))

        records = await self.run("cache read", read)
        return [RequestRecord(*orjson.loads(record)) for record in records]

    async def export_entries(self) -> AsyncIterator[tuple[str, CachedResponse]]:
        async for page in self._index_pages("cache read"):
            keys = [key for key, _ in page]

            async def read(keys: list[str] = keys) -> list[dict[bytes, bytes]]:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.hgetall(self.entry_key(key))
                    return list(await pipe.execute())

            for key, fields in zip(keys, await self.run("cache read", read), strict=True):
                if fields:
                    yield key, _entry(fields)

    async def _index_pages(self, what: str) -> AsyncIterator[list[tuple[str, bytes]]]:
        """Every indexed key with its metadata, a page at a time (HSCAN: Redis is never held for long)."""
        meta_key = self._index.meta
        cursor = 0
        while True:

            async def scan(cursor: int = cursor) -> tuple[int, dict[bytes, bytes]]:
                found = await self.redis.hscan(meta_key, cursor, count=_PAGE)
                return cast(tuple[int, dict[bytes, bytes]], found)

            cursor, page = await self.run(what, scan)
            if page:
                yield [(name.decode(), raw) for name, raw in page.items()]
            if cursor == 0:
                return

    async def latest_invalidation(self) -> int:
        value = await self.run("cache read", lambda: self.redis.get(self._index.seq))
        return int(value) if value is not None else 0

    async def invalidations_since(self, after: int) -> tuple[int, list[str | None]]:
        seq_key, feed_key = self._index.seq, self._index.feed

        async def read() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.get(seq_key)
                pipe.zrangebyscore(feed_key, f"({after}", "+inf", start=0, num=_INVALIDATIONS_KEPT)
                return list(await pipe.execute())

        latest_raw, members = await self.run("cache read", read)
        latest = int(latest_raw) if latest_raw is not None else 0
        if not members:
            # The feed's real end: below `after` when Redis lost its data (a restart without persistence).
            return min(after, latest), []
        keys: list[str | None] = []
        last = after
        for member in members:
            seq, _, key = member.decode().partition(":")
            last = int(seq)
            keys.append(key or None)
        return last, keys

    async def record(self, tally: Tally) -> None:
        periods = activity_buckets(tally.activity)
        recent = tally.recent[-RECENT_REQUESTS_KEPT:]
        counted = {name: amount for name, amount in tally.counters().items() if amount}
        args: list[Any] = [
            int(time.time()) - ACTIVITY_KEPT_SECONDS,
            RECENT_REQUESTS_KEPT,
            len(counted),
            len(tally.entry_hits),
            len(tally.savings),
            len(periods),
            len(recent),
        ]
        for name, amount in counted.items():
            args += [name, amount]
        for key, (count, at) in tally.entry_hits.items():
            args += [key, count, repr(at)]
        for (provider, model), figures in tally.savings.items():
            args += [provider, model, *figures.values()]
        for (step, start), counts in periods.items():
            args += [step, start, *counts]
        args += [orjson.dumps(astuple(record)) for record in recent]
        await self._script("record", args)

    async def statistics(self) -> CacheStatistics:
        totals_key, counters_key, savings_key = self._index.totals, self._index.counters, self._index.savings

        async def read() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(totals_key)
                pipe.hgetall(counters_key)
                pipe.hgetall(savings_key)
                return list(await pipe.execute())

        totals, counters, savings = await self.run("cache read", read)
        figures: dict[tuple[str, str], SavedFigures] = {}
        for name, value in savings.items():
            provider, model, number = name.decode().split("\x1f")
            setattr(figures.setdefault((provider, model), SavedFigures()), SAVING_FIGURES[int(number) - 1], int(value))
        return CacheStatistics(
            entries=int(totals.get(b"entries", 0)),
            bytes=int(totals.get(b"bytes", 0)),
            hits=int(counters.get(b"hits", 0)),
            misses=int(counters.get(b"misses", 0)),
            evictions=int(counters.get(b"evictions", 0)),
            stale=int(counters.get(b"stale", 0)),
            stores_skipped=int(counters.get(b"stores_skipped", 0)),
            savings=[Saving(provider, model, *saved.values()) for (provider, model), saved in sorted(figures.items())],
        )

    async def prune(self) -> int:
        """Drop from the index what Redis expired; returns how many."""
        total = 0
        while True:
            count = int(await self._script("prune", [repr(time.time())]))
            total += count
            if count < _PRUNE_BATCH:
                return total

    async def maintain(self) -> None:
        """For the process's lifetime: keep the index free of entries Redis expired. During an outage it
        waits quietly; requests and /healthz report the outage."""
        while True:
            try:
                await self.prune()
            except CacheError:
                pass
            await anyio.sleep(PRUNE_INTERVAL)

    async def close(self) -> None:
        self._closed = True
        await self.redis.aclose()


def _fields(entry: CachedResponse) -> list[Any]:
    """The entry's hash: a field for each of ENTRY_FIELDS that has a value."""
    fields: list[Any] = []
    for entry_field, value in zip(ENTRY_FIELDS, entry_values(entry), strict=True):
        if value is not None:
            fields += [entry_field.name, repr(value) if isinstance(value, float) else value]
    return fields


# Each entry field's name in a hash, and whether an older version's hash may lack it.
_HASH_FIELDS = [(entry_field.name.encode(), entry_field) for entry_field in ENTRY_FIELDS]


def _entry(fields: dict[bytes, bytes]) -> CachedResponse:
    """An entry from its hash; an optional field it lacks takes its default."""
    return entry_from_values(
        fields[name] if entry_field.required else fields.get(name, entry_field.default)
        for name, entry_field in _HASH_FIELDS
    )


def _info(key: bytes, raw: bytes, hits: bytes | int | None, last_hit: bytes | None) -> EntryInfo:
    """An entry's listing from its index metadata, hit count and last hit."""
    provider, endpoint, model, namespace, created_at, size, *more = orjson.loads(raw)
    return EntryInfo(
        key=key.decode(),
        provider=provider,
        endpoint=endpoint,
        model=model,
        namespace=namespace,
        size=size,
        created_at=created_at,
        last_hit_at=float(last_hit) if last_hit is not None else None,
        hits=int(hits) if hits is not None else 0,
        prompt_preview=more[0] if more else None,  # older versions kept six fields
    )


def _meta(raw: bytes) -> tuple[str, str, str | None, str, float]:
    provider, endpoint, model, namespace, created_at, *_ = orjson.loads(raw)
    return provider, endpoint, model, namespace, created_at


def _matches(meta: tuple[str, str, str | None, str, float], which: EntryFilter) -> bool:
    provider, _, _, namespace, created_at = meta
    return which.covers(provider, namespace, created_at)
