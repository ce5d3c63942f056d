"""The dashboard page in a real headless Chromium (Debian's `chromium`), driven with Playwright.

Screenshots go to test-artifacts/ (ignored by git) for a person to look at.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from tests.conftest import ProxyFactory
from tests.servers import FakeUpstream

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 740}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (.ci/run does)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


class Problems(list[str]):
    """Console errors and warnings, and uncaught exceptions, of one page."""

    def watch(self, page: Page) -> Page:
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.append(f"uncaught: {error}"))
        return page

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.append(f"{message.type}: {message.text}")


@pytest.fixture
def page(browser: Browser) -> Iterator[tuple[Page, Problems]]:
    context = browser.new_context(viewport=DESKTOP)
    problems = Problems()
    yield problems.watch(context.new_page()), problems
    context.close()


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def chat(base: str, content: str, **headers: str) -> str:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers).headers["x-cache-status"]


def counted(base: str, requests: int, **headers: str) -> dict[str, Any]:
    """GET /cache/stats once the proxy has counted `requests` lookups (a miss counts after it is stored)."""
    deadline = time.monotonic() + 5
    while (stats := httpx.get(f"{base}/cache/stats", headers=headers).json())["hits"] + stats["misses"] < requests:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return dict(stats)


def polyline_points(page: Page, series: str) -> int:
    points = page.get_attribute(f'#activity-chart polyline[data-series="{series}"]', "points") or ""
    return len(points.split())


def no_horizontal_scroll(page: Page) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


def test_an_empty_cache_shows_how_to_start_not_a_broken_chart(
    start_proxy: ProxyFactory, upstream: FakeUpstream, page: tuple[Page, Problems]
) -> None:
    base = start_proxy()
    tab, problems = page
    tab.goto(f"{base}/dashboard")
    tab.wait_for_selector("#empty-state", state="visible")
    assert f"{base}/v1" in tab.inner_text("#empty-state")
    assert tab.is_hidden("#activity") and tab.is_hidden("#top-entries")
    assert "NaN" not in tab.inner_html("body")
    screenshot(tab, "dashboard-empty.png")
    tab.set_viewport_size(PHONE)
    assert no_horizontal_scroll(tab)
    assert problems == []


@pytest.mark.both_backends
def test_the_page_shows_the_figures_of_cache_stats_and_a_point_per_period(
    start_proxy: ProxyFactory, upstream: FakeUpstream, page: tuple[Page, Problems]
) -> None:
    base = start_proxy()
    for content in ["What is the capital of France?", "Translate 'cat' into German"]:
        assert [chat(base, content), chat(base, content), chat(base, content)] == ["MISS", "HIT", "HIT"]
    stats = counted(base, 6)
    tab, problems = page
    tab.goto(f"{base}/dashboard")
    tab.wait_for_selector(f'#hits[data-value="{stats["hits"]}"]')

    shown = {
        name: tab.get_attribute(f"#{name}", "data-value")
        for name in ["hit-ratio", "hits", "misses", "entries", "bytes", "tokens-saved", "cost-saved", "time-saved"]
    }
    assert {name: float(value or "nan") for name, value in shown.items()} == {
        "hit-ratio": stats["hit_ratio"],
        "hits": stats["hits"],
        "misses": stats["misses"],
        "entries": stats["entries"],
        "bytes": stats["bytes"],
        "tokens-saved": stats["tokens_saved"]["total"],
        "cost-saved": stats["cost_saved_usd"],
        "time-saved": stats["upstream_seconds_saved"],
    }
    assert tab.inner_text("#hits") == "4" and tab.inner_text("#hit-ratio") == "66.7%"
    assert tab.inner_text("#tokens-saved") == f"{stats['tokens_saved']['total']:,}"

    assert [polyline_points(tab, series) for series in ("requests", "hits", "misses")] == [60, 60, 60]
    tab.click("#range-week")
    assert [polyline_points(tab, series) for series in ("requests", "hits", "misses")] == [168, 168, 168]
    tab.click("#range-hour")

    rows = tab.locator("#top-entries tbody tr")
    assert rows.count() == 2 and "What is the capital of France?" in tab.inner_text("#top-entries")
    assert tab.locator("#recent tbody tr").count() == 6
    assert tab.locator("#by-model tbody tr").count() == 1 and "gpt-4o-mini" in tab.inner_text("#by-model")
    assert tab.is_hidden("#empty-state")
    screenshot(tab, f"dashboard-1280x800-{start_proxy.store.get('cache_backend', 'sqlite')}.png")

    tab.set_viewport_size(PHONE)
    tab.wait_for_timeout(100)
    assert no_horizontal_scroll(tab)
    screenshot(tab, "dashboard-375-phone.png")
    assert problems == []


def test_the_page_refreshes_itself(
    start_proxy: ProxyFactory, upstream: FakeUpstream, page: tuple[Page, Problems]
) -> None:
    base = start_proxy()
    chat(base, "first")
    counted(base, 1)
    tab, problems = page
    tab.goto(f"{base}/dashboard?refresh=1")
    tab.wait_for_selector('#misses[data-value="1"]')
    assert chat(base, "first") == "HIT"
    tab.wait_for_selector('#hits[data-value="1"]', timeout=5000)
    tab.wait_for_selector("#recent tbody tr >> nth=1")
    assert problems == []


@pytest.mark.parametrize(
    ("settings", "key", "named"),
    [
        pytest.param({"admin_api_key": "admin-secret"}, "admin-secret", "ADMIN_API_KEY", id="admin-key"),
        # Without ADMIN_API_KEY, loopback clients use a proxy key when the proxy requires one.
        pytest.param({"proxy_api_keys": "team-key"}, "team-key", "proxy API key", id="proxy-key"),
    ],
)
def test_a_page_that_needs_a_key_asks_for_it_once_per_browser_session(
    start_proxy: ProxyFactory,
    upstream: FakeUpstream,
    page: tuple[Page, Problems],
    settings: dict[str, str],
    key: str,
    named: str,
) -> None:
    base = start_proxy(**settings)
    chat(base, "hello", authorization=f"Bearer {key}")
    counted(base, 1, authorization=f"Bearer {key}")
    tab, problems = page
    tab.goto(f"{base}/dashboard")
    tab.wait_for_selector("#key-form", state="visible")
    tab.fill("#admin-key", "wrong-key")
    tab.press("#admin-key", "Enter")
    tab.wait_for_selector("#auth-error", state="visible")
    assert named in tab.inner_text("#auth-error")

    tab.fill("#admin-key", key)
    tab.press("#admin-key", "Enter")
    tab.wait_for_selector('#misses[data-value="1"]')
    assert tab.evaluate("sessionStorage.getItem('openai-proxy-admin-key')") == key
    assert tab.evaluate("localStorage.length") == 0
    tab.reload()
    tab.wait_for_selector('#misses[data-value="1"]')
    assert tab.is_hidden("#key-form")
    # Chromium itself reports each refused fetch; the page adds nothing of its own.
    assert [problem for problem in problems if "status of 401" not in problem] == []


def test_a_store_that_cannot_be_read_is_named_on_the_page(
    start_proxy: ProxyFactory, upstream: FakeUpstream, page: tuple[Page, Problems], tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    base = start_proxy(cache_db=tmp_path / "a-file" / "cache.db")
    tab, problems = page
    tab.goto(f"{base}/dashboard")
    tab.wait_for_selector("#connection", state="visible")
    assert "cache store is unavailable" in tab.inner_text("#connection")
    assert "cache store is unavailable" in tab.inner_text("#loading")
    assert [problem for problem in problems if "status of 503" not in problem] == []
