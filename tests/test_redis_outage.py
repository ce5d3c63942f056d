"""Redis outages: the proxy fails open, says so once, never waits long for Redis, and recovers by itself.

Each test starts (and stops, and restarts) a Redis server of its own on a spare port.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import REDIS_PASSWORD, ProxyFactory
from tests.redis_servers import RedisServer
from tests.servers import FakeUpstream

TIMEOUT = 0.2


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.remove()


def redis_proxy(start_proxy: ProxyFactory, server: RedisServer, **overrides: Any) -> str:
    return start_proxy(
        cache_backend="redis",
        redis_url=server.url,
        redis_key_prefix=f"outage-{uuid.uuid4().hex[:8]}",
        redis_timeout=TIMEOUT,
        **overrides,
    )


def ask(base: str, content: str = "outage") -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": content}]}
    response = httpx.post(f"{base}/v1/chat/completions", json=body)
    assert response.status_code == 200, "a Redis outage never fails a request"
    return response


def status(response: httpx.Response) -> str:
    return response.headers["x-cache-status"]


def health(base: str) -> dict[str, Any]:
    response = httpx.get(f"{base}/healthz")
    assert response.status_code == 200, "monitoring sees a degraded proxy, not a dead one"
    return dict(response.json())


def until(condition: Any, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "the proxy did not recover by itself"
        time.sleep(0.05)


def outage_lines(caplog: pytest.LogCaptureFixture, server: RedisServer) -> tuple[list[str], list[str]]:
    """The log lines about this server's outage (an earlier test's proxy may still be shutting down)."""
    messages = [record.getMessage() for record in caplog.records if record.name == "openai_proxy.cache"]
    began = [text for text in messages if "serving from upstream" in text and f":{server.port}" in text]
    ended = [text for text in messages if "(redis) works again" in text]
    return began, ended


def test_a_redis_down_at_start_up_does_not_stop_start_up_and_is_used_once_it_is_up(
    start_proxy: ProxyFactory, upstream: FakeUpstream, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="openai_proxy.cache")
    base = redis_proxy(start_proxy, own_redis)  # nothing listens on its port yet

    state = health(base)
    assert state["status"] == "degraded"
    assert state["cache"]["backend"] == "redis" and f"127.0.0.1:{own_redis.port}" in state["cache"]["reason"]
    assert [status(ask(base)) for _ in range(5)] == ["BYPASS"] * 5
    assert upstream.calls == 5

    own_redis.start()
    until(lambda: status(ask(base)) == "MISS")
    assert status(ask(base)) == "HIT"
    assert health(base)["status"] == "ok"
    began, ended = outage_lines(caplog, own_redis)
    assert (len(began), len(ended)) == (1, 1), "one line when the outage starts, one when it ends"


def test_a_redis_going_away_and_coming_back_is_survived_without_a_restart(
    start_proxy: ProxyFactory, upstream: FakeUpstream, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="openai_proxy.cache")
    own_redis.start()
    base = redis_proxy(start_proxy, own_redis)
    assert [status(ask(base)), status(ask(base))] == ["MISS", "HIT"]

    own_redis.stop()
    during = [status(ask(base, f"during {number}")) for number in range(20)]
    assert during == ["BYPASS"] * 20
    assert health(base)["status"] == "degraded"
    httpx.get(f"{base}/cache/stats")  # the admin API fails too, and still says why
    began, ended = outage_lines(caplog, own_redis)
    assert (len(began), len(ended)) == (1, 0), "logged once, not once per request"

    own_redis.start()  # the same port, empty: it kept nothing
    until(lambda: status(ask(base, "after")) == "MISS")
    assert status(ask(base, "after")) == "HIT"
    until(lambda: health(base)["status"] == "ok")
    began, ended = outage_lines(caplog, own_redis)
    assert (len(began), len(ended)) == (1, 1)


def test_a_hung_redis_delays_no_request_beyond_its_timeout(
    start_proxy: ProxyFactory, upstream: FakeUpstream, own_redis: RedisServer
) -> None:
    own_redis.start()
    base = redis_proxy(start_proxy, own_redis)
    assert status(ask(base)) == "MISS"
    assert own_redis.pid is not None
    os.kill(own_redis.pid, signal.SIGSTOP)  # it accepts connections but answers nothing
    try:
        for number in range(8):
            started = time.monotonic()
            assert status(ask(base, f"hung {number}")) == "BYPASS"
            # One Redis wait at most (a read), plus the request itself on a busy test machine.
            assert time.monotonic() - started < TIMEOUT + 0.5
        assert health(base)["status"] == "degraded"
    finally:
        os.kill(own_redis.pid, signal.SIGCONT)
    until(lambda: status(ask(base, "hung 0")) == "MISS")
    until(lambda: health(base)["status"] == "ok")


def test_the_redis_password_is_used_and_never_shown(
    start_proxy: ProxyFactory, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(password=REDIS_PASSWORD).start()
    try:
        url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{server.port}/0"
        base = start_proxy(cache_backend="redis", redis_url=url, redis_key_prefix="password")
        assert [status(ask(base)), status(ask(base))] == ["MISS", "HIT"]
        assert health(base)["status"] == "ok"

        wrong = f"redis://:wrong-{REDIS_PASSWORD}@127.0.0.1:{server.port}/0"
        refused = start_proxy(cache_backend="redis", redis_url=wrong, redis_key_prefix="password")
        assert status(ask(refused, "refused")) == "BYPASS"
        state = health(refused)
        assert state["status"] == "degraded"
        shown = [
            str(state),
            httpx.get(f"{refused}/cache/stats").text,
            httpx.get(f"{refused}/cache/entries").text,
            caplog.text,
        ]
        assert not any(REDIS_PASSWORD in text for text in shown)
    finally:
        server.remove()


@pytest.mark.anyio
async def test_the_first_commands_after_redis_restarts_find_no_connection_it_closed(own_redis: RedisServer) -> None:
    # The pool must not hand out a connection the old server closed: each one's next command would fail,
    # and count as a new outage (redis-py skips that check while maintenance notifications are on).
    from cache.redis_backend import RedisBackend

    own_redis.start()
    backend = RedisBackend.at(own_redis.url, timeout=TIMEOUT, prefix=f"restart-{uuid.uuid4().hex[:8]}")
    await backend.open()  # opens several connections, left idle in the pool
    try:
        own_redis.stop()
        own_redis.start()  # the same port, a new server
        await asyncio.sleep(0.1)  # the event loop reads the old connections' end, as a serving one would
        results = await asyncio.gather(*(backend.get(f"k{number}") for number in range(8)), return_exceptions=True)
        assert results == [None] * 8
    finally:
        await backend.close()
