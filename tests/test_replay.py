from __future__ import annotations

import json
from typing import Any

import pytest

from cache.base import CachedResponse
from cache.convert import anthropic_stream_to_json, chat_stream_to_json, is_usage_chunk
from cache.replay import Replay, replay
from cache.sse import DONE, EVENT_STREAM, encode_event, parse_events, stream_completed
from tests.servers import (
    anthropic_events,
    anthropic_message,
    chat_chunks,
    chat_completion,
    chat_tool_completion,
)

JSON = "application/json"
CHAT = "chat/completions"
MESSAGES = "messages"


def stored(body: bytes, content_type: str, endpoint: str = CHAT) -> CachedResponse:
    return CachedResponse(
        status=200,
        content_type=content_type,
        body=body,
        created_at=1_700_000_000.0,
        provider="openai" if endpoint != MESSAGES else "anthropic",
        endpoint=f"v1/{endpoint}",
        model="m",
    )


def stored_stream(chunks: list[bytes], endpoint: str = CHAT) -> CachedResponse:
    return stored(b"".join(chunks), EVENT_STREAM, endpoint)


def stored_json(value: Any, endpoint: str = CHAT) -> CachedResponse:
    return stored(json.dumps(value).encode(), JSON, endpoint)


def answered(result: Replay | None) -> Replay:
    assert result is not None
    return result


def payloads(stream: bytes) -> list[Any]:
    return [event.json() for event in parse_events(stream) if event.data != DONE]


CHAT_WITH_USAGE = chat_chunks(1, "m", usage=True)
CHAT_WITHOUT_USAGE = chat_chunks(1, "m")
TEXT_COMPLETION_STREAM = [
    b'data: {"id": "cmpl-1", "object": "text_completion", "choices": [{"text": "answer 1"}]}\n\n',
    b"data: [DONE]\n\n",
]
RESPONSES_STREAM = [
    encode_event({"type": "response.created"}, name="response.created"),
    encode_event({"type": "response.completed"}, name="response.completed"),
]
EMBEDDING = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}]}


# Same shape as recorded: the stored bytes, unchanged


@pytest.mark.parametrize(
    ("entry", "endpoint"),
    [
        pytest.param(stored_json(chat_completion(1, "m")), CHAT, id="chat-json"),
        pytest.param(stored_json(anthropic_message(1, "m"), MESSAGES), MESSAGES, id="messages-json"),
        pytest.param(stored_json({"choices": [{"text": "x"}]}, "completions"), "completions", id="completions"),
        pytest.param(stored_json({"output": []}, "responses"), "responses", id="responses-json"),
        pytest.param(stored_json(EMBEDDING, "embeddings"), "embeddings", id="embeddings-json"),
        pytest.param(
            stored(b'{"a":  1,\n "b": "\\u00e9"}', "application/json; charset=utf-8"),
            CHAT,
            id="json-bytes-and-content-type-as-stored",
        ),
    ],
)
@pytest.mark.parametrize("wants_usage", [True, False])
def test_json_asked_as_json_is_the_stored_bytes(entry: CachedResponse, endpoint: str, wants_usage: bool) -> None:
    result = replay(entry, endpoint, wants_stream=False, wants_usage=wants_usage)

    assert result == Replay(entry.body, entry.content_type)


@pytest.mark.parametrize(
    ("entry", "endpoint"),
    [
        pytest.param(stored_stream(anthropic_events(1, "m"), MESSAGES), MESSAGES, id="messages"),
        pytest.param(stored_stream(anthropic_events(1, "m", tools=True), MESSAGES), MESSAGES, id="messages-tools"),
        pytest.param(stored_stream(TEXT_COMPLETION_STREAM, "completions"), "completions", id="completions"),
        pytest.param(stored_stream(RESPONSES_STREAM, "responses"), "responses", id="responses"),
    ],
)
@pytest.mark.parametrize("wants_usage", [True, False])
def test_stream_asked_as_stream_is_the_stored_bytes(entry: CachedResponse, endpoint: str, wants_usage: bool) -> None:
    result = replay(entry, endpoint, wants_stream=True, wants_usage=wants_usage)

    assert result == Replay(entry.body, EVENT_STREAM)


def test_stored_content_type_parameters_are_kept() -> None:
    entry = stored(b"".join(anthropic_events(1, "m")), "text/event-stream; charset=utf-8", MESSAGES)

    result = replay(entry, MESSAGES, wants_stream=True, wants_usage=False)

    assert result == Replay(entry.body, "text/event-stream; charset=utf-8")


# OpenAI chat stream asked as a stream: usage as asked


