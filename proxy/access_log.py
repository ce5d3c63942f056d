"""The access log: one line per request, written after its response ended (ACCESS_LOG, LOG_FORMAT).

Never a credential and never a body: the path is logged without its query string (some clients put keys
there), and the cache key only as a short prefix. Lines are kept in memory and written a batch at a
time, off the request path.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Literal, TextIO

import anyio
import orjson

from proxy.exchange import KEY_PREFIX_LENGTH, RECORDED_TEXT_LIMIT, Exchange

LogFormat = Literal["text", "json"]
FLUSH_INTERVAL = 0.2
# Written at once when this many lines wait, whatever the interval.
_BATCH = 512


class WithoutQueryStrings(logging.Filter):
    """uvicorn's own access log, on when the app is served as `uvicorn openai_proxy:app`, logs each path
    with its query string, where a client may carry a key (Gemini's `?key=`): the query is cut off."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):  # client, method, path, ...
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


def keep_query_strings_out_of_the_server_log() -> None:
    server_log = logging.getLogger("uvicorn.access")
    if not any(isinstance(existing, WithoutQueryStrings) for existing in server_log.filters):
        server_log.addFilter(WithoutQueryStrings())


def _milliseconds(seconds: float | None) -> float | None:
    return round(seconds * 1000, 3) if seconds is not None else None


# Fields repeat from line to line (the client, its user agent, the model, the path): their escaped forms
# are kept, up to this length, so most lines escape nothing.
_REMEMBERED_LENGTH = 256


def _quoted(value: str | None) -> str:
    """A field of the text format: quoted, with quotes, backslashes and control characters escaped, so a
    client cannot forge a line."""
    if not value:
        return '"-"'
    return _remembered_quote(value) if len(value) <= _REMEMBERED_LENGTH else _quote(value)


def _quote(value: str) -> str:
    escaped = json.dumps(value[:RECORDED_TEXT_LIMIT], ensure_ascii=True)[1:-1]
    return f'"{escaped}"'


_remembered_quote = functools.lru_cache(maxsize=1024)(_quote)


def _bare(value: str | None) -> str:
    if not value:
        return "-"
    return _remembered_bare(value) if len(value) <= _REMEMBERED_LENGTH else _bare_form(value)


def _bare_form(value: str) -> str:
    return _quote(value)[1:-1].replace(" ", "%20")


_remembered_bare = functools.lru_cache(maxsize=1024)(_bare_form)


@functools.lru_cache(maxsize=4)
def _stamp(second: int) -> str:
    return time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(second))


def text_line(exchange: Exchange) -> str:
    """nginx's combined log format, then the cache status and what the proxy knows of the request:
    provider, endpoint, model, seconds, seconds to the first byte, key prefix."""
    ttfb = exchange.time_to_first_byte if exchange.streamed else None
    return (
        f"{_bare(exchange.client)} - - [{_stamp(int(exchange.at))}] {_request(exchange.method, exchange.path)}"
        f' {exchange.status} {exchange.sent_bytes} "-" {_quoted(exchange.user_agent)}'
        f" {_answered(exchange.cache_status, exchange.provider, exchange.endpoint, exchange.model)}"
        f" {exchange.duration:.3f} {'-' if ttfb is None else f'{ttfb:.3f}'}"
        f" {_bare(exchange.key[:KEY_PREFIX_LENGTH] if exchange.key else None)}"
    )


def _request(method: str, path: str) -> str:
    if len(method) + len(path) > _REMEMBERED_LENGTH:
        return _request_form(method, path)
    return _remembered_request(method, path)


def _request_form(method: str, path: str) -> str:
    return _quoted(f"{method} {path} HTTP/1.1")


_remembered_request = functools.lru_cache(maxsize=1024)(_request_form)


def _answered(cache_status: str | None, provider: str | None, endpoint: str | None, model: str | None) -> str:
    """The cache status, provider, endpoint and model fields (only the model is the client's to choose)."""
    if model is not None and len(model) > _REMEMBERED_LENGTH:
        return _answered_form(cache_status, provider, endpoint, model)
    return _remembered_answered(cache_status, provider, endpoint, model)


def _answered_form(cache_status: str | None, provider: str | None, endpoint: str | None, model: str | None) -> str:
    return f"{_bare(cache_status)} {_bare(provider)} {_bare(endpoint)} {_quoted(model)}"


_remembered_answered = functools.lru_cache(maxsize=1024)(_answered_form)


@functools.lru_cache(maxsize=4)
def _iso_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def json_line(exchange: Exchange) -> str:
    stamp = f"{_iso_second(int(exchange.at))}.{int(exchange.at * 1000) % 1000:03d}Z"
    record = {
        "time": stamp,
        "client": exchange.client,
        "method": exchange.method,
        "path": exchange.path,
        "status": exchange.status,
        "bytes": exchange.sent_bytes,
        "cache_status": exchange.cache_status,
        "coalesced": exchange.coalesced,
        "provider": exchange.provider,
        "endpoint": exchange.endpoint,
        "model": exchange.model[:RECORDED_TEXT_LIMIT] if exchange.model else None,
        "duration_ms": _milliseconds(exchange.duration),
        "ttfb_ms": _milliseconds(exchange.time_to_first_byte) if exchange.streamed else None,
        "key": exchange.key[:KEY_PREFIX_LENGTH] if exchange.key else None,
        "user_agent": exchange.user_agent[:RECORDED_TEXT_LIMIT] or None,
    }
    return orjson.dumps(record).decode()


FORMATTERS: dict[str, Callable[[Exchange], str]] = {"text": text_line, "json": json_line}


class AccessLog:
    """Lines waiting to be written; `flush_periodically` writes them, and so does shutdown."""

    def __init__(self, log_format: LogFormat, stream: TextIO | None = None) -> None:
        self._format = FORMATTERS[log_format]
        # Bound now: standard output as the server starts, whatever replaces sys.stdout later.
        self._stream = stream if stream is not None else sys.stdout
        self._waiting: list[Exchange] = []
        self._full = anyio.Event()

    def add(self, exchange: Exchange) -> None:
        self._waiting.append(exchange)
        if len(self._waiting) >= _BATCH:
            self._full.set()

    def flush(self) -> None:
        if not self._waiting:
            return
        waiting, self._waiting = self._waiting, []
        try:
            self._stream.write("".join(self._format(exchange) + "\n" for exchange in waiting))
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stdout must not take requests down with it

    async def flush_periodically(self) -> None:
        while True:
            with anyio.move_on_after(FLUSH_INTERVAL):
                await self._full.wait()
            self._full = anyio.Event()
            self.flush()
