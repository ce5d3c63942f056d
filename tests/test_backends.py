"""The storage contract every cache backend keeps, run against each backend."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

import aiosqlite
import anyio
import pytest
from redis.asyncio import Connection, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError

from cache import CacheBackend, CachedResponse, CacheError, SqliteBackend
from cache import sqlite as sqlite_module
from cache.base import EntryFilter, EntryInfo, StoreBusy
from cache.health import CacheHealth
from cache.redis_backend import FAILURES_TO_SKIP, HiredisPackingConnection, RedisBackend, WaitingConnectionPool
from cache.sqlite import SCHEMA_VERSION
from cache.stats import ACTIVITY_KEPT_SECONDS, RECENT_REQUESTS_KEPT, ActivityPoint, RequestRecord, SavedFigures, Tally
from proxy.storing import StoreQueue

pytestmark = pytest.mark.anyio

ENTRY = CachedResponse(
    status=200,
    content_type="application/json",
    body=b'{"id": "chatcmpl-1", "bytes": "\\u00e9\\u0000"}',
    created_at=1_700_000_000.5,
    provider="openai",
    endpoint="v1/chat/completions",
    model="gpt-4o-mini",
)

# More entries than a store plausibly reads or deletes in one batch, with bodies small enough to stay fast.
MANY = 1001


class Opener(Protocol):
    """Opens a backend over the test's store; `max_entries`/`max_bytes` bound it (0: unbounded)."""

    def __call__(self, *, max_entries: int = 0, max_bytes: int = 0) -> Awaitable[CacheBackend]: ...


