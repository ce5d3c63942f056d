"""The cache's statistics: what hits saved, the counts and activity gathered in memory between flushes
(`Tally`), and the figures the statistics store gives back."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


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
    # Answers served but not stored because the store was falling behind (STORE_BACKLOG_BYTES).
    stores_skipped: int = 0

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
    stores_skipped: int = 0
    # key -> (hits, time of the last one)
    entry_hits: dict[str, tuple[int, float]] = field(default_factory=dict)
    # (provider, model) -> what its hits saved
    savings: dict[tuple[str, str], SavedFigures] = field(default_factory=dict)
    # minute start (unix seconds) -> requests, hits, misses
    activity: dict[int, list[int]] = field(default_factory=dict)
    # the newest last, at most RECENT_REQUESTS_KEPT
    recent: list[RequestRecord] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(any(self.counters().values()) or self.activity or self.recent)

    def counters(self) -> dict[str, int]:
        """The plain counts, by the name the stores keep them under."""
        return {"hits": self.hits, "misses": self.misses, "stale": self.stale, "stores_skipped": self.stores_skipped}

    def saved(self, provider: str, model: str) -> SavedFigures:
        """The figures of one provider and model, to add to."""
        group = (provider, model)
        figures = self.savings.get(group)
        if figures is None:
            figures = self.savings[group] = SavedFigures()
        return figures

    def count_activity(self, at: float, figure: int) -> None:
        """Add one to a figure (0: requests, 1: hits, 2: misses) of the minute that holds `at`."""
        minute = int(at) // 60 * 60
        counts = self.activity.get(minute)
        if counts is None:
            counts = self.activity[minute] = [0, 0, 0]
        counts[figure] += 1

    def merge(self, other: Tally) -> None:
        self.hits += other.hits
        self.misses += other.misses
        self.stale += other.stale
        self.stores_skipped += other.stores_skipped
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
