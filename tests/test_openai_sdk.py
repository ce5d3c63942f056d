"""End to end through the official openai SDK: the proxy as a real server, a fake upstream behind it."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import PROXY_OPENAI_KEY, ProxyFactory
from tests.servers import FakeUpstream

pytestmark = pytest.mark.both_backends

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]


def client(base_url: str, key: str = "sk-dummy") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)


def test_miss_then_hit_gives_identical_parsed_results(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    sdk = client(start_proxy())
    first = sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    second = sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)

    assert first.headers["x-cache-status"] == "MISS"
    assert second.headers["x-cache-status"] == "HIT"
    assert second.headers["x-cache-key"] == first.headers["x-cache-key"]
    assert int(second.headers["age"]) >= 0
    assert first.parse().model_dump() == second.parse().model_dump()
    assert second.parse().choices[0].message.content == "answer 1"
    assert upstream.calls == 1


def test_other_model_and_temperature_still_hit(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    sdk = client(start_proxy())
    sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, temperature=0)
    again = sdk.chat.completions.with_raw_response.create(
        model="gpt-4.1", messages=MESSAGES, temperature=0.9, top_p=0.5, max_tokens=50, user="someone"
    )
    assert again.headers["x-cache-status"] == "HIT"
    assert upstream.calls == 1


def test_different_conversation_is_a_miss(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    sdk = client(start_proxy())
    sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    other = sdk.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[*MESSAGES[:1], {"role": "user", "content": "Say bye"}]
    )
    assert other.headers["x-cache-status"] == "MISS"
    assert other.parse().choices[0].message.content == "answer 2"


def test_string_and_text_part_content_share_an_entry(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    sdk = client(start_proxy())
    sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    parts = sdk.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    )
    assert parts.headers["x-cache-status"] == "HIT"


def test_proxy_key_replaces_the_client_key(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    client(start_proxy(), key="sk-client-dummy").chat.completions.create(model="m", messages=MESSAGES)
    sent = upstream.requests[0]
    assert sent.header_values("authorization") == [f"Bearer {PROXY_OPENAI_KEY}"]
    assert sent.header("x-api-key") is None


def test_embeddings_are_cached_per_model(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    sdk = client(start_proxy())
    first = sdk.embeddings.create(model="text-embedding-3-small", input="hello", encoding_format="float")
    hit = sdk.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input="hello", encoding_format="float"
    )
    other_model = sdk.embeddings.with_raw_response.create(
        model="text-embedding-3-large", input="hello", encoding_format="float"
    )
    assert hit.headers["x-cache-status"] == "HIT"
    assert hit.parse().data[0].embedding == first.data[0].embedding
    assert other_model.headers["x-cache-status"] == "MISS"
    assert upstream.calls == 2


def test_models_list_is_passed_through(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    response = client(start_proxy()).models.with_raw_response.list()
    assert response.headers["x-cache-status"] == "BYPASS"
    assert [model.id for model in response.parse()] == ["gpt-4o-mini"]
    assert upstream.requests[0].method == "GET"
    assert upstream.requests[0].path == "/v1/models"


def test_upstream_errors_are_returned_and_not_stored(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    from starlette.responses import JSONResponse

    async def rate_limited(request, recorded):  # type: ignore[no-untyped-def]
        return JSONResponse({"error": {"message": "slow down", "type": "rate_limit"}}, status_code=429)

    upstream.handler = rate_limited
    sdk = client(start_proxy())
    for _ in range(2):
        with pytest.raises(openai.RateLimitError):
            sdk.chat.completions.create(model="m", messages=MESSAGES)
    assert upstream.calls == 2
