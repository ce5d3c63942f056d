"""What the app does from start-up to shutdown besides answering requests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from cache import CacheError, CacheHealth
from cache.health import Operation
from cache.memory import TieredBackend
from proxy.access_log import AccessLog
from proxy.pricing import Prices
from proxy.statistics import Statistics
from proxy.storing import StoreQueue
from proxy.upstream import UpstreamClient

if TYPE_CHECKING:
    from cache.redis_flights import RedisFlights


@dataclass(frozen=True)
class Lifespan:
    """Opens the store and runs the background work while the app serves; at shutdown, writes what is
    still held and closes every connection."""

    store: TieredBackend
    stores: StoreQueue  # answers waiting to be stored
    health: CacheHealth
    prices: Prices
    statistics: Statistics
    client: UpstreamClient
    flights: RedisFlights | None
    access_log: AccessLog | None

    @asynccontextmanager
    async def __call__(self, app: object) -> AsyncIterator[None]:
        self.prices.prepare()
        await self.client.signer.prepare()
        try:
            await self.store.open()
        except CacheError as exc:
            self.health.failed(Operation.READ, exc)
        try:
            async with anyio.create_task_group() as background:
                background.start_soon(self.prices.load)
                background.start_soon(self.statistics.flush_periodically)
                background.start_soon(self.store.sync_periodically)
                background.start_soon(self.store.backend.maintain)
                if self.access_log is not None:
                    background.start_soon(self.access_log.flush_periodically)
                yield
                background.cancel_scope.cancel()
        finally:
            await self.stores.drain()
            await self.statistics.flush()
            if self.access_log is not None:
                self.access_log.flush()
            if self.flights is not None:
                await self.flights.close()
            await self.store.close()
            await self.client.aclose()
