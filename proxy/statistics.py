"""Hit and miss counts, activity over time and the latest requests, gathered in memory and written to the
store every second, off the request path."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from decimal import Decimal

import anyio

from cache import CachedResponse, CacheError, CacheHealth
from cache.base import StatisticsStore, same_entry
from cache.health import Operation
from cache.stats import RECENT_REQUESTS_KEPT, CacheStatistics, Tally
from proxy.exchange import Exchange, request_record

FLUSH_INTERVAL = 1.0

logger = logging.getLogger("openai_proxy")


NANOS_PER_DOLLAR = 1_000_000_000


Pricer = Callable[[CachedResponse], Decimal | None]


def _nothing_waits(key: str) -> bool:
    return False


class Statistics:
    def __init__(
        self,
        backend: StatisticsStore,
        health: CacheHealth,
        pricer: Callable[[], Awaitable[Pricer]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`pricer`: gives, once ready, what an entry's usage cost in USD (None: unknown). Hits are priced
        when they are written to the store, off the request path."""
        self.backend = backend
        self.health = health
        self.pricer = pricer
        self.clock = clock
        self._tally = Tally()
        # The last proxied requests that ended since the last flush.
        self._ended: deque[Exchange] = deque(maxlen=RECENT_REQUESTS_KEPT)
        # Entries hit since the last flush, added to the tally then: key -> (entry, hits, time of the last);
        # and the hits of entries replaced meanwhile (a refresh), to be priced as their own.
        self._hit: dict[str, tuple[CachedResponse, int, float]] = {}
        self._replaced: list[tuple[str, tuple[CachedResponse, int, float]]] = []
        # Whether an answer is still waiting to be stored under a key (the proxy's store queue says). The store
        # counts hits only on entries it holds, so a waiting entry's own hits (count, time of the last) are
        # held back until it is stored, or given up; its savings are counted at once.
        self.entry_waiting: Callable[[str], bool] = _nothing_waits
        self._held_entry_hits: dict[str, tuple[int, float]] = {}
        # One flush at a time: a flush asked for while another writes (GET /cache/stats during the
        # periodic one) returns only once everything counted before it is in the store.
        self._flushing = anyio.Lock()

    def hit(self, key: str, entry: CachedResponse, at: float) -> None:
        """Count a hit; what it saved is worked out at the next flush, once per entry hit."""
        tally = self._tally
        tally.hits += 1
        tally.count_activity(at, 1)
        earlier = self._hit.get(key)
        if earlier is None:
            self._hit[key] = (entry, 1, at)
        elif same_entry(earlier[0], entry):
            self._hit[key] = (earlier[0], earlier[1] + 1, at)
        else:
            self._replaced.append((key, earlier))
            self._hit[key] = (entry, 1, at)

    async def _add_hits(self) -> None:
        """Add the entries hit since the last flush to the tally: their hits and what those saved, priced."""
        price = None
        if self.pricer is not None and (self._hit or self._replaced):
            try:
                price = await self.pricer()
            except RuntimeError:
                logger.error("no price table: hits are counted without dollars (hits_without_price)")
                self.pricer = None
        hit, self._hit = self._hit, {}
        replaced, self._replaced = self._replaced, []
        held, self._held_entry_hits = self._held_entry_hits, {}
        tally = self._tally
        for key, (hits, at) in held.items():
            self._count_entry_hits(key, hits, at)
        for key, (entry, hits, at) in [*replaced, *hit.items()]:
            self._count_entry_hits(key, hits, at)
            saved = tally.saved(entry.provider, entry.model or "")
            saved.hits += hits
            saved.input_tokens += (entry.input_tokens or 0) * hits
            saved.output_tokens += (entry.output_tokens or 0) * hits
            saved.upstream_ms += round((entry.upstream_seconds or 0.0) * 1000) * hits
            cost = price(entry) if price is not None else None
            if cost is None:
                saved.unpriced_hits += hits
            else:
                saved.cost_nanos += int(cost * NANOS_PER_DOLLAR) * hits

    def _count_entry_hits(self, key: str, hits: int, at: float) -> None:
        counts = self._held_entry_hits if self.entry_waiting(key) else self._tally.entry_hits
        earlier, last = counts.get(key, (0, 0.0))
        counts[key] = (earlier + hits, max(last, at))

    def miss(self) -> None:
        self._tally.misses += 1
        self._tally.count_activity(self.clock(), 2)

    def requested(self, exchange: Exchange) -> None:
        """A proxied request ended (whatever its cache status): for the activity series and recent requests.
        Its record is made at the next flush, and only for the last few: nothing more per request."""
        self._tally.count_activity(exchange.at, 0)
        self._ended.append(exchange)

    def stale(self) -> None:
        self._tally.stale += 1

    def store_skipped(self) -> None:
        self._tally.stores_skipped += 1

    async def flush(self) -> None:
        """Write what was gathered; on failure keep it for the next flush, so no count is lost."""
        async with self._flushing:
            await self._add_hits()
            if self._ended:
                self._tally.merge(Tally(recent=[request_record(exchange) for exchange in self._ended]))
                self._ended.clear()
            if not self._tally:
                return
            tally, self._tally = self._tally, Tally()
            try:
                await self.backend.record(tally)
            except CacheError as exc:
                self.health.failed(Operation.WRITE, exc)
                tally.merge(self._tally)
                self._tally = tally
            else:
                self.health.succeeded(Operation.WRITE)

    async def figures(self) -> CacheStatistics:
        """The store's figures (what was gathered in memory is in them once flushed)."""
        return await self.backend.statistics()

    async def flush_periodically(self) -> None:
        while True:
            await anyio.sleep(FLUSH_INTERVAL)
            await self.flush()
