"""The proxy's own pages besides the admin API: /healthz, /metrics and the dashboard's files."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cache import CacheBackend, CacheError, CacheHealth
from cache.stats import CacheStatistics
from proxy.access import AdminAccess
from proxy.dashboard import DashboardPage
from proxy.errors import ProxyError, error_response
from proxy.metrics import CONTENT_TYPE, Metrics
from proxy.pricing import Prices
from proxy.statistics import Statistics
from proxy.storing import StoreQueue


class HealthCheck:
    def __init__(self, store: CacheBackend, health: CacheHealth) -> None:
        self.store = store
        self.health = health

    async def cache(self) -> dict[str, Any]:
        """The cache store's state, as /healthz and the dashboard show it."""
        reason = self.health.state().reason
        if reason is None:
            try:
                await self.store.ping()
            except CacheError as exc:
                reason = str(exc)
        return {"backend": self.store.name, "ok": reason is None, "reason": reason}

    async def answer(self, request: Request) -> Response:
        cache = await self.cache()
        return JSONResponse({"status": "ok" if cache["ok"] else "degraded", "cache": cache})


class MetricsPage:
    def __init__(
        self,
        metrics: Metrics,
        health: CacheHealth,
        statistics: Statistics,
        prices: Prices,
        access: AdminAccess | None,
        waiting: StoreQueue | None = None,
    ) -> None:
        """`access`: whom the page answers; None for anyone (METRICS_PUBLIC). `waiting`: the answers
        waiting to be stored, which a scrape lets settle briefly so the entry figures count them."""
        self.metrics = metrics
        self.health = health
        self.statistics = statistics
        self.prices = prices
        self.access = access
        self.waiting = waiting

    async def answer(self, request: Request) -> Response:
        try:
            if self.access is not None:
                self.access.authorize(request)
        except ProxyError as error:
            return error_response(error)
        await self.statistics.flush()
        if self.waiting is not None:
            await self.waiting.settled()
        await self.prices.loaded()  # a model is a label once the price table knows it
        try:
            figures: CacheStatistics | None = await self.statistics.figures()
        except CacheError:
            figures = None
        return Response(self.metrics.exposition(figures, self.health.state()), media_type=CONTENT_TYPE)


class DashboardFiles:
    def __init__(self, page: DashboardPage, access: AdminAccess) -> None:
        self.page = page
        self.access = access

    async def answer(self, request: Request) -> Response:
        try:
            self.access.authorize_page(request)
        except ProxyError as error:
            return error_response(error)
        found = self.page.response(request.path_params.get("name", ""))
        if found is None:
            return error_response(ProxyError(404, "The dashboard has no such file.", "unknown_route"))
        return found