def build_backend(
    name: str, tmp_path: Path, request: pytest.FixtureRequest, *, max_entries: int, max_bytes: int
) -> CacheBackend:
    """A backend over the test's own store: a file in its directory, or a key prefix of its own in the
    run's Redis server or cluster (so nothing else is touched and nothing needs flushing)."""
    if name == "sqlite":
        return SqliteBackend(tmp_path / "contract.db", max_entries=max_entries, max_bytes=max_bytes)
    cluster = name == "redis-cluster"
    server = request.getfixturevalue("redis_cluster" if cluster else "redis_server")
    # A busy test machine can hold an event loop (or a new connection) for longer than the default 0.5 s.
    return RedisBackend.at(
        server.url,
        cluster=cluster,
        timeout=2.0,
        prefix=f"test-{tmp_path.name}",
        max_entries=max_entries,
        max_bytes=max_bytes,
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sqlite", "redis", "redis-cluster"])
async def open_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens a backend over the same store each time it is called, to test what persists."""
    opened: list[CacheBackend] = []

    async def open_one(*, max_entries: int = 0, max_bytes: int = 0) -> CacheBackend:
        backend = build_backend(request.param, tmp_path, request, max_entries=max_entries, max_bytes=max_bytes)
        await backend.open()
        opened.append(backend)
        return backend

    yield open_one
    for backend in opened:
        await backend.close()


def entry(
    created_at: float = 1_700_000_000.0,
    *,
    body: bytes = b"{}",
    namespace: str = "",
    provider: str = "openai",
    model: str | None = "gpt-4o-mini",
) -> CachedResponse:
    return dataclasses.replace(
        ENTRY, created_at=created_at, body=body, namespace=namespace, provider=provider, model=model
    )


def sqlite_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if "_connection_worker_thread" in thread.name}


async def stored_keys(backend: CacheBackend, candidates: list[str]) -> set[str]:
    return {key for key in candidates if await backend.get(key) is not None}


async def exported(backend: CacheBackend) -> list[tuple[str, CachedResponse]]:
    return [pair async for pair in backend.export_entries()]


async def listed(
    backend: CacheBackend, which: EntryFilter | None = None, offset: int = 0, limit: int = 100
) -> list[str]:
    return [info.key for info in await backend.list_entries(which or EntryFilter(), offset, limit)]


async def test_an_unknown_key_is_none(open_backend: Opener) -> None:
    backend = await open_backend()
    assert await backend.get("missing") is None


async def test_a_stored_entry_comes_back_unchanged(open_backend: Opener) -> None:
    backend = await open_backend()
    await backend.set("k", ENTRY)
    assert await backend.get("k") == ENTRY


@pytest.mark.parametrize(
    "stored",
    [
        pytest.param(
            CachedResponse(
                status=203,
                content_type="text/event-stream; charset=utf-8",
                body=b"data: \xff\xfe\x00 not utf-8\n\n",
                created_at=1_700_000_123.25,
                provider="anthropic",
                endpoint="v1/messages?beta=true",
                model=None,
                namespace="team-a/eval:1",
                ttl=3600.5,
                input_tokens=1234,
                output_tokens=0,
                cached_input_tokens=1024,
                cache_write_tokens=7,
                upstream_seconds=2.375,
                prompt_preview="Say “bonjour” …",
            ),
            id="every-field-set-model-none",
        ),
        pytest.param(
            CachedResponse(200, "application/json", b"", 0.0, "openai", "v1/embeddings"),
            id="defaults-and-empty-body",
        ),
    ],
)
async def test_every_field_round_trips(open_backend: Opener, stored: CachedResponse) -> None:
    backend = await open_backend()
    await backend.set("k", stored)
    assert await backend.get("k") == stored
    assert await exported(backend) == [("k", stored)]


async def test_storing_again_replaces_the_entry(open_backend: Opener) -> None:
    backend = await open_backend()
    await backend.set("k", ENTRY)
    newer = CachedResponse(201, "application/json", b"{}", 2.0, "anthropic", "v1/messages", None)
    await backend.set("k", newer)
    assert await backend.get("k") == newer


async def test_entries_persist_across_reopening(open_backend: Opener) -> None:
    first = await open_backend()
    await first.set("k", ENTRY)
    await first.close()
    assert await (await open_backend()).get("k") == ENTRY


async def test_ping_succeeds_on_a_usable_store(open_backend: Opener) -> None:
    await (await open_backend()).ping()


async def test_a_closed_backend_raises_cache_error(open_backend: Opener) -> None:
    backend = await open_backend()
    await backend.close()
    with pytest.raises(CacheError):
        await backend.get("k")
    with pytest.raises(CacheError):
        await backend.set("k", ENTRY)
    with pytest.raises(CacheError):
        await backend.ping()


# delete and purge


async def test_delete_says_whether_there_was_an_entry(open_backend: Opener) -> None:
    backend = await open_backend()
    await backend.set("k", ENTRY)
    await backend.set("other", ENTRY)

    assert await backend.delete("k") is True
    assert await backend.get("k") is None
    assert await backend.delete("k") is False
    assert await backend.delete("never-stored") is False
    assert await backend.get("other") == ENTRY


async def test_purge_without_a_filter_deletes_everything(open_backend: Opener) -> None:
    backend = await open_backend()
    for number in range(5):
        await backend.set(f"k{number}", entry(number, namespace=f"ns{number % 2}"))

    assert await backend.purge(EntryFilter()) == 5
    assert await exported(backend) == []
    assert await backend.purge(EntryFilter()) == 0


# key -> (namespace, provider, created_at)
FILTERED: dict[str, tuple[str, str, float]] = {
    "a-openai-100": ("a", "openai", 100.0),
    "a-anthropic-200": ("a", "anthropic", 200.0),
    "b-openai-300": ("b", "openai", 300.0),
    "default-openai-400": ("", "openai", 400.0),
    "default-anthropic-500": ("", "anthropic", 500.0),
}

FILTERS = [
    pytest.param(EntryFilter(namespace="a"), {"a-openai-100", "a-anthropic-200"}, id="namespace"),
    pytest.param(EntryFilter(namespace=""), {"default-openai-400", "default-anthropic-500"}, id="default-namespace"),
    pytest.param(EntryFilter(namespace="nobody"), set(), id="namespace-matching-nothing"),
    pytest.param(EntryFilter(provider="anthropic"), {"a-anthropic-200", "default-anthropic-500"}, id="provider"),
    pytest.param(EntryFilter(created_before=300.0), {"a-openai-100", "a-anthropic-200"}, id="created-before-is-strict"),
    pytest.param(EntryFilter(namespace="a", provider="openai"), {"a-openai-100"}, id="namespace-and-provider"),
    pytest.param(
        EntryFilter(provider="openai", created_before=350.0), {"a-openai-100", "b-openai-300"}, id="provider-and-age"
    ),
    pytest.param(
        EntryFilter(namespace="", provider="openai", created_before=450.0),
        {"default-openai-400"},
        id="all-three",
    ),
    pytest.param(EntryFilter(namespace="b", created_before=300.0), set(), id="all-must-match"),
]


async def store_filtered(backend: CacheBackend) -> None:
    for key, (namespace, provider, created_at) in FILTERED.items():
        await backend.set(key, entry(created_at, namespace=namespace, provider=provider))


@pytest.mark.parametrize(("which", "matching"), FILTERS)
async def test_purge_deletes_exactly_the_matching_entries(
    open_backend: Opener, which: EntryFilter, matching: set[str]
) -> None:
    backend = await open_backend()
    await store_filtered(backend)

    assert await backend.purge(which) == len(matching)
    assert await stored_keys(backend, list(FILTERED)) == set(FILTERED) - matching


@pytest.mark.parametrize("count", [pytest.param(1000, id="1000"), pytest.param(MANY, id=str(MANY))])
async def test_purge_deletes_more_entries_than_one_batch(open_backend: Opener, count: int) -> None:
    backend = await open_backend()
    for number in range(count):
        await backend.set(f"bulk-{number:05d}", entry(number, body=b"x", namespace="bulk"))
    for number in range(3):
        await backend.set(f"kept-{number}", entry(number, body=b"x", namespace="kept"))

    assert await backend.purge(EntryFilter(namespace="bulk")) == count
    assert sorted(key for key, _ in await exported(backend)) == ["kept-0", "kept-1", "kept-2"]
    assert await backend.purge(EntryFilter()) == 3
    assert (await backend.statistics()).entries == 0


# list_entries


async def test_list_entries_are_newest_first_whatever_the_order_of_storing(open_backend: Opener) -> None:
    backend = await open_backend()
    for created_at in (300.0, 100.0, 500.0, 200.0, 400.0):
        await backend.set(f"at-{created_at:.0f}", entry(created_at))

    assert await listed(backend) == ["at-500", "at-400", "at-300", "at-200", "at-100"]


@pytest.mark.parametrize(
    ("offset", "limit", "expected"),
    [
        pytest.param(0, 2, ["at-5", "at-4"], id="first-page"),
        pytest.param(2, 2, ["at-3", "at-2"], id="second-page"),
        pytest.param(4, 2, ["at-1"], id="last-partial-page"),
        pytest.param(5, 2, [], id="past-the-end"),
        pytest.param(1, 10, ["at-4", "at-3", "at-2", "at-1"], id="limit-larger-than-rest"),
    ],
)
async def test_list_entries_pages_with_offset_and_limit(
    open_backend: Opener, offset: int, limit: int, expected: list[str]
) -> None:
    backend = await open_backend()
    for number in range(1, 6):
        await backend.set(f"at-{number}", entry(float(number)))

    assert await listed(backend, offset=offset, limit=limit) == expected


@pytest.mark.parametrize(("which", "matching"), FILTERS)
async def test_list_entries_shows_only_the_matching_entries(
    open_backend: Opener, which: EntryFilter, matching: set[str]
) -> None:
    backend = await open_backend()
    await store_filtered(backend)

    newest_first = sorted(matching, key=lambda key: FILTERED[key][2], reverse=True)
    assert await listed(backend, which) == newest_first


async def test_list_entries_describe_each_entry_without_its_body(open_backend: Opener) -> None:
    backend = await open_backend()
    body = "é answer".encode()
    await backend.set("k", entry(123.5, body=body, namespace="team", provider="anthropic", model=None))

    assert await backend.list_entries(EntryFilter(), 0, 10) == [
        EntryInfo(
            key="k",
            provider="anthropic",
            endpoint=ENTRY.endpoint,
            model=None,
            namespace="team",
            size=len(body),
            created_at=123.5,
            last_hit_at=None,
            hits=0,
        )
    ]


async def test_list_entries_show_the_hits_recorded_for_each_entry(open_backend: Opener) -> None:
    backend = await open_backend()
    await backend.set("hit", entry(1.0))
    await backend.set("missed", entry(2.0))

    await backend.record(Tally(hits=3, entry_hits={"hit": (3, 50.0)}))
    await backend.record(Tally(hits=2, entry_hits={"hit": (2, 40.0)}))

    infos = {info.key: info for info in await backend.list_entries(EntryFilter(), 0, 10)}
    assert (infos["hit"].hits, infos["hit"].last_hit_at) == (5, 50.0)
    assert (infos["missed"].hits, infos["missed"].last_hit_at) == (0, None)


async def test_most_hit_lists_entries_with_hits_most_first_with_their_prompt(open_backend: Opener) -> None:
    backend = await open_backend()
    for index, key in enumerate(["once", "thrice", "twice", "never", "gone"]):
        await backend.set(key, dataclasses.replace(entry(float(index)), prompt_preview=f"prompt of {key}"))
    await backend.record(Tally(hits=9, entry_hits={"once": (1, 5.0), "thrice": (2, 6.0), "gone": (9, 7.0)}))
    await backend.record(Tally(hits=3, entry_hits={"thrice": (1, 8.0), "twice": (2, 9.0)}))
    await backend.delete("gone")

    top = await backend.most_hit(10)
    assert [(info.key, info.hits, info.prompt_preview) for info in top] == [
        ("thrice", 3, "prompt of thrice"),
        ("twice", 2, "prompt of twice"),
        ("once", 1, "prompt of once"),
    ]
    assert top[0].last_hit_at == 8.0 and top[0].size == len(b"{}")
    assert [info.key for info in await backend.most_hit(2)] == ["thrice", "twice"]


async def test_most_hit_of_an_empty_store_is_empty(open_backend: Opener) -> None:
    backend = await open_backend()
    assert await backend.most_hit(10) == []


async def test_activity_adds_up_per_minute_and_per_hour(open_backend: Opener) -> None:
    backend = await open_backend()
    hour = (int(time.time()) // 3600 - 1) * 3600  # the last whole hour, so every minute of it is kept
    await backend.record(Tally(activity={hour + 60: [3, 2, 1], hour + 120: [1, 0, 1]}))
    await backend.record(Tally(activity={hour + 60: [2, 2, 0], hour + 3540: [5, 1, 4]}))

    minutes = await backend.activity(60, hour)
    assert minutes == [
        ActivityPoint(hour + 60, 5, 4, 1),
        ActivityPoint(hour + 120, 1, 0, 1),
        ActivityPoint(hour + 3540, 5, 1, 4),
    ]
    assert await backend.activity(60, hour + 121) == minutes[2:]
    assert await backend.activity(3600, hour) == [ActivityPoint(hour, 11, 5, 6)]


async def test_activity_older_than_its_retention_is_dropped(open_backend: Opener) -> None:
    backend = await open_backend()
    now = int(time.time())
    old = now - ACTIVITY_KEPT_SECONDS - 7200
    old -= old % 3600
    recent = now - now % 60
    await backend.record(Tally(activity={old: [1, 1, 0]}))
    await backend.record(Tally(activity={recent: [1, 0, 1]}))

    assert await backend.activity(60, 0) == [ActivityPoint(recent, 1, 0, 1)]
    assert await backend.activity(3600, 0) == [ActivityPoint(recent - recent % 3600, 1, 0, 1)]


def request_record(at: float, path: str = "/v1/chat/completions") -> RequestRecord:
    return RequestRecord(
        at=at,
        method="POST",
        path=path,
        provider="openai",
        endpoint="chat/completions",
        model="gpt-4o-mini",
        status=200,
        cache_status="HIT",
        coalesced=False,
        streamed=True,
        duration_ms=1.25,
        bytes=812,
        key="0123456789ab",
    )


async def test_recent_requests_keep_the_newest_first_up_to_their_bound(open_backend: Opener) -> None:
    backend = await open_backend()
    assert await backend.recent_requests() == []
    first = [request_record(float(at)) for at in range(30)]
    then = [request_record(float(at), path="/anthropic/v1/messages") for at in range(30, 60)]
    await backend.record(Tally(recent=first))
    await backend.record(Tally(recent=then))

    kept = await backend.recent_requests()
    assert kept == list(reversed(first + then))[:RECENT_REQUESTS_KEPT]
    reopened = await open_backend()
    assert await reopened.recent_requests() == kept


# export_entries


@pytest.mark.parametrize(
    "count", [pytest.param(3, id="few"), pytest.param(500, id="500"), pytest.param(MANY, id=str(MANY))]
)
async def test_export_yields_every_entry_exactly_once(open_backend: Opener, count: int) -> None:
    backend = await open_backend()
    stored = {f"key-{number:05d}": entry(float(number), body=str(number).encode()) for number in range(count)}
    for key, value in stored.items():
        await backend.set(key, value)

    pairs = await exported(backend)

    assert len(pairs) == count
    assert dict(pairs) == stored


async def test_export_of_an_empty_store_yields_nothing(open_backend: Opener) -> None:
    assert await exported(await open_backend()) == []


# record and statistics


async def test_an_empty_store_has_zero_statistics(open_backend: Opener) -> None:
    stats = await (await open_backend()).statistics()

    assert (stats.entries, stats.bytes, stats.hits, stats.misses, stats.evictions) == (0, 0, 0, 0, 0)
    assert stats.savings == []
    assert stats.hit_ratio == 0.0


async def test_recorded_hits_and_misses_add_up(open_backend: Opener) -> None:
    backend = await open_backend()
    await backend.record(Tally(hits=3, misses=1))
    await backend.record(Tally(hits=0, misses=4))
    await backend.record(Tally(hits=2, misses=0))

    stats = await backend.statistics()
    assert (stats.hits, stats.misses) == (5, 5)
    assert stats.hit_ratio == 0.5


async def test_recorded_statistics_persist_across_reopening(open_backend: Opener) -> None:
    first = await open_backend()
    await first.record(Tally(hits=2, misses=1, savings={("openai", "gpt-4o"): SavedFigures(2, 20, 10)}))
    await first.close()

    stats = await (await open_backend()).statistics()
    assert (stats.hits, stats.misses) == (2, 1)
    assert [(s.provider, s.model, s.hits) for s in stats.savings] == [("openai", "gpt-4o", 2)]


async def test_savings_add_up_per_provider_and_model(open_backend: Opener) -> None:
    backend = await open_backend()
    await backend.record(
        Tally(
            hits=3,
            savings={("openai", "gpt-4o"): SavedFigures(2, 100, 40), ("anthropic", "claude"): SavedFigures(1, 7, 3)},
        )
    )
    await backend.record(
        Tally(
            hits=2,
            savings={("openai", "gpt-4o"): SavedFigures(1, 50, 20), ("openai", "gpt-4o-mini"): SavedFigures(1, 5, 1)},
        )
    )

    savings = {
        (s.provider, s.model): (s.hits, s.input_tokens, s.output_tokens) for s in (await backend.statistics()).savings
    }
    assert savings == {
        ("openai", "gpt-4o"): (3, 150, 60),
        ("openai", "gpt-4o-mini"): (1, 5, 1),
        ("anthropic", "claude"): (1, 7, 3),
    }


async def test_recording_hits_for_a_deleted_entry_does_not_fail_or_revive_it(open_backend: Opener) -> None:
    backend = await open_backend()
    await backend.set("kept", entry(1.0))
    await backend.set("gone", entry(2.0))
    await backend.delete("gone")

    await backend.record(Tally(hits=2, entry_hits={"gone": (1, 10.0), "kept": (1, 10.0)}))

    assert await backend.get("gone") is None
    assert [(info.key, info.hits) for info in await backend.list_entries(EntryFilter(), 0, 10)] == [("kept", 1)]
    stats = await backend.statistics()
    assert (stats.entries, stats.hits) == (1, 2)


async def test_entry_totals_follow_inserts_replacements_and_deletes(open_backend: Opener) -> None:
    backend = await open_backend()

    async def totals() -> tuple[int, int]:
        stats = await backend.statistics()
        return stats.entries, stats.bytes

    await backend.set("a", entry(body=b"a" * 10))
    assert await totals() == (1, 10)
    await backend.set("b", entry(body=b"b" * 20))
    assert await totals() == (2, 30)
    await backend.set("a", entry(body=b"A" * 50))
    assert await totals() == (2, 70), "a bigger body for the same key"
    await backend.set("a", entry(body=b"a" * 5))
    assert await totals() == (2, 25), "a smaller body for the same key"
    await backend.delete("b")
    assert await totals() == (1, 5)
    await backend.delete("b")
    assert await totals() == (1, 5), "deleting a missing key changes nothing"
    await backend.set("c", entry(body=b"c" * 7, namespace="x"))
    await backend.purge(EntryFilter(namespace="x"))
    assert await totals() == (1, 5)
    await backend.purge(EntryFilter())
    assert await totals() == (0, 0)


# Least-recently-used eviction. Entries are stored as if created in the recent past and touched "now",
# so the order holds whether a store takes the time of use from the entry or from its own clock.


def past(seconds_ago: float) -> float:
    return time.time() - seconds_ago


async def test_past_max_entries_the_oldest_entry_goes(open_backend: Opener) -> None:
    backend = await open_backend(max_entries=3)
    for number, key in enumerate("abcd"):
        await backend.set(key, entry(past(100 - number)))

    assert await stored_keys(backend, list("abcd")) == {"b", "c", "d"}
    stats = await backend.statistics()
    assert (stats.entries, stats.evictions) == (3, 1)


async def test_a_recorded_hit_keeps_an_entry_from_eviction(open_backend: Opener) -> None:
    backend = await open_backend(max_entries=3)
    for number, key in enumerate("abc"):
        await backend.set(key, entry(past(100 - number)))

    await backend.record(Tally(hits=1, entry_hits={"a": (1, time.time())}))
    await backend.set("d", entry(past(50)))

    assert await stored_keys(backend, list("abcd")) == {"a", "c", "d"}
    assert (await backend.statistics()).evictions == 1


async def test_the_evictions_counter_counts_every_evicted_entry(open_backend: Opener) -> None:
    backend = await open_backend(max_entries=3)
    keys = [f"k{number}" for number in range(7)]
    for number, key in enumerate(keys):
        await backend.set(key, entry(past(100 - number)))

    assert await stored_keys(backend, keys) == {"k4", "k5", "k6"}
    stats = await backend.statistics()
    assert (stats.entries, stats.evictions) == (3, 4)


async def test_replacing_an_entry_in_a_full_store_evicts_nothing(open_backend: Opener) -> None:
    backend = await open_backend(max_entries=3)
    for number, key in enumerate("abc"):
        await backend.set(key, entry(past(100 - number)))

    await backend.set("b", entry(past(10), body=b"newer"))

    assert await stored_keys(backend, list("abc")) == {"a", "b", "c"}
    assert (await backend.statistics()).evictions == 0


async def test_past_max_bytes_least_recently_used_entries_go_until_under_the_cap(open_backend: Opener) -> None:
    backend = await open_backend(max_bytes=100)
    for number, key in enumerate("abc"):
        await backend.set(key, entry(past(100 - number), body=b"x" * 30))
    await backend.record(Tally(hits=1, entry_hits={"a": (1, time.time())}))

    await backend.set("d", entry(past(50), body=b"y" * 50))

    assert await stored_keys(backend, list("abcd")) == {"a", "d"}
    stats = await backend.statistics()
    assert (stats.entries, stats.bytes, stats.evictions) == (2, 80, 2)


async def test_filling_max_bytes_exactly_evicts_nothing(open_backend: Opener) -> None:
    backend = await open_backend(max_bytes=100)
    await backend.set("a", entry(past(10), body=b"x" * 60))
    await backend.set("b", entry(past(5), body=b"x" * 40))

    stats = await backend.statistics()
    assert (stats.entries, stats.bytes, stats.evictions) == (2, 100, 0)


async def test_an_entry_bigger_than_max_bytes_is_not_stored_and_evicts_nothing(open_backend: Opener) -> None:
    backend = await open_backend(max_bytes=100)
    await backend.set("a", entry(past(10), body=b"x" * 40))
    await backend.set("b", entry(past(5), body=b"x" * 40))

    await backend.set("huge", entry(past(1), body=b"x" * 101))

    assert await backend.get("huge") is None
    assert await stored_keys(backend, ["a", "b"]) == {"a", "b"}
    stats = await backend.statistics()
    assert (stats.entries, stats.bytes, stats.evictions) == (2, 80, 0)


async def test_an_entry_of_exactly_max_bytes_is_stored_alone(open_backend: Opener) -> None:
    backend = await open_backend(max_bytes=100)
    await backend.set("a", entry(past(10), body=b"x" * 40))

    await backend.set("whole", entry(past(1), body=b"x" * 100))

    assert await stored_keys(backend, ["a", "whole"]) == {"whole"}
    stats = await backend.statistics()
    assert (stats.entries, stats.bytes, stats.evictions) == (1, 100, 1)


async def thread_statements(backend: SqliteBackend) -> list[str]:
    """The statements the store's thread connection runs from now on (the writes not made on the event loop)."""
    assert backend._db is not None
    statements: list[str] = []
    await backend._db.set_trace_callback(statements.append)
    return statements


def keys_stored(statements: list[str]) -> set[str]:
    return {statement.split("VALUES ('")[1].split("'")[0] for statement in statements if "INTO entries" in statement}


class TinySqlite(SqliteBackend):
    """A real SQLite store on a "disk" that holds only a few pages more than it starts with (a limit each
    connection that writes is given)."""

    async def _prepare(self, db: aiosqlite.Connection) -> None:
        await super()._prepare(db)
        self.page_limit = await self._scalar(db, "PRAGMA page_count") + 16
        async with db.execute(f"PRAGMA max_page_count={self.page_limit}"):
            pass  # the pragma answers a row: its cursor is closed, or it would hold a read open

    async def _connect(self) -> None:
        await super()._connect()
        assert self._point_writer is not None
        self._point_writer.execute(f"PRAGMA max_page_count={self.page_limit}")


class TestSqliteOpening:
    async def test_an_unusable_path_raises_cache_error(self, tmp_path: Path) -> None:
        (tmp_path / "file").write_text("")
        backend = SqliteBackend(tmp_path / "file" / "cache.db")
        with pytest.raises(CacheError, match="cannot open"):
            await backend.open()
        with pytest.raises(CacheError, match="cannot open"):
            await backend.get("k")

    async def test_a_file_that_is_not_a_database_is_moved_aside_for_an_empty_cache(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        garbage = b"garbage" * 1000
        (tmp_path / "bad.db").write_bytes(garbage)
        backend = SqliteBackend(tmp_path / "bad.db")
        await backend.open()
        try:
            await backend.set("k", ENTRY)
            assert await backend.get("k") == ENTRY
        finally:
            await backend.close()
        [moved] = tmp_path.glob("bad.db.corrupt-*")
        assert moved.read_bytes() == garbage, "kept for a post-mortem"
        [line] = [r.getMessage() for r in caplog.records if r.name == "openai_proxy.cache"]
        assert "bad.db is corrupt" in line and str(moved) in line

    async def filled(self, path: Path) -> bytes:
        backend = SqliteBackend(path)
        await backend.open()
        for number in range(300):
            await backend.set(f"k{number}", entry(body=b"x" * 2000))
        await backend.checkpoint()
        await backend.close()
        return path.read_bytes()

    @pytest.mark.parametrize("damage", ["truncated", "overwritten"])
    async def test_a_damaged_file_is_found_and_replaced(self, tmp_path: Path, damage: str) -> None:
        path = tmp_path / "cut.db"
        data = await self.filled(path)
        middle = len(data) // 2
        if damage == "truncated":
            path.write_bytes(data[:middle])
        else:
            path.write_bytes(data[:middle] + b"\xff" * 8192 + data[middle + 8192 :])
        backend = SqliteBackend(path)
        await backend.open()  # found here when the schema cannot be read, else by the check
        try:
            await backend.verify()
            assert await backend.verify() is True, "the file in use now is sound"
            assert await backend.get("k1") is None
            await backend.set("k", ENTRY)
            assert await backend.get("k") == ENTRY
        finally:
            await backend.close()
        assert len(list(tmp_path.glob("cut.db.corrupt-*"))) == 1

    async def test_the_check_finds_damage_that_opening_does_not(self, tmp_path: Path) -> None:
        path = tmp_path / "cut.db"
        data = await self.filled(path)
        middle = len(data) // 2
        path.write_bytes(data[:middle] + b"\xff" * 8192 + data[middle + 8192 :])
        backend = SqliteBackend(path)
        await backend.open()
        try:
            assert not list(tmp_path.glob("cut.db.corrupt-*"))
            assert await backend.verify() is False
            assert len(list(tmp_path.glob("cut.db.corrupt-*"))) == 1
        finally:
            await backend.close()

    async def test_reads_while_the_file_is_reopened_all_succeed(self, tmp_path: Path) -> None:
        """Another process replaced the file, so the backend reopens it: a read already on its way finishes,
        one that comes meanwhile waits for the new file; none fails (its request would go upstream)."""
        backend = SqliteBackend(tmp_path / "reopened.db")
        await backend.open()
        await backend.set("k", ENTRY)
        outcomes: list[str] = []
        reads: list[Callable[[], Awaitable[object]]] = [
            lambda: backend.get("k"),
            backend.statistics,
            backend.latest_invalidation,
        ]

        async def read(operation: int) -> None:
            for _ in range(40):
                try:
                    await reads[operation]()
                    outcomes.append("read")
                except CacheError:
                    outcomes.append("cache error")
                await anyio.sleep(0)

        try:
            async with anyio.create_task_group() as readers:
                for number in range(30):
                    readers.start_soon(read, number % 3)
                for _ in range(5):
                    await anyio.sleep(0.002)
                    await backend._replace(lambda: None)
            assert outcomes == ["read"] * (30 * 40)
            assert await backend.get("k") == ENTRY
        finally:
            await backend.close()

    async def test_a_read_waits_for_a_reopening_only_so_long(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(sqlite_module, "_REOPEN_WAIT_SECONDS", 0.1)

        class SlowToOpen(SqliteBackend):
            opening_delay = 0.0

            async def _connect(self) -> None:
                await anyio.sleep(self.opening_delay)
                await super()._connect()

        backend = SlowToOpen(tmp_path / "slow.db")
        await backend.open()
        await backend.set("k", ENTRY)
        backend.opening_delay = 1.0
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(backend._replace, lambda: None)
                await anyio.sleep(0.05)  # the file is closed now, and opening again takes a second
                started = time.monotonic()
                with pytest.raises(CacheError):
                    await backend.get("k")
                assert time.monotonic() - started < 0.5, "it waited its 0.1 s, not for the whole reopening"
            assert await backend.get("k") == ENTRY, "reopened"
        finally:
            await backend.close()

    def test_a_check_cancelled_at_shutdown_ends_before_the_event_loop_closes(self, tmp_path: Path) -> None:
        path = tmp_path / "large.db"
        with sqlite3.connect(path) as db:  # about 20 MB, so the check takes tens of milliseconds
            db.execute("CREATE TABLE filler (id INTEGER PRIMARY KEY, v TEXT)")
            db.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300000)"
                " INSERT INTO filler (v) SELECT printf('row %d of the filler', i) FROM n"
            )
            db.execute("CREATE INDEX filler_v ON filler (v)")
        db.close()

        async def start_checking_and_shut_down() -> None:
            backend = SqliteBackend(path)
            await backend.open()
            try:
                with anyio.move_on_after(0.02):  # after its connection opened, during the check
                    await backend.verify()
            finally:
                await backend.close()

        failures: list[threading.ExceptHookArgs] = []
        hook, threading.excepthook = threading.excepthook, failures.append
        ours = sqlite_threads()
        try:
            anyio.run(start_checking_and_shut_down)  # closes its event loop on return
            for thread in sqlite_threads() - ours:
                thread.join(timeout=5)
        finally:
            threading.excepthook = hook
        assert [str(failure.exc_value) for failure in failures] == []

    async def test_a_read_the_event_loop_would_wait_for_goes_to_the_readers_thread(self, tmp_path: Path) -> None:
        backend = SqliteBackend(tmp_path / "cache.db")
        await backend.open()
        try:
            await backend.set("k", ENTRY)
            # The loop's own connection meets a lock (SQLite's busy answer, here from a copy of the file
            # that another connection holds exclusively): the read is made in the reader's thread instead.
            shutil.copy(tmp_path / "cache.db", tmp_path / "held.db")
            holder = sqlite3.connect(tmp_path / "held.db", isolation_level=None)
            holder.execute("PRAGMA journal_mode=DELETE")
            holder.execute("BEGIN EXCLUSIVE")
            assert backend._point_reader is not None
            backend._point_reader.close()
            backend._point_reader = sqlite3.connect(tmp_path / "held.db", timeout=0, isolation_level=None)
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                backend._point_reader.execute("SELECT 1 FROM entries").fetchall()

            assert await backend.get("k") == ENTRY
            holder.close()
        finally:
            await backend.close()

    async def test_a_lone_write_is_made_on_the_event_loop_without_a_checkpoint(self, tmp_path: Path) -> None:
        backend = SqliteBackend(tmp_path / "cache.db")
        await backend.open()
        try:
            statements = await thread_statements(backend)
            writing = backend.set("k", ENTRY)
            with pytest.raises(StopIteration):
                writing.send(None)  # done without waiting on anything: no trip to the database thread
            assert statements == []
            with sqlite3.connect(tmp_path / "cache.db") as other:
                assert other.execute("SELECT count(*) FROM entries WHERE key = 'k'").fetchone() == (1,)
            assert await backend.get("k") == ENTRY
            assert backend._point_writer is not None
            # A checkpoint would hold up every request: the thread's connection makes them.
            assert backend._point_writer.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
            assert backend._point_writer.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
        finally:
            await backend.close()

    async def test_a_write_another_connection_holds_the_lock_for_waits_for_it_in_the_thread(
        self, tmp_path: Path
    ) -> None:
        backend = SqliteBackend(tmp_path / "cache.db")
        await backend.open()
        holder = sqlite3.connect(tmp_path / "cache.db", isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")  # another process writing
            first = asyncio.ensure_future(backend.set("k", entry(body=b"first")))
            await asyncio.sleep(0.2)
            assert not first.done(), "the write waits for the lock (in the thread) instead of failing"
            second = asyncio.ensure_future(backend.set("k", entry(body=b"second")))
            await asyncio.sleep(0.05)
            holder.execute("COMMIT")
            await asyncio.wait_for(asyncio.gather(first, second), 5)

            stored = await backend.get("k")
            assert stored is not None and stored.body == b"second", "writes keep their order"
            await backend.set("k", entry(body=b"third"))  # on the loop again
            stored = await backend.get("k")
            assert stored is not None and stored.body == b"third"
        finally:
            holder.close()
            await backend.close()

    async def test_a_batch_of_writes_makes_one_on_the_event_loop_and_the_rest_in_the_thread(
        self, tmp_path: Path
    ) -> None:
        backend = SqliteBackend(tmp_path / "cache.db")
        await backend.open()
        try:
            statements = await thread_statements(backend)
            await asyncio.gather(*(backend.set(f"k{number}", ENTRY) for number in range(10)))
            assert keys_stored(statements) == {f"k{number}" for number in range(1, 10)}
            assert sum(statement == "BEGIN IMMEDIATE" for statement in statements) <= 2, "group commits"
            assert all([await backend.get(f"k{number}") == ENTRY for number in range(10)])

            await asyncio.sleep(0)  # the next turn of the loop
            statements.clear()
            await backend.set("lone", ENTRY)
            assert statements == [], "a lone write in a later turn is made on the event loop again"
        finally:
            await backend.close()

    async def test_a_write_after_a_deletion_waiting_in_the_thread_comes_after_it(self, tmp_path: Path) -> None:
        backend = SqliteBackend(tmp_path / "cache.db")
        await backend.open()
        try:
            await backend.set("k", entry(body=b"old"))
            async with backend._transaction:  # a statistics write, say
                deleting = asyncio.ensure_future(backend.delete("k"))
                await asyncio.sleep(0.01)
            # The lock is free, and the deletion has yet to take it.
            await backend.set("k", entry(body=b"new"))
            await deleting

            stored = await backend.get("k")
            assert stored is not None and stored.body == b"new"
        finally:
            await backend.close()

    async def test_a_bounded_store_writes_in_the_thread_and_evicts(self, tmp_path: Path) -> None:
        backend = SqliteBackend(tmp_path / "cache.db", max_entries=2)
        await backend.open()
        try:
            statements = await thread_statements(backend)
            for number in range(4):
                await backend.set(f"k{number}", ENTRY)
            assert [await backend.get(f"k{number}") is not None for number in range(4)] == [False, False, True, True]
            # In the thread, where eviction runs in the same transaction.
            assert keys_stored(statements) == {"k0", "k1", "k2", "k3"}
        finally:
            await backend.close()

    async def test_an_unreadable_file_fails_a_read_with_cache_error(self, tmp_path: Path) -> None:
        backend = SqliteBackend(tmp_path / "gone.db")
        await backend.open()
        try:
            await backend.set("k", ENTRY)
            await backend.checkpoint()
            with open(tmp_path / "gone.db", "r+b") as damaged:
                damaged.seek(4096)
                damaged.write(b"\xff" * 8192)  # the entries' pages
            with pytest.raises(CacheError, match="cache read failed"):
                for number in range(50):
                    await backend.get(f"absent-{number}")
                await backend.get("k")
        finally:
            await backend.close()

    async def test_a_full_disk_fails_the_write_not_the_store(self, tmp_path: Path) -> None:
        backend = TinySqlite(tmp_path / "full.db")
        await backend.open()
        try:
            await backend.set("small", ENTRY)
            with pytest.raises(CacheError, match="full"):
                await backend.set("large", entry(body=b"x" * 200_000))
            assert await backend.get("small") == ENTRY
            assert await backend.get("large") is None
        finally:
            await backend.close()

    async def test_writes_take_the_lock_up_front_and_the_wal_is_truncated(self, tmp_path: Path) -> None:
        backend = SqliteBackend(tmp_path / "wal.db", max_entries=1000)
        await backend.open()
        statements: list[str] = []
        try:
            assert backend._db is not None
            await backend._db.set_trace_callback(statements.append)
            await asyncio.gather(*(backend.set(f"k{n}", entry(body=b"y" * 4000)) for n in range(200)))
            await backend.delete("k1")
            await backend.purge(EntryFilter(provider="nobody"))
            await backend.record(Tally(hits=1))
            assert (tmp_path / "wal.db-wal").stat().st_size > 500_000
            await backend.checkpoint()
            assert (tmp_path / "wal.db-wal").stat().st_size == 0
        finally:
            await backend.close()
        begins = [statement for statement in statements if statement.upper().startswith("BEGIN")]
        assert begins and all(statement.upper() == "BEGIN IMMEDIATE" for statement in begins), begins

    async def test_a_newer_schema_is_refused_not_overwritten(self, tmp_path: Path) -> None:
        with sqlite3.connect(tmp_path / "new.db") as db:
            db.execute("PRAGMA user_version=99")
        with pytest.raises(CacheError, match="newer"):
            await SqliteBackend(tmp_path / "new.db").open()
        with sqlite3.connect(tmp_path / "new.db") as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == 99

    async def test_missing_parent_folders_are_created(self, tmp_path: Path) -> None:
        backend = SqliteBackend(tmp_path / "a" / "b" / "cache.db")
        await backend.open()
        await backend.set("k", ENTRY)
        await backend.close()
        assert (tmp_path / "a" / "b" / "cache.db").exists()


class TestSqliteMigration:
    V1_ROWS = [
        ("old-chat", "openai", "v1/chat/completions", "gpt-4o-mini", 200, "application/json", b'{"a": 1}', 100.0),
        (
            "old-stream",
            "anthropic",
            "v1/messages",
            None,
            200,
            "text/event-stream",
            b"\xe9\xff!",
            200.0,
        ),
    ]

    @pytest.fixture
    def version_1_database(self, tmp_path: Path) -> Path:
        path = tmp_path / "v1.db"
        db = sqlite3.connect(path)
        db.execute(
            "CREATE TABLE entries (key TEXT PRIMARY KEY, provider TEXT NOT NULL, endpoint TEXT NOT NULL,"
            " model TEXT, status INTEGER NOT NULL, content_type TEXT NOT NULL, body BLOB NOT NULL,"
            " created_at REAL NOT NULL)"
        )
        db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)", self.V1_ROWS)
        db.execute("PRAGMA user_version=1")
        db.commit()
        db.close()
        return path

    async def open_migrated(self, path: Path, **limits: int) -> SqliteBackend:
        backend = SqliteBackend(path, **limits)
        await backend.open()
        return backend

    async def test_entries_stay_readable_with_defaults_for_the_new_fields(self, version_1_database: Path) -> None:
        backend = await self.open_migrated(version_1_database)
        try:
            for key, provider, endpoint, model, status, content_type, body, created_at in self.V1_ROWS:
                assert await backend.get(key) == CachedResponse(
                    status, content_type, body, created_at, provider, endpoint, model, "", None, None, None
                )
        finally:
            await backend.close()

    async def test_statistics_count_the_migrated_entries_and_their_bytes(self, version_1_database: Path) -> None:
        backend = await self.open_migrated(version_1_database)
        try:
            stats = await backend.statistics()
            assert (stats.entries, stats.bytes) == (2, sum(len(row[6]) for row in self.V1_ROWS))
            sizes = {info.key: (info.size, info.hits) for info in await backend.list_entries(EntryFilter(), 0, 10)}
            assert sizes == {row[0]: (len(row[6]), 0) for row in self.V1_ROWS}

            await backend.set("new", entry(body=b"12345"))
            await backend.delete("old-chat")
            stats = await backend.statistics()
            assert (stats.entries, stats.bytes) == (2, len(self.V1_ROWS[1][6]) + 5)
        finally:
            await backend.close()

    async def test_the_schema_version_becomes_current(self, version_1_database: Path) -> None:
        backend = await self.open_migrated(version_1_database)
        await backend.close()
        with sqlite3.connect(version_1_database) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert SCHEMA_VERSION > 1

    async def test_migrated_entries_are_evicted_oldest_first(self, version_1_database: Path) -> None:
        backend = await self.open_migrated(version_1_database, max_entries=2)
        try:
            await backend.set("new", entry(300.0))
            assert await backend.get("old-chat") is None
            assert await backend.get("old-stream") is not None
            assert await backend.get("new") is not None
        finally:
            await backend.close()


async def test_an_answer_too_big_to_store_removes_the_outdated_one(open_backend: Opener) -> None:
    backend = await open_backend(max_bytes=100)
    await backend.set("k", ENTRY)
    await backend.set("k", CachedResponse(200, "application/json", b"x" * 101, 2.0, "openai", "v1/chat/completions"))
    assert await backend.get("k") is None


@pytest.mark.parametrize("name", ["redis", "redis-cluster"])
@pytest.mark.parametrize("failing", ["add", "write"])
async def test_a_store_that_fails_halfway_leaves_neither_an_entry_nor_its_index(
    name: str, failing: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The index and the entry are written by two scripts (in one round trip on a single server): when
    either fails, neither stays, so no purge can miss an entry and no list names a missing one."""
    backend = build_backend(name, tmp_path, request, max_entries=0, max_bytes=0)
    assert isinstance(backend, RedisBackend)
    await backend.open()
    try:
        backend._scripts[failing] = backend.redis.register_script("return redis.error_reply('refused')")
        with pytest.raises(CacheError, match="refused"):
            await backend.set("k", entry())
        assert await backend.get("k") is None
        assert await listed(backend) == []
    finally:
        await backend.close()


async def test_a_server_that_lost_its_scripts_gets_them_again(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    backend = build_backend("redis", tmp_path, request, max_entries=0, max_bytes=0)
    assert isinstance(backend, RedisBackend)
    await backend.open()
    try:
        await backend.redis.script_flush()  # as a restarted server: the run's own, which no one else uses
        await backend.set("k", entry())
        assert await backend.get("k") == entry()
        assert await listed(backend) == ["k"]
    finally:
        await backend.close()


async def test_past_its_connections_a_command_waits_for_one_and_fails_only_after_the_wait(
    request: pytest.FixtureRequest,
) -> None:
    server = request.getfixturevalue("redis_server")
    pool = WaitingConnectionPool.from_url(server.url, max_connections=2, wait=0.6, socket_timeout=2)
    client = Redis(connection_pool=pool)
    list_key = f"pool-test-{uuid.uuid4().hex}"
    try:
        # Four commands that each hold a connection 0.2 s, two connections: they take turns, none fails. (Redis
        # ends a blocking command's wait on its 10-a-second clock, so 0.2 s can be 0.3: a third turn would wait
        # 0.6 s, as long as a command may.)
        answers = await asyncio.gather(*(client.blpop([list_key], timeout=0.2) for _ in range(4)))
        assert answers == [None] * 4
        assert len(pool._holding) == 0 and pool._free._value == 2
        # Held longer than a command may wait: the third fails, once its wait is over, not before.
        held = [asyncio.ensure_future(client.blpop([list_key], timeout=1.0)) for _ in range(2)]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(RedisConnectionError, match="no Redis connection came free within 0.6 s"):
            await client.get(list_key)
        assert 0.5 < time.monotonic() - started < 0.9
        await asyncio.gather(*held)
        assert pool._free._value == 2, "every connection is free again"
    finally:
        await client.aclose()


async def test_a_busy_pool_is_no_outage_and_an_answer_it_had_no_connection_for_is_stored_later(
    request: pytest.FixtureRequest,
) -> None:
    """An overloaded proxy finds every connection busy: that is not Redis down (which makes requests skip it
    for a while), and an answer waiting to be stored waits again rather than being lost."""
    server = request.getfixturevalue("redis_server")
    pool = WaitingConnectionPool.from_url(server.url, max_connections=1, wait=0.2, socket_timeout=3)
    backend = RedisBackend(Redis(connection_pool=pool), where="test", prefix=f"busy-{uuid.uuid4().hex}")
    await backend.open()
    health = CacheHealth("redis", operations_fail_apart=False)
    skipped: list[int] = []
    queue = StoreQueue(backend, health, 1 << 20, on_skipped=lambda: skipped.append(1))
    try:
        # The only connection held 1.6 s, longer than a command may wait for one.
        held = asyncio.ensure_future(backend.redis.blpop([f"busy-{uuid.uuid4().hex}"], timeout=1.6))
        await asyncio.sleep(0.05)
        for _ in range(FAILURES_TO_SKIP + 1):
            with pytest.raises(StoreBusy, match="no Redis connection came free within 0.2 s"):
                await backend.get("k")
        landed: list[bool] = []
        assert queue.put("k", entry(), landed.append)
        await asyncio.sleep(0.5)  # two writes at least found no connection free
        assert queue.waiting == 1 and landed == [], "the answer still waits to be stored"
        await held
        await queue.drain()
        assert landed == [True] and skipped == []
        assert await backend.get("k") == entry(), "read at once: Redis was never skipped as down"
        assert health.state().ok, "the store never failed"
    finally:
        await backend.close()


@pytest.mark.parametrize(
    "command",
    [
        ("EVALSHA", "0" * 40, 2, "{p}:sizes", b"{p}:meta", 10_000, "key", 1032, repr(1_700_000_000.123456), "", 0),
        ("HSET", "p:{k}", "body", b"\xff\x00 not utf-8", "model", "gpt-4o-mini \u00e9\U0001f600", "ttl", 3600.5),
        ("SET", "n", -3, 10**20, 1e-7, float("inf"), 0.1 + 0.2),
        ("SET", "views", memoryview(b"a view"), bytearray(b"an array"), b""),
        ("SCRIPT LOAD", "return 1"),
        (b"CLIENT SETNAME", "proxy"),
    ],
)
async def test_commands_are_packed_as_redis_py_packs_them(command: tuple[object, ...]) -> None:
    """hiredis packs what redis-py's own packer would have sent, byte for byte."""
    packed = b"".join(HiredisPackingConnection().pack_command(*command))
    assert packed == b"".join(Connection().pack_command(*command))


@pytest.mark.parametrize("value", [True, None, object()])
async def test_a_value_redis_has_no_form_for_is_refused_as_redis_py_refuses_it(value: object) -> None:
    with pytest.raises(DataError):
        Connection().pack_command("SET", "k", value)
    with pytest.raises(DataError):
        HiredisPackingConnection().pack_command("SET", "k", value)


async def test_a_single_server_backend_packs_with_hiredis(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    backend = build_backend("redis", tmp_path, request, max_entries=0, max_bytes=0)
    await backend.open()
    try:
        assert isinstance(backend, RedisBackend) and isinstance(backend.redis, Redis)
        assert backend.redis.connection_pool.connection_class is HiredisPackingConnection
        stored = dataclasses.replace(ENTRY, body=bytes(range(256)) * 40, prompt_preview="\u00e9t\u00e9 \U0001f600")
        await backend.set("packed", stored)
        assert await backend.get("packed") == stored
    finally:
        await backend.close()
