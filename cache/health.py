"""Whether the cache store currently works, with each outage logged once when it starts and ends."""

from __future__ import annotations

import logging
from collections.abc import Callable
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
    def __init__(
        self,
        backend: str,
        *,
        operations_fail_apart: bool = True,
        on_failure: Callable[[Operation], None] | None = None,
    ) -> None:
        """`operations_fail_apart`: reads and writes are tracked (and logged) apart, as with SQLite;
        otherwise, as with Redis, any failure is the store's outage and any success its end.
        `on_failure` hears of every failure (the metrics count them)."""
        self.backend = backend
        self.apart = operations_fail_apart
        self.on_failure = on_failure
        self._failures: dict[Operation | None, str] = {}

    def failed(self, operation: Operation, exc: CacheError) -> None:
        if self.on_failure is not None:
            self.on_failure(operation)
        tracked = operation if self.apart else None
        if tracked not in self._failures:
            what = f"{operation.value}s fail" if self.apart else "fails"
            logger.error("cache store (%s) %s, serving from upstream until it recovers: %s", self.backend, what, exc)
        self._failures[tracked] = str(exc)

    def succeeded(self, operation: Operation) -> None:
        tracked = operation if self.apart else None
        if self._failures.pop(tracked, None) is not None:
            what = f"{operation.value}s work" if self.apart else "works"
            logger.warning("cache store (%s) %s again", self.backend, what)

    def state(self) -> CacheState:
        reason = "; ".join(self._failures.values()) or None
        return CacheState(self.backend, reason is None, reason)
