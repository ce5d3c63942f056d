"""Proxy hygiene and failure behaviour: what reaches the client when the upstream or the store misbehaves."""

from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cache import CachedResponse, SqliteBackend
from cache import sqlite as sqlite_module
from openai_proxy import create_app
from proxy.settings import Settings
from tests.conftest import FakeClock, ProxyFactory
from tests.servers import FakeUpstream, Recorded, ServerThread, chat_completion, gzip_json
from tests.test_backends import TinySqlite

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def post_chat(base: str, content: str = "hi", **kwargs: Any) -> httpx.Response:
    body = {**CHAT, "messages": [{"role": "user", "content": content}]}
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=10, **kwargs)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_gzipped_upstream_answers_reach_the_client_decoded(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    async def gzipped(request: Request, recorded: Recorded) -> Response:
        return gzip_json(chat_completion(7, "m"))

    upstream.handler = gzipped
    base = start_proxy()
    for expected in ("MISS", "HIT"):
        with httpx.Client() as http:
            response = http.post(f"{base}/v1/chat/completions", json=CHAT, headers={"accept-encoding": "identity"})
        assert response.headers["x-cache-status"] == expected
        assert "content-encoding" not in response.headers
        assert response.json()["id"] == "chatcmpl-7"
        assert int(response.headers["content-length"]) == len(response.content)


def test_hop_by_hop_request_headers_are_not_forwarded(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    headers = {
        "keep-alive": "timeout=5",
        "te": "trailers",
        "proxy-authorization": "Basic eDp5",
        "connection": "keep-alive, x-hop",
        "x-hop": "1",
        "x-end-to-end": "kept",
    }
    post_chat(start_proxy(), headers=headers)
    sent = upstream.requests[0]
    for name in ("keep-alive", "te", "proxy-authorization", "x-hop"):
        assert sent.header(name) is None, name
    assert sent.header("x-end-to-end") == "kept"


def test_hop_by_hop_response_headers_are_not_relayed(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    async def with_hop_headers(request: Request, recorded: Recorded) -> Response:
        headers = {"keep-alive": "timeout=5", "x-upstream": "kept", "proxy-authenticate": "Basic"}
        return JSONResponse(chat_completion(1, "m"), headers=headers)

    upstream.handler = with_hop_headers
    response = post_chat(start_proxy())
    assert response.headers["x-upstream"] == "kept"
    assert "keep-alive" not in response.headers and "proxy-authenticate" not in response.headers


def test_unreachable_upstream_is_a_502_and_nothing_is_stored(start_proxy: ProxyFactory) -> None:
    base = start_proxy(openai_base_url=f"http://127.0.0.1:{closed_port()}")
    for _ in range(2):
        response = post_chat(base)
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "upstream_unreachable"
        assert response.headers["x-cache-status"] == "MISS"


def test_slow_upstream_is_a_504_and_nothing_is_stored(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    async def slow(request: Request, recorded: Recorded) -> Response:
        await asyncio.sleep(0.6 if upstream.calls == 1 else 0)
        return JSONResponse(chat_completion(upstream.calls, "m"))

    upstream.handler = slow
    base = start_proxy(upstream_timeout=0.3)
    timed_out = post_chat(base)
    assert timed_out.status_code == 504
    assert timed_out.json()["error"]["type"] == "upstream_timeout"
    assert post_chat(base).headers["x-cache-status"] == "MISS"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"cache-control": "no-store"}, id="no-store"),
        pytest.param({"cache-control": "private, max-age=0"}, id="private"),
        pytest.param({"set-cookie": "session=abc"}, id="set-cookie"),
    ],
)
def test_answers_marked_private_are_relayed_not_stored(
    start_proxy: ProxyFactory, upstream: FakeUpstream, headers: dict[str, str]
) -> None:
    async def private(request: Request, recorded: Recorded) -> Response:
        return JSONResponse(chat_completion(upstream.calls, "m"), headers=headers)

    upstream.handler = private
    base = start_proxy()
    first = post_chat(base)
    assert first.status_code == 200 and first.json()["id"] == "chatcmpl-1"
    assert post_chat(base).headers["x-cache-status"] == "MISS"


