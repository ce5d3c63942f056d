"""Streamed answers: relayed live and recorded on a miss, replayed on a hit, converted to and from JSON."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import anthropic
import httpx
import openai
import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from tests.conftest import ProxyFactory
from tests.servers import FakeUpstream, Recorded, chat_chunks

pytestmark = pytest.mark.both_backends

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
ANTHROPIC_TOOLS = [
    {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
]


def openai_client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="sk-dummy", max_retries=0)


def anthropic_client(base: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{base}/anthropic", api_key="sk-ant-dummy", max_retries=0)


def raw_stream(base: str, path: str, body: dict[str, Any]) -> tuple[httpx.Response, bytes]:
    with httpx.stream("POST", f"{base}{path}", json={**body, "stream": True}, timeout=10) as response:
        content = b"".join(response.iter_raw())
    return response, content


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": MESSAGES, **extra}


class TestOpenAIChat:
    def test_stream_miss_then_byte_for_byte_hit(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        base = start_proxy()
        body = chat_body(stream_options={"include_usage": True})
        miss, recorded = raw_stream(base, "/v1/chat/completions", body)
        hit, replayed = raw_stream(base, "/v1/chat/completions", body)
        assert (miss.headers["x-cache-status"], hit.headers["x-cache-status"]) == ("MISS", "HIT")
        assert hit.headers["content-type"].startswith("text/event-stream")
        assert replayed == recorded == b"".join(chat_chunks(1, "gpt-4o-mini", usage=True))
        assert upstream.calls == 1

    def test_sdk_iterates_a_replayed_stream(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        sdk = openai_client(start_proxy())
        texts = []
        for _ in range(2):
            stream = sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
            texts.append("".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices))
        assert texts == ["answer 1", "answer 1"]
        assert upstream.calls == 1

    def test_json_request_answered_from_a_recorded_stream(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        sdk = openai_client(start_proxy())
        streamed = list(
            sdk.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
        )
        reply = sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
        completion = reply.parse()
        assert reply.headers["x-cache-status"] == "HIT"
        assert reply.headers["content-type"] == "application/json"
        assert completion.id == streamed[0].id == "chatcmpl-1"
        assert completion.choices[0].message.content == "answer 1"
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None and completion.usage == streamed[-1].usage
        assert completion.system_fingerprint == "fp_test"
        assert upstream.calls == 1

    def test_stream_request_answered_from_a_stored_json(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        sdk = openai_client(start_proxy())
        stored = sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        chunks = list(
            sdk.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "answer 1"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage == stored.usage
        with sdk.chat.completions.stream(model="gpt-4o-mini", messages=MESSAGES) as helper:
            final = helper.get_final_completion()
        assert final.id == stored.id
        assert final.choices[0].message.content == stored.choices[0].message.content
        assert upstream.calls == 1

    def test_tool_calls_survive_both_conversions(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        sdk = openai_client(start_proxy())
        options: dict[str, Any] = {"model": "gpt-4o-mini", "messages": MESSAGES, "tools": TOOLS}
        list(sdk.chat.completions.create(**options, stream=True, stream_options={"include_usage": True}))
        as_json = sdk.chat.completions.create(**options)
        call = as_json.choices[0].message.tool_calls[0]  # type: ignore[index]
        assert (call.id, call.function.name, call.function.arguments) == (  # type: ignore[union-attr]
            "call_1",
            "get_weather",
            '{"city": "Paris"}',
        )
        assert as_json.choices[0].finish_reason == "tool_calls"

        other: dict[str, Any] = {**options, "messages": [{"role": "user", "content": "And in Rome?"}]}
        stored = sdk.chat.completions.create(**other)
        with sdk.chat.completions.stream(**other) as helper:
            final = helper.get_final_completion()
        assert final.choices[0].message.tool_calls[0].function.arguments == (  # type: ignore[index]
            stored.choices[0].message.tool_calls[0].function.arguments  # type: ignore[index, union-attr]
        )
        assert final.choices[0].finish_reason == "tool_calls"
        assert upstream.calls == 2

    def test_usage_chunk_is_dropped_when_not_asked_for(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        base = start_proxy()
        raw_stream(base, "/v1/chat/completions", chat_body(stream_options={"include_usage": True}))
        hit, replayed = raw_stream(base, "/v1/chat/completions", chat_body())
        assert hit.headers["x-cache-status"] == "HIT"
        assert b'"choices": []' not in replayed
        assert replayed.endswith(b"data: [DONE]\n\n")

    def test_a_recording_without_usage_is_refetched_for_clients_that_need_usage(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        base = start_proxy(stream_usage_providers="none")  # a provider the proxy does not ask for usage
        raw_stream(base, "/v1/chat/completions", chat_body())
        wants_usage, replayed = raw_stream(
            base, "/v1/chat/completions", chat_body(stream_options={"include_usage": True})
        )
        as_json = httpx.post(f"{base}/v1/chat/completions", json=chat_body())
        assert wants_usage.headers["x-cache-status"] == "MISS"
        assert b'"choices": []' in replayed
        assert as_json.headers["x-cache-status"] == "HIT", "the new recording has usage, so it converts"
        assert as_json.json()["usage"]["total_tokens"] == 12
        assert upstream.calls == 2


class TestAnthropicMessages:
    def test_stream_miss_then_byte_for_byte_hit(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        base = start_proxy()
        body = {"model": "claude-test", "max_tokens": 100, "messages": MESSAGES}
        miss, recorded = raw_stream(base, "/anthropic/v1/messages", body)
        hit, replayed = raw_stream(base, "/anthropic/v1/messages", body)
        assert (miss.headers["x-cache-status"], hit.headers["x-cache-status"]) == ("MISS", "HIT")
        assert replayed == recorded
        assert b"event: message_stop" in replayed

    def test_final_message_is_the_same_in_every_direction(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        sdk = anthropic_client(start_proxy())
        options: dict[str, Any] = {"model": "claude-test", "max_tokens": 100, "tools": ANTHROPIC_TOOLS}
        with sdk.messages.stream(messages=MESSAGES, **options) as stream:
            live = stream.get_final_message()
        from_stream = sdk.messages.create(messages=MESSAGES, **options)
        assert from_stream.model_dump() == live.model_dump()
        assert from_stream.content[1].input == {"city": "Paris"}  # type: ignore[union-attr]

        other = [{"role": "user", "content": "And in Rome?"}]
        stored = sdk.messages.create(messages=other, **options)
        with sdk.messages.stream(messages=other, **options) as stream:
            from_json = stream.get_final_message()
        assert from_json.model_dump() == stored.model_dump()
        assert upstream.calls == 2


class RecordingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class TestIncompleteStreamsAreNeverStored:
    def test_upstream_drop_mid_stream(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        async def dropping(request: Request, recorded: Recorded) -> Response:
            async def events() -> Any:
                yield chat_chunks(upstream.calls, "m")[0]
                await asyncio.sleep(0.05)
                raise RuntimeError("upstream crashed mid-stream")

            return StreamingResponse(events(), media_type="text/event-stream")

        upstream.handler = dropping
        base = start_proxy()
        received = []
        server_log = logging.getLogger("uvicorn.error")
        server_errors = RecordingHandler()
        server_log.addHandler(server_errors)
        try:
            with pytest.raises(httpx.RemoteProtocolError):  # noqa: PT012
                with httpx.stream("POST", f"{base}/v1/chat/completions", json=chat_body(stream=True)) as response:
                    assert response.headers["x-cache-status"] == "MISS"
                    for line in response.iter_lines():
                        received.append(line)
        finally:
            server_log.removeHandler(server_errors)
        assert received[0].startswith("data: {")
        # The proxy logs the broken upstream (a warning); the server's complaint about the response it cut off
        # on purpose is no error.
        assert "ASGI callable returned without completing response." not in server_errors.messages
        upstream.handler = None
        assert httpx.post(f"{base}/v1/chat/completions", json=chat_body()).headers["x-cache-status"] == "MISS"

    def test_client_disconnect_closes_the_upstream_and_stores_nothing(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        closed_at: list[float] = []

        async def slow(request: Request, recorded: Recorded) -> Response:
            async def events() -> Any:
                try:
                    for chunk in chat_chunks(upstream.calls, "m"):
                        yield chunk
                        await asyncio.sleep(0.3)
                finally:
                    closed_at.append(time.monotonic())

            return StreamingResponse(events(), media_type="text/event-stream")

        upstream.handler = slow
        base = start_proxy()
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=chat_body(stream=True)) as response:
            next(response.iter_lines())
            left_at = time.monotonic()
        deadline = time.monotonic() + 3
        while not closed_at and time.monotonic() < deadline:
            time.sleep(0.02)
        assert closed_at, "the upstream kept streaming to nobody"
        assert closed_at[0] - left_at < 1.0
        time.sleep(0.3)
        upstream.handler = None
        assert httpx.post(f"{base}/v1/chat/completions", json=chat_body()).headers["x-cache-status"] == "MISS"

    @pytest.mark.parametrize(
        "chunks",
        [
            pytest.param(chat_chunks(1, "m")[:-1], id="no-done"),
            pytest.param([*chat_chunks(1, "m")[:2], b'data: {"error": {"message": "overloaded"}}\n\n'], id="error"),
            pytest.param([chat_chunks(1, "m")[0][:40]], id="cut-mid-event"),
        ],
    )
    def test_streams_that_did_not_finish_cleanly(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, chunks: list[bytes]
    ) -> None:
        async def unfinished(request: Request, recorded: Recorded) -> Response:
            return upstream.stream(chunks)

        upstream.handler = unfinished
        base = start_proxy()
        for _ in range(2):
            response, content = raw_stream(base, "/v1/chat/completions", chat_body())
            assert response.headers["x-cache-status"] == "MISS"
            assert content == b"".join(chunks)
        assert upstream.calls == 2

    def test_anthropic_stream_without_message_stop(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        from tests.servers import anthropic_events

        async def unfinished(request: Request, recorded: Recorded) -> Response:
            return upstream.stream(anthropic_events(upstream.calls, "m")[:-1])

        upstream.handler = unfinished
        base = start_proxy()
        body = {"model": "m", "max_tokens": 10, "messages": MESSAGES}
        for _ in range(2):
            assert raw_stream(base, "/anthropic/v1/messages", body)[0].headers["x-cache-status"] == "MISS"


def test_endpoints_without_conversion_keep_streams_apart(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    base = start_proxy()
    body = {"model": "m", "prompt": "Once upon a time"}
    first, _ = raw_stream(base, "/v1/completions", body)
    as_json = httpx.post(f"{base}/v1/completions", json=body)
    again, _ = raw_stream(base, "/v1/completions", body)
    assert [
        first.headers["x-cache-status"],
        as_json.headers["x-cache-status"],
        again.headers["x-cache-status"],
    ] == [
        "MISS",
        "MISS",
        "HIT",
    ]
    assert json.loads(as_json.content)["echo"] == "/v1/completions"


@pytest.mark.parametrize("asks_usage", [False, True], ids=["usage-withheld", "usage-asked"])
def test_each_chunk_reaches_the_client_while_the_upstream_holds_the_next(
    start_proxy: ProxyFactory, upstream: FakeUpstream, asks_usage: bool
) -> None:
    upstream.chunk_delay = 0.25
    body = chat_body(stream=True, stream_options={"include_usage": True}) if asks_usage else chat_body(stream=True)
    sent = chat_chunks(1, "gpt-4o-mini", usage=True)  # the proxy asks for usage either way
    expected = sent if asks_usage else chat_chunks(1, "gpt-4o-mini")
    # Which upstream chunk each client chunk is (the usage chunk is withheld from a client that did not ask).
    sources = [index for index, chunk in enumerate(sent) if asks_usage or b'"choices": []' not in chunk]
    delays = []
    with httpx.stream("POST", f"{start_proxy()}/v1/chat/completions", json=body) as response:
        for index, chunk in enumerate(response.iter_raw()):
            delays.append(time.perf_counter() - upstream.sent_at[sources[index]])
            assert chunk == expected[index], "each upstream chunk arrives on its own"
    assert len(delays) == len(expected)
    # Generous for a loaded CI machine; bench/stream_latency.py measures the real figure.
    assert max(delays) < 0.1, delays
