from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from openai_proxy import create_app
from proxy.settings import Settings
from tests.servers import FakeUpstream, ServerThread

# Keys the proxy holds in tests. They must never show up anywhere but in the upstream's headers.
PROXY_OPENAI_KEY = "sk-proxy-openai-CANARY-0f3e"
PROXY_ANTHROPIC_KEY = "sk-ant-proxy-CANARY-77a1"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting leaks in from the machine's environment or a .env file."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    server = ServerThread(fake.app()).start()
    fake.url = server.url
    yield fake
    server.stop()


ProxyFactory = Callable[..., str]


@pytest.fixture
def start_proxy(upstream: FakeUpstream, tmp_path: Path) -> Iterator[ProxyFactory]:
    """Start the proxy as a real server on a loopback port; returns its base URL.

    By default it fronts the fake upstream for openai and anthropic and holds a key for each.
    """
    servers: list[ServerThread] = []

    def start(**overrides: Any) -> str:
        values: dict[str, Any] = {
            "openai_base_url": upstream.url,
            "anthropic_base_url": upstream.url,
            "openai_api_key": PROXY_OPENAI_KEY,
            "anthropic_api_key": PROXY_ANTHROPIC_KEY,
            "cache_db": tmp_path / "cache.db",
        }
        values.update(overrides)
        settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
        server = ServerThread(create_app(settings)).start()
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.stop()
