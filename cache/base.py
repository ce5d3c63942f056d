"""What the cache stores and the protocol every storage backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class CacheError(Exception):
    """The cache store could not do what was asked. Requests are then served from upstream."""


@dataclass(frozen=True)
class CachedResponse:
    """A complete upstream answer, as replayed on a hit. Never holds a credential."""

    status: int
    content_type: str
    body: bytes
    created_at: float
    provider: str
    endpoint: str
    model: str | None = None


class CacheBackend(Protocol):
    """Async storage for cached responses. Every method raises CacheError when the store fails."""

    name: str

    async def open(self) -> None: ...

    async def get(self, key: str) -> CachedResponse | None: ...

    async def set(self, key: str, entry: CachedResponse) -> None: ...

    async def ping(self) -> None:
        """Return when the store is usable; raise CacheError saying why it is not."""
        ...

    async def close(self) -> None: ...
