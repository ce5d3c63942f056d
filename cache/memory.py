"""A bounded in-memory tier of hot entries in front of a storage backend.

Hits on hot entries never leave the event loop. The tier is only a copy: every write goes to the
backend too, and deletes, purges and refreshes made by any process reach every tier through the
backend's invalidation feed (`invalidations_since`) within `SYNC_INTERVAL`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator

import anyio

from cache.base import CacheBackend, CachedResponse, CacheError, EntryFilter, EntryInfo

logger = logging.getLogger("openai_proxy.cache")

SYNC_INTERVAL = 0.5
# Bookkeeping per entry besides its body: the key, the object, the LRU links (measured with tracemalloc:
# 535 bytes for an entry of the usual fields).
_OVERHEAD = 560


class HotEntries:
    """An LRU map of key -> entry, bounded by the bytes the entries hold."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, CachedResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedResponse | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: CachedResponse) -> None:
        self.discard(key)
        size = len(entry.body) + _OVERHEAD
        if size > self.max_bytes:
            return
        self._entries[key] = entry
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= len(evicted.body) + _OVERHEAD

    def discard(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= len(entry.body) + _OVERHEAD

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


class TieredBackend:
    """The entry store of a backend with `HotEntries` in front (an EntryStore; the backend's statistics are
    used directly). It follows the backend's invalidation feed."""

    def __init__(self, backend: CacheBackend, max_bytes: int, *, evicts: bool = False) -> None:
        """`evicts`: the backend enforces size limits, so a write may remove other entries."""
        self.backend = backend
        self.evicts = evicts
        self.name = backend.name
        self.hot = HotEntries(max_bytes)
        self._seen_invalidation = 0

    async def open(self) -> None:
        """Open the backend, and follow its invalidation feed from its current end."""
        await self.backend.open()
        self._seen_invalidation = await self.backend.latest_invalidation()

    async def get(self, key: str) -> CachedResponse | None:
        entry = self.hot.get(key)
        if entry is None:
            entry = await self.backend.get(key)
            if entry is not None:
                self.hot.put(key, entry)
        return entry

    def held(self, key: str) -> CachedResponse | None:
        """The entry if the tier holds it: no I/O, no waiting."""
        return self.hot.get(key)

    def remember(self, key: str, entry: CachedResponse) -> None:
        """Hold an entry read from the backend by other means than `get`, as `get` would have."""
        self.hot.put(key, entry)

    async def set(self, key: str, entry: CachedResponse) -> None:
        # In the tier at once, so a request arriving while the store writes is already a hit;
        # out again if the store refuses it, so the tier never holds what the store does not.
        self.hot.put(key, entry)
        try:
            await self.backend.set(key, entry)
        except BaseException:
            self.hot.discard(key)
            raise
        if self.evicts:
            try:
                await self.sync()  # drops what this write evicted from the store
            except CacheError:
                self.hot.clear()

    async def delete(self, key: str) -> bool:
        self.hot.discard(key)
        return await self.backend.delete(key)

    async def purge(self, which: EntryFilter) -> int:
        self.hot.clear()
        return await self.backend.purge(which)

    async def list_entries(self, which: EntryFilter, offset: int, limit: int) -> list[EntryInfo]:
        return await self.backend.list_entries(which, offset, limit)

    def export_entries(self) -> AsyncIterator[tuple[str, CachedResponse]]:
        return self.backend.export_entries()

    async def close(self) -> None:
        self.hot.clear()
        await self.backend.close()

    async def sync(self) -> None:
        """Drop what other processes deleted, purged or replaced since the last sync."""
        latest, keys = await self.backend.invalidations_since(self._seen_invalidation)
        if latest == self._seen_invalidation:
            return
        if latest < self._seen_invalidation or None in keys or latest - self._seen_invalidation > len(keys):
            self.hot.clear()  # a purge, more changes than the feed still holds, or a new store
        else:
            for key in keys:
                if key is not None:
                    self.hot.discard(key)
        self._seen_invalidation = latest

    async def sync_periodically(self) -> None:
        while True:
            await anyio.sleep(SYNC_INTERVAL)
            try:
                await self.sync()
            except CacheError:
                # The store is failing; what the tier holds cannot be checked, so it must not be served.
                self.hot.clear()
