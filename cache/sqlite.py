"""The embedded cache store: one SQLite file, written through aiosqlite's own thread."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import orjson

from cache.base import ENTRY_FIELDS, CachedResponse, CacheError, EntryFilter, EntryInfo, entry_from_values, entry_values
from cache.stats import (
    ACTIVITY_KEPT_SECONDS,
    ACTIVITY_STEPS,
    RECENT_REQUESTS_KEPT,
    SAVING_FIGURES,
    ActivityPoint,
    CacheStatistics,
    RequestRecord,
    Saving,
    Tally,
    activity_buckets,
)

logger = logging.getLogger("openai_proxy.cache")

# How often the maintenance loop looks for a replaced file, and how often it checkpoints the WAL.
FILE_CHECK_INTERVAL = 1.0
CHECKPOINT_INTERVAL = 60.0
# How long a read waits for the file to be opened again (after another process replaced it).
_REOPEN_WAIT_SECONDS = 1.0
# The WAL is truncated to this after a checkpoint, so a burst of writes cannot leave it large for good.
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
_CORRUPTION_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})

# Each step brings a database from the version before it to its own; `user_version` records the last.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS entries (
            key TEXT PRIMARY KEY,
            provider TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            model TEXT,
            status INTEGER NOT NULL,
            content_type TEXT NOT NULL,
            body BLOB NOT NULL,
            created_at REAL NOT NULL
        )""",
    ),
    (
        "ALTER TABLE entries ADD COLUMN namespace TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE entries ADD COLUMN ttl REAL",
        "ALTER TABLE entries ADD COLUMN input_tokens INTEGER",
        "ALTER TABLE entries ADD COLUMN output_tokens INTEGER",
        "ALTER TABLE entries ADD COLUMN size INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE entries ADD COLUMN hits INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE entries ADD COLUMN last_hit_at REAL",
        # Least recently used first: the eviction order.
        "ALTER TABLE entries ADD COLUMN used_at REAL NOT NULL DEFAULT 0",
        "UPDATE entries SET size = length(body), used_at = created_at",
        "CREATE INDEX entries_by_use ON entries (used_at)",
        "CREATE INDEX entries_by_creation ON entries (created_at)",
        # Totals kept by triggers, so limits are checked without counting the table.
        "CREATE TABLE totals (id INTEGER PRIMARY KEY CHECK (id = 1), entries INTEGER NOT NULL, bytes INTEGER NOT NULL)",
        "INSERT INTO totals SELECT 1, count(*), coalesce(sum(size), 0) FROM entries",
        """CREATE TRIGGER entries_added AFTER INSERT ON entries BEGIN
            UPDATE totals SET entries = entries + 1, bytes = bytes + NEW.size;
        END""",
        """CREATE TRIGGER entries_removed AFTER DELETE ON entries BEGIN
            UPDATE totals SET entries = entries - 1, bytes = bytes - OLD.size;
        END""",
        """CREATE TRIGGER entries_resized AFTER UPDATE OF size ON entries BEGIN
            UPDATE totals SET bytes = bytes - OLD.size + NEW.size;
        END""",
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        """CREATE TABLE savings (
            provider TEXT NOT NULL,
            model TEXT NOT NULL,
            hits INTEGER NOT NULL,
            input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            PRIMARY KEY (provider, model)
        )""",
    ),
    (
        # Keys deleted or replaced, for the memory tiers of every process to drop (NULL: all of them).
        "CREATE TABLE invalidations (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT)",
        # A replacement (the upsert's UPDATE) is recorded by the same statement that makes it.
        """CREATE TRIGGER entries_replaced AFTER UPDATE OF body ON entries BEGIN
            INSERT INTO invalidations (key) VALUES (NEW.key);
        END""",
    ),
    (
        # Hit counts in narrow rows of their own: counting a hit rewrites a few bytes, not a row with its
        # body, which at a million entries made the per-second statistics write slow down reads.
        """CREATE TABLE entry_hits (
            key TEXT PRIMARY KEY,
            hits INTEGER NOT NULL,
            last_hit_at REAL NOT NULL
        ) WITHOUT ROWID""",
        "INSERT INTO entry_hits SELECT key, hits, last_hit_at FROM entries WHERE hits > 0",
        """CREATE TRIGGER entries_forget_hits AFTER DELETE ON entries BEGIN
            DELETE FROM entry_hits WHERE key = OLD.key;
        END""",
    ),
    (
        # What prices a hit and what it saved: the provider's own prompt caching, and the upstream's time.
        "ALTER TABLE entries ADD COLUMN cached_input_tokens INTEGER",
        "ALTER TABLE entries ADD COLUMN cache_write_tokens INTEGER",
        "ALTER TABLE entries ADD COLUMN upstream_seconds REAL",
        "ALTER TABLE savings ADD COLUMN cost_nanos INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE savings ADD COLUMN upstream_ms INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE savings ADD COLUMN unpriced_hits INTEGER NOT NULL DEFAULT 0",
    ),
    (
        # What the dashboard shows: each entry's prompt line, the most-hit entries, activity over time and the
        # latest requests.
        "ALTER TABLE entries ADD COLUMN prompt_preview TEXT",
        "CREATE INDEX entry_hits_by_count ON entry_hits (hits)",
        """CREATE TABLE activity (
            step INTEGER NOT NULL,
            start INTEGER NOT NULL,
            requests INTEGER NOT NULL,
            hits INTEGER NOT NULL,
            misses INTEGER NOT NULL,
            PRIMARY KEY (step, start)
        ) WITHOUT ROWID""",
        "CREATE TABLE recent_requests (seq INTEGER PRIMARY KEY AUTOINCREMENT, record TEXT NOT NULL)",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

# An entry's columns are its fields (ENTRY_FIELDS), in order; the table adds its size and last use.
_ENTRY_COLUMNS = ", ".join(entry_field.name for entry_field in ENTRY_FIELDS)
_ROW_COLUMNS = ("key", *(entry_field.name for entry_field in ENTRY_FIELDS), "size", "used_at")
_UPSERT = (
    f"INSERT INTO entries ({', '.join(_ROW_COLUMNS)}) VALUES ({', '.join('?' for _ in _ROW_COLUMNS)})"
    " ON CONFLICT (key) DO UPDATE SET " + ", ".join(f"{column} = excluded.{column}" for column in _ROW_COLUMNS[1:])
)
_INFO_COLUMNS = (
    "e.key, e.provider, e.endpoint, e.model, e.namespace, e.size, e.created_at, h.last_hit_at, coalesce(h.hits, 0),"
    " e.prompt_preview"
)
_EXPORT_BATCH = 500
_PURGE_BATCH = 1000
_INVALIDATIONS_KEPT = 10_000


class SqliteBackend:
    name = "sqlite"

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout: float = 5.0,
        max_entries: int = 0,
        max_bytes: int = 0,
    ) -> None:
        """`max_entries` and `max_bytes` bound the store (0: unbounded); past them, LRU entries go."""
        self.path = path
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        # Point reads by key and single-row stores run on the event loop itself, on connections of their own
        # that never wait for a lock (they fall back to the threads when they would); see `get` and `set`.
        self._point_reader: sqlite3.Connection | None = None
        self._point_writer: sqlite3.Connection | None = None
        self._open_error = "not opened yet"
        # One connection serves every coroutine; a transaction must not take in another's statements.
        self._transaction = _Turns()
        self._batch: _Batch | None = None
        self._wrote_this_turn = False  # a store was made on the event loop in this turn of it
        self._file_id: tuple[int, int] | None = None
        # Set while the file is closed and opened again: reads wait for that rather than fail.
        self._reopening: asyncio.Event | None = None

    async def open(self) -> None:
        """Open the file, or, when it is not a usable database, move it aside and begin an empty one."""
        opened = _file_id(self.path)
        try:
            await self._connect()
        except _Corrupt as exc:
            self._quarantine(str(exc.__cause__), opened)
            await self._connect()

    async def _connect(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            self._open_error = f"cannot open {self.path}: {exc}"
            raise CacheError(self._open_error) from exc
        reader: aiosqlite.Connection | None = None
        point_reader: sqlite3.Connection | None = None
        try:
            await self._prepare(db)
            # Reads get a connection (and a thread) of their own: with WAL they never wait for a write, so a
            # batch of statistics or a burst of stores cannot hold up hits.
            reader = await aiosqlite.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
            await reader.execute("PRAGMA query_only=1")
            point_reader = _point_connection(self.path, writes=False)
            point_writer = _point_connection(self.path, writes=True)
        except sqlite3.Error as exc:
            for connection in (reader, db):
                if connection is not None:
                    await connection.close()
            if point_reader is not None:
                point_reader.close()
            self._open_error = f"cannot use {self.path}: {exc}"
            if _is_corruption(exc):
                raise _Corrupt(self._open_error) from exc
            raise CacheError(self._open_error) from exc
        self._file_id = _file_id(self.path)
        self._db, self._reader = db, reader
        self._point_reader, self._point_writer = point_reader, point_writer

    def _quarantine(self, reason: str, checked: tuple[int, int] | None) -> None:
        """Move the unusable file (and its WAL) aside, keeping it for a post-mortem, unless the file at
        the path is no longer the one `checked` (another worker moved it already)."""
        if _file_id(self.path) != checked:
            return
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        moved = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.path}{suffix}")
            if source.exists():
                source.replace(f"{moved}{suffix}")
        logger.error("cache file %s is corrupt (%s); moved it to %s and began an empty cache", self.path, reason, moved)

    async def verify(self) -> bool:
        """Check the whole file (PRAGMA quick_check); a corrupt one is moved aside for an empty cache.

        Runs after start-up, off the request path: its cost grows with the cache. True when it was sound.
        """
        checked = _file_id(self.path)
        try:
            problems = await self._quick_check()
        except sqlite3.Error as exc:
            if not _is_corruption(exc):
                raise CacheError(f"cache check failed: {exc}") from exc
            problems = [str(exc)]
        if not problems:
            return True
        await self._replace(lambda: self._quarantine(problems[0], checked))
        return False

    async def _quick_check(self) -> list[str]:
        """The problems PRAGMA quick_check reports. It runs on a connection (and thread) of its own, so hits
        do not queue behind it; cancelled (at shutdown), it is interrupted and its thread ended before this
        returns, for a thread left running would answer into a closed event loop."""
        with anyio.CancelScope(shield=True):
            checker = await aiosqlite.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        try:
            async with checker.execute("PRAGMA quick_check") as cursor:
                return [row[0] for row in await cursor.fetchall() if row[0] != "ok"]
        except anyio.get_cancelled_exc_class():
            await checker.interrupt()
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await checker.close()

    async def _replace(self, change: Any) -> None:
        """Close the file, run `change`, and open what is at the path now."""
        async with self._transaction:
            self._reopening = reopened = asyncio.Event()
            try:
                await self.close()
                change()
                await self._connect()
            finally:
                self._reopening = None
                reopened.set()

    async def checkpoint(self) -> None:
        """Copy the WAL into the database file and truncate it, so the WAL cannot grow without bound."""
        async with self._transaction:
            try:
                await _run(self._connection(), "PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                raise CacheError(f"cache checkpoint failed: {exc}") from exc

    async def maintain(self) -> None:
        """For the process's lifetime: check the file once, then follow a file another process replaced
        and checkpoint the WAL now and then. Failures are left to the requests that meet them."""
        if self._db is None:
            return  # it could not be opened: requests go upstream, and /healthz says why
        with _logged_failure("quick_check"):
            await self.verify()
        last_checkpoint = time.monotonic()
        while True:
            await anyio.sleep(FILE_CHECK_INTERVAL)
            if self._file_id is not None and _file_id(self.path) != self._file_id:
                logger.warning("cache file %s was replaced by another process; opening the new one", self.path)
                with _logged_failure("reopen"):
                    await self._replace(lambda: None)
            if time.monotonic() - last_checkpoint >= CHECKPOINT_INTERVAL:
                last_checkpoint = time.monotonic()
                with _logged_failure("checkpoint"):
                    await self.checkpoint()

    async def _prepare(self, db: aiosqlite.Connection) -> None:
        # WAL lets readers (hits) go on while one writer stores a miss; NORMAL sync is safe with WAL.
        await _run(db, "PRAGMA journal_mode=WAL")
        await _run(db, "PRAGMA synchronous=NORMAL")
        await _run(db, f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        version = await self._scalar(db, "PRAGMA user_version")
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"cache schema version {version} is newer than this proxy understands ({SCHEMA_VERSION})"
            )
        if version == SCHEMA_VERSION:
            return
        await db.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated while this one waited for the lock.
            version = await self._scalar(db, "PRAGMA user_version")
            for steps in _MIGRATIONS[version:]:
                for statement in steps:
                    await db.execute(statement)
            await db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            await db.execute("COMMIT")
        except sqlite3.Error:
            await db.execute("ROLLBACK")
            raise

    @staticmethod
    async def _scalar(db: aiosqlite.Connection, query: str) -> int:
        async with db.execute(query) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise CacheError(self._open_error)
        return self._db

    def _reading(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise CacheError(self._open_error)
        return self._reader

    async def get(self, key: str) -> CachedResponse | None:
        """The entry under `key`. Read on the event loop: a lookup by primary key takes tens of
        microseconds, a trip to the reader's thread several times that in CPU and wake-ups, on every
        miss and on every hit the memory tier does not hold. When the read would wait for a lock (rare
        with WAL), it goes to the reader's thread, which waits up to the busy timeout."""
        query = f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE key = ?"
        point_reader = self._point_reader
        if point_reader is not None and self._reopening is None:
            try:
                row = point_reader.execute(query, (key,)).fetchone()
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise CacheError(f"cache read failed: {exc}") from exc
            except sqlite3.Error as exc:
                raise CacheError(f"cache read failed: {exc}") from exc
            else:
                return entry_from_values(row) if row is not None else None
        rows = await self._rows(query, (key,))
        return entry_from_values(rows[0]) if rows else None

    async def set(self, key: str, entry: CachedResponse) -> None:
        size = len(entry.body)
        if self.max_bytes and size > self.max_bytes:
            # It would evict everything else and still not fit; what it replaces is outdated now.
            await self.delete(key)
            return
        row = _row(key, entry, size)
        if self._write_at_once(row):
            return
        # Group commit: writes that arrive while another is in progress share the next transaction, so a
        # burst of misses costs a few trips to the database thread, not several each.
        batch = self._batch if self._batch is not None else _Batch()
        self._batch = batch
        batch.rows.append(row)
        async with self._transaction:
            if not batch.written:
                if self._batch is batch:
                    self._batch = None
                batch.written = True
                try:
                    await self._write_rows(batch.rows)
                except CacheError as exc:
                    batch.error = exc
        if batch.error is not None:
            raise batch.error

    def _write_at_once(self, row: tuple[Any, ...]) -> bool:
        """Store one row on the event loop, as its own transaction, when nothing else is being written in
        the thread or waits to be (writes keep their order), the store is unbounded (no eviction to run with
        it) and no other store was made so in this turn of the loop (a batch then goes to the thread as one
        transaction, and never holds the loop for more than one statement): True when it is stored.

        A trip to the database thread costs more CPU than the statement itself (144 us against 60 us for a
        1 kB row here), and storing a miss at a time is what a store that keeps up does. False when the
        write would wait for a lock: it then goes to the thread, which waits."""
        writer = self._point_writer
        if (
            writer is None
            or self._reopening is not None
            or self._batch is not None
            or self._transaction.taken
            or self.max_entries
            or self.max_bytes
            or self._wrote_this_turn
        ):
            return False
        try:
            writer.execute(_UPSERT, row)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                return False
            raise CacheError(f"cache write failed: {exc}") from exc
        except sqlite3.Error as exc:
            raise CacheError(f"cache write failed: {exc}") from exc
        self._wrote_this_turn = True
        asyncio.get_running_loop().call_soon(self._next_turn)
        return True

    def _next_turn(self) -> None:
        self._wrote_this_turn = False

    async def _write_rows(self, rows: list[tuple[Any, ...]]) -> None:
        db = self._connection()
        limited = bool(self.max_entries or self.max_bytes)
        if len(rows) == 1 and not limited:
            # One statement is its own transaction (its triggers included): one trip to the database thread.
            try:
                await db.execute(_UPSERT, rows[0])
            except sqlite3.Error as exc:
                raise CacheError(f"cache write failed: {exc}") from exc
            return
        async with self._transaction_body("cache write") as db:
            await db.executemany(_UPSERT, rows)
            if limited:
                await self._evict_over_limits(db)

    @asynccontextmanager
    async def _write(self, what: str) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction, committed whole or not at all."""
        async with self._transaction, self._transaction_body(what) as db:
            yield db

    @asynccontextmanager
    async def _transaction_body(self, what: str) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN ... COMMIT (or ROLLBACK); the caller holds `self._transaction`."""
        db = self._connection()
        try:
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                # Shielded: a cancelled request must not leave the shared connection mid-transaction.
                with anyio.CancelScope(shield=True):
                    await db.execute("ROLLBACK")
                raise
            with anyio.CancelScope(shield=True):
                await db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise CacheError(f"{what} failed: {exc}") from exc

    async def _evict_over_limits(self, db: aiosqlite.Connection) -> None:
        if not (self.max_entries or self.max_bytes):
            return
        evicted = 0
        while True:
            async with db.execute("SELECT entries, bytes FROM totals") as cursor:
                row = await cursor.fetchone()
            entries, size = row if row else (0, 0)
            excess = max(
                entries - self.max_entries if self.max_entries else 0,
                1 if self.max_bytes and size > self.max_bytes else 0,
            )
            if excess <= 0 or entries <= 1:
                break
            async with db.execute(
                "DELETE FROM entries WHERE key IN (SELECT key FROM entries ORDER BY used_at LIMIT ?) RETURNING key",
                (excess,),
            ) as cursor:
                keys = [(key,) for (key,) in await cursor.fetchall()]
            await db.executemany("INSERT INTO invalidations (key) VALUES (?)", keys)
            evicted += len(keys)
        if evicted:
            await _add_counter(db, "evictions", evicted)

    async def delete(self, key: str) -> bool:
        async with self._write("cache delete") as db:
            cursor = await db.execute("DELETE FROM entries WHERE key = ?", (key,))
            deleted = cursor.rowcount > 0
            if deleted:
                await db.execute("INSERT INTO invalidations (key) VALUES (?)", (key,))
        return deleted

    async def purge(self, which: EntryFilter) -> int:
        where, parameters = _where(which)
        deleted = 0
        while True:
            # In batches, so a large purge never holds the write lock for long; the last one also tells
            # every process's memory tier, in the same transaction.
            async with self._write("cache purge") as db:
                cursor = await db.execute(
                    f"DELETE FROM entries WHERE rowid IN (SELECT rowid FROM entries {where} LIMIT ?)",
                    (*parameters, _PURGE_BATCH),
                )
                deleted += cursor.rowcount
                if cursor.rowcount < _PURGE_BATCH:
                    await db.execute("INSERT INTO invalidations (key) VALUES (NULL)")
                    return deleted

    async def list_entries(self, which: EntryFilter, offset: int, limit: int) -> list[EntryInfo]:
        where, parameters = _where(which)
        query = (
            f"SELECT {_INFO_COLUMNS} FROM entries e LEFT JOIN entry_hits h ON h.key = e.key {where}"
            " ORDER BY e.created_at DESC LIMIT ? OFFSET ?"
        )
        return [EntryInfo(*row) for row in await self._rows(query, (*parameters, limit, offset))]

    async def export_entries(self) -> AsyncIterator[tuple[str, CachedResponse]]:
        after = ""
        while True:
            query = f"SELECT key, {_ENTRY_COLUMNS} FROM entries WHERE key > ? ORDER BY key LIMIT ?"
            rows = await self._rows(query, (after, _EXPORT_BATCH))
            for row in rows:
                yield row[0], entry_from_values(row[1:])
            if len(rows) < _EXPORT_BATCH:
                return
            after = rows[-1][0]

    async def latest_invalidation(self) -> int:
        [(latest,)] = await self._rows("SELECT coalesce(max(seq), 0) FROM invalidations")
        return int(latest)

    async def invalidations_since(self, after: int) -> tuple[int, list[str | None]]:
        query = "SELECT seq, key FROM invalidations WHERE seq > ? ORDER BY seq LIMIT ?"
        rows = await self._rows(query, (after, _INVALIDATIONS_KEPT))
        if not rows:
            # The feed's real end: below `after` when the file was replaced by a new one.
            return min(after, await self.latest_invalidation()), []
        return rows[-1][0], [key for _, key in rows]

    async def record(self, tally: Tally) -> None:
        async with self._write("cache statistics write") as db:
            await db.execute(
                "DELETE FROM invalidations WHERE seq < (SELECT max(seq) FROM invalidations) - ?",
                (_INVALIDATIONS_KEPT,),
            )
            for name, amount in tally.counters().items():
                await _add_counter(db, name, amount)
            hits = [(key, count, at, key) for key, (count, at) in tally.entry_hits.items()]
            await db.executemany(
                "INSERT INTO entry_hits SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM entries WHERE key = ?)"
                " ON CONFLICT (key) DO UPDATE SET hits = hits + excluded.hits,"
                " last_hit_at = max(last_hit_at, excluded.last_hit_at)",
                hits,
            )
            if self.max_entries or self.max_bytes:
                # The eviction order; only a bounded store needs it, and it costs a rewrite of each row.
                await db.executemany(
                    "UPDATE entries SET used_at = max(used_at, ?) WHERE key = ?",
                    [(at, key) for key, (_, at) in tally.entry_hits.items()],
                )
            await db.executemany(
                f"INSERT INTO savings (provider, model, {', '.join(SAVING_FIGURES)})"
                f" VALUES (?, ?, {', '.join('?' for _ in SAVING_FIGURES)}) ON CONFLICT (provider, model) DO UPDATE SET "
                + ", ".join(f"{name} = {name} + excluded.{name}" for name in SAVING_FIGURES),
                [(provider, model, *figures.values()) for (provider, model), figures in tally.savings.items()],
            )
            await _record_activity(db, tally)

    async def most_hit(self, limit: int) -> list[EntryInfo]:
        query = (
            f"SELECT {_INFO_COLUMNS} FROM entry_hits h JOIN entries e ON e.key = h.key"
            " ORDER BY h.hits DESC LIMIT ?"  # walks the index by hit count, most first, and stops
        )
        return [EntryInfo(*row) for row in await self._rows(query, (limit,))]

    async def activity(self, step: int, since: int) -> list[ActivityPoint]:
        query = "SELECT start, requests, hits, misses FROM activity WHERE step = ? AND start >= ? ORDER BY start"
        return [ActivityPoint(*row) for row in await self._rows(query, (step, since))]

    async def recent_requests(self) -> list[RequestRecord]:
        query = "SELECT record FROM recent_requests ORDER BY seq DESC LIMIT ?"
        return [RequestRecord(*orjson.loads(record)) for (record,) in await self._rows(query, (RECENT_REQUESTS_KEPT,))]

    async def _rows(
        self, query: str, parameters: tuple[Any, ...] = (), failure: str = "cache read failed"
    ) -> list[Any]:
        """The query's rows, read in one trip to the reader's thread. One trip, so a reopening of the file
        (which closes the connection behind every queued trip) cannot come between a query and its rows."""
        if self._reopening is not None:
            with anyio.move_on_after(_REOPEN_WAIT_SECONDS):  # beyond it, the request goes upstream
                await self._reopening.wait()
        try:
            return list(await self._reading().execute_fetchall(query, parameters))
        except sqlite3.Error as exc:
            raise CacheError(f"{failure}: {exc}") from exc

    async def statistics(self) -> CacheStatistics:
        totals = await self._rows("SELECT entries, bytes FROM totals")
        counters: dict[str, int] = dict(await self._rows("SELECT name, value FROM counters"))
        query = f"SELECT provider, model, {', '.join(SAVING_FIGURES)} FROM savings ORDER BY provider, model"
        savings = [Saving(*row) for row in await self._rows(query)]
        entries, size = totals[0] if totals else (0, 0)
        return CacheStatistics(
            entries=entries,
            bytes=size,
            hits=counters.get("hits", 0),
            misses=counters.get("misses", 0),
            evictions=counters.get("evictions", 0),
            stale=counters.get("stale", 0),
            stores_skipped=counters.get("stores_skipped", 0),
            savings=savings,
        )

    async def ping(self) -> None:
        await self._rows("SELECT 1 FROM entries LIMIT 1", failure="cache unusable")

    async def close(self) -> None:
        connections = [db for db in (self._reader, self._db) if db is not None]
        for point in (self._point_reader, self._point_writer):
            if point is not None:
                point.close()
        self._db = self._reader = None
        self._point_reader = self._point_writer = None
        self._open_error = "closed"
        for db in connections:
            await db.close()


async def _run(db: aiosqlite.Connection, statement: str) -> None:
    """Run a statement that may answer rows, its cursor closed at once: a statement left open holds a read
    of the file, and a connection that still reads from before a store on the event loop cannot write."""
    async with db.execute(statement):
        pass


def _point_connection(path: Path, writes: bool) -> sqlite3.Connection:
    """A connection for the event loop's own thread, which must never wait for a lock. One that writes
    syncs as the thread's does (NORMAL, safe with WAL) and never checkpoints: a checkpoint copies megabytes
    and would hold up every request meanwhile. The thread's connection checkpoints at its next commit
    (the statistics, each second while requests come) and the maintenance loop every minute."""
    connection = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    try:
        if writes:
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA wal_autocheckpoint=0")
        else:
            connection.execute("PRAGMA query_only=1")
    except sqlite3.Error:
        connection.close()
        raise
    return connection


class _Turns:
    """The database thread's connection, taken by one transaction at a time in the order they asked;
    `taken` counts the one that holds it and those that wait."""

    __slots__ = ("_lock", "taken")

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self.taken = 0

    async def __aenter__(self) -> None:
        self.taken += 1
        try:
            await self._lock.acquire()
        except BaseException:
            self.taken -= 1
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release()
        self.taken -= 1


class _Corrupt(CacheError):
    """The file is not a usable SQLite database."""


def _is_corruption(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in _CORRUPTION_CODES


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


@contextmanager
def _logged_failure(what: str) -> Iterator[None]:
    try:
        yield
    except CacheError as exc:
        logger.warning("cache maintenance (%s) failed: %s", what, exc)


@dataclass
class _Batch:
    """Writes that go into one transaction, and how it went for all of them."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    written: bool = False
    error: CacheError | None = None


def _row(key: str, entry: CachedResponse, size: int) -> tuple[Any, ...]:
    return (key, *entry_values(entry), size, entry.created_at)


def _where(which: EntryFilter) -> tuple[str, tuple[Any, ...]]:
    clauses: list[str] = []
    parameters: list[Any] = []
    for clause, value in (
        ("namespace = ?", which.namespace),
        ("provider = ?", which.provider),
        ("created_at < ?", which.created_before),
    ):
        if value is not None:
            clauses.append(clause)
            parameters.append(value)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), tuple(parameters)


async def _record_activity(db: aiosqlite.Connection, tally: Tally) -> None:
    """Add the tally's activity to the series and its requests to the recent ones; drop what is too old."""
    buckets = activity_buckets(tally.activity)
    if buckets:
        await db.executemany(
            "INSERT INTO activity VALUES (?, ?, ?, ?, ?) ON CONFLICT (step, start) DO UPDATE SET"
            " requests = requests + excluded.requests, hits = hits + excluded.hits, misses = misses + excluded.misses",
            [(step, start, *figures) for (step, start), figures in buckets.items()],
        )
        oldest = int(time.time()) - ACTIVITY_KEPT_SECONDS
        # By step, so the primary key finds the rows rather than a scan of the table.
        await db.executemany(
            "DELETE FROM activity WHERE step = ? AND start < ?", [(step, oldest) for step in ACTIVITY_STEPS]
        )
    if tally.recent:
        await db.executemany(
            "INSERT INTO recent_requests (record) VALUES (?)",
            [(orjson.dumps(astuple(record)),) for record in tally.recent[-RECENT_REQUESTS_KEPT:]],
        )
        await db.execute(
            "DELETE FROM recent_requests WHERE seq <= (SELECT max(seq) FROM recent_requests) - ?",
            (RECENT_REQUESTS_KEPT,),
        )


async def _add_counter(db: aiosqlite.Connection, name: str, amount: int) -> None:
    if amount:
        await db.execute(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (name, amount),
        )
