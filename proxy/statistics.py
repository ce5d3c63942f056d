"""Hit and miss counts, gathered in memory and written to the store every second, off the request path."""

from __future__ import annotations

import anyio

from cache import CacheBackend, CachedResponse, CacheError, CacheHealth
from cache.base import Tally
from cache.health import Operation

FLUSH_INTERVAL = 1.0


class Statistics:
    def __init__(self, backend: CacheBackend, health: CacheHealth) -> None:
        self.backend = backend
        self.health = health
        self._tally = Tally()
        # One flush at a time: a flush asked for while another writes (GET /cache/stats during the
        # periodic one) returns only once everything counted before it is in the store.
        self._flushing = anyio.Lock()

    def hit(self, key: str, entry: CachedResponse, at: float) -> None:
        tally = self._tally
        tally.hits += 1
        count, _ = tally.entry_hits.get(key, (0, 0.0))
        tally.entry_hits[key] = (count + 1, at)
        saved = tally.savings.setdefault((entry.provider, entry.model or ""), [0, 0, 0])
        saved[0] += 1
        saved[1] += entry.input_tokens or 0
        saved[2] += entry.output_tokens or 0

    def miss(self) -> None:
        self._tally.misses += 1

    def stale(self) -> None:
        self._tally.stale += 1

    async def flush(self) -> None:
        """Write what was gathered; on failure keep it for the next flush, so no count is lost."""
        async with self._flushing:
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

    async def flush_periodically(self) -> None:
        while True:
            await anyio.sleep(FLUSH_INTERVAL)
            await self.flush()
