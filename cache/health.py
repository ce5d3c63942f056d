"""Whether the cache store currently works, with each outage logged once when it starts and ends."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cache.base import CacheError

logger = logging.getLogger("openai_proxy.cache")


@dataclass(frozen=True)
class CacheState:
    backend: str
    ok: bool
    reason: str | None = None


class CacheHealth:
    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._failure: str | None = None

    @property
    def failing(self) -> bool:
        return self._failure is not None

    def failed(self, exc: CacheError) -> None:
        if self._failure is None:
            logger.error(
                "cache store (%s) failed, serving from upstream until it recovers: %s", self.backend, exc
            )
        self._failure = str(exc)

    def succeeded(self) -> None:
        if self._failure is not None:
            logger.warning("cache store (%s) works again", self.backend)
        self._failure = None

    def state(self) -> CacheState:
        return CacheState(self.backend, self._failure is None, self._failure)
