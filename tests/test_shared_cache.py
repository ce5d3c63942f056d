"""Several proxy instances sharing one cache: real processes on one Redis, or on one SQLite file.

The processes take seconds to start, so they are module fixtures: each xdist worker that runs tests of
this module starts them once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ProxyFactory
from tests.processes import OPENAI_PROXY, environment, running, started_together
from tests.redis_servers import RedisCluster, RedisServer
from tests.servers import FakeUpstream, chat_chunks

Pair = tuple[str, str]


def start_pair(tmp_path: Path, **settings: str) -> Iterator[Pair]:
    env = environment(OPENAI_API_KEY="sk-shared-cache-test", CACHE_DB=str(tmp_path / "shared.db"), **settings)
    with started_together([OPENAI_PROXY, OPENAI_PROXY], tmp_path, [env, env]) as [(a, _), (b, _)]:
        yield a, b


@pytest.fixture(scope="module")
def redis_pair(
    redis_server: RedisServer, upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    """Two proxy processes on one Redis (a key prefix of their own)."""
    yield from start_pair(
        tmp_path_factory.mktemp("redis-pair"),
        OPENAI_BASE_URL=upstream_server.url,
        CACHE_BACKEND="redis",
        REDIS_URL=redis_server.url,
        REDIS_KEY_PREFIX=f"pair-{uuid.uuid4().hex[:8]}",
        REDIS_TIMEOUT="2",  # as in conftest's store_settings: a busy test machine is not an outage
    )


@pytest.fixture(scope="module")
def sqlite_workers(upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`openai-proxy --workers 2`: two processes on one SQLite file, behind one port."""
    folder = tmp_path_factory.mktemp("sqlite-workers")
    env = environment(OPENAI_API_KEY="sk-shared-cache-test", OPENAI_BASE_URL=upstream_server.url)
    with running([*OPENAI_PROXY, "--workers", "2"], folder, env) as base:
        yield base


@pytest.fixture(scope="module")
def sqlite_pair(sqlite_workers: str) -> Pair:
    return sqlite_workers, sqlite_workers


def chat_body(**extra: Any) -> dict[str, Any]:
    """A conversation no other test asks about (the pairs' cache outlives each test)."""
    return {"model": "m", "messages": [{"role": "user", "content": f"shared {uuid.uuid4().hex}"}], **extra}


async def split(pair: Pair, count: int, body: dict[str, Any]) -> list[tuple[str, httpx.Response, bytes]]:
    """`count` identical requests at once, half through each instance."""
    limits = httpx.Limits(max_connections=count + 10)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:

        async def one(base: str) -> tuple[str, httpx.Response, bytes]:
            async with http.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
                return base, response, await response.aread()

        return await asyncio.gather(*(one(pair[number % 2]) for number in range(count)))


@pytest.mark.parametrize("streamed", [False, True], ids=["json", "stream"])
def test_50_identical_misses_across_two_instances_make_one_upstream_request(
    redis_pair: Pair, upstream: FakeUpstream, streamed: bool
) -> None:
    if streamed:
        upstream.chunk_delay = 0.1
    else:
        upstream.answer_slowly(1.0)
    results = asyncio.run(split(redis_pair, 50, chat_body(stream=streamed)))

    assert upstream.calls == 1
    assert all(response.status_code == 200 for _, response, _ in results)
    statuses = Counter((base, response.headers["x-cache-status"]) for base, response, _ in results)
    a, b = redis_pair
    assert statuses[(a, "HIT")] + statuses[(b, "HIT")] == 49
    assert statuses[(a, "MISS")] + statuses[(b, "MISS")] == 1
    bodies = {body for _, _, body in results}
    if streamed:
        assert bodies == {b"".join(chat_chunks(1, "m"))}, "every client gets the bytes a direct client gets"
    else:
        assert len(bodies) == 1


def serves(base: str, body: dict[str, Any]) -> bytes | None:
    """What `base` answers from its cache alone (None: nothing)."""
    response = httpx.post(f"{base}/v1/chat/completions", json=body, headers={"cache-control": "only-if-cached"})
    return response.content if response.status_code == 200 else None


