"""openai-proxy: a caching reverse proxy for LLM APIs.

`create_app(settings)` builds the ASGI app; `openai-proxy` (main) serves it with uvicorn;
`uvicorn openai_proxy:app` builds it from the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio
import httpx
import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from cache import CacheBackend, CacheError, CacheHealth, SqliteBackend
from cache.base import CacheStatistics
from cache.health import Operation
from cache.keys import GENERATION_ENDPOINTS
from cache.memory import TieredBackend
from cache.prices import PriceTable, parse_price_overrides
from cache.usage import Usage, entry_usage
from proxy import commands
from proxy.access_log import AccessLog
from proxy.admin import AdminApi
from proxy.dashboard import Dashboard, DashboardPage
from proxy.errors import ProxyError, error_response
from proxy.exchange import begin, observing
from proxy.handler import Proxy
from proxy.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from proxy.metrics import MULTIPROCESS_DIRECTORY, Metrics, ModelLabels
from proxy.server import HttpProtocol
from proxy.settings import Settings, describe_invalid_settings
from proxy.statistics import Pricer, Statistics
from proxy.upstream import UpstreamClient, UpstreamTransport

__all__ = ["Settings", "create_app", "main"]

logger = logging.getLogger("openai_proxy")
T = TypeVar("T")

PROXIED_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


class LoadedLater(Generic[T]):
    """A value that takes a while to build (the price table: most of a second), built in a thread after
    start-up rather than delaying it; `get` waits for it (and builds it, if nothing has begun to)."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self.value: T | None = None
        self._begun = False
        self._loaded = asyncio.Event()

    async def load(self) -> None:
        self._begun = True
        # Shielded: a shutdown that begins meanwhile waits for it, so `get` never waits for nothing.
        with anyio.CancelScope(shield=True):
            try:
                self.value = await anyio.to_thread.run_sync(self._build)
            except Exception:
                logger.exception("could not build %s", self._build)
            finally:
                self._loaded.set()

    async def get(self) -> T:
        if not self._begun:
            await self.load()
        await self._loaded.wait()
        if self.value is None:
            raise RuntimeError("the value could not be built")
        return self.value


def build_backend(settings: Settings) -> CacheBackend:
    """The cache store the settings name (CACHE_BACKEND)."""
    if settings.cache_backend == "redis":
        from cache.redis_backend import RedisBackend  # redis-py takes a while to import: only when used

        return RedisBackend(
            settings.redis_url.get_secret_value(),
            cluster=settings.redis_cluster,
            prefix=settings.redis_key_prefix,
            timeout=settings.redis_timeout,
            default_ttl=settings.cache_ttl,
            max_entries=settings.cache_max_entries,
            max_bytes=settings.cache_max_bytes,
        )
    return SqliteBackend(
        settings.cache_db,
        busy_timeout=settings.cache_busy_timeout,
        max_entries=settings.cache_max_entries,
        max_bytes=settings.cache_max_bytes,
    )


