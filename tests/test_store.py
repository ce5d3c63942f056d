"""Which store the settings name, and what comes with its kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cache import SqliteBackend
from cache.redis_backend import RedisBackend
from cache.redis_flights import RedisFlights
from proxy.settings import Settings
from proxy.store import build_store, store_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def test_a_sqlite_file_is_no_shared_store(tmp_path: Path) -> None:
    store = build_store(settings(cache_db=tmp_path / "c.db"))
    assert isinstance(store.backend, SqliteBackend)
    assert store.flights is None
    assert store.operations_fail_apart


async def test_a_redis_store_coalesces_across_proxies() -> None:
    # Nothing connects before the first command: no server is needed.
    store = build_store(settings(cache_backend="redis", redis_url="redis://127.0.0.1:1/0"))
    assert isinstance(store.backend, RedisBackend)
    assert isinstance(store.flights, RedisFlights) and store.flights.backend is store.backend
    assert not store.operations_fail_apart
    await store.flights.close()
    await store.backend.close()


async def test_a_redis_store_passed_in_gets_its_flights_too() -> None:
    backend = RedisBackend.at("redis://127.0.0.1:1/0")
    store = store_for(backend, settings())
    assert isinstance(store.flights, RedisFlights) and store.flights.backend is backend
    await store.flights.close()
    assert store_for(backend, settings(cache_lock_timeout=0)).flights is None, "no coalescing at all"
    await backend.close()
