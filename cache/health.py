"""Whether the cache store currently works, with each outage logged once when it starts and ends."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum

from cache.base import CacheError

logger = logging.getLogger("openai_proxy.cache")


class Operation(StrEnum):
    # Tracked apart because they fail apart: with WAL, reads go on while writes hit a lock or a full disk.
    READ = "read"
    WRITE = "write"


@dataclass(frozen=True)
class CacheState:
    backend: str
    ok: bool
    reason: str | None = None


class CacheHealth:
    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._failures: dict[Operation, str] = {}

    def failed(self, operation: Operation, exc: CacheError) -> None:
        if operation not in self._failures:
            logger.error(
                "cache store (%s) %ss fail, serving from upstream until it recovers: %s",
                self.backend,
                operation.value,
                exc,
            )
        self._failures[operation] = str(exc)

    def succeeded(self, operation: Operation) -> None:
        if self._failures.pop(operation, None) is not None:
            logger.warning("cache store (%s) %ss work again", self.backend, operation.value)

    def state(self) -> CacheState:
        reason = "; ".join(self._failures.values()) or None
        return CacheState(self.backend, reason is None, reason)