def create_app(
    settings: Settings | None = None,
    backend: CacheBackend | None = None,
    http: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.time,
) -> ProxyApp:
    settings = settings if settings is not None else Settings()
    limited = bool(settings.cache_max_entries or settings.cache_max_bytes)
    store = backend if backend is not None else build_backend(settings)
    tiered = TieredBackend(store, settings.memory_cache_bytes, evicts=limited)
    shared_flights = None
    if store.name == "redis" and settings.cache_lock_timeout > 0:
        from cache.redis_backend import RedisBackend
        from cache.redis_flights import RedisFlights

        assert isinstance(store, RedisBackend)
        shared_flights = RedisFlights(store, settings.cache_lock_timeout)
    timeout = httpx.Timeout(settings.upstream_timeout, connect=min(10.0, settings.upstream_timeout))
    client = UpstreamClient(http if http is not None else UpstreamTransport(), timeout)
    prices = LoadedLater(
        lambda: PriceTable(parse_price_overrides(settings.price_overrides) if settings.price_overrides else None)
    )
    known_usage = Usage(input_tokens=1, output_tokens=1)

    def known_model(provider: str, model: str) -> bool:
        table = prices.value
        return table is not None and table.cost(provider, model, known_usage) is not None

    async def pricer() -> Pricer:
        table = await prices.get()
        return lambda entry: table.cost(entry.provider, entry.model, entry_usage(entry))

    metrics = None
    if settings.metrics:
        metrics = Metrics(
            set(settings.providers()),
            set(GENERATION_ENDPOINTS),
            ModelLabels(known=known_model, listed=settings.metrics_models),
        )

    def count_store_failure(operation: Operation) -> None:
        if metrics is not None:
            metrics.store_failures.labels(operation.value).inc()

    # SQLite reads go on while writes fail (a lock, a full disk); a Redis outage stops both.
    health = CacheHealth(tiered.name, operations_fail_apart=store.name != "redis", on_failure=count_store_failure)
    statistics = Statistics(tiered, health, pricer, clock)
    proxy = Proxy(settings, tiered, health, client, statistics, clock, shared_flights)

    async def cache_health() -> dict[str, Any]:
        reason = health.state().reason
        if reason is None:
            try:
                await tiered.ping()
            except CacheError as exc:
                reason = str(exc)
        return {"backend": tiered.name, "ok": reason is None, "reason": reason}

    dashboard = Dashboard(
        tiered,
        cache_health,
        show_prompts=settings.dashboard_show_prompts,
        max_entries=settings.cache_max_entries,
        max_bytes=settings.cache_max_bytes,
        clock=clock,
    )
    admin_key = settings.admin_api_key.get_secret_value() if settings.admin_api_key else None
    admin = AdminApi(
        tiered,
        statistics,
        admin_key,
        proxy.proxy_keys,
        clock,
        show_prompts=settings.dashboard_show_prompts,
        dashboard=dashboard.report,
    )
    dashboard_page = DashboardPage()

    access_log = AccessLog(settings.log_format) if settings.access_log else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await tiered.open()
        except CacheError as exc:
            health.failed(Operation.READ, exc)
        try:
            async with anyio.create_task_group() as background:
                background.start_soon(prices.load)
                background.start_soon(statistics.flush_periodically)
                background.start_soon(tiered.sync_periodically)
                background.start_soon(tiered.maintain)
                if access_log is not None:
                    background.start_soon(access_log.flush_periodically)
                yield
                background.cancel_scope.cancel()
        finally:
            await statistics.flush()
            if access_log is not None:
                access_log.flush()
            if shared_flights is not None:
                await shared_flights.close()
            await tiered.close()
            await client.aclose()

    app = FastAPI(title="openai-proxy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(Exception, _internal_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> JSONResponse:
        cache = await cache_health()
        return JSONResponse({"status": "ok" if cache["ok"] else "degraded", "cache": cache})

    if metrics is not None:
        exposed = metrics

        @app.get("/metrics")
        async def metrics_page(request: Request) -> Response:
            try:
                if not settings.metrics_public:
                    admin.authorize(request)
            except ProxyError as error:
                return error_response(error)
            await statistics.flush()
            with contextlib.suppress(RuntimeError):
                await prices.get()  # a model is a label once the price table knows it
            try:
                figures: CacheStatistics | None = await tiered.statistics()
            except CacheError:
                figures = None
            return Response(exposed.exposition(figures, health.state()), media_type=METRICS_CONTENT_TYPE)

    @app.get("/dashboard")
    @app.get("/dashboard/{name:path}")
    async def dashboard_files(request: Request, name: str = "") -> Response:
        try:
            admin.authorize_page(request)
        except ProxyError as error:
            return error_response(error)
        found = dashboard_page.response(name)
        if found is None:
            return error_response(ProxyError(404, "The dashboard has no such file.", "unknown_route"))
        return found

    @app.api_route("/cache", methods=PROXIED_METHODS)
    @app.api_route("/cache/{path:path}", methods=PROXIED_METHODS)
    async def cache_admin(request: Request) -> Response:
        return await admin.serve(request)

    return ProxyApp(proxy, app, statistics, metrics, access_log)


# First path segments the proxy's own routes answer; every other path is proxied.
OWN_ROUTES = frozenset({"healthz", "cache", "metrics", "dashboard"})


class ProxyApp:
    """The ASGI application. Proxied paths go straight to the proxy, with no framework in the way of a
    hit; the proxy's own routes (/healthz, /cache, /metrics, /dashboard) and the lifespan go to the FastAPI app."""

    def __init__(
        self,
        proxy: Proxy,
        api: FastAPI,
        statistics: Statistics,
        metrics: Metrics | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self.proxy = proxy
        self.api = api
        self.statistics = statistics
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)
            return
        exchange = begin(scope)
        proxied = scope["path"].split("/", 2)[1] not in OWN_ROUTES
        try:
            if proxied:
                await self.proxy(scope, receive, observing(send, exchange))
            else:
                await self.api(scope, receive, observing(send, exchange))
        finally:
            if exchange.ended is None:
                exchange.ended = time.perf_counter()
            if proxied:
                self.statistics.requested(exchange)
            if self.metrics is not None:
                self.metrics.observe(exchange)
            if self.access_log is not None:
                self.access_log.add(exchange)

    def lifespan(self) -> AbstractAsyncContextManager[Any]:
        """Start-up and shutdown, for running the app without a server (tests)."""
        return self.api.router.lifespan_context(self.api)


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.error("unexpected error while serving %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(ProxyError(500, "The proxy failed unexpectedly; see its log.", "internal_error"))


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
    code = {404: "unknown_route", 405: "method_not_allowed"}.get(status, "invalid_request")
    return error_response(ProxyError(status, f"{request.method} {request.url.path}: {exc}", code))


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, or a one-line message and exit status 2 when one is invalid."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        sys.stderr.write(f"openai-proxy: {describe_invalid_settings(exc)}\n")
        raise SystemExit(2) from None


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=logging.DEBUG if level == "trace" else level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def tune_garbage_collection() -> None:
    """Fewer, cheaper collections for a server: every request allocates short-lived objects in bulk,
    and with the default threshold the collector's pauses showed as the miss path's tail latency."""
    gc.freeze()  # what start-up built lives as long as the process; never scan it again
    gc.set_threshold(10_000, 10, 10)


def _app_from_environment() -> ProxyApp:
    settings = load_settings()
    configure_logging(settings.log_level)
    app = create_app(settings)
    tune_garbage_collection()
    return app


_app: ProxyApp | None = None


def __getattr__(name: str) -> Any:
    # `uvicorn openai_proxy:app` builds the app on first use, so importing this module for
    # `create_app` reads no environment and opens no file.
    global _app
    if name == "app":
        if _app is None:
            _app = _app_from_environment()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _settings_epilog() -> str:
    names = [name.upper() for name in Settings.model_fields]
    return (
        "Every option, and every other setting, can also be set in the environment or a .env file "
        "in the working directory (see Sample.env). Settings: " + ", ".join(names) + "."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openai-proxy",
        description="A caching reverse proxy for LLM APIs. Point your SDK at http://HOST:PORT/v1. "
        "Without a command it serves; the commands work on the cache store (CACHE_BACKEND: the file "
        "CACHE_DB, or Redis at REDIS_URL).",
        epilog=_settings_epilog(),
    )
    parser.add_argument("--host", help="address to bind (HOST; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (PORT; default 8000)")
    parser.add_argument("--workers", type=int, help="number of worker processes (WORKERS; default 1)")
    parser.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="log level (LOG_LEVEL; default info)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    stats = commands.add_parser("stats", help="show cache statistics and tokens saved")
    stats.add_argument("--json", action="store_true", help="print the figures as JSON")
    purge = commands.add_parser("purge", help="delete entries (all of them, or those matching every filter)")
    purge.add_argument("--namespace", help="only entries of this X-Cache-Namespace")
    purge.add_argument("--provider", help="only entries of this provider (openai, anthropic, ...)")
    purge.add_argument("--older-than", metavar="AGE", help="only entries older than AGE (3600s, 30m, 12h, 7d, 2w)")
    export = commands.add_parser("export", help="write every entry to a JSON-lines file")
    export.add_argument("file", type=Path, metavar="FILE.jsonl")
    load = commands.add_parser("import", help="store the entries of a JSON-lines file made by export")
    load.add_argument("file", type=Path, metavar="FILE.jsonl")
    return parser


def run_command(settings: Settings, args: argparse.Namespace) -> int:
    backend = build_backend(settings)
    actions: dict[str, Callable[[], Awaitable[int]]] = {
        "stats": lambda: commands.show_statistics(backend, args.json),
        "purge": lambda: commands.purge(backend, args.namespace, args.provider, args.older_than),
        "export": lambda: commands.export_entries(backend, args.file),
        "import": lambda: commands.import_entries(backend, args.file),
    }
    return asyncio.run(commands.run(backend, args.command, actions[args.command]))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    serving = {name: getattr(args, name) for name in ("host", "port", "workers", "log_level")}
    settings = load_settings(**{name: value for name, value in serving.items() if value is not None})
    if args.command is not None:
        raise SystemExit(run_command(settings, args))
    configure_logging(settings.log_level)
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "server_header": False,
        # The proxy writes its own access log (ACCESS_LOG, LOG_FORMAT), with what uvicorn's cannot know.
        "access_log": False,
        # Client addresses are the sockets' own: the admin API's loopback rule must not trust X-Forwarded-For.
        "proxy_headers": False,
        "http": HttpProtocol,
    }
    if settings.workers > 1:
        # Each worker process builds its own app from the environment. Their request metrics meet in a
        # directory of this server's own: two servers on one host never share it or wipe each other's.
        with tempfile.TemporaryDirectory(prefix="openai-proxy-metrics-") as directory:
            os.environ[MULTIPROCESS_DIRECTORY] = directory
            uvicorn.run("openai_proxy:app", workers=settings.workers, **options)
    else:
        app = create_app(settings)
        tune_garbage_collection()
        uvicorn.run(app, **options)


if __name__ == "__main__":
    main()
