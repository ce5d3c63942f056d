"""Expiry, size limits, per-request directives, namespaces, offline mode and access keys, end to end."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import PROXY_OPENAI_KEY, FakeClock, ProxyFactory, wait_until_stored
from tests.servers import FakeUpstream

pytestmark = pytest.mark.both_backends

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def chat(base: str, headers: dict[str, str] | None = None, content: str = "hi", **extra: Any) -> httpx.Response:
    body = {**CHAT, "messages": [{"role": "user", "content": content}], **extra}
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers or {}, timeout=10)


def status(response: httpx.Response) -> str:
    return response.headers["x-cache-status"]


class TestExpiry:
    def test_an_entry_older_than_cache_ttl_is_refetched_as_expired(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, clock: FakeClock
    ) -> None:
        base = start_proxy(clock=clock, cache_ttl=60)
        assert status(chat(base)) == "MISS"
        wait_until_stored(base, 1)
        clock.advance(59)
        assert status(chat(base)) == "HIT"
        clock.advance(1)
        expired = chat(base)
        assert status(expired) == "EXPIRED"
        assert expired.json()["choices"][0]["message"]["content"] == "answer 2"
        fresh = chat(base)
        assert status(fresh) == "HIT", "the expired entry was replaced"
        assert fresh.json()["choices"][0]["message"]["content"] == "answer 2"
        assert fresh.headers["age"] == "0"

    def test_without_ttl_entries_never_expire(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, clock: FakeClock
    ) -> None:
        base = start_proxy(clock=clock)
        chat(base)
        wait_until_stored(base, 1)
        clock.advance(10 * 365 * 86400)
        hit = chat(base)
        assert status(hit) == "HIT"
        assert int(hit.headers["age"]) == 10 * 365 * 86400

    def test_x_cache_ttl_gives_an_entry_its_own_lifetime(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, clock: FakeClock
    ) -> None:
        base = start_proxy(clock=clock, cache_ttl=60)
        chat(base, {"x-cache-ttl": "3600"}, content="long")
        chat(base, {"x-cache-ttl": "5"}, content="short")
        wait_until_stored(base, 2)
        clock.advance(30)
        assert status(chat(base, content="long")) == "HIT"
        assert status(chat(base, content="short")) == "EXPIRED"
        clock.advance(1000)
        assert status(chat(base, content="long")) == "HIT"

    def test_an_entry_ages_from_when_the_provider_answered_not_from_when_it_was_stored(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, clock: FakeClock
    ) -> None:
        base = start_proxy(clock=clock)
        upstream.chunk_delay = 0.1
        body = {**CHAT, "stream": True}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=10) as streamed:
            assert status(streamed) == "MISS"
            clock.advance(100)  # while the answer is still streaming, long before it is stored
            streamed.read()
        upstream.chunk_delay = 0
        deadline = time.monotonic() + 3
        while status(hit := chat(base, {"cache-control": "only-if-cached"}, stream=True)) != "HIT":
            assert time.monotonic() < deadline, "the streamed answer was never stored"
            time.sleep(0.05)
        assert hit.headers["age"] == "100"

    def test_max_age_accepts_only_younger_entries(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, clock: FakeClock
    ) -> None:
        base = start_proxy(clock=clock)
        chat(base)
        wait_until_stored(base, 1)
        clock.advance(100)
        assert status(chat(base, {"cache-control": "max-age=200"})) == "HIT"
        assert status(chat(base, {"cache-control": "max-age=50"})) == "EXPIRED"
        assert status(chat(base, {"cache-control": "max-age=50"})) == "HIT", "refetched just now"


class TestSizeLimits:
    def test_least_recently_used_entries_are_evicted(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, clock: FakeClock
    ) -> None:
        base = start_proxy(clock=clock, cache_max_entries=2)
        chat(base, content="a")
        clock.advance(1)
        chat(base, content="b")
        wait_until_stored(base, 2)
        clock.advance(1)
        assert status(chat(base, content="a")) == "HIT"  # "a" is now the more recently used
        httpx.get(f"{base}/cache/stats")  # flushes the hit, which records the use
        clock.advance(1)
        chat(base, content="c")  # evicts "b", once stored (just after the answer)
        deadline = time.monotonic() + 3
        while status(chat(base, {"cache-control": "only-if-cached"}, content="b")) != "MISS":
            assert time.monotonic() < deadline, '"b" was never evicted'
            time.sleep(0.05)
        assert status(chat(base, content="a")) == "HIT"
        assert status(chat(base, content="c")) == "HIT"
        assert status(chat(base, content="b")) == "MISS"
        stats = httpx.get(f"{base}/cache/stats").json()
        assert stats["entries"] == 2
        assert stats["evictions"] >= 1

    def test_the_byte_cap_holds(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        base = start_proxy(cache_max_bytes="1KB")
        for number in range(8):
            chat(base, content=f"prompt {number}")
        assert httpx.get(f"{base}/cache/stats").json()["bytes"] <= 1024


class TestRequestDirectives:
    def test_no_cache_refetches_and_replaces(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        base = start_proxy()
        chat(base)
        refreshed = chat(base, {"cache-control": "no-cache"})
        assert status(refreshed) == "REFRESH"
        assert refreshed.json()["choices"][0]["message"]["content"] == "answer 2"
        assert chat(base).json()["choices"][0]["message"]["content"] == "answer 2"

    def test_no_store_does_not_store(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        base = start_proxy()
        assert status(chat(base, {"cache-control": "no-store"})) == "MISS"
        assert status(chat(base)) == "MISS"
        assert status(chat(base, {"cache-control": "no-store"})) == "HIT", "no-store still reads"

    def test_only_if_cached_never_contacts_the_upstream(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        base = start_proxy()
        missing = chat(base, {"cache-control": "only-if-cached"})
        assert missing.status_code == 504
        assert missing.json()["error"]["code"] == "not_cached"
        assert "not in the cache" in missing.json()["error"]["message"].lower()
        assert upstream.calls == 0
        chat(base)
        assert status(chat(base, {"cache-control": "only-if-cached"})) == "HIT"

    def test_namespaces_partition_the_cache(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        base = start_proxy()
        chat(base, {"x-cache-namespace": "suite-a"})
        assert status(chat(base, {"x-cache-namespace": "suite-a"})) == "HIT"
        assert status(chat(base, {"x-cache-namespace": "suite-b"})) == "MISS"
        assert status(chat(base)) == "MISS"

    def test_the_sdk_sends_directives_as_extra_headers(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        sdk = openai.OpenAI(
            base_url=f"{start_proxy()}/v1",
            api_key="dummy",
            max_retries=0,
            default_headers={"X-Cache-Namespace": "experiment-42"},
        )
        sdk.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        with pytest.raises(openai.APIStatusError) as raised:
            sdk.chat.completions.create(
                **{**CHAT, "messages": [{"role": "user", "content": "new"}]},  # type: ignore[arg-type]
                extra_headers={"Cache-Control": "only-if-cached"},
            )
        assert raised.value.status_code == 504
        again = sdk.chat.completions.with_raw_response.create(**CHAT)  # type: ignore[call-overload]
        assert again.headers["x-cache-status"] == "HIT"

    @pytest.mark.parametrize(
        ("headers", "named"),
        [
            pytest.param({"cache-control": "max-age=-5"}, "max-age", id="negative-max-age"),
            pytest.param({"cache-control": "max-age=abc"}, "max-age", id="text-max-age"),
            pytest.param({"x-cache-namespace": "n" * 10_000}, "X-Cache-Namespace", id="10kB-namespace"),
            pytest.param({"x-cache-namespace": "a b"}, "X-Cache-Namespace", id="space-in-namespace"),
            pytest.param({"x-cache-ttl": "-1"}, "X-Cache-TTL", id="negative-ttl"),
        ],
    )
    def test_garbage_values_are_a_400(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, headers: dict[str, str], named: str
    ) -> None:
        response = chat(start_proxy(), headers)
        assert response.status_code == 400
        assert named in response.json()["error"]["message"]
        assert upstream.calls == 0


class TestModes:
    def test_respond_with_cache_false_always_asks_the_upstream(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        base = start_proxy(respond_with_cache=False)
        assert [status(chat(base)) for _ in range(2)] == ["MISS", "MISS"]
        assert upstream.calls == 2

    def test_store_cache_false_stores_nothing(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        base = start_proxy(store_cache=False)
        assert [status(chat(base)) for _ in range(2)] == ["MISS", "MISS"]

    def test_offline_mode_replays_and_never_calls_upstream(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, tmp_path: Any
    ) -> None:
        database = tmp_path / "fixtures.db"
        chat(start_proxy(cache_db=database))
        offline = start_proxy(cache_db=database, cache_offline=True, openai_api_key=None)
        assert status(chat(offline)) == "HIT"
        missing = chat(offline, content="never recorded")
        assert missing.status_code == 504
        assert "offline" in missing.json()["error"]["message"].lower()
        models = httpx.get(f"{offline}/v1/models")
        assert models.status_code == 504
        streamed = chat(offline, stream=True)
        assert status(streamed) == "HIT"
        assert upstream.calls == 1


class TestProxyApiKeys:
    def test_requests_without_a_valid_key_are_refused(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        base = start_proxy(proxy_api_keys="team-key-1,team-key-2")
        for headers in ({}, {"authorization": "Bearer wrong"}, {"x-api-key": "team-key-3"}):
            refused = chat(base, headers)
            assert refused.status_code == 401
            assert refused.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert upstream.calls == 0
        assert httpx.get(f"{base}/healthz").status_code == 200

    def test_a_valid_key_is_accepted_and_never_forwarded(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        base = start_proxy(proxy_api_keys="team-key-1,team-key-2")
        assert chat(base, {"authorization": "Bearer team-key-2"}).status_code == 200
        assert status(chat(base, {"x-api-key": "team-key-1"})) == "HIT", "one shared cache for all proxy keys"
        sent = upstream.requests[0]
        assert sent.header_values("authorization") == [f"Bearer {PROXY_OPENAI_KEY}"]
        assert "team-key" not in str(sent.headers)

    @pytest.mark.parametrize("header", ["api-key", "x-goog-api-key"])
    def test_the_key_headers_of_azure_and_gemini_clients_present_it_too(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, header: str
    ) -> None:
        base = start_proxy(proxy_api_keys="team-key-1")
        assert chat(base, {header: "team-key-1"}).status_code == 200
        assert chat(base, {header: "team-key-9"}).status_code == 401
        assert "team-key" not in str(upstream.requests[0].headers)

    def test_without_a_provider_key_the_proxy_key_still_stays_here(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        base = start_proxy(proxy_api_keys="team-key-1", openai_api_key=None)
        chat(base, {"authorization": "Bearer team-key-1"})
        assert upstream.requests[0].header("authorization") is None
