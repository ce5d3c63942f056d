"""The proxy's own routes, in one table; every other path is proxied.

`ProxyApp` (openai_proxy.py) sends a request whose first path segment is one of `OWN_PREFIXES` to the
router built from `ROUTES`, and every other request straight to the proxy: no router is in the way of a hit.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Scope

from proxy.errors import ProxyError, error_response

if TYPE_CHECKING:
    from proxy.admin import AdminApi
    from proxy.pages import DashboardFiles, HealthCheck, MetricsPage

logger = logging.getLogger("openai_proxy")

Answer = Callable[[Request], Awaitable[Response]]
ANY_METHOD = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


@dataclass(frozen=True)
class OwnPages:
    """What answers the proxy's own routes, in one app."""

    health: HealthCheck
    metrics: MetricsPage | None  # None: METRICS=false, and /metrics is no route
    dashboard: DashboardFiles
    admin: AdminApi


class ExactRoute(Route):
    """A route that answers only the methods it names: Starlette's would answer HEAD wherever it answers
    GET, which the own routes never have."""

    def __init__(self, path: str, answer: Answer, methods: Collection[str]) -> None:
        super().__init__(path, answer, methods=methods)
        self.methods = set(methods)


class AdminRoute(ExactRoute):
    """A route of the admin API, which answers a path with trailing slashes as without (`/cache/stats/`)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        return super().matches({**scope, "path": scope["path"].rstrip("/")})


@dataclass(frozen=True)
class OwnRoute:
    """A row of the table: declared once for every app, bound to one app's pages by `route`."""

    path: str
    answer: Callable[[OwnPages], Answer | None]  # what answers it in one app; None: it is switched off
    methods: tuple[str, ...] = ("GET",)
    kind: type[ExactRoute] = ExactRoute

    def route(self, pages: OwnPages) -> Route | None:
        answer = self.answer(pages)
        return None if answer is None else self.kind(self.path, answer, self.methods)


ROUTES: tuple[OwnRoute, ...] = (
    OwnRoute("/healthz", lambda own: own.health.answer, ("GET", "HEAD")),
    OwnRoute("/metrics", lambda own: own.metrics.answer if own.metrics is not None else None),
    OwnRoute("/dashboard", lambda own: own.dashboard.answer),
    OwnRoute("/dashboard/{name:path}", lambda own: own.dashboard.answer),
    OwnRoute("/cache", lambda own: own.admin.purge, ("DELETE",), kind=AdminRoute),
    OwnRoute("/cache/stats", lambda own: own.admin.stats, kind=AdminRoute),
    OwnRoute("/cache/dashboard", lambda own: own.admin.dashboard_figures, kind=AdminRoute),
    OwnRoute("/cache/entries", lambda own: own.admin.entries, kind=AdminRoute),
    OwnRoute("/cache/entries/{key:path}", lambda own: own.admin.delete_entry, ("DELETE",), kind=AdminRoute),
    # Any other path or method under /cache: the admin API's own 404, once the client is let in.
    OwnRoute("/cache", lambda own: own.admin.unknown_route, ANY_METHOD, kind=AdminRoute),
    OwnRoute("/cache/{path:path}", lambda own: own.admin.unknown_route, ANY_METHOD, kind=AdminRoute),
)

# First path segments the own routes answer (a switched-off route's too: its path is still not proxied).
OWN_PREFIXES = frozenset(route.path.split("/", 2)[1] for route in ROUTES)
# Names no provider may take: the own routes', `v1` (the default provider's routes: proxy/handler.py), and
# names kept for routes of the proxy's own (`admin`; FastAPI's `docs` and `openapi.json`).
RESERVED_NAMES = OWN_PREFIXES | {"v1", "admin", "docs", "openapi.json"}


def own_routes(pages: OwnPages) -> list[BaseRoute]:
    return [route for spec in ROUTES if (route := spec.route(pages)) is not None]


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.error("unexpected error while serving %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(ProxyError(500, "The proxy failed unexpectedly; see its log.", "internal_error"))


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    code = {404: "unknown_route", 405: "method_not_allowed"}.get(status, "invalid_request")
    return error_response(ProxyError(status, f"{request.method} {request.url.path}: {exc}", code))


# The own routes' errors (no route, a wrong method, a bug) answered in OpenAI's error shape.
EXCEPTION_HANDLERS: dict[int | type[Exception], Callable[[Request, Any], Coroutine[Any, Any, Response]]] = {
    Exception: _internal_error,
    HTTPException: _http_error,
}