def seconds_until(condition: Any, limit: float = 3.0) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < limit, "the other instance never noticed"
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_refresh_delete_or_purge_through_one_instance_reaches_the_other(
    redis_pair: Pair, upstream: FakeUpstream
) -> None:
    """The other instance holds the entry in its memory tier, which it would serve for as long as it holds it;
    each change made through the first reaches it with nothing else asking it to look. How soon (within a
    second: it reads the invalidation feed every SYNC_INTERVAL) is a figure of the README, not asserted in
    wall time here: on a loaded test machine the polling itself can take longer."""
    a, b = redis_pair
    body = chat_body()
    stored = httpx.post(f"{a}/v1/chat/completions", json=body)
    assert stored.headers["x-cache-status"] == "MISS"
    seconds_until(lambda: serves(b, body) == stored.content)  # stored once answered; now in b's memory tier too

    refreshed = httpx.post(f"{a}/v1/chat/completions", json=body, headers={"cache-control": "no-cache"})
    assert refreshed.headers["x-cache-status"] == "REFRESH" and refreshed.content != stored.content
    seconds_until(lambda: serves(b, body) == refreshed.content)

    key = stored.headers["x-cache-key"]
    assert httpx.delete(f"{a}/cache/entries/{key}").status_code == 200
    seconds_until(lambda: serves(b, body) is None)

    httpx.post(f"{a}/v1/chat/completions", json=body)
    seconds_until(lambda: serves(b, body) is not None)
    assert httpx.delete(f"{a}/cache").status_code == 200
    seconds_until(lambda: serves(b, body) is None)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_concurrent_misses_through_two_instances_are_all_stored(
    backend: str, request: pytest.FixtureRequest, upstream: FakeUpstream
) -> None:
    """Many processes writing at once: no client sees an error (SQLite's "database is locked" included),
    and no answer is lost."""
    pair: Pair = request.getfixturevalue(f"{backend}_pair")
    bodies = [chat_body() for _ in range(40)]

    async def all_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as http:
            return await asyncio.gather(
                *(http.post(f"{pair[n % 2]}/v1/chat/completions", json=body) for n, body in enumerate(bodies))
            )

    responses = asyncio.run(all_at_once())
    assert [response.status_code for response in responses] == [200] * 40
    assert upstream.calls == 40
    for number, body in enumerate(bodies):
        other = pair[(number + 1) % 2]
        seconds_until(lambda other=other, body=body: serves(other, body) is not None)  # type: ignore[misc]
    assert upstream.calls == 40


def in_thread_pair(start_proxy: ProxyFactory, redis_server: RedisServer, **overrides: Any) -> Pair:
    """Two proxies in this process on one Redis: instances as far as the cache can tell, cheaply."""
    settings = {
        "cache_backend": "redis",
        "redis_url": redis_server.url,
        "redis_key_prefix": uuid.uuid4().hex[:8],
        "redis_timeout": 2.0,
    }
    return start_proxy(**settings, **overrides), start_proxy(**settings, **overrides)


def test_a_waiter_on_another_instance_gives_up_after_the_lock_timeout(
    start_proxy: ProxyFactory, redis_server: RedisServer, upstream: FakeUpstream
) -> None:
    upstream.answer_slowly(2.0)
    a, b = in_thread_pair(start_proxy, redis_server, cache_lock_timeout=0.5)
    body = chat_body()

    async def leader_then_waiter() -> tuple[httpx.Response, float]:
        async with httpx.AsyncClient(timeout=30) as http:
            leading = asyncio.ensure_future(http.post(f"{a}/v1/chat/completions", json=body))
            await asyncio.sleep(0.3)  # the leader holds the lock
            started = time.monotonic()
            waited = await http.post(f"{b}/v1/chat/completions", json=body)
            elapsed = time.monotonic() - started
            await leading
            return waited, elapsed

    waited, elapsed = asyncio.run(leader_then_waiter())
    assert upstream.calls == 2, "the waiter went upstream itself"
    assert waited.headers["x-cache-status"] == "MISS"
    assert 2.0 <= elapsed < 2.0 + 1.0, "it waited the lock timeout (0.5 s), then its own upstream request (2 s)"


def test_when_the_leader_fails_waiters_on_another_instance_go_upstream_at_once(
    start_proxy: ProxyFactory, redis_server: RedisServer, upstream: FakeUpstream
) -> None:
    upstream.answer_slowly(1.0, first_fails=True)
    a, b = in_thread_pair(start_proxy, redis_server)
    body = chat_body()

    async def leader_then_waiters() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as http:
            leading = asyncio.ensure_future(http.post(f"{a}/v1/chat/completions", json=body))
            await asyncio.sleep(0.3)
            waiting = asyncio.gather(*(http.post(f"{b}/v1/chat/completions", json=body) for _ in range(3)))
            return [await leading, *await waiting]

    leader, *waiters = asyncio.run(leader_then_waiters())
    assert leader.status_code == 529
    assert [response.status_code for response in waiters] == [200] * 3, "the leader's error is not theirs"
    assert upstream.calls == 4, "each waiter went upstream on its own once the leader failed"


def test_workers_share_one_cache_and_a_purge_through_one_reaches_every_workers_memory_tier(
    sqlite_workers: str, upstream: FakeUpstream
) -> None:
    base, body = sqlite_workers, chat_body()
    assert httpx.post(f"{base}/v1/chat/completions", json=body).headers["x-cache-status"] == "MISS"
    # Stored after it was sent: until the file has it, the other worker would rightly miss.
    deadline = time.monotonic() + 10
    while httpx.get(f"{base}/cache/entries").json()["entries"] == [] and time.monotonic() < deadline:
        time.sleep(0.02)
    # Many requests on fresh connections, so that both workers likely hold the entry in memory. The kernel
    # picks the worker, so this cannot be forced; the feed itself is tested across two processes above.
    hits = [httpx.post(f"{base}/v1/chat/completions", json=body).headers["x-cache-status"] for _ in range(20)]
    assert set(hits) == {"HIT"}
    assert upstream.calls == 1
    assert httpx.delete(f"{base}/cache").json()["deleted"] >= 1
    time.sleep(1.0)
    after = [
        httpx.post(f"{base}/v1/chat/completions", json=body, headers={"cache-control": "only-if-cached"})
        for _ in range(20)
    ]
    assert {response.status_code for response in after} == {504}, "no worker served the purged entry from memory"


