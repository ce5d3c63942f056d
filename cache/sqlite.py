"""The embedded cache store: one SQLite file, written through aiosqlite's own thread."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiosqlite

from cache.base import CachedResponse, CacheError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT,
    status INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    body BLOB NOT NULL,
    created_at REAL NOT NULL
)
"""


class SqliteBackend:
    name = "sqlite"

    def __init__(self, path: Path, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None
        self._open_error = "not opened yet"

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            self._open_error = f"cannot open {self.path}: {exc}"
            raise CacheError(self._open_error) from exc
        try:
            await self._prepare(db)
        except sqlite3.Error as exc:
            await db.close()
            self._open_error = f"cannot use {self.path}: {exc}"
            raise CacheError(self._open_error) from exc
        self._db = db

    async def _prepare(self, db: aiosqlite.Connection) -> None:
        # WAL lets readers (hits) go on while one writer stores a miss; NORMAL sync is safe with WAL.
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        async with db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        version = row[0] if row else 0
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"cache schema version {version} is newer than this proxy understands ({SCHEMA_VERSION})"
            )
        await db.execute(_SCHEMA)
        await db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise CacheError(self._open_error)
        return self._db

    async def get(self, key: str) -> CachedResponse | None:
        db = self._connection()
        try:
            async with db.execute(
                "SELECT status, content_type, body, created_at, provider, endpoint, model"
                " FROM entries WHERE key = ?",
                (key,),
            ) as cursor:
                row = await cursor.fetchone()
        except sqlite3.Error as exc:
            raise CacheError(f"cache read failed: {exc}") from exc
        if row is None:
            return None
        status, content_type, body, created_at, provider, endpoint, model = row
        return CachedResponse(
            status=status,
            content_type=content_type,
            body=bytes(body),
            created_at=created_at,
            provider=provider,
            endpoint=endpoint,
            model=model,
        )

    async def set(self, key: str, entry: CachedResponse) -> None:
        db = self._connection()
        try:
            await db.execute(
                "INSERT OR REPLACE INTO entries"
                " (key, provider, endpoint, model, status, content_type, body, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    entry.provider,
                    entry.endpoint,
                    entry.model,
                    entry.status,
                    entry.content_type,
                    entry.body,
                    entry.created_at,
                ),
            )
        except sqlite3.Error as exc:
            raise CacheError(f"cache write failed: {exc}") from exc

    async def ping(self) -> None:
        db = self._connection()
        try:
            async with db.execute("SELECT 1 FROM entries LIMIT 1") as cursor:
                await cursor.fetchone()
        except sqlite3.Error as exc:
            raise CacheError(f"cache unusable: {exc}") from exc

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            self._open_error = "closed"
            await db.close()
