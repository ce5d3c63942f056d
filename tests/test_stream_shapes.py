"""One entry answers both shapes in the clients' default configuration: the proxy asks the provider for
usage on every chat stream it records, and gives each client exactly the stream it asked for."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ProxyFactory, wait_until_stored
from tests.servers import FakeUpstream, chat_chunks, chat_completion

pytestmark = pytest.mark.both_backends

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {}}}},
    }
]
USAGE = chat_completion(1, "m")["usage"]


def sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="sk-dummy", max_retries=0)


def raw_stream(base: str, body: dict[str, Any]) -> tuple[httpx.Response, bytes]:
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, timeout=10) as response:
        return response, b"".join(response.iter_raw())


def test_a_default_sdk_stream_with_tools_then_the_same_request_as_json_is_one_upstream_call(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    client = sdk(start_proxy())
    streamed = list(client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS, stream=True))
    reply = client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES, tools=TOOLS)
    assert reply.headers["x-cache-status"] == "HIT"
    completion = reply.parse()
    assert completion.usage is not None and completion.usage.model_dump(exclude_none=True) == USAGE
    assert completion.choices[0].message.tool_calls[0].function.arguments == '{"city": "Paris"}'  # type: ignore[index]
    assert all(chunk.usage is None for chunk in streamed), "the streamed client did not ask for usage"
    assert upstream.calls == 1
    asked = upstream.requests[0].json()
    assert asked["stream_options"] == {"include_usage": True}, "the proxy asked the provider for usage"


def test_stream_then_invoke_as_langchain_does(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    base = start_proxy()
    # ChatOpenAI.stream(...) sends stream=true without stream_options; .invoke(...) the same without stream.
    response, streamed = raw_stream(base, {"model": "m", "messages": MESSAGES, "temperature": 0.7})
    invoked = httpx.post(f"{base}/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "temperature": 0.7})
    assert (response.headers["x-cache-status"], invoked.headers["x-cache-status"]) == ("MISS", "HIT")
    assert invoked.json()["usage"] == USAGE
    assert invoked.json()["choices"][0]["message"]["content"] == "answer 1"
    assert upstream.calls == 1


def test_each_client_gets_exactly_the_stream_it_asked_for_live_and_replayed(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    base = start_proxy()
    body = {"model": "m", "messages": MESSAGES}
    live = raw_stream(base, body)[1]
    replayed = raw_stream(base, body)[1]
    with_usage = raw_stream(base, {**body, "stream_options": {"include_usage": True}})[1]
    assert live == replayed == b"".join(chat_chunks(1, "m")), "no usage chunk, no null usage, byte for byte"
    assert b"usage" not in live
    assert with_usage == b"".join(chat_chunks(1, "m", usage=True)), "the real usage, as the provider sent it"
    assert upstream.calls == 1


def test_a_stream_recorded_by_one_instance_answers_json_on_another(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    first, second = start_proxy(), start_proxy(memory_cache_bytes=0)
    body = {"model": "m", "messages": MESSAGES}
    assert raw_stream(first, body)[0].headers["x-cache-status"] == "MISS"
    wait_until_stored(second, 1)
    as_json = httpx.post(f"{second}/v1/chat/completions", json=body)
    assert as_json.headers["x-cache-status"] == "HIT"
    assert as_json.json()["usage"] == USAGE
    assert upstream.calls == 1


def test_a_provider_not_asked_for_usage_gets_the_clients_body_untouched(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    base = start_proxy(mistral_base_url=upstream.url)  # mistral is not in STREAM_USAGE_PROVIDERS' default
    body = json.dumps({"model": "m", "messages": MESSAGES, "stream": True}).encode()
    with httpx.stream("POST", f"{base}/mistral/v1/chat/completions", content=body) as response:
        response.read()
    assert upstream.requests[0].body == body
    as_json = httpx.post(f"{base}/mistral/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
    assert as_json.headers["x-cache-status"] == "MISS", "no usage was recorded, and none is made up"
    assert upstream.calls == 2
