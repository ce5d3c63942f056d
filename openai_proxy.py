"""openai-proxy: a caching reverse proxy for LLM APIs.

`create_app(settings)` builds the ASGI app; `openai-proxy` (main) serves it with uvicorn;
`uvicorn openai_proxy:app` builds it from the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from cache import CacheBackend, CacheHealth
from cache.keys import ALL_GENERATION_ENDPOINTS
from cache.memory import TieredBackend
from proxy import commands
from proxy.access import AdminAccess
from proxy.access_log import AccessLog, keep_query_strings_out_of_the_server_log
from proxy.admin import AdminApi
from proxy.aws import AwsSigner
from proxy.dashboard import Dashboard, DashboardPage
from proxy.exchange import Exchange, answered_at_once, begin, observing
from proxy.handler import Proxy
from proxy.lifespan import Lifespan
from proxy.metrics import MULTIPROCESS_DIRECTORY, Metrics, ModelLabels
from proxy.pages import DashboardFiles, HealthCheck, MetricsPage
from proxy.pricing import Prices
from proxy.responses import BufferedResponse, quiet_deliberate_cut_offs
from proxy.routes import EXCEPTION_HANDLERS, OWN_PREFIXES, OwnPages, own_routes
from proxy.server import HttpProtocol
from proxy.settings import Settings, describe_invalid_settings
from proxy.statistics import Statistics
from proxy.store import build_backend, build_store, store_for
from proxy.storing import StoreQueue
from proxy.upstream import UpstreamClient, UpstreamTransport

__all__ = ["Settings", "create_app", "main"]


def create_app(
    settings: Settings | None = None,
    backend: CacheBackend | None = None,
    http: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.time,
) -> ProxyApp:
    settings = settings if settings is not None else Settings()
    quiet_deliberate_cut_offs()
    keep_query_strings_out_of_the_server_log()
    store = build_store(settings) if backend is None else store_for(backend, settings)
    limited = bool(settings.cache_max_entries or settings.cache_max_bytes)
    tiered = TieredBackend(store.backend, settings.memory_cache_bytes, evicts=limited)
    prices = Prices(settings.price_overrides)
    metrics = _metrics(settings, prices) if settings.metrics else None
    on_failure = metrics.count_store_failure if metrics is not None else None
    health = CacheHealth(tiered.name, operations_fail_apart=store.operations_fail_apart, on_failure=on_failure)
    statistics = Statistics(store.backend, health, prices.pricer, clock)
    timeout = httpx.Timeout(settings.upstream_timeout, connect=min(10.0, settings.upstream_timeout))
    transport = http if http is not None else UpstreamTransport(settings.upstream_max_connections)
    client = UpstreamClient(transport, timeout, AwsSigner(settings))
    proxy = Proxy(settings, tiered, health, client, statistics, clock, store.flights)
    statistics.entry_waiting = proxy.stores.is_waiting
    access_log = AccessLog(settings.log_format) if settings.access_log else None
    pages = _own_pages(settings, tiered, proxy.stores, health, statistics, prices, metrics, clock)
    lifespan = Lifespan(tiered, proxy.stores, health, prices, statistics, client, store.flights, access_log)
    api = FastAPI(
        title="openai-proxy",
        routes=own_routes(pages),
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    return ProxyApp(proxy, api, statistics, metrics, access_log)


def _metrics(settings: Settings, prices: Prices) -> Metrics:
    return Metrics(
        set(settings.providers()),
        set(ALL_GENERATION_ENDPOINTS),
        ModelLabels(known=prices.knows, listed=settings.metrics_models),
        settings.prometheus_multiproc_dir,
    )


def _own_pages(
    settings: Settings,
    store: TieredBackend,
    waiting: StoreQueue,
    health: CacheHealth,
    statistics: Statistics,
    prices: Prices,
    metrics: Metrics | None,
    clock: Callable[[], float],
) -> OwnPages:
    admin_key = settings.admin_api_key.get_secret_value() if settings.admin_api_key else None
    access = AdminAccess(admin_key, [key.get_secret_value() for key in settings.proxy_api_keys])
    health_check = HealthCheck(store.backend, health)
    dashboard = Dashboard(
        store.backend,
        health_check.cache,
        show_prompts=settings.dashboard_show_prompts,
        max_entries=settings.cache_max_entries,
        max_bytes=settings.cache_max_bytes,
        clock=clock,
    )
    metrics_page = None
    if metrics is not None:
        metrics_access = None if settings.metrics_public else access
        metrics_page = MetricsPage(metrics, health, statistics, prices, metrics_access, waiting)
    return OwnPages(
        health=health_check,
        metrics=metrics_page,
        dashboard=DashboardFiles(DashboardPage(), access),
        admin=AdminApi(
            store,
            statistics,
            access,
            dashboard.report,
            clock,
            show_prompts=settings.dashboard_show_prompts,
            waiting=waiting,
        ),
    )


class ProxyApp:
    """The ASGI application. Proxied paths go straight to the proxy, with no framework in the way of a
    hit; the proxy's own routes (proxy/routes.py) and the lifespan go to the FastAPI app."""

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
        proxied = _is_proxied(scope)
        try:
            if proxied:
                await self.proxy(scope, receive, observing(send, exchange))
            else:
                await self.api(scope, receive, observing(send, exchange))
        finally:
            if exchange.ended is None:
                exchange.ended = time.perf_counter()
            self._seen(exchange, proxied)

    def answer_at_once(self, scope: Scope, body: bytes) -> BufferedResponse | None:
        """The answer to a request the server has read whole, when the proxy can give it without waiting on
        anything (a hit on a request sent before byte for byte: `Proxy.answer_at_once`), for the server to
        write without an ASGI task (proxy/server.py). Statistics, metrics and the access log see it like
        any other answer; None leaves the request to `__call__`, with nothing counted."""
        if not _is_proxied(scope):
            return None
        exchange = begin(scope)
        answer = self.proxy.answer_at_once(scope, body)
        if answer is not None:
            answered_at_once(exchange, answer.status, answer.raw_headers, answer.body)
            self._seen(exchange, proxied=True)
        return answer

    def _seen(self, exchange: Exchange, proxied: bool) -> None:
        if proxied:
            self.statistics.requested(exchange)
        if self.metrics is not None:
            self.metrics.observe(exchange)
        if self.access_log is not None:
            self.access_log.add(exchange)

    def lifespan(self) -> AbstractAsyncContextManager[Any]:
        """Start-up and shutdown, for running the app without a server (tests)."""
        return self.api.router.lifespan_context(self.api)


def _is_proxied(scope: Scope) -> bool:
    return scope["path"].split("/", 2)[1] not in OWN_PREFIXES


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


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit, and return it: each open stream
    holds two sockets (the client's and the upstream's), and the usual soft limit of 1,024 would refuse
    connections at about 500 streams."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            return soft
        return wanted
    return soft


def tune_garbage_collection() -> None:
    """Fewer, cheaper collections for a server: every request allocates short-lived objects in bulk,
    and with the default threshold the collector's pauses showed as the miss path's tail latency."""
    gc.freeze()  # what start-up built lives as long as the process; never scan it again
    gc.set_threshold(10_000, 10, 10)


def _app_from_environment() -> ProxyApp:
    settings = load_settings()
    configure_logging(settings.log_level)
    app = create_app(settings)
    raise_open_file_limit()
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
        raise_open_file_limit()
        tune_garbage_collection()
        uvicorn.run(app, **options)


if __name__ == "__main__":
    main()
