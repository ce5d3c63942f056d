from __future__ import annotations

import functools
import logging
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx._transports.default as httpx_transports
import pytest

from openai_proxy import create_app
from proxy.server import HttpProtocol
from proxy.settings import Settings
from tests.redis_servers import RedisCluster, RedisServer
from tests.servers import FakeUpstream, ServerThread

# Keys the proxy holds in tests. They must never show up anywhere but in the upstream's headers.
PROXY_OPENAI_KEY = "sk-proxy-openai-CANARY-0f3e"
PROXY_ANTHROPIC_KEY = "sk-ant-proxy-CANARY-77a1"
PROXY_AZURE_KEY = "azure-proxy-CANARY-4b8e"
PROXY_GEMINI_KEY = "gemini-proxy-CANARY-e61f"
# Client credentials some tests send; forwarded upstream, never written anywhere else either.
PROXY_CLIENT_KEY = "proxy-client-CANARY-5d21"
CLIENT_CANARIES = (PROXY_CLIENT_KEY, "sk-client-LOGCANARY-91", "sk-client-SECRET", "sk-client-a", "sk-client-b")
# The password of a Redis server some tests start; part of REDIS_URL, so a credential too.
REDIS_PASSWORD = "redis-pw-CANARY-3c9d"
CANARIES = (
    PROXY_OPENAI_KEY,
    PROXY_ANTHROPIC_KEY,
    PROXY_AZURE_KEY,
    PROXY_GEMINI_KEY,
    "aws-proxy-secret-CANARY-2a7d",  # tests/test_bedrock.py's AWS secret and session token
    "aws-proxy-token-CANARY-81c0",
    REDIS_PASSWORD,
    *CLIENT_CANARIES,
)


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


@pytest.fixture(scope="session", autouse=True)
def one_default_tls_context() -> Iterator[None]:
    """Every httpx client (the SDKs' too) builds a TLS context with the system's CA certificates, about
    50 ms each; the tests build thousands of clients and speak no TLS, so they share one."""
    create = httpx_transports.create_ssl_context

    @functools.cache
    def default_context(trust_env: bool) -> ssl.SSLContext:
        return create(trust_env=trust_env)

    def shared(verify: Any = True, cert: Any = None, trust_env: bool = True) -> ssl.SSLContext:
        if verify is True and cert is None:
            return default_context(trust_env)
        return create(verify=verify, cert=cert, trust_env=trust_env)

    httpx_transports.create_ssl_context = shared
    yield
    httpx_transports.create_ssl_context = create


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
    # botocore's credential chain (Bedrock) reads files and asks an instance's metadata service: neither here.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[FakeUpstream]:
    """One fake upstream server for the whole run; each test gets it reset (see `upstream`)."""
    fake = FakeUpstream()
    # uvicorn's default idle timeout, as behind vLLM: the proxy must not reuse a connection being closed.
    server = ServerThread(fake.app(), keep_alive=5).start()
    fake.url = server.url
    yield fake
    server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A Redis server of the run's own, on a free port; tests share it through key prefixes of their own."""
    server = RedisServer().start()
    yield server
    server.remove()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A Redis Cluster of three servers of the run's own."""
    cluster = RedisCluster().start()
    yield cluster
    cluster.remove()


@pytest.fixture
def upstream(upstream_server: FakeUpstream) -> FakeUpstream:
    upstream_server.reset()
    return upstream_server


class ProxyFactory:
    """Starts the proxy as a real server on a loopback port and returns its base URL.

    By default it fronts the fake upstream for openai and anthropic and holds a key for each.
    """

    def __init__(self, upstream: FakeUpstream, tmp_path: Path, store: dict[str, Any]) -> None:
        """`store`: the settings that choose the cache store (SQLite in the test's directory by default)."""
        self.upstream = upstream
        self.tmp_path = tmp_path
        self.store = store
        self.servers: dict[str, ServerThread] = {}

    def __call__(self, clock: Callable[[], float] = time.time, **overrides: Any) -> str:
        values: dict[str, Any] = {
            "openai_base_url": self.upstream.url,
            "anthropic_base_url": self.upstream.url,
            "openai_api_key": PROXY_OPENAI_KEY,
            "anthropic_api_key": PROXY_ANTHROPIC_KEY,
            "cache_db": self.tmp_path / "cache.db",
            **self.store,
        }
        values.update(overrides)
        settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
        server = ServerThread(create_app(settings, clock=clock), http=HttpProtocol).start()
        self.servers[server.url] = server
        return server.url

    def stop(self, url: str) -> None:
        """Shut one proxy down the way a signal would: its lifespan ends and flushes what it holds."""
        self.servers.pop(url).stop()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `both_backends` run once on SQLite and once on Redis."""
    if metafunc.definition.get_closest_marker("both_backends") and "start_proxy" in metafunc.fixturenames:
        metafunc.parametrize("cache_backend", ["sqlite", "redis"], indirect=True)


@pytest.fixture
def cache_backend(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def store_settings(cache_backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Settings for the test's own cache store: a SQLite file in its directory, or a key prefix of its
    own in the run's Redis server."""
    if cache_backend == "sqlite":
        return {}
    server: RedisServer = request.getfixturevalue("redis_server")
    return {
        "cache_backend": "redis",
        "redis_url": server.url,
        "redis_key_prefix": f"test-{tmp_path.name}",
        # A busy test machine can hold an event loop for longer than the default; outage tests set their own.
        "redis_timeout": 2.0,
    }


def as_environment(settings: dict[str, Any]) -> dict[str, str]:
    """The same settings as environment variables, for a proxy or a command run as a process."""
    return {name.upper(): str(value) for name, value in settings.items()}


@pytest.fixture
def start_proxy(upstream: FakeUpstream, tmp_path: Path, store_settings: dict[str, Any]) -> Iterator[ProxyFactory]:
    factory = ProxyFactory(upstream, tmp_path, store_settings)
    yield factory
    for server in factory.servers.values():
        # Not waited for: a test that needs the shutdown done (its flush, say) stops its proxy itself.
        server.stop(wait=False)


@dataclass
class FakeClock:
    """A clock the tests move by hand, so expiry is tested without sleeping."""

    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_until_stored(base: str, entries: int) -> None:
    """Answers are stored just after they were sent; wait for that before moving the clock."""
    deadline = time.monotonic() + 5
    while httpx.get(f"{base}/cache/stats").json()["entries"] < entries:
        assert time.monotonic() < deadline, "the entry was never stored"
        time.sleep(0.02)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
