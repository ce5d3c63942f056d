"""What the cache stores and the protocol every storage backend implements."""

from __future__ import annotations

import types
from collections.abc import AsyncIterator, Iterable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Protocol, get_args, get_type_hints


class CacheError(Exception):
    """The cache store could not do what was asked. Requests are then served from upstream."""


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


@dataclass(frozen=True)
class Saving:
    """What hits saved for one provider and model: tokens not paid for again, their price (in billionths
    of a dollar, so sums stay exact), and the upstream's time. `unpriced_hits`: hits whose cost is unknown
    (a model the price table does not know, or no usage reported); they count tokens but no dollars."""

    provider: str
    model: str
    hits: int
    input_tokens: int
    output_tokens: int
    cost_nanos: int = 0
    upstream_ms: int = 0
    unpriced_hits: int = 0


@dataclass(slots=True)
class SavedFigures:
    """What hits saved for one provider and model, as counted between flushes (a `Saving`'s figures)."""

    hits: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nanos: int = 0
    upstream_ms: int = 0
    unpriced_hits: int = 0

    def add(self, other: SavedFigures) -> None:
        for name in SAVING_FIGURES:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def values(self) -> tuple[int, ...]:
        """The figures in the order of SAVING_FIGURES: how the stores hold them."""
        return tuple(getattr(self, name) for name in SAVING_FIGURES)


SAVING_FIGURES = tuple(figure.name for figure in fields(SavedFigures))


@dataclass(frozen=True)
class CacheStatistics:
    entries: int
    bytes: int
    hits: int
    misses: int
    evictions: int
    savings: list[Saving] = field(default_factory=list)
    # Expired entries served because the upstream failed (CACHE_STALE_IF_ERROR); not counted as hits.
    stale: int = 0

    @property
    def hit_ratio(self) -> float:
        answered = self.hits + self.misses
        return self.hits / answered if answered else 0.0


# The activity time series: requests, hits and misses per minute and per hour, kept this long.
ACTIVITY_KEPT_SECONDS = 7 * 24 * 3600
ACTIVITY_STEPS = (60, 3600)
# The recent requests the store keeps for the dashboard.
RECENT_REQUESTS_KEPT = 50


@dataclass(frozen=True)
class ActivityPoint:
    """What the proxy answered in one minute or hour, from `start` (unix seconds) on."""

    start: int
    requests: int
    hits: int
    misses: int


@dataclass(frozen=True)
class RequestRecord:
    """One proxied request as the dashboard lists it: no credential, no body, no query string."""

    at: float
    method: str
    path: str
    provider: str | None
    endpoint: str | None
    model: str | None
    status: int
    cache_status: str | None
    coalesced: bool
    streamed: bool
    duration_ms: float
    bytes: int
    key: str | None  # a short prefix of the cache key


def activity_buckets(minutes: dict[int, list[int]]) -> dict[tuple[int, int], list[int]]:
    """Per-minute figures (minute start -> requests, hits, misses) summed into every step of ACTIVITY_STEPS."""
    buckets: dict[tuple[int, int], list[int]] = {}
    for minute, figures in minutes.items():
        for step in ACTIVITY_STEPS:
            totals = buckets.setdefault((step, minute - minute % step), [0, 0, 0])
            for index, value in enumerate(figures):
                totals[index] += value
    return buckets


@dataclass
class Tally:
    """Counts gathered in memory between two flushes to the store, so no request writes for them."""

    hits: int = 0
    misses: int = 0
    stale: int = 0
    # key -> (hits, time of the last one)
    entry_hits: dict[str, tuple[int, float]] = field(default_factory=dict)
    # (provider, model) -> what its hits saved
    savings: dict[tuple[str, str], SavedFigures] = field(default_factory=dict)
    # minute start (unix seconds) -> requests, hits, misses
    activity: dict[int, list[int]] = field(default_factory=dict)
    # the newest last, at most RECENT_REQUESTS_KEPT
    recent: list[RequestRecord] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.hits or self.misses or self.stale or self.activity or self.recent)

    def saved(self, provider: str, model: str) -> SavedFigures:
        """The figures of one provider and model, to add to."""
        return self.savings.setdefault((provider, model), SavedFigures())

    def count_activity(self, at: float, figure: int) -> None:
        """Add one to a figure (0: requests, 1: hits, 2: misses) of the minute that holds `at`."""
        minute = int(at) - int(at) % 60
        self.activity.setdefault(minute, [0, 0, 0])[figure] += 1

    def merge(self, other: Tally) -> None:
        self.hits += other.hits
        self.misses += other.misses
        self.stale += other.stale
        for key, (count, at) in other.entry_hits.items():
            previous, last = self.entry_hits.get(key, (0, 0.0))
            self.entry_hits[key] = (previous + count, max(last, at))
        for group, figures in other.savings.items():
            self.savings.setdefault(group, SavedFigures()).add(figures)
        for minute, counts in other.activity.items():
            totals = self.activity.setdefault(minute, [0, 0, 0])
            for index, value in enumerate(counts):
                totals[index] += value
        self.recent = sorted(self.recent + other.recent, key=lambda record: record.at)[-RECENT_REQUESTS_KEPT:]


class CacheBackend(Protocol):
    """Async storage for cached responses. Every method raises CacheError when the store fails."""

    name: str

    async def open(self) -> None: ...

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

    async def most_hit(self, limit: int) -> list[EntryInfo]:
        """The entries with the most hits, most first."""
        ...

    def export_entries(self) -> AsyncIterator[tuple[str, CachedResponse]]: ...

    async def record(self, tally: Tally) -> None:
        """Add counts gathered in memory to the store's statistics."""
        ...

    async def latest_invalidation(self) -> int:
        """The position of the newest entry in the invalidation feed (0 when empty)."""
        ...

    async def invalidations_since(self, after: int) -> tuple[int, list[str | None]]:
        """Keys deleted or replaced after position `after` (None: a purge), and the newest position.

        The feed keeps a bounded window; a caller that finds a gap must assume everything changed.
        """
        ...

    async def statistics(self) -> CacheStatistics: ...

    async def activity(self, step: int, since: int) -> list[ActivityPoint]:
        """The activity series of one of ACTIVITY_STEPS from `since` on, oldest first; periods without
        requests are missing."""
        ...

    async def recent_requests(self) -> list[RequestRecord]:
        """The last RECENT_REQUESTS_KEPT requests recorded, newest first."""
        ...

    async def ping(self) -> None:
        """Return when the store is usable; raise CacheError saying why it is not."""
        ...

    async def maintain(self) -> None:
        """The store's own upkeep, run in the background for the process's lifetime (it may return at once)."""
        ...

    async def close(self) -> None: ...