def test_redirects_are_returned_not_followed(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    async def redirect(request: Request, recorded: Recorded) -> Response:
        return Response(status_code=307, headers={"location": "http://127.0.0.1:9/steal"})

    upstream.handler = redirect
    response = post_chat(start_proxy())
    assert response.status_code == 307
    assert response.headers["location"] == "http://127.0.0.1:9/steal"
    assert upstream.calls == 1


def test_entries_survive_a_restart(start_proxy: ProxyFactory, upstream: FakeUpstream, tmp_path: Path) -> None:
    database = tmp_path / "persist.db"
    assert post_chat(start_proxy(cache_db=database)).headers["x-cache-status"] == "MISS"
    restarted = start_proxy(cache_db=database)
    response = post_chat(restarted)
    assert response.headers["x-cache-status"] == "HIT"
    assert response.json()["id"] == "chatcmpl-1"


def test_sqlite_runs_in_wal_mode_with_a_schema_version(start_proxy: ProxyFactory, tmp_path: Path) -> None:
    start_proxy(cache_db=tmp_path / "w.db")
    httpx.get(f"{start_proxy(cache_db=tmp_path / 'w.db')}/healthz")
    with sqlite3.connect(tmp_path / "w.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] >= 1


class TestBrokenStore:
    def assert_served_and_degraded(
        self, base: str, caplog: pytest.LogCaptureFixture, cause: str, status: str = "BYPASS"
    ) -> None:
        for number in range(3):
            response = post_chat(base, content=f"question {number}")
            assert response.status_code == 200
            assert response.headers["x-cache-status"] == status
        # Answers are stored after they are sent, so a failed write shows a moment after its response.
        deadline = time.monotonic() + 3
        while (health := httpx.get(f"{base}/healthz")).json()["status"] == "ok" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health.status_code == 200
        assert health.json()["status"] == "degraded"
        assert cause in health.json()["cache"]["reason"]
        failures = [
            r.getMessage() for r in caplog.records if r.name == "openai_proxy.cache" and r.levelno == logging.ERROR
        ]
        # One line per outage: reads and writes of SQLite fail apart, so at most one for each.
        failing = [message.split(") ", 1)[1].split(",")[0] for message in failures]
        assert 1 <= len(failures) == len(set(failing)) <= 2, failures
        assert all(cause in message for message in failures), failures

    def test_unwritable_path(
        self,
        start_proxy: ProxyFactory,
        upstream: FakeUpstream,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        (tmp_path / "a-file").write_text("not a directory")
        base = start_proxy(cache_db=tmp_path / "a-file" / "cache.db")
        self.assert_served_and_degraded(base, caplog, "cannot open")
        assert upstream.calls == 3
        start_proxy.stop(base)  # its last statistics flush fails too: logged here, not in the next test

    def test_locked_database(
        self,
        start_proxy: ProxyFactory,
        upstream: FakeUpstream,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        base = start_proxy(cache_db=tmp_path / "locked.db", cache_busy_timeout=0.1)
        assert httpx.get(f"{base}/healthz").json()["status"] == "ok"
        holder = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # holds the write lock; WAL readers still read
        try:
            self.assert_served_and_degraded(base, caplog, "locked", status="MISS")
            assert upstream.calls == 3
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        recovered = post_chat(base)
        assert recovered.headers["x-cache-status"] == "MISS"
        assert post_chat(base).headers["x-cache-status"] == "HIT"
        # A statistics flush that began under the lock may fail after this; the next one clears it.
        deadline = time.monotonic() + 3
        while httpx.get(f"{base}/healthz").json()["status"] != "ok":
            assert time.monotonic() < deadline, "the store works again, so /healthz must say so"
            time.sleep(0.05)


def test_a_follower_is_never_served_an_answer_older_than_its_max_age(
    start_proxy: ProxyFactory, upstream: FakeUpstream, clock: FakeClock, tmp_path: Path
) -> None:
    """Identical requests follow the one in flight until its answer is stored. When that store is slow (here
    a write lock holds it), the answer can be too old for a follower's max-age by then: it goes upstream."""
    base = start_proxy(clock=clock, cache_db=tmp_path / "slow.db")
    assert httpx.get(f"{base}/healthz").json()["status"] == "ok"
    holder = sqlite3.connect(tmp_path / "slow.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the first answer's store waits for this lock
    try:
        assert post_chat(base).headers["x-cache-status"] == "MISS"
        clock.advance(100)
        with ThreadPoolExecutor(1) as pool:
            follower = pool.submit(post_chat, base, headers={"cache-control": "max-age=50"})
            time.sleep(0.3)  # it follows the first request, whose answer is not stored yet
            holder.execute("COMMIT")
            followed = follower.result(timeout=10)
    finally:
        holder.close()
    assert followed.headers["x-cache-status"] in ("MISS", "EXPIRED")
    assert "x-cache-coalesced" not in followed.headers
    assert upstream.calls == 2
    assert post_chat(base, headers={"cache-control": "max-age=50"}).headers["x-cache-status"] == "HIT"


class LateSecondLookup(SqliteBackend):
    """The second read answers late: what it read, once an identical request has stored its answer."""

    reads = 0

    async def get(self, key: str) -> CachedResponse | None:
        self.reads += 1
        entry = await super().get(key)
        if self.reads == 2:
            await asyncio.sleep(0.5)
        return entry


def test_a_request_whose_lookup_missed_an_answer_stored_meanwhile_is_a_hit(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Looked up just before an identical request in flight stored its answer, found no flight after:
    the answer is in the cache by then, so it must not go upstream a second time."""
    settings = Settings(_env_file=None, openai_base_url=upstream.url, openai_api_key="sk-test", memory_cache_bytes=0)  # type: ignore[call-arg]
    server = ServerThread(create_app(settings, backend=LateSecondLookup(tmp_path / "late.db"))).start()

    upstream.answer_slowly(0.2)
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post_chat, server.url)
            deadline = time.monotonic() + 5
            while upstream.calls == 0:  # the first now waits for the upstream, and has stored nothing
                assert time.monotonic() < deadline
                time.sleep(0.01)
            second = pool.submit(post_chat, server.url)
            statuses = [
                first.result(timeout=10).headers["x-cache-status"],
                second.result(timeout=10).headers["x-cache-status"],
            ]
    finally:
        server.stop()
    assert statuses == ["MISS", "HIT"]
    assert upstream.calls == 1


def test_upstream_cookies_are_never_sent_for_another_client(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    async def sets_a_cookie(request: Request, recorded: Recorded) -> Response:
        return JSONResponse(chat_completion(upstream.calls, "m"), headers={"set-cookie": "session=client-a; Path=/"})

    upstream.handler = sets_a_cookie
    base = start_proxy()
    first = post_chat(base, content="client a")
    assert first.headers["set-cookie"].startswith("session=client-a"), "relayed to the client it was meant for"
    post_chat(base, content="client b")
    assert upstream.requests[1].header("cookie") is None


class TestDamagedStore:
    def test_a_corrupt_file_is_moved_aside_and_the_proxy_caches_again(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        garbage = b"this is not an sqlite database" * 200
        (tmp_path / "corrupt.db").write_bytes(garbage)
        base = start_proxy(cache_db=tmp_path / "corrupt.db")
        assert httpx.get(f"{base}/healthz").json()["status"] == "ok"
        assert post_chat(base).headers["x-cache-status"] == "MISS"
        assert post_chat(base).headers["x-cache-status"] == "HIT"
        [moved] = tmp_path.glob("corrupt.db.corrupt-*")
        assert moved.read_bytes() == garbage
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "is corrupt" in errors[0]

    def test_a_full_disk_fails_writes_never_requests(
        self, upstream: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        settings = Settings(_env_file=None, openai_base_url=upstream.url, openai_api_key="sk-test")  # type: ignore[call-arg]
        server = ServerThread(create_app(settings, backend=TinySqlite(tmp_path / "full.db"))).start()

        async def long_answer(request: Request, recorded: Recorded) -> Response:
            answer = chat_completion(upstream.calls, "m")
            answer["choices"][0]["message"]["content"] = "many words " * 20_000
            return JSONResponse(answer)

        upstream.handler = long_answer
        try:
            answers = [post_chat(server.url, content=f"question {number}") for number in range(3)]
            assert [answer.status_code for answer in answers] == [200, 200, 200]
            deadline = time.monotonic() + 3
            while httpx.get(f"{server.url}/healthz").json()["status"] == "ok" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "full" in httpx.get(f"{server.url}/healthz").json()["cache"]["reason"]
            failures = [r.getMessage() for r in caplog.records if r.name == "openai_proxy.cache"]
            assert len(failures) == 1 and "full" in failures[0], failures
        finally:
            server.stop()

    def test_the_wal_is_checkpointed_while_serving(
        self,
        start_proxy: ProxyFactory,
        upstream: FakeUpstream,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setattr(sqlite_module, "CHECKPOINT_INTERVAL", 0.2)
        monkeypatch.setattr(sqlite_module, "FILE_CHECK_INTERVAL", 0.05)
        base = start_proxy(cache_db=tmp_path / "wal.db")
        for number in range(20):
            post_chat(base, content=f"question {number}")
        wal = tmp_path / "wal.db-wal"
        deadline = time.monotonic() + 5
        while wal.stat().st_size > 0:
            assert time.monotonic() < deadline, "the WAL was never truncated"
            time.sleep(0.05)

    def test_a_file_replaced_by_another_process_is_followed(
        self,
        start_proxy: ProxyFactory,
        upstream: FakeUpstream,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setattr(sqlite_module, "FILE_CHECK_INTERVAL", 0.05)
        path = tmp_path / "followed.db"
        base = start_proxy(cache_db=path, memory_cache_bytes=0)
        post_chat(base)
        deadline = time.monotonic() + 5
        # Stored just after it was answered (a hit at once, while it waits to be written): in the file before
        # the file moves, or it would be written into the new one.
        while not stored_entries(path):
            assert time.monotonic() < deadline, "the first answer was never stored"
            time.sleep(0.02)
        assert post_chat(base).headers["x-cache-status"] == "HIT"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").rename(tmp_path / f"old{suffix}")
        sqlite3.connect(path).close()  # what another worker's quarantine leaves: a new, empty file
        deadline = time.monotonic() + 5
        while post_chat(base).headers["x-cache-status"] == "HIT":
            assert time.monotonic() < deadline, "the proxy kept using the file that was moved away"
            time.sleep(0.05)
        # Now it answers from the new file: a miss there is stored there and hit again.
        while post_chat(base).headers["x-cache-status"] != "HIT":
            assert time.monotonic() < deadline, "the proxy did not cache in the new file"
            time.sleep(0.05)
        while stored_entries(path) != 1:  # a hit while it waits to be written; then it is in the new file
            assert time.monotonic() < deadline, "the answer was never written to the new file"
            time.sleep(0.02)


def stored_entries(path: Path) -> int:
    with sqlite3.connect(path) as db:
        tables = db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'entries'").fetchone()[0]
        return int(db.execute("SELECT count(*) FROM entries").fetchone()[0]) if tables else 0
