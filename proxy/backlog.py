"""A bound on the answers waiting to be stored, so memory stays bounded when the store falls behind.

An answer is stored after it was sent, off the request path; a client's next request does not wait
for it. A store slower than the upstream (a busy disk, a slow Redis) would otherwise gather answers
in memory without end. Past the bound an answer is served but not stored, and counted.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("openai_proxy.cache")

# What a waiting store holds besides its body (its task, the sent response, the entry), so the bound holds
# for memory, not only for bodies: with 3,844 stores waiting on SQLite (bench/sustained.py misses), the
# proxy's RSS had grown by about 60 kB for each.
WAITING_STORE_OVERHEAD = 48 * 1024


class StoreBacklog:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.waiting = 0
        self._skipped_in_episode = 0

    def admit(self, size: int) -> bool:
        """Whether an answer of `size` bytes may wait to be stored; if so, `release` it once stored."""
        cost = size + WAITING_STORE_OVERHEAD
        if self.waiting and self.bytes + cost > self.max_bytes:
            if not self._skipped_in_episode:
                logger.warning(
                    "the cache store is falling behind (%d answers waiting to be stored, STORE_BACKLOG_BYTES):"
                    " answers are served but not stored until it catches up",
                    self.waiting,
                )
            self._skipped_in_episode += 1
            return False
        self.bytes += cost
        self.waiting += 1
        return True

    def release(self, size: int) -> None:
        self.bytes -= size + WAITING_STORE_OVERHEAD
        self.waiting -= 1
        if self._skipped_in_episode and self.bytes <= self.max_bytes // 2:
            logger.warning("the cache store caught up; %d answers were not stored meanwhile", self._skipped_in_episode)
            self._skipped_in_episode = 0
