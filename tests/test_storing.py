"""Answers waiting to be stored are bounded: a store that falls behind costs skipped stores, counted,
never memory that grows with the requests."""

from __future__ import annotations

import asyncio
import gc
import http.client
import itertools
import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

import proxy.handler
from cache import CachedResponse, CacheError, CacheHealth
from cache.base import EntryFilter, StoreBusy
from openai_proxy import ProxyApp, create_app
from proxy.settings import Settings
from proxy.storing import CONCURRENT_WRITES, WAITING_ENTRY_OVERHEAD, StoreQueue
from tests.conftest import PROXY_OPENAI_KEY, ProxyFactory
from tests.servers import FakeUpstream, ServerThread


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class BlockedStore:
    """An entry store whose writes wait until `opened` (or fail with `failure`), to drive the queue."""

    name = "blocked"

    def __init__(self, failure: Exception | None = None) -> None:
        self.opened = asyncio.Event()
        self.failure = failure
        self.stored: list[str] = []

    async def set(self, key: str, entry: CachedResponse) -> None:
        await self.opened.wait()
        if self.failure is not None:
            raise self.failure
        self.stored.append(key)


def entry(size: int) -> CachedResponse:
    return CachedResponse(
        status=200, content_type="application/json", body=b"x" * size, created_at=0.0, provider="p", endpoint="e"
    )


def queue_for(store: BlockedStore, max_bytes: int) -> tuple[StoreQueue, list[int], CacheHealth]:
    skipped: list[int] = []
    health = CacheHealth("blocked")
    queue = StoreQueue(store, health, max_bytes, on_skipped=lambda: skipped.append(1))  # type: ignore[arg-type]
    return queue, skipped, health


@pytest.mark.anyio
async def test_answers_wait_to_be_stored_only_up_to_the_bound(caplog: pytest.LogCaptureFixture) -> None:
    store = BlockedStore()
    queue, skipped, _ = queue_for(store, max_bytes=3 * (1000 + WAITING_ENTRY_OVERHEAD))
    landed: list[tuple[str, bool]] = []
    accepted = [queue.put(f"k{n}", entry(1000), lambda ok, n=n: landed.append((f"k{n}", ok))) for n in range(5)]
    assert accepted == [True, True, True, False, False]
    assert (queue.waiting, queue.bytes) == (3, 3 * (1000 + WAITING_ENTRY_OVERHEAD))
    assert len(skipped) == 2 and landed == [("k3", False), ("k4", False)], "skipped answers are counted and landed"
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "falling behind" in warnings[0].getMessage(), "logged once per episode"
    store.opened.set()
    await queue.drain()
    assert store.stored == ["k0", "k1", "k2"], "written in the order they came"
    assert sorted(landed) == [("k0", True), ("k1", True), ("k2", True), ("k3", False), ("k4", False)]
    assert (queue.waiting, queue.bytes) == (0, 0)
    assert "2 answers were not stored" in caplog.records[-1].getMessage(), "the episode's end, with its count"


@pytest.mark.anyio
async def test_one_answer_larger_than_the_bound_may_still_wait_alone() -> None:
    queue, _, _ = queue_for(BlockedStore(), max_bytes=1024)
    assert queue.put("big", entry(10_000)), "an empty queue takes any answer: the bound is on what waits"
    assert not queue.put("small", entry(10))


@pytest.mark.anyio
async def test_a_failing_store_lands_its_answers_unstored_and_goes_on() -> None:
    store = BlockedStore(failure=CacheError("disk full"))
    queue, _, health = queue_for(store, max_bytes=1 << 20)
    landed: list[bool] = []
    for n in range(3):
        queue.put(f"k{n}", entry(10), landed.append)
    store.opened.set()
    await queue.drain()
    assert landed == [False, False, False] and queue.waiting == 0
    state = health.state()
    assert not state.ok and "disk full" in str(state.reason)
    store.failure = None
    queue.put("k3", entry(10), landed.append)
    await queue.drain()
    assert landed[-1] is True and store.stored == ["k3"], "the queue goes on after a failure"


class BusyStore:
    """A store whose first `busy` writes find every connection in use (StoreBusy)."""

    name = "busy"

    def __init__(self, busy: int) -> None:
        self.busy = busy
        self.stored: list[str] = []

    async def set(self, key: str, entry: CachedResponse) -> None:
        await asyncio.sleep(0)
        if self.busy:
            self.busy -= 1
            raise StoreBusy("no connection came free")
        self.stored.append(key)


