"""The admin API under /cache: statistics, listing, deleting and purging entries.

The CLI (`openai-proxy stats|purge`) uses the same functions on the same store.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cache import CacheError
from cache.base import EntryFilter, EntryInfo, EntryStore
from cache.control import ControlError, parse_duration
from cache.stats import CacheStatistics, Saving
from proxy.access import AdminAccess
from proxy.errors import ProxyError, error_response
from proxy.statistics import NANOS_PER_DOLLAR, Statistics
from proxy.storing import StoreQueue

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
        "stores_skipped": statistics.stores_skipped,
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


AdminEndpoint = Callable[["AdminApi", Request], Awaitable[Response]]


def _admin_endpoint(endpoint: AdminEndpoint) -> AdminEndpoint:
    """An endpoint that answers only whom the admin rule lets in, with the statistics flushed first, and its
    errors in OpenAI's shape."""

    @functools.wraps(endpoint)
    async def answer(admin: AdminApi, request: Request) -> Response:
        try:
            admin.access.authorize(request)
            # Answers just sent, and counts gathered since the last flush, belong in every answer: the answers
            # first, so that the hits on an answer still waiting to be stored are counted on its entry.
            if admin.waiting is not None:
                await admin.waiting.settled()
            await admin.statistics.flush()
            return await endpoint(admin, request)
        except ControlError as exc:
            return error_response(ProxyError(400, str(exc), "invalid_parameter"))
        except CacheError as exc:
            return error_response(ProxyError(503, f"The cache store is unavailable: {exc}", "cache_unavailable"))
        except ProxyError as error:
            return error_response(error)

    return answer


class AdminApi:
    """The endpoints under /cache; proxy/routes.py says which path and method each answers."""

    def __init__(
        self,
        entries: EntryStore,
        statistics: Statistics,
        access: AdminAccess,
        dashboard: Callable[[], Awaitable[dict[str, Any]]],
        clock: Callable[[], float] = time.time,
        *,
        show_prompts: bool = True,
        waiting: StoreQueue | None = None,
    ) -> None:
        """`dashboard` gives what GET /cache/dashboard answers (the dashboard page's figures); `waiting`:
        the answers waiting to be stored, of which deletions and purges cover their share too."""
        self.store = entries
        self.waiting = waiting
        self.statistics = statistics
        self.access = access
        self.dashboard = dashboard
        self.clock = clock
        self.show_prompts = show_prompts

    @_admin_endpoint
    async def stats(self, request: Request) -> Response:
        return JSONResponse(statistics_report(await self.statistics.figures()))

    @_admin_endpoint
    async def dashboard_figures(self, request: Request) -> Response:
        return JSONResponse(await self.dashboard())

    @_admin_endpoint
    async def entries(self, request: Request) -> Response:
        query = request.query_params
        limit = _bounded_int(query.get("limit"), "limit", default=100, low=1, high=MAX_PAGE)
        offset = _bounded_int(query.get("offset"), "offset", default=0, low=0, high=2**62)
        which = EntryFilter(namespace=query.get("namespace"), provider=query.get("provider"))
        entries = await self.store.list_entries(which, offset, limit + 1)
        page = [entry_view(entry, self.show_prompts) for entry in entries[:limit]]
        next_offset = offset + limit if len(entries) > limit else None
        return JSONResponse({"entries": page, "offset": offset, "limit": limit, "next_offset": next_offset})

    @_admin_endpoint
    async def delete_entry(self, request: Request) -> Response:
        key: str = request.path_params["key"]
        if self.waiting is not None:
            self.waiting.forget(key=key)
        if not await self.store.delete(key):
            raise ProxyError(404, f"No cache entry has the key {key[:80]!r}.", "entry_not_found")
        return JSONResponse({"deleted": 1})

    @_admin_endpoint
    async def purge(self, request: Request) -> Response:
        query = request.query_params
        which = entry_filter(query.get("namespace"), query.get("provider"), query.get("older_than"), self.clock())
        if self.waiting is not None:
            self.waiting.forget(which)
        return JSONResponse({"deleted": await self.store.purge(which)})

    @_admin_endpoint
    async def unknown_route(self, request: Request) -> Response:
        raise ProxyError(404, "Unknown admin route. See the README's admin API section.", "unknown_route")


def _bounded_int(value: str | None, name: str, *, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise ControlError(f"{name} must be a whole number from {low} to {high}.")
    return int(value)
