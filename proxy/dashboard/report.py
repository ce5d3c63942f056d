"""What `GET /cache/dashboard` answers: everything the page shows, read from the cache store in one go."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from cache.base import StatisticsStore
from cache.stats import ActivityPoint
from proxy.admin import entry_view, statistics_report

# The chart's two ranges: the last hour by minute, the last 7 days by hour.
RANGES = {"hour": (60, 60), "week": (3600, 7 * 24)}
TOP_ENTRIES = 10


def activity_series(points: list[ActivityPoint], step: int, count: int, now: float) -> dict[str, Any]:
    """`count` periods of `step` seconds ending with the one that holds `now`, oldest first; a period
    without requests is there with zeros, so a chart always has `count` points."""
    last = int(now) - int(now) % step
    known = {point.start: point for point in points}
    series = []
    for start in range(last - (count - 1) * step, last + step, step):
        point = known.get(start, ActivityPoint(start, 0, 0, 0))
        series.append({"at": start, "requests": point.requests, "hits": point.hits, "misses": point.misses})
    return {"step_seconds": step, "points": series}


class Dashboard:
    def __init__(
        self,
        backend: StatisticsStore,
        cache_health: Callable[[], Awaitable[dict[str, Any]]],
        *,
        show_prompts: bool,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.cache_health = cache_health
        self.show_prompts = show_prompts
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock

    async def report(self) -> dict[str, Any]:
        """The page's figures; raises CacheError when the store cannot be read."""
        now = self.clock()
        hour, week = (
            self.backend.activity(step, int(now) - step * count) for step, count in (RANGES["hour"], RANGES["week"])
        )
        statistics, top, recent, by_minute, by_hour = await asyncio.gather(
            self.backend.statistics(),
            self.backend.most_hit(TOP_ENTRIES),
            self.backend.recent_requests(),
            hour,
            week,
        )
        return {
            "generated_at": now,
            "show_prompts": self.show_prompts,
            "stats": statistics_report(statistics),
            "activity": {
                "hour": activity_series(by_minute, *RANGES["hour"], now),
                "week": activity_series(by_hour, *RANGES["week"], now),
            },
            "top_entries": [entry_view(info, self.show_prompts) for info in top],
            # Newest first by arrival: a request is recorded when it ends, so a slow one comes in late.
            "recent": [asdict(record) for record in sorted(recent, key=lambda record: record.at, reverse=True)],
            "capacity": {
                "entries": statistics.entries,
                "bytes": statistics.bytes,
                "max_entries": self.max_entries,
                "max_bytes": self.max_bytes,
            },
            "health": await self.cache_health(),
        }