@pytest.mark.anyio
async def test_answers_the_store_was_too_busy_for_wait_again() -> None:
    store = BusyStore(busy=CONCURRENT_WRITES + 3)
    skipped: list[int] = []
    health = CacheHealth("busy")
    queue = StoreQueue(store, health, 1 << 30, on_skipped=lambda: skipped.append(1))  # type: ignore[arg-type]
    landed: list[bool] = []
    keys = [f"k{n}" for n in range(CONCURRENT_WRITES + 10)]
    for key in keys:
        queue.put(key, entry(10), landed.append)
    assert all(queue.is_waiting(key) for key in keys)
    await queue.drain()
    assert sorted(store.stored) == sorted(keys), "every answer stored, once"
    assert landed == [True] * len(keys) and skipped == [] and queue.bytes == 0
    assert health.state().ok, "a busy store is not a failing one"


@pytest.mark.anyio
async def test_a_store_busy_at_once_does_not_hold_the_event_loop() -> None:
    """A store that says it is busy without waiting at all still leaves the event loop to others between
    two tries."""
    ticks = 0
    seen: list[int] = []

    class BusyAtOnce:
        name = "busy-at-once"

        async def set(self, key: str, entry: CachedResponse) -> None:
            seen.append(ticks)
            if len(seen) <= 3:
                raise StoreBusy("no connection came free")

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    ticker = asyncio.ensure_future(tick())
    queue = StoreQueue(BusyAtOnce(), CacheHealth("busy"), 1 << 20, on_skipped=lambda: None)  # type: ignore[arg-type]
    landed: list[bool] = []
    queue.put("k", entry(10), landed.append)
    await queue.drain()
    ticker.cancel()
    assert landed == [True] and len(seen) == 4
    assert all(later > earlier for earlier, later in itertools.pairwise(seen)), "the loop ran between two tries"


@pytest.mark.anyio
async def test_an_unexpected_store_error_is_logged_and_the_queue_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    store = BlockedStore(failure=RuntimeError("a bug in a store"))
    queue, _, _ = queue_for(store, max_bytes=1 << 20)
    landed: list[bool] = []
    queue.put("k0", entry(10), landed.append)
    store.opened.set()
    await queue.drain()
    assert landed == [False] and queue.waiting == 0
    assert any("failed unexpectedly" in record.getMessage() and record.exc_info for record in caplog.records)
    store.failure = None
    queue.put("k1", entry(10), landed.append)
    await queue.drain()
    assert landed == [False, True] and store.stored == ["k1"]


@pytest.mark.anyio
async def test_figures_wait_briefly_for_the_answers_just_sent() -> None:
    store = BlockedStore()
    queue, _, _ = queue_for(store, max_bytes=1 << 20)
    queue.put("k0", entry(10))
    started = time.monotonic()
    await queue.settled(timeout=0.2)  # the store does not catch up: the figures are answered anyway
    assert 0.15 < time.monotonic() - started < 2 and queue.waiting == 1, "waited the timeout, gave nothing up"
    asyncio.get_running_loop().call_later(0.05, store.opened.set)
    await queue.settled(timeout=5)
    assert store.stored == ["k0"] and queue.waiting == 0


@pytest.mark.anyio
async def test_a_store_that_does_not_catch_up_does_not_hold_up_a_shutdown(caplog: pytest.LogCaptureFixture) -> None:
    store = BlockedStore()  # never opened: every write waits
    queue, _, _ = queue_for(store, max_bytes=1 << 20)
    landed: list[bool] = []
    for n in range(CONCURRENT_WRITES + 5):
        queue.put(f"k{n}", entry(10), landed.append)
    await asyncio.sleep(0)
    started = time.monotonic()
    await queue.drain(timeout=0.2)
    assert time.monotonic() - started < 2
    assert landed == [False] * (CONCURRENT_WRITES + 5), "each answer is told it was not stored"
    assert (queue.waiting, queue.bytes, store.stored) == (0, 0, [])
    assert queue.waiting_entry("k0") is None
    assert f"with {CONCURRENT_WRITES + 5} answers still waiting" in caplog.records[-1].getMessage()


