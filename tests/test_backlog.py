"""Answers waiting to be stored are bounded: a store that falls behind costs skipped stores, counted,
never memory that grows with the requests."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from openai_proxy import create_app
from proxy.backlog import WAITING_STORE_OVERHEAD, StoreBacklog
from proxy.settings import Settings
from tests.conftest import PROXY_OPENAI_KEY
from tests.servers import FakeUpstream, ServerThread


def test_answers_wait_to_be_stored_only_up_to_the_bound(caplog: pytest.LogCaptureFixture) -> None:
    backlog = StoreBacklog(max_bytes=3 * (1000 + WAITING_STORE_OVERHEAD))
    assert [backlog.admit(1000) for _ in range(5)] == [True, True, True, False, False]
    assert (backlog.waiting, backlog.bytes) == (3, 3 * (1000 + WAITING_STORE_OVERHEAD))
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "falling behind" in warnings[0].getMessage(), "logged once per episode"
    for _ in range(3):
        backlog.release(1000)
    assert (backlog.waiting, backlog.bytes) == (0, 0)
    assert "2 answers were not stored" in caplog.records[-1].getMessage(), "the episode's end, with its count"


def test_one_answer_larger_than_the_bound_may_still_wait_alone() -> None:
    backlog = StoreBacklog(max_bytes=1024)
    assert backlog.admit(10_000), "an empty backlog takes any answer: the bound is on what waits"
    assert not backlog.admit(10)


def chat(number: int) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": f"unique prompt {number}"}]}


def test_a_blocked_store_skips_stores_instead_of_holding_answers(upstream: FakeUpstream, tmp_path: Path) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        openai_base_url=upstream.url,
        openai_api_key=PROXY_OPENAI_KEY,
        cache_db=tmp_path / "blocked.db",
        cache_busy_timeout=5,
        store_backlog_bytes=4 * (2048 + WAITING_STORE_OVERHEAD),
    )
    app = create_app(settings)
    server = ServerThread(app).start()
    base = server.url
    try:
        assert httpx.get(f"{base}/healthz").json()["status"] == "ok"
        holder = sqlite3.connect(tmp_path / "blocked.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # every store now waits for this lock
        try:
            most_waiting = asyncio.run(send_misses(base, app.proxy.backlog, count=60))
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert most_waiting <= 4, "answers waiting to be stored stay within the bound"
        stats = wait_for_stores(base, expected=60)
        assert stats["stores_skipped"] >= 50
        assert stats["entries"] + stats["stores_skipped"] == 60, "every answer stored or counted as skipped"
        metrics = httpx.get(f"{base}/metrics").text
        assert f"openai_proxy_cache_stores_skipped_total {float(stats['stores_skipped'])}" in metrics
    finally:
        server.stop()


async def send_misses(base: str, backlog: StoreBacklog, count: int) -> int:
    """Send `count` new prompts, ten at a time; every one is answered. Returns the most answers seen
    waiting to be stored at once."""
    most = 0
    async with httpx.AsyncClient(timeout=10) as http:
        for start in range(0, count, 10):
            answers = await asyncio.gather(
                *(http.post(f"{base}/v1/chat/completions", json=chat(n)) for n in range(start, start + 10))
            )
            assert all(answer.status_code == 200 for answer in answers)
            most = max(most, backlog.waiting)
    return most


def wait_for_stores(base: str, expected: int) -> dict[str, int]:
    deadline = time.monotonic() + 10
    while True:
        stats: dict[str, int] = httpx.get(f"{base}/cache/stats").json()
        if stats["entries"] + stats["stores_skipped"] >= expected or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)
