"""Answers on their way to the store: queued once they were sent, written by a task of their own, and
bounded, so memory stays bounded when the store falls behind.

A request's task hands its entry over and ends: a waiting store holds its entry and nothing of the
request (its task, connection and upstream response are freed at once). A waiting entry already
answers its key (`waiting_entry`), so the next identical request is a hit before it was written.
One writer task takes the queue in order, `CONCURRENT_WRITES` entries at a time, so a store that
batches (SQLite's group commit, Redis's pooled connections) gets them together. Past `max_bytes` an
answer is served but not stored, counted (`stores_skipped`), and the episode is logged once when it
begins and once when the store caught up. A write the store was too busy to take (`StoreBusy`: every
connection in use) waits again, first in line: backpressure within the same bound, never a lost answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from cache import CachedResponse, CacheError, CacheHealth
from cache.base import EntryFilter, EntryStore, StoreBusy
from cache.health import Operation

logger = logging.getLogger("openai_proxy.cache")

# What a waiting entry holds besides its body (the entry's other fields, its place in the queue), so
# the bound holds for memory, not only for bodies.
WAITING_ENTRY_OVERHEAD = 2 * 1024
CONCURRENT_WRITES = 64
DRAIN_SECONDS = 10.0
# How long the writer pauses before it writes again what the store was too busy to take (a busy Redis
# pool has already made each write wait REDIS_TIMEOUT).
BUSY_PAUSE_SECONDS = 0.05
SETTLE_SECONDS = 1.0

Landed = Callable[[bool], None]  # told whether the store has the entry, once that is known


@dataclass(slots=True)
class _Waiting:
    key: str
    entry: CachedResponse
    cost: int
    landed: Landed | None
    forgotten: bool = False  # deleted or purged while it waited: not written


class StoreQueue:
    def __init__(self, store: EntryStore, health: CacheHealth, max_bytes: int, on_skipped: Callable[[], None]) -> None:
        self.store = store
        self.health = health
        self.max_bytes = max_bytes
        self.on_skipped = on_skipped
        self.bytes = 0
        self._queue: deque[_Waiting] = deque()
        self._by_key: dict[str, _Waiting] = {}  # the latest waiting entry of each key
        self._writing: list[_Waiting] = []
        self._busy: list[_Waiting] = []  # written while the store was too busy: to be written again
        self._writer: asyncio.Task[None] | None = None
        self._skipped_in_episode = 0

    @property
    def waiting(self) -> int:
        """Entries not yet in the store: queued, or being written."""
        return len(self._queue) + len(self._writing)

    def is_waiting(self, key: str) -> bool:
        """Whether an answer waits to be stored under `key` (queued, or being written)."""
        return key in self._by_key

    def waiting_entry(self, key: str) -> CachedResponse | None:
        waiting = self._by_key.get(key)
        return waiting.entry if waiting is not None else None

    def forget(self, which: EntryFilter | None = None, key: str | None = None) -> None:
        """Waiting entries that a purge (`which`) or a deletion (`key`) covers are not written (or deleted
        again, when being written): an entry deleted while it waited must not come back afterwards."""
        for waiting in (*self._writing, *self._queue):
            if waiting.key == key or (which is not None and which.matches(waiting.entry)):
                waiting.forgotten = True
                if self._by_key.get(waiting.key) is waiting:
                    del self._by_key[waiting.key]

    def put(self, key: str, entry: CachedResponse, landed: Landed | None = None) -> bool:
        """Queue `entry` to be stored under `key`; False (and `landed(False)`) when the queue is full.
        One entry larger than the bound may still wait alone: the bound is on what waits."""
        cost = len(entry.body) + WAITING_ENTRY_OVERHEAD
        if self.waiting and self.bytes + cost > self.max_bytes:
            self._skip()
            if landed is not None:
                landed(False)
            return False
        self.bytes += cost
        waiting = _Waiting(key, entry, cost, landed)
        self._queue.append(waiting)
        self._by_key[key] = waiting
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_queued())
        return True

    async def settled(self, timeout: float = SETTLE_SECONDS) -> None:
        """Until the answers waiting now are written, for at most `timeout` seconds: the figures of
        /cache/stats and /metrics then count the answers just sent, unless the store is far behind."""
        if self._writer is not None:
            await asyncio.wait([self._writer], timeout=timeout)

    async def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        """Until every queued entry was written (or failed), before the store closes; a store that has not
        caught up within `timeout` seconds does not hold up a shutdown: what still waits is not stored."""
        writer = self._writer
        if writer is None:
            return
        done, _ = await asyncio.wait([writer], timeout=timeout)
        if not done:
            logger.warning(
                "shutting down with %d answers still waiting to be stored; they were not stored", self.waiting
            )
            writer.cancel()
            await asyncio.wait([writer])

    def _skip(self) -> None:
        if not self._skipped_in_episode:
            logger.warning(
                "the cache store is falling behind (%d answers waiting to be stored, STORE_BACKLOG_BYTES):"
                " answers are served but not stored until it catches up",
                self.waiting,
            )
        self._skipped_in_episode += 1
        self.on_skipped()

    async def _write_queued(self) -> None:
        try:
            while self._queue:
                taken = [self._queue.popleft() for _ in range(min(CONCURRENT_WRITES, len(self._queue)))]
                self._writing = taken
                if len(taken) == 1:
                    await self._write(taken[0])  # the usual case when the store keeps up: no task of its own
                else:
                    await asyncio.gather(*(self._write(waiting) for waiting in taken))
                self._writing = []
                if self._busy:
                    self._queue.extendleft(reversed(self._busy))
                    self._busy = []
                    await asyncio.sleep(BUSY_PAUSE_SECONDS)  # never a busy loop, whatever the store
        finally:
            for waiting in (*self._busy, *self._queue):  # cancelled (a shutdown that could not wait): never written
                self._release(waiting.cost)
                if waiting.landed is not None:
                    waiting.landed(False)
            self._queue.clear()
            self._by_key.clear()
            self._writing = []
            self._busy = []
            self._writer = None

    async def _write(self, waiting: _Waiting) -> None:
        stored = written = busy = False
        try:
            if waiting.forgotten:
                return
            await self.store.set(waiting.key, waiting.entry)
            written = True
            if waiting.forgotten:
                await self.store.delete(waiting.key)
            else:
                stored = True
            self.health.succeeded(Operation.WRITE)
        except StoreBusy as exc:
            if written:  # deleting an entry forgotten meanwhile: it stays stored, a failed write like any other
                self.health.failed(
                    Operation.WRITE, CacheError(f"deleting an entry forgotten while it was stored: {exc}")
                )
            elif self._by_key.get(waiting.key) is waiting:  # else a newer answer for its key waits: that one goes
                busy = True
                self._busy.append(waiting)
        except CacheError as exc:
            self.health.failed(Operation.WRITE, exc)
        except Exception:
            logger.exception("storing an answer failed unexpectedly; it was not stored")
        finally:
            if not busy:
                self._done(waiting, stored)

    def _done(self, waiting: _Waiting, stored: bool) -> None:
        if self._by_key.get(waiting.key) is waiting:
            del self._by_key[waiting.key]
        self._release(waiting.cost)
        if waiting.landed is not None:
            waiting.landed(stored)

    def _release(self, cost: int) -> None:
        self.bytes -= cost
        if self._skipped_in_episode and self.bytes <= self.max_bytes // 2:
            logger.warning("the cache store caught up; %d answers were not stored meanwhile", self._skipped_in_episode)
            self._skipped_in_episode = 0
