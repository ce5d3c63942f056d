"""GET /cache/dashboard (the dashboard page's figures) and the page's files, through a real proxy."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cache.stats import ActivityPoint
from openai_proxy import Settings, create_app
from proxy.dashboard import DashboardPage, activity_series
from tests.conftest import CANARIES, ProxyFactory
from tests.servers import FakeUpstream

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "alpha question\nwith a second line"}]}
OTHER = {"model": "gpt-4o", "messages": [{"role": "user", "content": "beta question"}]}


def dashboard(base: str, **headers: str) -> dict[str, Any]:
    response = httpx.get(f"{base}/cache/dashboard", headers=headers)
    assert response.status_code == 200, response.text
    figures: dict[str, Any] = response.json()
    return figures


def settled(base: str, requests: int) -> dict[str, Any]:
    """The figures once `requests` proxied requests are counted: a miss is counted when its answer is
    stored, a moment after the client has it."""
    deadline = time.monotonic() + 5
    while totals((figures := dashboard(base))["activity"]["hour"]["points"])[0] < requests:
        assert time.monotonic() < deadline, figures["activity"]["hour"]["points"][-2:]
        time.sleep(0.05)
    return figures


def post(base: str, body: dict[str, Any] | bytes, path: str = "/v1/chat/completions") -> str | None:
    options: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(f"{base}{path}", headers={"authorization": "Bearer sk-client-SECRET"}, **options)
    return response.headers.get("x-cache-status")


def totals(points: list[dict[str, int]]) -> tuple[int, int, int]:
    return (
        sum(point["requests"] for point in points),
        sum(point["hits"] for point in points),
        sum(point["misses"] for point in points),
    )


def test_a_series_has_every_period_oldest_first_with_zeros_where_nothing_happened() -> None:
    last = 1_700_000_000 - 1_700_000_000 % 60
    now = last + 59.9
    series = activity_series([ActivityPoint(last, 4, 3, 1), ActivityPoint(last - 120, 2, 0, 2)], 60, 60, now)
    points = series["points"]
    assert series["step_seconds"] == 60 and len(points) == 60
    assert [point["at"] for point in points] == list(range(last - 59 * 60, last + 60, 60))
    assert points[-1] == {"at": last, "requests": 4, "hits": 3, "misses": 1}
    assert points[-3] == {"at": last - 120, "requests": 2, "hits": 0, "misses": 2}
    assert totals(points) == (6, 3, 3)


def test_an_old_or_future_point_is_outside_the_series() -> None:
    now = 1_700_003_600.0
    known = [ActivityPoint(int(now) - 7200, 5, 5, 0), ActivityPoint(int(now) + 3600, 1, 1, 0)]
    assert totals(activity_series(known, 3600, 1, now)["points"]) == (0, 0, 0)


@pytest.mark.both_backends
def test_the_figures_are_those_of_the_store_after_a_known_sequence(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    base = start_proxy()
    assert [post(base, CHAT), post(base, CHAT), post(base, CHAT)] == ["MISS", "HIT", "HIT"]
    assert [post(base, OTHER), post(base, OTHER)] == ["MISS", "HIT"]
    assert post(base, b"not json") == "BYPASS"
    assert post(base, CHAT, path="/nowhere/v1/chat/completions") is None  # 404: no such provider
    httpx.get(f"{base}/healthz")  # the proxy's own routes are not requests it proxied

    figures = settled(base, 7)
    assert figures["stats"] == httpx.get(f"{base}/cache/stats").json()
    assert (figures["stats"]["hits"], figures["stats"]["misses"]) == (3, 2)

    hour, week = figures["activity"]["hour"], figures["activity"]["week"]
    assert (hour["step_seconds"], len(hour["points"])) == (60, 60)
    assert (week["step_seconds"], len(week["points"])) == (3600, 168)
    assert totals(hour["points"]) == totals(week["points"]) == (7, 3, 2)
    minute = int(figures["generated_at"]) // 60 * 60
    assert hour["points"][-1]["at"] == minute and hour["points"][0]["at"] == minute - 59 * 60

    top = [(entry["model"], entry["hits"], entry["prompt"]) for entry in figures["top_entries"]]
    assert top == [("gpt-4o-mini", 2, "alpha question"), ("gpt-4o", 1, "beta question")]
    assert figures["top_entries"][0]["endpoint"] == "v1/chat/completions" and figures["top_entries"][0]["size"] > 0

    recent = figures["recent"]
    assert [record["cache_status"] for record in recent] == [None, "BYPASS", "HIT", "MISS", "HIT", "HIT", "MISS"]
    assert [record["status"] for record in recent[:3]] == [404, 400, 200]
    newest_hit = recent[2]
    assert newest_hit["path"] == "/v1/chat/completions" and newest_hit["model"] == "gpt-4o"
    assert newest_hit["provider"] == "openai" and len(newest_hit["key"]) == 12
    assert newest_hit["bytes"] > 0 and newest_hit["duration_ms"] > 0
    assert [record["at"] for record in recent] == sorted((record["at"] for record in recent), reverse=True)

    assert figures["capacity"] == {
        "entries": 2,
        "bytes": figures["stats"]["bytes"],
        "max_entries": 0,
        "max_bytes": 0,
    }
    assert figures["health"]["ok"] is True and figures["show_prompts"] is True
    assert not any(canary in json.dumps(figures) for canary in CANARIES)


@pytest.mark.both_backends
def test_every_proxy_on_one_store_adds_to_one_series_that_survives_a_restart(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    first, second = start_proxy(), start_proxy()
    assert post(first, CHAT) == "MISS"
    settled(first, 1)  # stored
    assert [post(second, CHAT), post(second, OTHER)] == ["HIT", "MISS"]
    settled(second, 3)  # and so written what it counted

    shared = dashboard(first)
    assert totals(shared["activity"]["hour"]["points"]) == (3, 1, 2)
    assert len(shared["recent"]) == 3
    assert [(entry["model"], entry["hits"]) for entry in shared["top_entries"]] == [("gpt-4o-mini", 1)]

    start_proxy.stop(first)
    start_proxy.stop(second)
    again = dashboard(start_proxy())
    assert totals(again["activity"]["hour"]["points"]) == (3, 1, 2)
    assert again["recent"] == shared["recent"]


def test_prompts_are_left_out_when_dashboard_show_prompts_is_false(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    base = start_proxy(dashboard_show_prompts=False)
    post(base, CHAT)
    post(base, CHAT)
    figures = dashboard(base)
    assert figures["show_prompts"] is False
    assert [entry["hits"] for entry in figures["top_entries"]] == [1]
    assert "prompt" not in figures["top_entries"][0] and "alpha" not in json.dumps(figures)


def test_capacity_shows_the_configured_caps(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    base = start_proxy(cache_max_entries=100, cache_max_bytes="1MB")
    post(base, CHAT)
    capacity = dashboard(base)["capacity"]
    assert (capacity["entries"], capacity["max_entries"], capacity["max_bytes"]) == (1, 100, 1024 * 1024)


def test_an_empty_cache_has_zero_series_and_no_entries(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    figures = dashboard(start_proxy())
    assert totals(figures["activity"]["hour"]["points"]) == (0, 0, 0)
    assert len(figures["activity"]["week"]["points"]) == 168
    assert (figures["top_entries"], figures["recent"], figures["stats"]["entries"]) == ([], [], 0)


def test_the_page_and_its_files_are_served_with_a_strict_content_security_policy(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    base = start_proxy()
    for path, media_type in [
        ("/dashboard", "text/html"),
        ("/dashboard/", "text/html"),
        ("/dashboard/dashboard.js", "text/javascript"),
        ("/dashboard/dashboard.css", "text/css"),
    ]:
        response = httpx.get(f"{base}{path}")
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(media_type)
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy
        assert response.headers["x-content-type-options"] == "nosniff"
    page = httpx.get(f"{base}/dashboard").text
    assert '<script type="module" src="/dashboard/dashboard.js">' in page
    assert not re.search(r"""(?:src|href)=["'](?:https?:)?//""", page), "nothing from another origin"
    missing = httpx.get(f"{base}/dashboard/../openai_proxy.py")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_route"
    assert httpx.get(f"{base}/dashboard/secrets.txt").status_code == 404