@pytest.mark.parametrize(
    ("chunks", "wants_usage"),
    [
        pytest.param(CHAT_WITH_USAGE, True, id="usage-recorded-and-asked"),
        pytest.param(CHAT_WITHOUT_USAGE, False, id="usage-neither-recorded-nor-asked"),
        pytest.param(chat_chunks(1, "m", tools=True, usage=True), True, id="tools-with-usage"),
        pytest.param(chat_chunks(1, "m", tools=True), False, id="tools-without-usage"),
    ],
)
def test_chat_stream_with_the_usage_asked_for_is_the_stored_bytes(chunks: list[bytes], wants_usage: bool) -> None:
    entry = stored_stream(chunks)

    result = replay(entry, CHAT, wants_stream=True, wants_usage=wants_usage)

    assert result == Replay(entry.body, EVENT_STREAM)


def test_chat_stream_with_usage_asked_without_usage_is_the_stream_that_client_would_have_had() -> None:
    entry = stored_stream(CHAT_WITH_USAGE)

    result = answered(replay(entry, CHAT, wants_stream=True, wants_usage=False))

    assert result.content_type == EVENT_STREAM
    assert [event.raw for event in parse_events(result.body)] == CHAT_WITHOUT_USAGE, "no usage chunk, no null usage"
    assert b"usage" not in result.body
    assert not any(is_usage_chunk(payload) for payload in payloads(result.body))
    assert result.body.endswith(b"data: [DONE]\n\n")
    assert stream_completed(CHAT, result.body)


def test_chat_stream_usage_chunk_removal_keeps_a_tail_without_blank_line() -> None:
    entry = stored(b"".join(CHAT_WITH_USAGE).removesuffix(b"\n\n"), EVENT_STREAM)

    result = answered(replay(entry, CHAT, wants_stream=True, wants_usage=False))

    assert result.body == b"".join(CHAT_WITHOUT_USAGE).removesuffix(b"\n\n")
    assert result.body.endswith(b"data: [DONE]")


def test_chat_stream_usage_chunk_removal_keeps_crlf_events_byte_identical() -> None:
    crlf_chunks = [chunk.replace(b"\n", b"\r\n") for chunk in CHAT_WITH_USAGE]
    entry = stored_stream(crlf_chunks)

    result = answered(replay(entry, CHAT, wants_stream=True, wants_usage=False))

    assert result.body == b"".join(chunk.replace(b"\n", b"\r\n") for chunk in CHAT_WITHOUT_USAGE)


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param(CHAT_WITHOUT_USAGE, id="text"),
        pytest.param(chat_chunks(1, "m", tools=True), id="tools"),
    ],
)
def test_chat_stream_without_usage_cannot_answer_a_request_for_usage(chunks: list[bytes]) -> None:
    assert replay(stored_stream(chunks), CHAT, wants_stream=True, wants_usage=True) is None


# Conversions between stream and JSON


@pytest.mark.parametrize("wants_usage", [True, False])
def test_chat_stream_asked_as_json_is_the_completion(wants_usage: bool) -> None:
    result = answered(replay(stored_stream(CHAT_WITH_USAGE), CHAT, wants_stream=False, wants_usage=wants_usage))

    assert result.content_type == JSON
    completion = json.loads(result.body)
    assert completion == chat_stream_to_json(parse_events(b"".join(CHAT_WITH_USAGE)))
    assert completion["object"] == "chat.completion"
    assert completion["id"] == "chatcmpl-1"
    assert completion["choices"][0]["message"]["content"] == "answer 1"
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert completion["usage"] == chat_completion(1, "m")["usage"]


def test_chat_tool_stream_asked_as_json_has_the_tool_call() -> None:
    entry = stored_stream(chat_chunks(1, "m", tools=True, usage=True))

    result = answered(replay(entry, CHAT, wants_stream=False, wants_usage=False))

    assert json.loads(result.body)["choices"] == chat_tool_completion(1, "m")["choices"]


def test_chat_stream_asked_as_json_keeps_non_ascii_text() -> None:
    chunks = [
        encode_event({"id": "c", "choices": [{"index": 0, "delta": {"content": "héllo ✓"}}]}),
        encode_event({"id": "c", "choices": [], "usage": {"total_tokens": 1}}),
        encode_event(DONE),
    ]

    result = answered(replay(stored_stream(chunks), CHAT, wants_stream=False, wants_usage=False))

    assert "héllo ✓".encode() in result.body
    assert json.loads(result.body)["choices"][0]["message"]["content"] == "héllo ✓"


@pytest.mark.parametrize("wants_usage", [True, False])
def test_chat_stream_without_usage_cannot_answer_as_json(wants_usage: bool) -> None:
    assert replay(stored_stream(CHAT_WITHOUT_USAGE), CHAT, wants_stream=False, wants_usage=wants_usage) is None


