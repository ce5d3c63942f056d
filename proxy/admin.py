"""The admin API under /cache: statistics, listing, deleting and purging entries.

The CLI (`openai-proxy stats|purge`) uses the same functions on the same store.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cache import CacheBackend, CacheError
from cache.base import CacheStatistics, EntryFilter, EntryInfo, Saving
from cache.control import ControlError, parse_duration
from proxy.access import is_loopback, presents_key
from proxy.errors import ProxyError, error_response
from proxy.headers import scope_headers
from proxy.statistics import NANOS_PER_DOLLAR, Statistics

MAX_PAGE = 1000


def _saved(savings: list[Saving]) -> dict[str, Any]:
    return {
        "hits": sum(saving.hits for saving in savings),
        "input_tokens": sum(saving.input_tokens for saving in savings),
        "output_tokens": sum(saving.output_tokens for saving in savings),
        "cost_usd": sum(saving.cost_nanos for saving in savings) / NANOS_PER_DOLLAR,
        "upstream_seconds": sum(saving.upstream_ms for saving in savings) / 1000,
        "hits_without_price": sum(saving.unpriced_hits for saving in savings),
    }


def statistics_report(statistics: CacheStatistics) -> dict[str, Any]:
    """What `GET /cache/stats` and `openai-proxy stats` show."""
    providers = sorted({saving.provider for saving in statistics.savings})
    total = _saved(statistics.savings)
    return {
        "entries": statistics.entries,
        "bytes": statistics.bytes,
        "hits": statistics.hits,
        "misses": statistics.misses,
        "hit_ratio": round(statistics.hit_ratio, 4),
        "evictions": statistics.evictions,
        "stale": statistics.stale,
        "tokens_saved": {
            "input": total["input_tokens"],
            "output": total["output_tokens"],
            "total": total["input_tokens"] + total["output_tokens"],
        },
        # Dollars only for hits whose price is known; `hits_without_price` counts the others.
        "cost_saved_usd": total["cost_usd"],
        "hits_without_price": total["hits_without_price"],
        "upstream_seconds_saved": total["upstream_seconds"],
        "by_provider": {
            provider: _saved([saving for saving in statistics.savings if saving.provider == provider])
            for provider in providers
        },
        "by_model": [
            {"provider": saving.provider, "model": saving.model, **_saved([saving])} for saving in statistics.savings
        ],
    }


def entry_view(info: EntryInfo, show_prompts: bool) -> dict[str, Any]:
    """An entry as the admin API and the dashboard list it; its prompt line only when they may show it."""
    view = asdict(info)
    prompt = view.pop("prompt_preview")
    if show_prompts:
        view["prompt"] = prompt
    return view


def entry_filter(namespace: str | None, provider: str | None, older_than: str | None, now: float) -> EntryFilter:
    """The filter that `purge` options and `DELETE /cache` query parameters describe."""
    created_before = None
    if older_than is not None:
        created_before = now - parse_duration(older_than)
    return EntryFilter(namespace=namespace, provider=provider, created_before=created_before)


class AdminApi:
    def __init__(
        self,
        backend: CacheBackend,
        statistics: Statistics,
        admin_key: str | None,
        proxy_keys: list[str],
        clock: Callable[[], float] = time.time,
        *,
        show_prompts: bool = True,
        dashboard: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        """`dashboard` gives what GET /cache/dashboard answers (the dashboard page's figures)."""
        self.backend = backend
        self.statistics = statistics
        self.admin_key = admin_key
        self.proxy_keys = proxy_keys
        self.clock = clock
        self.show_prompts = show_prompts
        self.dashboard = dashboard

    def authorize_page(self, request: Request) -> None:
        """The dashboard's static files hold no figures: with ADMIN_API_KEY set anyone may load them (the
        page then asks for the key); otherwise, like the admin API, only loopback clients."""
        if self.admin_key is None and not is_loopback(request.client.host if request.client else None):
            raise ProxyError(
                403, "The dashboard answers only loopback clients unless ADMIN_API_KEY is set.", "forbidden"
            )

    def authorize(self, request: Request) -> None:
        """ADMIN_API_KEY when set; otherwise only loopback clients (and their proxy key, if one is required)."""
        headers = scope_headers(request.scope)
        if self.admin_key is not None:
            if not presents_key(headers, [self.admin_key]):
                raise ProxyError(
                    401, "The admin API needs ADMIN_API_KEY (Authorization: Bearer or x-api-key).", "invalid_api_key"
                )
            return
        # The socket's peer address, never a header: a crafted Host or X-Forwarded-For changes nothing.
        if not is_loopback(request.client.host if request.client else None):
            raise ProxyError(
                403, "The admin API answers only loopback clients unless ADMIN_API_KEY is set.", "forbidden"
            )
        if self.proxy_keys and not presents_key(headers, self.proxy_keys):
            raise ProxyError(
                401, "A valid proxy API key is required (Authorization: Bearer or x-api-key).", "invalid_api_key"
            )

    async def serve(self, request: Request) -> Response:
        try:
            self.authorize(request)
            # Counts gathered since the last flush belong in every answer.
            await self.statistics.flush()
            return await self._route(request)
        except ControlError as exc:
            return error_response(ProxyError(400, str(exc), "invalid_parameter"))
        except CacheError as exc:
            return error_response(ProxyError(503, f"The cache store is unavailable: {exc}", "cache_unavailable"))
        except ProxyError as error:
            return error_response(error)

    async def _route(self, request: Request) -> Response:
        path, method = request.url.path.rstrip("/"), request.method
        if path == "/cache/stats" and method == "GET":
            return JSONResponse(statistics_report(await self.backend.statistics()))
        if path == "/cache/dashboard" and method == "GET" and self.dashboard is not None:
            return JSONResponse(await self.dashboard())
        if path == "/cache/entries" and method == "GET":
            return await self._list(request)
        if path.startswith("/cache/entries/") and method == "DELETE":
            key = path.removeprefix("/cache/entries/")
            if not await self.backend.delete(key):
                raise ProxyError(404, f"No cache entry has the key {key[:80]!r}.", "entry_not_found")
            return JSONResponse({"deleted": 1})
        if path == "/cache" and method == "DELETE":
            query = request.query_params
            which = entry_filter(query.get("namespace"), query.get("provider"), query.get("older_than"), self.clock())
            return JSONResponse({"deleted": await self.backend.purge(which)})
        raise ProxyError(404, "Unknown admin route. See the README's admin API section.", "unknown_route")

    async def _list(self, request: Request) -> Response:
        query = request.query_params
        limit = _bounded_int(query.get("limit"), "limit", default=100, low=1, high=MAX_PAGE)
        offset = _bounded_int(query.get("offset"), "offset", default=0, low=0, high=2**62)
        which = EntryFilter(namespace=query.get("namespace"), provider=query.get("provider"))
        entries = await self.backend.list_entries(which, offset, limit + 1)
        page = [entry_view(entry, self.show_prompts) for entry in entries[:limit]]
        next_offset = offset + limit if len(entries) > limit else None
        return JSONResponse({"entries": page, "offset": offset, "limit": limit, "next_offset": next_offset})


def _bounded_int(value: str | None, name: str, *, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise ControlError(f"{name} must be a whole number from {low} to {high}.")
    return int(value)