def test_with_an_admin_key_the_page_loads_but_its_figures_need_the_key(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    base = start_proxy(admin_api_key="admin-secret")
    assert httpx.get(f"{base}/dashboard").status_code == 200
    refused = httpx.get(f"{base}/cache/dashboard")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{base}/cache/dashboard", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert dashboard(base, authorization="Bearer admin-secret")["stats"]["entries"] == 0


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    ("client", "admin_key", "expected"),
    [
        pytest.param("127.0.0.1", None, 200, id="loopback"),
        pytest.param("203.0.113.9", None, 403, id="remote"),
        pytest.param("203.0.113.9", "admin-secret", 200, id="remote-with-an-admin-key-set"),
    ],
)
async def test_without_an_admin_key_only_loopback_clients_get_the_page(
    tmp_path: Path, client: str, admin_key: str | None, expected: int, anyio_backend: str
) -> None:
    settings = Settings(_env_file=None, cache_db=tmp_path / "c.db", admin_api_key=admin_key)  # type: ignore[call-arg]
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app, client=(client, 40000))
    async with app.lifespan():
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as http:
            page = await http.get("/dashboard")
            figures = await http.get("/cache/dashboard")
    assert page.status_code == expected
    assert figures.status_code == (200 if expected == 200 and admin_key is None else 401 if admin_key else 403)
    if expected == 403:
        assert page.json()["error"]["type"] == "permission_error"


def test_metrics_false_removes_the_metrics_route_and_nothing_else(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    base = start_proxy(metrics=False)
    assert [post(base, CHAT), post(base, CHAT)] == ["MISS", "HIT"]
    gone = httpx.get(f"{base}/metrics")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "unknown_route"
    assert dashboard(base)["stats"]["hits"] == 1


def test_a_flush_that_fails_keeps_activity_for_the_next_one(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    """Counted while the store refuses writes, written once it accepts them: nothing is lost."""
    base = start_proxy(cache_busy_timeout=0.05)
    holder = sqlite3.connect(start_proxy.tmp_path / "cache.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        for _ in range(3):
            post(base, b"not json")
        time.sleep(1.3)  # at least one periodic flush failed meanwhile
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert totals(settled(base, 3)["activity"]["hour"]["points"]) == (3, 0, 0)


@pytest.mark.parametrize("name", ["../static.py", "../../openai_proxy.py", "index.html", "/etc/passwd", "report.py"])
def test_the_page_serves_its_three_files_and_nothing_else(name: str) -> None:
    page = DashboardPage()
    assert page.response(name) is None
    assert {name for name in ("", "/", "dashboard.js", "dashboard.css") if page.response(name) is not None} == {
        "",
        "/",
        "dashboard.js",
        "dashboard.css",
    }
