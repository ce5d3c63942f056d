"""Whether the cache store currently works, with each outage logged once when it starts and ends; a store
that fails and works by turns is logged at most once per `FLAP_SECONDS`, not once per turn. A store too
busy to take an operation (`StoreBusy`) works: that is the proxy's overload, logged apart, never an outage."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from cache.base import CacheError, StoreBusy

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


# An outage that begins within this many seconds after the last logged one ended is a flap of the same
# trouble (a store that fails and works by turns, such as a pool that no connection comes free in while the
# proxy is overloaded): it is logged only if it lasts `FLAP_LOGGED_AFTER` seconds, and the brief ones are
# counted in the next line that is logged.
FLAP_SECONDS = 10.0
FLAP_LOGGED_AFTER = 1.0


@dataclass
class _Outage:
    started: float
    logged: bool


class CacheHealth:
    def __init__(
        self,
        backend: str,
        *,
        operations_fail_apart: bool = True,
        on_failure: Callable[[Operation], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`operations_fail_apart`: reads and writes are tracked (and logged) apart, as with SQLite;
        otherwise, as with Redis, any failure is the store's outage and any success its end.
        `on_failure` hears of every failure (the metrics count them)."""
        self.backend = backend
        self.apart = operations_fail_apart
        self.on_failure = on_failure
        self.clock = clock
        self._failures: dict[Operation | None, str] = {}
        self._outages: dict[Operation | None, _Outage] = {}
        # When the last logged outage of each operation ended, and the brief outages since, not logged.
        self._logged_end: dict[Operation | None, float] = {}
        self._brief: dict[Operation | None, int] = {}
        # When the store's being busy was last logged, and the busy operations since.
        self._busy_logged_at: float | None = None
        self._busy_since_logged = 0

    def failed(self, operation: Operation, exc: CacheError) -> None:
        """`operation` failed with `exc`: an outage begins (or goes on), unless the store was only too busy
        to take it (`StoreBusy`). The metrics count both."""
        if self.on_failure is not None:
            self.on_failure(operation)
        if isinstance(exc, StoreBusy):
            self._busy(exc)
            return
        tracked = operation if self.apart else None
        self._failures[tracked] = str(exc)
        now = self.clock()
        outage = self._outages.get(tracked)
        if outage is None:
            ended = self._logged_end.get(tracked)
            outage = self._outages[tracked] = _Outage(now, logged=False)
            if ended is not None and now - ended < FLAP_SECONDS:
                return  # a flap: logged if it lasts
        elif outage.logged or now - outage.started < FLAP_LOGGED_AFTER:
            return
        outage.logged = True
        what = f"{operation.value}s fail" if self.apart else "fails"
        brief = self._brief.pop(tracked, 0)
        flaps = f" (after {brief} brief outages, not logged one by one)" if brief else ""
        logger.error(
            "cache store (%s) %s, serving from upstream until it recovers%s: %s", self.backend, what, flaps, exc
        )

    def _busy(self, exc: StoreBusy) -> None:
        """Logged at most once per `FLAP_SECONDS`, with the busy operations since the last line."""
        self._busy_since_logged += 1
        now = self.clock()
        if self._busy_logged_at is not None and now - self._busy_logged_at < FLAP_SECONDS:
            return
        logger.warning(
            "cache store (%s) too busy: the proxy asks more than its connections carry (operations that found every"
            " connection in use: %d; lookups went upstream, writes wait their turn): %s",
            self.backend,
            self._busy_since_logged,
            exc,
        )
        self._busy_logged_at, self._busy_since_logged = now, 0

    def succeeded(self, operation: Operation) -> None:
        if not self._outages:
            return
        tracked = operation if self.apart else None
        outage = self._outages.pop(tracked, None)
        if outage is None:
            return
        del self._failures[tracked]
        if outage.logged:
            self._logged_end[tracked] = self.clock()
            what = f"{operation.value}s work" if self.apart else "works"
            logger.warning("cache store (%s) %s again", self.backend, what)
        else:
            self._brief[tracked] = self._brief.get(tracked, 0) + 1

    def state(self) -> CacheState:
        reason = "; ".join(self._failures.values()) or None
        return CacheState(self.backend, reason is None, reason)