def test_a_proxy_on_a_redis_cluster_caches_streams_and_purges(
    redis_cluster: RedisCluster, start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    base = start_proxy(
        cache_backend="redis",
        redis_url=redis_cluster.url,
        redis_cluster=True,
        redis_key_prefix=f"cluster-{uuid.uuid4().hex[:8]}",
        memory_cache_bytes=0,  # every hit is read from the cluster
    )
    bodies = [chat_body() for _ in range(6)]  # keys on every node, most likely
    for body in bodies:
        assert httpx.post(f"{base}/v1/chat/completions", json=body).headers["x-cache-status"] == "MISS"
    for body in bodies:
        assert stored_then_hit(base, body).headers["x-cache-status"] == "HIT"
    streamed = chat_body(stream=True)
    first = httpx.post(f"{base}/v1/chat/completions", json=streamed)
    again = stored_then_hit(base, streamed)
    assert first.headers["x-cache-status"] == "MISS"
    assert again.content == first.content
    assert httpx.get(f"{base}/cache/stats").json()["entries"] == 7
    assert httpx.delete(f"{base}/cache").json() == {"deleted": 7}
    assert httpx.post(f"{base}/v1/chat/completions", json=bodies[0]).headers["x-cache-status"] == "MISS"
    assert httpx.get(f"{base}/healthz").json()["cache"] == {"backend": "redis", "ok": True, "reason": None}


def stored_then_hit(base: str, body: dict[str, Any]) -> httpx.Response:
    """The answer to `body` once it is a hit. An answer is stored just after it was sent: without a memory
    tier, a request right behind it may still miss."""
    deadline = time.monotonic() + 5
    while (response := httpx.post(f"{base}/v1/chat/completions", json=body)).headers["x-cache-status"] != "HIT":
        assert time.monotonic() < deadline, response.headers["x-cache-status"]
        time.sleep(0.02)
    return response


def served(base: str) -> float:
    """Requests to /v1/chat/completions this server counted, read from its /metrics."""
    return _served_in(httpx.get(f"{base}/metrics").text)


def _served_in(text: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "openai_proxy_requests_total" and sample.labels["endpoint"] == "chat/completions"
    )


def test_metrics_of_several_workers_are_those_of_the_whole_server(sqlite_workers: str, upstream: FakeUpstream) -> None:
    base = sqlite_workers
    before = served(base)

    async def at_once(count: int, scrape: bool) -> list[float]:
        # Many connections at once, so that both workers likely take some. The kernel picks the worker: this
        # checks the shared metrics directory is written and read; test_cli checks each server gets its own.
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            if scrape:
                pages = await asyncio.gather(*(http.get(f"{base}/metrics") for _ in range(count)))
                return [_served_in(page.text) for page in pages]
            await asyncio.gather(*(http.post(f"{base}/v1/chat/completions", json=chat_body()) for _ in range(count)))
            return []

    asyncio.run(at_once(40, scrape=False))
    scrapes = asyncio.run(at_once(20, scrape=True))
    assert {count - before for count in scrapes} == {40.0}, "every scrape counts every worker's requests"


def test_two_servers_on_one_host_keep_their_metrics_apart(redis_pair: Pair, upstream: FakeUpstream) -> None:
    a, b = redis_pair
    before = served(a), served(b)
    for base in (a, a, a, b, b):
        httpx.post(f"{base}/v1/chat/completions", json=chat_body())
    assert (served(a) - before[0], served(b) - before[1]) == (3.0, 2.0)


def _requests_shown(base: str) -> int:
    points = httpx.get(f"{base}/cache/dashboard").json()["activity"]["week"]["points"]
    return sum(point["requests"] for point in points)


@pytest.mark.parametrize("pair_name", ["sqlite_pair", "redis_pair"], ids=["two-workers", "two-instances-on-redis"])
def test_the_dashboard_counts_the_requests_of_every_worker_and_instance(
    pair_name: str, request: pytest.FixtureRequest, upstream: FakeUpstream
) -> None:
    pair: Pair = request.getfixturevalue(pair_name)
    # Earlier tests' requests on these servers are counted within a second of their end: wait for them.
    before = -1
    while before != (before := _requests_shown(pair[0])):
        time.sleep(1.1)

    async def at_once(count: int) -> None:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            bases = [pair[number % 2] for number in range(count)]
            await asyncio.gather(*(http.post(f"{base}/v1/chat/completions", json=chat_body()) for base in bases))

    asyncio.run(at_once(40))
    # Each process writes what it counted within a second; then every one of them shows all of it.
    deadline = time.monotonic() + 5
    while {_requests_shown(base) - before for base in pair} != {40}:
        assert time.monotonic() < deadline, [_requests_shown(base) - before for base in pair]
        time.sleep(0.1)