@pytest.mark.anyio
async def test_a_deleted_or_purged_entry_that_waits_is_never_left_in_the_store() -> None:
    store = BlockedStore()
    queue, _, _ = queue_for(store, max_bytes=1 << 20)
    deleted: list[str] = []

    async def delete(key: str) -> bool:
        deleted.append(key)
        return True

    store.delete = delete  # type: ignore[attr-defined]
    for n in range(CONCURRENT_WRITES + 3):
        queue.put(f"k{n}", entry(10))
    for _ in range(2):  # the writer takes the first CONCURRENT_WRITES and begins writing them
        await asyncio.sleep(0)
    assert queue.waiting == CONCURRENT_WRITES + 3 and len(store.stored) == 0
    queue.forget(key="k0")  # being written
    queue.forget(key=f"k{CONCURRENT_WRITES}")  # still queued
    queue.forget(EntryFilter(provider="other"))  # covers none
    assert queue.waiting_entry("k0") is None and queue.waiting_entry(f"k{CONCURRENT_WRITES}") is None
    assert queue.waiting_entry("k1") is not None
    store.opened.set()
    await queue.drain()
    assert f"k{CONCURRENT_WRITES}" not in store.stored, "a forgotten entry still queued is not written"
    assert deleted == ["k0"], "one forgotten while it was written is deleted again"
    assert len(store.stored) == CONCURRENT_WRITES + 2


@pytest.mark.anyio
async def test_a_busy_write_of_an_answer_since_replaced_or_forgotten_is_not_tried_again() -> None:
    """Busy writes are tried again only for the latest answer of their key; and the deletion of an entry
    forgotten while it was written, when the store is busy, is a failed write (the health says so)."""
    store = BlockedStore(failure=StoreBusy("no connection came free"))
    queue, _, health = queue_for(store, max_bytes=1 << 20)
    landed: list[tuple[str, bool]] = []
    queue.put("k", entry(10), lambda ok: landed.append(("first", ok)))
    await asyncio.sleep(0)  # being written
    queue.put("k", entry(20), lambda ok: landed.append(("second", ok)))  # a newer answer for the same key
    store.opened.set()
    await asyncio.sleep(0.01)
    assert landed == [("first", False)], "the older answer, busy, is not written again: the newer one waits"
    store.failure = None
    await queue.drain()
    assert landed == [("first", False), ("second", True)] and store.stored == ["k"]
    assert queue.bytes == 0 and health.state().ok

    async def busy_delete(key: str) -> bool:
        raise StoreBusy("no connection came free")

    store.delete = busy_delete  # type: ignore[attr-defined]
    store.opened.clear()
    queue.put("gone", entry(10), lambda ok: landed.append(("gone", ok)))
    await asyncio.sleep(0)
    queue.forget(key="gone")
    store.opened.set()
    await queue.drain()
    assert landed[-1] == ("gone", False) and queue.waiting == 0
    assert not health.state().ok and "no connection came free" in str(health.state().reason)


def chat(number: int) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": f"unique prompt {number}"}]}


@contextmanager
def serving(upstream: FakeUpstream, database: Path, **settings: Any) -> Iterator[tuple[ProxyApp, str]]:
    """The proxy on a loopback port with its cache in `database`: its app and base URL."""
    app = create_app(
        Settings(  # type: ignore[call-arg]
            _env_file=None,
            openai_base_url=upstream.url,
            openai_api_key=PROXY_OPENAI_KEY,
            cache_db=database,
            **settings,
        )
    )
    server = ServerThread(app).start()
    try:
        assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"
        yield app, server.url
    finally:
        server.stop()


@contextmanager
def write_locked(database: Path) -> Iterator[None]:
    """Another connection holds the file's write lock: no store can write until the block ends."""
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_blocked_store_skips_stores_instead_of_holding_answers(upstream: FakeUpstream, tmp_path: Path) -> None:
    bound = 4 * (2048 + WAITING_ENTRY_OVERHEAD)
    database = tmp_path / "blocked.db"
    with serving(upstream, database, cache_busy_timeout=5, store_backlog_bytes=bound) as (app, base):
        with write_locked(database):
            most_bytes = asyncio.run(send_misses(base, app.proxy.stores, count=60))
        assert most_bytes <= bound, "answers waiting to be stored stay within the bound"
        stats = wait_for_stores(base, expected=60)
        assert stats["stores_skipped"] >= 50
        assert stats["entries"] + stats["stores_skipped"] == 60, "every answer stored or counted as skipped"
        metrics = httpx.get(f"{base}/metrics").text
        assert f"openai_proxy_cache_stores_skipped_total {float(stats['stores_skipped'])}" in metrics


async def send_misses(base: str, queue: StoreQueue, count: int) -> int:
    """Send `count` new prompts, ten at a time; every one is answered. Returns the most bytes seen waiting
    to be stored at once."""
    most = 0
    async with httpx.AsyncClient(timeout=10) as http:
        for start in range(0, count, 10):
            answers = await asyncio.gather(
                *(http.post(f"{base}/v1/chat/completions", json=chat(n)) for n in range(start, start + 10))
            )
            assert all(answer.status_code == 200 for answer in answers)
            most = max(most, queue.bytes)
    return most


