"""The storage contract every cache backend keeps, run against each backend."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from cache import CacheBackend, CachedResponse, CacheError, SqliteBackend

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

Opener = Callable[[], Awaitable[CacheBackend]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sqlite"])
async def open_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens a backend over the same store each time it is called, to test what persists."""
    opened: list[CacheBackend] = []

    async def open_one() -> CacheBackend:
        backend = SqliteBackend(tmp_path / "contract.db")
        await backend.open()
        opened.append(backend)
        return backend

    yield open_one
    for backend in opened:
        await backend.close()


async def test_an_unknown_key_is_none(open_backend: Opener) -> None:
    backend = await open_backend()
    assert await backend.get("missing") is None


async def test_a_stored_entry_comes_back_unchanged(open_backend: Opener) -> None:
    backend = await open_backend()
    await backend.set("k", ENTRY)
    assert await backend.get("k") == ENTRY


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


class TestSqliteOpening:
    async def test_an_unusable_path_raises_cache_error(self, tmp_path: Path) -> None:
        (tmp_path / "file").write_text("")
        backend = SqliteBackend(tmp_path / "file" / "cache.db")
        with pytest.raises(CacheError, match="cannot open"):
            await backend.open()
        with pytest.raises(CacheError, match="cannot open"):
            await backend.get("k")

    async def test_a_file_that_is_not_a_database_raises_cache_error(self, tmp_path: Path) -> None:
        (tmp_path / "bad.db").write_bytes(b"garbage" * 1000)
        with pytest.raises(CacheError, match="not a database"):
            await SqliteBackend(tmp_path / "bad.db").open()

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
