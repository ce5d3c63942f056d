"""GET /metrics: Prometheus figures, produced with prometheus_client.

Two kinds of figures:
- per request (counts by provider, endpoint, cache status and status class; upstream and hit latency):
  counted by each process. With several workers they live in prometheus_client's multiprocess files in
  a directory private to this server (`openai-proxy --workers N` creates it and removes it at exit), so
  every scrape sums every worker.
- the cache's own (entries, bytes, hits, evictions, tokens saved...): read from the store at each
  scrape, so they are the figures /cache/stats and `openai-proxy stats` show, whichever worker answers.

Label values are bounded: providers and endpoints come from the proxy's own tables, cache statuses from
its own list, and models from `ModelLabels` (known or listed names only), so a client cannot create
new series at will.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from cache.health import CacheState, Operation
from cache.stats import CacheStatistics
from proxy.exchange import Exchange
from proxy.statistics import NANOS_PER_DOLLAR

# prometheus_client's own setting, which Settings reads too (prometheus_multiproc_dir).
MULTIPROCESS_DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"
OTHER = "other"
NONE = "none"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CACHE_STATUSES = frozenset({"HIT", "MISS", "BYPASS", "EXPIRED", "REFRESH", "STALE"})
# Answers that came from the upstream (NONE: not cacheable, passed through).
_FROM_UPSTREAM = frozenset({"MISS", "BYPASS", "EXPIRED", "REFRESH", NONE})
# Seconds: a hit takes milliseconds, an upstream answer up to minutes.
_HIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ModelLabels:
    """Model names as label values: a name `known` for its provider (the price table's, PRICE_OVERRIDES')
    or one the user `listed` (METRICS_MODELS); any other is `other`, so clients cannot choose series."""

    def __init__(self, known: Callable[[str, str], bool] | None = None, listed: Iterable[str] = ()) -> None:
        self._known = known
        self._listed = frozenset(listed)
        self._seen: set[tuple[str, str]] = set()

    def __call__(self, provider: str, model: str | None) -> str:
        if not model:
            return NONE
        if model in self._listed or (provider, model) in self._seen:
            return model
        if self._known is not None and self._known(provider, model):
            self._seen.add((provider, model))
            return model
        return OTHER


@dataclass(frozen=True)
class Figure:
    """A per-request figure: its name, help and label names, and a histogram's buckets (None: a counter)."""

    name: str
    documentation: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None


REQUESTS = Figure(
    "openai_proxy_requests",
    "Requests answered, by provider, endpoint, cache status and status class.",
    ("provider", "endpoint", "cache_status", "status_class", "coalesced"),
)
UPSTREAM_SECONDS = Figure(
    "openai_proxy_upstream_duration_seconds",
    "Seconds from a request that went upstream to the end of its answer, by provider.",
    ("provider",),
    _UPSTREAM_BUCKETS,
)
UPSTREAM_FIRST_BYTE = Figure(
    "openai_proxy_upstream_first_byte_seconds",
    "Seconds from a streamed request that went upstream to its first byte, by provider.",
    ("provider",),
    _UPSTREAM_BUCKETS,
)
HIT_SECONDS = Figure(
    "openai_proxy_hit_duration_seconds",
    "Seconds the proxy took to answer a hit: its own added latency.",
    (),
    _HIT_BUCKETS,
)
STORE_FAILURES = Figure(
    "openai_proxy_cache_store_failures",
    "Cache store operations that failed (the request was served anyway).",
    ("operation",),
)
REQUEST_FIGURES = (REQUESTS, UPSTREAM_SECONDS, UPSTREAM_FIRST_BYTE, HIT_SECONDS, STORE_FAILURES)


class Counted(Protocol):
    """One label set's value of a figure: a counter's (`inc`) or a histogram's (`observe`)."""

    def inc(self, amount: float = 1) -> None: ...

    def observe(self, amount: float) -> None: ...


class RequestFigures(Collector, Protocol):
    """Where the per-request figures are counted, and read from at a scrape."""

    def child(self, figure: Figure, *labels: str) -> Counted: ...


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def observe(self, amount: float) -> None:
        raise TypeError("a counter has no observations")


