"""Which upstream a request reaches, with which credential, and which requests are cached."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from providers import BUILTIN_PROVIDERS
from proxy.routes import OWN_PREFIXES, RESERVED_NAMES
from tests.conftest import PROXY_OPENAI_KEY, ProxyFactory
from tests.servers import FakeUpstream

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_v1_is_the_openai_prefix(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    base = start_proxy()
    first = httpx.post(f"{base}/v1/chat/completions", json=CHAT)
    second = httpx.post(f"{base}/openai/v1/chat/completions", json=CHAT)
    assert first.headers["x-cache-status"] == "MISS"
    assert second.headers["x-cache-status"] == "HIT"
    assert first.headers["x-cache-key"] == second.headers["x-cache-key"]
    assert upstream.requests[0].path == "/v1/chat/completions"


@pytest.mark.parametrize(
    "provider",
    [p.name for p in BUILTIN_PROVIDERS if p.name not in ("openai", "anthropic", "azure", "gemini", "bedrock")],
)
def test_every_builtin_provider_forwards_below_its_base_url(
    start_proxy: ProxyFactory, upstream: FakeUpstream, provider: str
) -> None:
    base = start_proxy(**{f"{provider}_base_url": f"{upstream.url}/root/v1", f"{provider}_api_key": "sk-p"})
    response = httpx.post(f"{base}/{provider}/v1/chat/completions?x=1", json=CHAT)
    assert response.status_code == 200
    assert response.headers["x-cache-status"] == "MISS"
    sent = upstream.requests[0]
    assert (sent.path, sent.query) == ("/root/v1/chat/completions", "x=1")
    assert sent.header_values("authorization") == ["Bearer sk-p"]


def test_providers_do_not_share_entries(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    base = start_proxy(groq_base_url=upstream.url)
    httpx.post(f"{base}/v1/chat/completions", json=CHAT)
    other = httpx.post(f"{base}/groq/v1/chat/completions", json=CHAT)
    assert other.headers["x-cache-status"] == "MISS"


def test_endpoints_do_not_share_entries(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    base = start_proxy()
    httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "hi"})
    chat = httpx.post(f"{base}/v1/chat/completions", json={"model": "m", "prompt": "hi"})
    assert chat.headers["x-cache-status"] == "MISS"


def test_extra_provider_from_configuration(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    extra = {"ollama": {"base_url": f"{upstream.url}/v1", "api_key": "sk-ollama"}}
    base = start_proxy(extra_providers=extra)
    response = httpx.post(f"{base}/ollama/v1/chat/completions", json=CHAT)
    again = httpx.post(f"{base}/ollama/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert again.headers["x-cache-status"] == "HIT"
    assert upstream.requests[0].path == "/v1/chat/completions"
    assert upstream.requests[0].header_values("authorization") == ["Bearer sk-ollama"]


def test_unknown_prefix_is_a_404_listing_the_known_ones(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    response = httpx.post(f"{start_proxy()}/nope/v1/chat/completions", json=CHAT)
    assert response.status_code == 404
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert "/anthropic/" in error["message"] and "/v1/" in error["message"]
    assert upstream.calls == 0


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/http://evil.example/v1/chat/completions", id="url-as-prefix"),
        pytest.param("//evil.example/v1/chat/completions", id="scheme-relative"),
        pytest.param("/openai@evil.example/v1/chat/completions", id="userinfo"),
    ],
)
def test_a_request_cannot_choose_the_upstream_host(
    start_proxy: ProxyFactory, upstream: FakeUpstream, path: str
) -> None:
    with httpx.Client() as http:
        request = http.build_request("POST", f"{start_proxy()}/", json=CHAT)
        request.url = request.url.copy_with(raw_path=path.encode())
        response = http.send(request)
    assert response.status_code == 404
    assert upstream.calls == 0


def test_host_is_the_upstreams(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    httpx.post(f"{start_proxy()}/v1/chat/completions", json=CHAT, headers={"host": "attacker.example"})
    assert upstream.requests[0].header("host") == upstream.url.removeprefix("http://")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        pytest.param("GET", "/v1/models", None, id="get-models"),
        pytest.param("POST", "/v1/threads/t1/messages", CHAT, id="not-a-generation-endpoint"),
        pytest.param("POST", "/v1/files", b"--x\r\n", id="multipart"),
        pytest.param("DELETE", "/v1/chat/completions/abc", None, id="delete"),
    ],
)
def test_non_cacheable_requests_are_forwarded_and_bypass(
    start_proxy: ProxyFactory, upstream: FakeUpstream, method: str, path: str, body: object
) -> None:
    base = start_proxy()
    content = body if isinstance(body, bytes) else json.dumps(body).encode() if body else None
    for _ in range(2):
        response = httpx.request(method, f"{base}{path}", content=content)
        assert response.status_code == 200
        assert response.headers["x-cache-status"] == "BYPASS"
        assert "x-cache-key" not in response.headers
    assert upstream.calls == 2
    assert upstream.requests[0].method == method
    assert upstream.requests[0].body == (content or b"")


def test_invalid_json_is_forwarded_unchanged_and_bypasses(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    response = httpx.post(
        f"{start_proxy()}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.headers["x-cache-status"] == "BYPASS"
    assert response.json()["error"]["message"] == "We could not parse the JSON body"
    assert upstream.requests[0].body == b"{not json"


def test_the_body_is_forwarded_byte_for_byte(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    raw = b'{"messages": [{"role": "user", "content": "hi"}],   "model": "m", "z": 1.50}'
    httpx.post(f"{start_proxy()}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert upstream.requests[0].body == raw


def test_override_model_replaces_the_model_forwarded(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    httpx.post(f"{start_proxy(override_model='local-llama')}/v1/chat/completions", json=CHAT)
    assert upstream.requests[0].json()["model"] == "local-llama"


class TestCredentials:
    def test_client_key_is_forwarded_when_the_proxy_has_none(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        base = start_proxy(openai_api_key=None)
        httpx.post(f"{base}/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-client-a"})
        assert upstream.requests[0].header_values("authorization") == ["Bearer sk-client-a"]

    def test_entries_are_scoped_to_the_client_credential(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        base = start_proxy(openai_api_key=None)
        url = f"{base}/v1/chat/completions"
        paid = httpx.post(url, json=CHAT, headers={"authorization": "Bearer sk-client-a"})
        same = httpx.post(url, json=CHAT, headers={"authorization": "Bearer sk-client-a"})
        other = httpx.post(url, json=CHAT, headers={"authorization": "Bearer sk-client-b"})
        keyless = httpx.post(url, json=CHAT)
        assert paid.headers["x-cache-status"] == "MISS"
        assert same.headers["x-cache-status"] == "HIT"
        assert other.headers["x-cache-status"] == "MISS"
        assert keyless.headers["x-cache-status"] == "MISS"
        assert len({paid.headers["x-cache-key"], other.headers["x-cache-key"], keyless.headers["x-cache-key"]}) == 3

    def test_the_proxy_key_makes_one_shared_cache(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        url = f"{start_proxy()}/v1/chat/completions"
        httpx.post(url, json=CHAT, headers={"authorization": "Bearer sk-client-a"})
        other = httpx.post(url, json=CHAT, headers={"authorization": "Bearer sk-client-b"})
        assert other.headers["x-cache-status"] == "HIT"

    def test_upstream_receives_exactly_one_credential(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        headers = [
            ("authorization", "Bearer a"),
            ("authorization", "Bearer b"),
            ("x-api-key", "c"),
            ("api-key", "d"),
        ]
        httpx.post(f"{start_proxy()}/v1/chat/completions", json=CHAT, headers=headers)
        sent = upstream.requests[0]
        assert sent.header_values("authorization") == [f"Bearer {PROXY_OPENAI_KEY}"]
        assert sent.header("x-api-key") is None and sent.header("api-key") is None

    def test_connection_header_cannot_strip_the_injected_key(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        headers = {"connection": "keep-alive, Authorization, X-Api-Key", "authorization": "Bearer sk-client"}
        httpx.post(f"{start_proxy()}/v1/chat/completions", json=CHAT, headers=headers)
        assert upstream.requests[0].header_values("authorization") == [f"Bearer {PROXY_OPENAI_KEY}"]

    def test_no_credential_is_stored(self, start_proxy: ProxyFactory, upstream: FakeUpstream, tmp_path) -> None:  # type: ignore[no-untyped-def]
        base = start_proxy(openai_api_key=None)
        httpx.post(f"{base}/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-client-SECRET"})
        httpx.get(f"{base}/cache/stats")  # answered after the entry was written
        database = (tmp_path / "cache.db").read_bytes() + (tmp_path / "cache.db-wal").read_bytes()
        assert b"sk-client-SECRET" not in database
        assert b"answer 1" in database


def test_credentials_never_reach_the_logs_or_error_bodies(
    start_proxy: ProxyFactory, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    base = start_proxy(openai_api_key=None)
    secret = "sk-client-LOGCANARY-91"
    headers = {"authorization": f"Bearer {secret}"}
    answers = [
        httpx.post(f"{base}/v1/chat/completions", json=CHAT, headers=headers),
        httpx.post(f"{base}/nope/v1/chat/completions", json=CHAT, headers=headers),
        httpx.post(f"{start_proxy(openai_base_url='http://127.0.0.1:9')}/v1/chat/completions", headers=headers),
    ]
    assert [answer.status_code for answer in answers] == [200, 404, 502]
    assert all(secret not in answer.text and secret not in str(answer.headers) for answer in answers)
    assert caplog.records, "the test must have captured some logging to mean anything"
    assert all(secret not in record.getMessage() for record in caplog.records)
    assert PROXY_OPENAI_KEY not in caplog.text


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        pytest.param("POST", "/healthz", 405, id="wrong-method-on-own-route"),
        pytest.param("GET", "/healthz/extra", 404, id="unknown-own-route"),
        pytest.param("POST", "/metrics", 405, id="wrong-method-on-metrics"),
        pytest.param("TRACE", "/cache/stats", 405, id="no-admin-route-has-this-method"),
        pytest.param("GET", "/", 404, id="root"),
    ],
)
def test_the_proxys_own_routes_answer_errors_in_openai_shape(
    start_proxy: ProxyFactory, upstream: FakeUpstream, method: str, path: str, status: int
) -> None:
    response = httpx.request(method, f"{start_proxy()}{path}")
    assert response.status_code == status
    assert set(response.json()["error"]) >= {"message", "type", "code"}
    assert upstream.calls == 0


def test_a_get_route_answers_head_only_where_it_says_so(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    base = start_proxy()
    assert httpx.head(f"{base}/healthz").status_code == 200
    assert httpx.head(f"{base}/metrics").status_code == 405
    assert httpx.head(f"{base}/dashboard").status_code == 405


def test_no_provider_may_take_the_first_segment_of_an_own_route() -> None:
    assert OWN_PREFIXES == {"healthz", "metrics", "dashboard", "cache"}
    assert OWN_PREFIXES < RESERVED_NAMES
    assert "v1" in RESERVED_NAMES