@pytest.mark.parametrize(
    "completion",
    [
        pytest.param(chat_completion(1, "m"), id="text"),
        pytest.param(chat_tool_completion(1, "m"), id="tools"),
    ],
)
def test_chat_json_asked_as_stream_with_usage(completion: dict[str, Any]) -> None:
    result = answered(replay(stored_json(completion), CHAT, wants_stream=True, wants_usage=True))

    assert result.content_type == EVENT_STREAM
    assert stream_completed(CHAT, result.body)
    last = payloads(result.body)[-1]
    assert is_usage_chunk(last)
    assert last["usage"] == completion["usage"]
    assert chat_stream_to_json(parse_events(result.body)) == completion


def test_chat_json_asked_as_stream_without_usage_has_no_usage_chunk() -> None:
    result = answered(replay(stored_json(chat_completion(1, "m")), CHAT, wants_stream=True, wants_usage=False))

    assert result.content_type == EVENT_STREAM
    assert stream_completed(CHAT, result.body)
    chunks = payloads(result.body)
    assert not any(is_usage_chunk(chunk) for chunk in chunks)
    assert all("usage" not in chunk for chunk in chunks)
    assert "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks) == "answer 1"


@pytest.mark.parametrize("tools", [pytest.param(False, id="text"), pytest.param(True, id="tools")])
def test_anthropic_stream_asked_as_json_is_the_message(tools: bool) -> None:
    chunks = anthropic_events(1, "m", tools=tools)

    result = answered(replay(stored_stream(chunks, MESSAGES), MESSAGES, wants_stream=False, wants_usage=False))

    assert result.content_type == JSON
    message = json.loads(result.body)
    assert message == anthropic_stream_to_json(parse_events(b"".join(chunks)))
    assert message["content"][0] == {"type": "text", "text": "answer 1"}
    assert message["stop_reason"] == ("tool_use" if tools else "end_turn")
    assert message["usage"] == {"input_tokens": 9, "output_tokens": 3}
    if tools:
        assert message["content"][1]["input"] == {"city": "Paris"}


def test_anthropic_json_asked_as_stream_is_the_message_stream() -> None:
    message = anthropic_message(1, "m")

    result = answered(replay(stored_json(message, MESSAGES), MESSAGES, wants_stream=True, wants_usage=True))

    assert result.content_type == EVENT_STREAM
    assert stream_completed(MESSAGES, result.body)
    events = parse_events(result.body)
    assert events[0].type == "message_start"
    assert events[-1].type == "message_stop"
    assert anthropic_stream_to_json(events) == message


def test_anthropic_stream_without_message_start_cannot_answer_as_json() -> None:
    entry = stored_stream(anthropic_events(1, "m")[1:], MESSAGES)

    assert replay(entry, MESSAGES, wants_stream=False, wants_usage=False) is None


# Shapes that cannot be converted


@pytest.mark.parametrize(
    ("entry", "endpoint", "wants_stream"),
    [
        pytest.param(
            stored_stream(TEXT_COMPLETION_STREAM, "completions"), "completions", False, id="completions-stream"
        ),
        pytest.param(
            stored_json({"choices": [{"text": "x"}]}, "completions"), "completions", True, id="completions-json"
        ),
        pytest.param(stored_stream(RESPONSES_STREAM, "responses"), "responses", False, id="responses-stream"),
        pytest.param(stored_json({"output": []}, "responses"), "responses", True, id="responses-json"),
        pytest.param(stored_json(EMBEDDING, "embeddings"), "embeddings", True, id="embeddings-json"),
        pytest.param(stored_stream([encode_event({"type": "message-end"})], "chat"), "chat", False, id="cohere-chat"),
    ],
)
@pytest.mark.parametrize("wants_usage", [True, False])
def test_other_endpoints_do_not_convert_between_stream_and_json(
    entry: CachedResponse, endpoint: str, wants_stream: bool, wants_usage: bool
) -> None:
    assert replay(entry, endpoint, wants_stream=wants_stream, wants_usage=wants_usage) is None


@pytest.mark.parametrize("endpoint", [CHAT, MESSAGES])
@pytest.mark.parametrize("wants_usage", [True, False])
def test_stored_json_that_does_not_parse_cannot_answer_as_a_stream(endpoint: str, wants_usage: bool) -> None:
    entry = stored(b'{"id": "chatcmpl-1", "choices": [', JSON, endpoint)

    assert replay(entry, endpoint, wants_stream=True, wants_usage=wants_usage) is None