class _Observations:
    """A histogram's counts per bucket (the last: above every bound) and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def inc(self, amount: float = 1) -> None:
        raise TypeError("a histogram counts observations")

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1  # a bucket holds what is at most its bound
        self.total += amount

    def cumulative(self) -> list[tuple[str, float]]:
        bounds = [*(floatToGoString(bound) for bound in self.bounds), "+Inf"]  # type: ignore[no-untyped-call]
        return list(zip(bounds, itertools.accumulate(self.counts), strict=True))


class LocalFigures:
    """The figures of a server that is one process, counted in plain memory: prometheus_client's own
    values take a lock for every change, three times for a hit, a tenth of a hit's work."""

    def __init__(self) -> None:
        self._children: dict[Figure, dict[tuple[str, ...], _Count | _Observations]] = {
            figure: {} for figure in REQUEST_FIGURES
        }
        for figure in REQUEST_FIGURES:
            if not figure.labels:
                self.child(figure)  # shown from the start, as zeros

    def child(self, figure: Figure, *labels: str) -> Counted:
        children = self._children[figure]
        counted = children.get(labels)
        if counted is None:
            counted = children[labels] = _Count() if figure.buckets is None else _Observations(figure.buckets)
        return counted

    def collect(self) -> Iterator[Metric]:
        for figure, children in self._children.items():
            family: CounterMetricFamily | HistogramMetricFamily
            if figure.buckets is None:
                family = CounterMetricFamily(figure.name, figure.documentation, labels=figure.labels)
                for labels, count in children.items():
                    assert isinstance(count, _Count)
                    family.add_metric(labels, count.value)
            else:
                family = HistogramMetricFamily(figure.name, figure.documentation, labels=figure.labels)
                for labels, observations in children.items():
                    assert isinstance(observations, _Observations)
                    family.add_metric(labels, observations.cumulative(), observations.total)
            yield family


