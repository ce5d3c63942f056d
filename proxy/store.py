"""The cache store the settings name, and what its kind brings with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cache import CacheBackend, SqliteBackend
from proxy.settings import Settings

if TYPE_CHECKING:
    from cache.redis_flights import RedisFlights


@dataclass(frozen=True)
class Store:
    backend: CacheBackend
    # Coalesces misses across every proxy on a shared store (Redis); None: each proxy coalesces its own.
    flights: RedisFlights | None
    # SQLite reads go on while writes fail (a lock, a full disk); a Redis outage stops both.
    operations_fail_apart: bool


def build_backend(settings: Settings) -> CacheBackend:
    """The cache store the settings name (CACHE_BACKEND)."""
    if settings.cache_backend == "redis":
        from cache.redis_backend import RedisBackend  # redis-py takes a while to import: only when used

        return RedisBackend.at(
            settings.redis_url.get_secret_value(),
            cluster=settings.redis_cluster,
            timeout=settings.redis_timeout,
            prefix=settings.redis_key_prefix,
            default_ttl=settings.cache_ttl,
            max_entries=settings.cache_max_entries,
            max_bytes=settings.cache_max_bytes,
        )
    return SqliteBackend(
        settings.cache_db,
        busy_timeout=settings.cache_busy_timeout,
        max_entries=settings.cache_max_entries,
        max_bytes=settings.cache_max_bytes,
    )


def build_store(settings: Settings) -> Store:
    return store_for(build_backend(settings), settings)


def store_for(backend: CacheBackend, settings: Settings) -> Store:
    """`backend`, and what its kind brings: a Redis store is shared with other proxies, a SQLite file is not."""
    if backend.name != "redis":  # checked by name, so that redis-py is imported only when used
        return Store(backend, flights=None, operations_fail_apart=True)
    return Store(backend, _redis_flights(backend, settings), operations_fail_apart=False)


def _redis_flights(backend: CacheBackend, settings: Settings) -> RedisFlights | None:
    from cache.redis_backend import RedisBackend
    from cache.redis_flights import RedisFlights, connect_reader

    if settings.cache_lock_timeout <= 0 or not isinstance(backend, RedisBackend):
        return None
    url, cluster, timeout = settings.redis_url.get_secret_value(), backend.cluster, settings.redis_timeout
    return RedisFlights(backend, connect_reader(url, cluster=cluster, timeout=timeout), settings.cache_lock_timeout)