def wait_for_stores(base: str, expected: int) -> dict[str, int]:
    deadline = time.monotonic() + 10
    while True:
        stats: dict[str, int] = httpx.get(f"{base}/cache/stats").json()
        if stats["entries"] + stats["stores_skipped"] >= expected or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def test_an_answer_waiting_to_be_stored_already_answers_hits(upstream: FakeUpstream, tmp_path: Path) -> None:
    database = tmp_path / "waiting.db"
    # No memory tier: a hit can only come from the store or the queue.
    with serving(upstream, database, cache_busy_timeout=5, memory_cache_bytes=0) as (_, base):
        url = f"{base}/v1/chat/completions"
        with write_locked(database):
            first = httpx.post(url, json=chat(1))
            again = httpx.post(url, json=chat(1))
            assert (first.headers["x-cache-status"], again.headers["x-cache-status"]) == ("MISS", "HIT")
            assert again.content == first.content
            assert sqlite3.connect(database).execute("SELECT count(*) FROM entries").fetchone() == (0,)
        assert wait_for_stores(base, expected=1)["entries"] == 1
        assert upstream.calls == 1


def test_an_answered_miss_leaves_nothing_for_the_garbage_collector(upstream: FakeUpstream, tmp_path: Path) -> None:
    """Each answered request is freed by reference counting: nothing of it waits in a reference cycle for a
    full collection, whose pause grows with what piled up (it was 0.7 s under sustained misses)."""
    with serving(upstream, tmp_path / "gc.db") as (_, base):
        port = int(base.rsplit(":", 1)[1])
        assert_no_garbage_left(port)


def assert_no_garbage_left(port: int) -> None:
    # The standard library's client, which leaves no garbage of its own to tell apart from the proxy's.
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def ask(method: str, path: str, body: dict[str, object] | None = None) -> bytes:
        client.request(
            method, path, body=json.dumps(body) if body else None, headers={"content-type": "application/json"}
        )
        response = client.getresponse()
        assert response.status == 200
        return response.read()

    try:
        # The first requests build what lives as long as the process.
        ask("POST", "/v1/chat/completions", chat(0))
        ask("POST", "/v1/chat/completions", {**chat(100), "stream": True})
        ask("GET", "/cache/stats")
        gc.collect()
        gc.disable()
        try:
            for number in range(1, 6):
                ask("POST", "/v1/chat/completions", chat(number))
                ask("POST", "/v1/chat/completions", {**chat(number + 10), "stream": True})
            deadline = time.monotonic() + 10
            while json.loads(ask("GET", "/cache/stats"))["entries"] < 12 and time.monotonic() < deadline:
                time.sleep(0.02)
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            left = sorted({f"{type(thing).__module__}.{type(thing).__qualname__}" for thing in gc.garbage})
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert left == [], "objects of answered requests left in reference cycles"
    finally:
        client.close()


def test_followers_are_answered_while_the_leaders_answer_waits_to_be_stored(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.answer_slowly(0.3)
    database = tmp_path / "followers.db"

    async def identical(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=10) as http:
            return await asyncio.gather(*(http.post(url, json=chat(7)) for _ in range(6)))

    with serving(upstream, database, cache_busy_timeout=30, memory_cache_bytes=0) as (_, base):
        with write_locked(database):  # the store cannot write until every answer came
            answers = asyncio.run(identical(f"{base}/v1/chat/completions"))
    assert [answer.status_code for answer in answers] == [200] * 6
    assert upstream.calls == 1, "the followers were answered from the waiting answer, not by going upstream"
    assert len({answer.content for answer in answers}) == 1


def test_a_rule_failing_on_an_answer_leaves_it_unstored_and_its_followers_answered(
    start_proxy: ProxyFactory, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An answer no rule foresaw (a rule raising on it) is not stored, and the flight still lands: its
    followers do not wait out CACHE_LOCK_TIMEOUT."""

    def unforeseen(*_: Any) -> Any:
        raise RuntimeError("a rule met an answer it did not foresee")

    monkeypatch.setattr(proxy.handler, "reported_usage", unforeseen)
    upstream.answer_slowly(0.3)
    base = start_proxy(cache_lock_timeout=30)
    body = {"model": "m", "messages": [{"role": "user", "content": "unforeseen"}]}

    async def three_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as http:
            return await asyncio.gather(*(http.post(f"{base}/v1/chat/completions", json=body) for _ in range(3)))

    started = time.monotonic()
    answers = asyncio.run(three_at_once())
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert time.monotonic() - started < 10, "the followers were answered, not left to the lock timeout"
    assert httpx.get(f"{base}/cache/stats").json()["entries"] == 0
    assert any("judging an answer for the cache failed" in record.getMessage() for record in caplog.records)