class SharedFigures:
    """The figures of a server of several worker processes: prometheus_client's multiprocess values, in
    files of a directory private to the server (`directory`), summed at each scrape."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # Not registered: multiprocess values are written to files, and read back from them.
        self._metrics: dict[Figure, Counter | Histogram] = {
            figure: (
                Counter(figure.name, figure.documentation, figure.labels, registry=None)
                if figure.buckets is None
                else Histogram(figure.name, figure.documentation, figure.labels, buckets=figure.buckets, registry=None)
            )
            for figure in REQUEST_FIGURES
        }

    def child(self, figure: Figure, *labels: str) -> Counted:
        metric = self._metrics[figure]
        return metric.labels(*labels) if labels else metric  # type: ignore[return-value]

    def collect(self) -> Iterator[Metric]:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.directory))  # type: ignore[no-untyped-call]
        yield from registry.collect()


class Metrics:
    def __init__(
        self, providers: set[str], endpoints: set[str], models: ModelLabels, directory: Path | None = None
    ) -> None:
        """`directory`: where every worker process of this server keeps its request figures
        (PROMETHEUS_MULTIPROC_DIR); None when this process is the only one."""
        self._providers = providers
        self._endpoints = endpoints
        self.models = models
        self.figures: RequestFigures = LocalFigures() if directory is None else SharedFigures(directory)
        self._hit_seconds = self.figures.child(HIT_SECONDS)
        # Each label set's value is looked up once.
        self._counted: dict[tuple[str, str, str, int, bool], Counted] = {}
        self._timings: dict[str, tuple[Counted, Counted]] = {}

    def count_store_failure(self, operation: Operation) -> None:
        self.figures.child(STORE_FAILURES, operation.value).inc()

    def observe(self, exchange: Exchange) -> None:
        """Count one finished request."""
        provider = exchange.provider if exchange.provider in self._providers else NONE
        endpoint = exchange.endpoint if exchange.endpoint in self._endpoints else OTHER
        status = exchange.cache_status if exchange.cache_status in CACHE_STATUSES else NONE
        labels = (provider, endpoint, status, exchange.status // 100, exchange.coalesced)
        counted = self._counted.get(labels)
        if counted is None:
            status_class = f"{exchange.status // 100}xx" if exchange.status else "none"
            coalesced = str(exchange.coalesced).lower()
            counted = self._counted[labels] = self.figures.child(
                REQUESTS, provider, endpoint, status, status_class, coalesced
            )
        counted.inc()
        if status == "HIT" and not exchange.coalesced:
            self._hit_seconds.observe(exchange.duration)
        elif provider != NONE and status in _FROM_UPSTREAM and exchange.status < 500:
            timings = self._timings.get(provider)
            if timings is None:
                timings = self._timings[provider] = (
                    self.figures.child(UPSTREAM_SECONDS, provider),
                    self.figures.child(UPSTREAM_FIRST_BYTE, provider),
                )
            timings[0].observe(exchange.duration)
            first_byte = exchange.time_to_first_byte
            if exchange.streamed and first_byte is not None:
                timings[1].observe(first_byte)

    def exposition(self, statistics: CacheStatistics | None, state: CacheState) -> bytes:
        """The text a scrape gets: this server's request figures and the store's own."""
        scrape = CollectorRegistry()
        scrape.register(_Merged(self.figures, _StoreFigures(statistics, state, self.models)))
        return generate_latest(scrape)


class _Merged(Collector):
    def __init__(self, requests: Collector, store: Collector) -> None:
        self._requests = requests
        self._store = store

    def collect(self) -> Iterator[Metric]:
        yield from self._requests.collect()
        yield from self._store.collect()


class _StoreFigures(Collector):
    """The cache store's figures at the moment of the scrape (None: the store could not be read)."""

    def __init__(self, statistics: CacheStatistics | None, state: CacheState, models: ModelLabels) -> None:
        self._statistics = statistics
        self._state = state
        self._models = models

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "openai_proxy_cache_up", "1 when the cache store works, 0 when it fails.", labels=["backend"]
        )
        up.add_metric([self._state.backend], 1.0 if self._state.ok and self._statistics is not None else 0.0)
        yield up
        statistics = self._statistics
        if statistics is None:
            return
        yield GaugeMetricFamily("openai_proxy_cache_entries", "Entries in the cache store.", value=statistics.entries)
        yield GaugeMetricFamily("openai_proxy_cache_bytes", "Bytes of the stored answers.", value=statistics.bytes)
        for name, documentation, value in (
            ("openai_proxy_cache_hits", "Requests answered from the cache (coalesced ones included).", statistics.hits),
            ("openai_proxy_cache_misses", "Cacheable requests the cache could not answer.", statistics.misses),
            (
                "openai_proxy_cache_evictions",
                "Entries evicted to keep the cache within its limits.",
                statistics.evictions,
            ),
            ("openai_proxy_cache_stale", "Expired entries served because the upstream failed.", statistics.stale),
            (
                "openai_proxy_cache_stores_skipped",
                "Answers served but not stored because the store was falling behind (STORE_BACKLOG_BYTES).",
                statistics.stores_skipped,
            ),
        ):
            yield CounterMetricFamily(name, documentation, value=value)
        yield from self._savings(statistics)

    def _savings(self, statistics: CacheStatistics) -> tuple[Metric, ...]:
        """What hits saved, by provider and model label."""
        tokens = CounterMetricFamily(
            "openai_proxy_tokens_saved",
            "Tokens that hits did not pay for again, as the provider reported them, by provider, model and kind.",
            labels=["provider", "model", "kind"],
        )
        cost = CounterMetricFamily(
            "openai_proxy_cost_saved_usd",
            "US dollars that hits did not pay again, at the price table's prices, by provider and model.",
            labels=["provider", "model"],
        )
        unpriced = CounterMetricFamily(
            "openai_proxy_hits_without_price",
            "Hits whose cost is unknown (unknown model or no usage): their tokens count, no dollars.",
            labels=["provider", "model"],
        )
        upstream = CounterMetricFamily(
            "openai_proxy_upstream_seconds_saved",
            "Seconds the upstream took for the answers that hits replayed, by provider and model.",
            labels=["provider", "model"],
        )
        for (provider, model), (inputs, outputs, dollars, unknown, seconds) in sorted(self._totals(statistics).items()):
            tokens.add_metric([provider, model, "input"], inputs)
            tokens.add_metric([provider, model, "output"], outputs)
            cost.add_metric([provider, model], dollars)
            unpriced.add_metric([provider, model], unknown)
            upstream.add_metric([provider, model], seconds)
        return tokens, cost, unpriced, upstream

    def _totals(self, statistics: CacheStatistics) -> dict[tuple[str, str], list[float]]:
        # Models without a label of their own add up under `other`.
        totals: dict[tuple[str, str], list[float]] = {}
        for saving in statistics.savings:
            group = (saving.provider, self._models(saving.provider, saving.model))
            figures = totals.setdefault(group, [0.0] * 5)
            values = (
                float(saving.input_tokens),
                float(saving.output_tokens),
                saving.cost_nanos / NANOS_PER_DOLLAR,
                float(saving.unpriced_hits),
                saving.upstream_ms / 1000,
            )
            for index, figure in enumerate(values):
                figures[index] += figure
        return totals
