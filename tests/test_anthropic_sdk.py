"""End to end through the official anthropic SDK, with base_url pointed at /anthropic."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from tests.conftest import PROXY_ANTHROPIC_KEY, ProxyFactory
from tests.servers import FakeUpstream

pytestmark = pytest.mark.both_backends

MESSAGES = [{"role": "user", "content": "Say hi"}]


def client(base_url: str, **auth: str) -> anthropic.Anthropic:
    auth = auth or {"api_key": "sk-ant-dummy"}
    return anthropic.Anthropic(base_url=f"{base_url}/anthropic", max_retries=0, **auth)  # type: ignore[arg-type]


def test_miss_then_hit(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    sdk = client(start_proxy())
    first = sdk.messages.with_raw_response.create(model="claude-test-a", max_tokens=100, messages=MESSAGES)
    second = sdk.messages.with_raw_response.create(
        model="claude-test-b", max_tokens=20, messages=MESSAGES, extra_body={"temperature": 1.0}
    )
    assert first.headers["x-cache-status"] == "MISS"
    assert second.headers["x-cache-status"] == "HIT"
    assert first.parse().model_dump() == second.parse().model_dump()
    assert second.parse().content[0].text == "answer 1"  # type: ignore[union-attr]
    assert upstream.calls == 1
    assert upstream.requests[0].path == "/v1/messages"


def test_system_prompt_is_part_of_the_conversation(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    sdk = client(start_proxy())
    sdk.messages.create(model="m", max_tokens=10, system="Be brief.", messages=MESSAGES)
    as_blocks = sdk.messages.with_raw_response.create(
        model="m", max_tokens=10, system=[{"type": "text", "text": "Be brief."}], messages=MESSAGES
    )
    other = sdk.messages.with_raw_response.create(model="m", max_tokens=10, system="Be verbose.", messages=MESSAGES)
    assert as_blocks.headers["x-cache-status"] == "HIT"
    assert other.headers["x-cache-status"] == "MISS"


def test_proxy_key_replaces_x_api_key(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    client(start_proxy()).messages.create(model="m", max_tokens=10, messages=MESSAGES)
    sent = upstream.requests[0]
    assert sent.header_values("x-api-key") == [PROXY_ANTHROPIC_KEY]
    assert sent.header("authorization") is None
    assert len(sent.header_values("anthropic-version")) == 1, "the SDK's own version is kept, not doubled"


def test_requests_without_a_version_get_the_default_one(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    body = {"model": "m", "max_tokens": 10, "messages": MESSAGES}
    response = httpx.post(f"{start_proxy()}/anthropic/v1/messages", json=body)
    assert response.status_code == 200
    assert upstream.requests[0].header_values("anthropic-version") == ["2023-06-01"]


def test_bearer_credential_from_the_sdk_is_replaced_too(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    client(start_proxy(), auth_token="client-oauth-token").messages.create(model="m", max_tokens=10, messages=MESSAGES)
    sent = upstream.requests[0]
    assert sent.header_values("x-api-key") == [PROXY_ANTHROPIC_KEY]
    assert sent.header("authorization") is None


def test_client_credential_is_forwarded_when_the_proxy_has_none(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    base = start_proxy(anthropic_api_key=None)
    client(base, auth_token="client-oauth-token").messages.create(model="m", max_tokens=10, messages=MESSAGES)
    httpx.post(
        f"{base}/anthropic/v1/messages",
        json={"model": "m", "max_tokens": 10, "messages": MESSAGES},
        headers={"x-api-key": "sk-ant-client"},
    )
    assert upstream.requests[0].header_values("authorization") == ["Bearer client-oauth-token"]
    assert upstream.requests[1].header_values("x-api-key") == ["sk-ant-client"]
    assert upstream.requests[1].header("authorization") is None
