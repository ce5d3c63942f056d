"""What the cache stores and the protocols of the stores that keep it."""

from __future__ import annotations

import types
from collections.abc import AsyncIterator, Iterable
from dataclasses import MISSING, dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol, get_args, get_type_hints

if TYPE_CHECKING:
    from cache.stats import ActivityPoint, CacheStatistics, RequestRecord, Tally


class CacheError(Exception):
    """The cache store could not do what was asked. Requests are then served from upstream."""


class StoreBusy(CacheError):
    """Every connection to the store stayed busy for the wait allowed: the store works, the proxy asks more of
    it than its connections carry (an overloaded proxy). A write may be tried again; nothing failed."""


@dataclass(frozen=True)
class CachedResponse:
    """A complete upstream answer, as replayed on a hit, with what the admin API shows of it.

    Never holds a credential. `ttl` is the entry's own time to live in seconds (from
    `X-Cache-TTL`); None means the proxy's `CACHE_TTL` applies. The token counts are the usage the
    provider reported (`input_tokens` includes the input it served from its own prompt cache,
    `cached_input_tokens`, and the input it wrote to it, `cache_write_tokens`); `upstream_seconds` is
    how long the upstream took to answer, which each hit saves.
    """

    status: int
    content_type: str
    body: bytes
    created_at: float
    provider: str
    endpoint: str
    model: str | None = None
    namespace: str = ""
    ttl: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int | None = None
    cache_write_tokens: int | None = None
    upstream_seconds: float | None = None
    # The first line of the prompt, shortened (cache/preview.py), for the dashboard's most-hit entries.
    prompt_preview: str | None = None


def same_entry(one: CachedResponse, other: CachedResponse) -> bool:
    """Whether two entries read under one key are the same stored answer: a read from the store gives a new
    copy each time, and a replaced entry (a refresh) was created at another time."""
    return one is other or one.created_at == other.created_at


@dataclass(frozen=True)
class EntryField:
    """One field of `CachedResponse`, as the stores and the export format handle it: every column, Redis
    field and export line is derived from these, so a new field is one line above (plus its migration)."""

    name: str
    kind: type  # int, float, str or bytes
    nullable: bool
    default: Any  # MISSING when the field is required

    @property
    def required(self) -> bool:
        return self.default is MISSING

    def decoded(self, value: Any) -> Any:
        """A stored value (text or bytes, as a store gives it back) as this field's type."""
        if value is None:
            return None
        if self.kind is str:
            return value.decode() if isinstance(value, bytes) else str(value)
        return self.kind(value)


def _describe(entry_type: type) -> tuple[EntryField, ...]:
    hints = get_type_hints(entry_type)
    described = []
    for entry_field in fields(entry_type):
        hint = hints[entry_field.name]
        kinds = [kind for kind in get_args(hint) if kind is not type(None)] if isinstance(hint, types.UnionType) else []
        described.append(
            EntryField(
                name=entry_field.name,
                kind=kinds[0] if kinds else hint,
                nullable=bool(kinds),
                default=entry_field.default,
            )
        )
    return tuple(described)


ENTRY_FIELDS = _describe(CachedResponse)


def entry_values(entry: CachedResponse) -> tuple[Any, ...]:
    """The entry's values in the order of ENTRY_FIELDS."""
    return tuple(getattr(entry, entry_field.name) for entry_field in ENTRY_FIELDS)


def entry_from_values(values: Iterable[Any]) -> CachedResponse:
    """An entry from stored values in the order of ENTRY_FIELDS, each decoded to its field's type."""
    return CachedResponse(
        *(entry_field.decoded(value) for entry_field, value in zip(ENTRY_FIELDS, values, strict=True))
    )


@dataclass(frozen=True)
class EntryInfo:
    """An entry as the admin API lists it: everything but the body."""

    key: str
    provider: str
    endpoint: str
    model: str | None
    namespace: str
    size: int
    created_at: float
    last_hit_at: float | None
    hits: int
    prompt_preview: str | None = None


@dataclass(frozen=True)
class EntryFilter:
    """Which entries a purge or a listing covers; None matches anything."""

    namespace: str | None = None
    provider: str | None = None
    created_before: float | None = None

    def covers(self, provider: str, namespace: str, created_at: float) -> bool:
        """Whether an entry of this provider and namespace, made at `created_at`, is one the filter names."""
        return (
            (self.namespace is None or namespace == self.namespace)
            and (self.provider is None or provider == self.provider)
            and (self.created_before is None or created_at < self.created_before)
        )

    def matches(self, entry: CachedResponse) -> bool:
        return self.covers(entry.provider, entry.namespace, entry.created_at)


class EntryStore(Protocol):
    """Where entries are kept. Every method raises CacheError when the store fails."""

    name: str

    async def get(self, key: str) -> CachedResponse | None: ...

    async def set(self, key: str, entry: CachedResponse) -> None:
        """Store `entry`, evicting least-recently-used entries if the store's limits are exceeded."""
        ...

    async def delete(self, key: str) -> bool: ...

    async def purge(self, which: EntryFilter) -> int:
        """Delete the matching entries; return how many."""
        ...

    async def list_entries(self, which: EntryFilter, offset: int, limit: int) -> list[EntryInfo]:
        """Matching entries, newest first."""
        ...

    def export_entries(self) -> AsyncIterator[tuple[str, CachedResponse]]: ...


class StatisticsStore(Protocol):
    """Where the counts, savings and activity that the proxy gathers in memory are added up (cache/stats.py)."""

    async def record(self, tally: Tally) -> None:
        """Add counts gathered in memory to the store's statistics."""
        ...

    async def statistics(self) -> CacheStatistics: ...

    async def activity(self, step: int, since: int) -> list[ActivityPoint]:
        """The activity series of one of ACTIVITY_STEPS from `since` on, oldest first; periods without
        requests are missing."""
        ...

    async def recent_requests(self) -> list[RequestRecord]:
        """The last RECENT_REQUESTS_KEPT requests recorded, newest first."""
        ...

    async def most_hit(self, limit: int) -> list[EntryInfo]:
        """The entries with the most hits, most first."""
        ...


class InvalidationFeed(Protocol):
    """The keys every process's memory tier must drop: deleted, replaced or purged entries."""

    async def latest_invalidation(self) -> int:
        """The position of the newest entry in the feed (0 when empty)."""
        ...

    async def invalidations_since(self, after: int) -> tuple[int, list[str | None]]:
        """Keys deleted or replaced after position `after` (None: a purge), and the newest position.

        The feed keeps a bounded window; a caller that finds a gap must assume everything changed.
        """
        ...


class CacheBackend(EntryStore, StatisticsStore, InvalidationFeed, Protocol):
    """A storage backend: one class per kind of store (SQLite, Redis), each all three of the above."""

    async def open(self) -> None: ...

    async def ping(self) -> None:
        """Return when the store is usable; raise CacheError saying why it is not."""
        ...

    async def maintain(self) -> None:
        """The store's own upkeep, run in the background for the process's lifetime (it may return at once)."""
        ...

    async def close(self) -> None: ...
