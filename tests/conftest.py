from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from openai_proxy import create_app
from proxy.server import HttpProtocol
from proxy.settings import Settings
from tests.servers import FakeUpstream, ServerThread

# Keys the proxy holds in tests. They must never show up anywhere but in the upstream's headers.
PROXY_OPENAI_KEY = "sk-proxy-openai-CANARY-0f3e"
PROXY_ANTHROPIC_KEY = "sk-ant-proxy-CANARY-77a1"
# Client credentials some tests send; forwarded upstream, never written anywhere else either.
PROXY_CLIENT_KEY = "proxy-client-CANARY-5d21"
CLIENT_CANARIES = (PROXY_CLIENT_KEY, "sk-client-LOGCANARY-91", "sk-client-SECRET", "sk-client-a", "sk-client-b")
CANARIES = (PROXY_OPENAI_KEY, PROXY_ANTHROPIC_KEY, *CLIENT_CANARIES)


class CanaryWatch(logging.Handler):
    """Sees every log record of the run, at every level, and keeps those that show a canary key."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        if any(canary in text for canary in CANARIES):
            self.leaks.append(f"{record.name} {record.levelname}: {text}")


@pytest.fixture(scope="session")
def canary_watch() -> Iterator[CanaryWatch]:
    watch = CanaryWatch()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(watch)
    root.setLevel(logging.DEBUG)
    yield watch
    root.removeHandler(watch)
    root.setLevel(previous)


@pytest.fixture(autouse=True)
def no_canary_in_the_logs(canary_watch: CanaryWatch) -> Iterator[None]:
    """Every test, at every log level: no log line or logged exception shows a key."""
    seen = len(canary_watch.leaks)
    yield
    leaks = canary_watch.leaks[seen:]
    assert not leaks, f"a credential reached the log: {leaks[0][:300]}"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting leaks in from the machine's environment or a .env file."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[FakeUpstream]:
    """One fake upstream server for the whole run; each test gets it reset (see `upstream`)."""
    fake = FakeUpstream()
    server = ServerThread(fake.app()).start()
    fake.url = server.url
    yield fake
    server.stop()


@pytest.fixture
def upstream(upstream_server: FakeUpstream) -> FakeUpstream:
    upstream_server.reset()
    return upstream_server


class ProxyFactory:
    """Starts the proxy as a real server on a loopback port and returns its base URL.

    By default it fronts the fake upstream for openai and anthropic and holds a key for each.
    """

    def __init__(self, upstream: FakeUpstream, tmp_path: Path) -> None:
        self.upstream = upstream
        self.tmp_path = tmp_path
        self.servers: dict[str, ServerThread] = {}

    def __call__(self, clock: Callable[[], float] = time.time, **overrides: Any) -> str:
        values: dict[str, Any] = {
            "openai_base_url": self.upstream.url,
            "anthropic_base_url": self.upstream.url,
            "openai_api_key": PROXY_OPENAI_KEY,
            "anthropic_api_key": PROXY_ANTHROPIC_KEY,
            "cache_db": self.tmp_path / "cache.db",
        }
        values.update(overrides)
        settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
        server = ServerThread(create_app(settings, clock=clock), http=HttpProtocol).start()
        self.servers[server.url] = server
        return server.url

    def stop(self, url: str) -> None:
        """Shut one proxy down the way a signal would: its lifespan ends and flushes what it holds."""
        self.servers.pop(url).stop()


@pytest.fixture
def start_proxy(upstream: FakeUpstream, tmp_path: Path) -> Iterator[ProxyFactory]:
    factory = ProxyFactory(upstream, tmp_path)
    yield factory
    for server in factory.servers.values():
        server.stop()


@dataclass
class FakeClock:
    """A clock the tests move by hand, so expiry is tested without sleeping."""

    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
