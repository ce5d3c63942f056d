"""The tokens a stored answer reports, so that hits can count what they saved."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cache.base import CachedResponse
from cache.convert import anthropic_stream_to_json, chat_stream_to_json
from cache.sse import parse_events
from cache.usage import Usage, entry_usage, reported_tokens, reported_usage
from tests.servers import anthropic_events, anthropic_message, chat_chunks, chat_completion

JSON = "application/json"
STREAM = "text/event-stream"


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode()


def sse(*events: dict[str, Any], done: bool = False) -> bytes:
    encoded = [f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode() for event in events]
    return b"".join(encoded) + (b"data: [DONE]\n\n" if done else b"")


def anthropic_with_cache_usage() -> dict[str, Any]:
    message = anthropic_message(1, "claude")
    message["usage"] = {
        "input_tokens": 9,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 1000,
        "output_tokens": 3,
    }
    return message


def anthropic_stream_with_cache_usage() -> bytes:
    events = [json.loads(chunk.split(b"data: ", 1)[1]) for chunk in anthropic_events(1, "claude")]
    events[0]["message"]["usage"].update(cache_creation_input_tokens=20, cache_read_input_tokens=300)
    return sse(*events)


RESPONSE = {
    "id": "resp_1",
    "object": "response",
    "status": "completed",
    "output": [{"type": "message", "content": [{"type": "output_text", "text": "hi"}]}],
    "usage": {"input_tokens": 11, "output_tokens": 22, "total_tokens": 33},
}


def responses_stream(final: str = "response.completed") -> bytes:
    started = {**RESPONSE, "status": "in_progress", "output": [], "usage": None}
    return sse(
        {"type": "response.created", "sequence_number": 0, "response": started},
        {"type": "response.in_progress", "sequence_number": 1, "response": started},
        {"type": "response.output_text.delta", "sequence_number": 2, "delta": "hi"},
        {"type": final, "sequence_number": 3, "response": RESPONSE},
    )


COHERE_V2 = {
    "id": "c1",
    "finish_reason": "COMPLETE",
    "message": {"role": "assistant", "content": [{"type": "text", "text": "hi"}]},
    "usage": {
        "billed_units": {"input_tokens": 5, "output_tokens": 7},
        "tokens": {"input_tokens": 150, "output_tokens": 7},
    },
}
COHERE_V1 = {"text": "hi", "meta": {"billed_units": {"input_tokens": 4, "output_tokens": 6}}}


@pytest.mark.parametrize(
    ("endpoint", "content_type", "body", "tokens"),
    [
        pytest.param("chat/completions", JSON, as_json(chat_completion(1, "m")), (9, 3), id="openai-chat-json"),
        pytest.param(
            "chat/completions", JSON + "; charset=utf-8", as_json(chat_completion(1, "m")), (9, 3), id="charset"
        ),
        pytest.param(
            "chat/completions", STREAM, b"".join(chat_chunks(1, "m", usage=True)), (9, 3), id="openai-chat-stream"
        ),
        pytest.param(
            "chat/completions",
            "Text/Event-Stream; charset=utf-8",
            b"".join(chat_chunks(1, "m", tools=True, usage=True)),
            (9, 3),
            id="openai-chat-stream-tools-mixed-case-type",
        ),
        pytest.param(
            "chat/completions",
            STREAM,
            b"".join(chat_chunks(1, "m")),
            (None, None),
            id="openai-chat-stream-without-usage",
        ),
        pytest.param(
            "completions",
            JSON,
            as_json({"choices": [{"text": "x"}], "usage": {"prompt_tokens": 4, "completion_tokens": 16}}),
            (4, 16),
            id="openai-legacy-completions",
        ),
        pytest.param("messages", JSON, as_json(anthropic_message(1, "claude")), (9, 3), id="anthropic-json"),
        pytest.param(
            "messages", JSON, as_json(anthropic_with_cache_usage()), (1109, 3), id="anthropic-json-with-cache-tokens"
        ),
        pytest.param("messages", STREAM, b"".join(anthropic_events(1, "claude")), (9, 3), id="anthropic-stream"),
        pytest.param(
            "messages",
            STREAM,
            b"".join(anthropic_events(1, "claude", tools=True)),
            (9, 3),
            id="anthropic-stream-with-tool-use",
        ),
        pytest.param(
            "messages", STREAM, anthropic_stream_with_cache_usage(), (329, 3), id="anthropic-stream-with-cache-tokens"
        ),
        pytest.param(
            "embeddings",
            JSON,
            as_json({"object": "list", "data": [], "usage": {"prompt_tokens": 2, "total_tokens": 2}}),
            (2, 0),
            id="embeddings",
        ),
        pytest.param("responses", JSON, as_json(RESPONSE), (11, 22), id="responses-json"),
        pytest.param("responses", STREAM, responses_stream(), (11, 22), id="responses-stream-completed"),
        pytest.param(
            "responses", STREAM, responses_stream("response.incomplete"), (11, 22), id="responses-stream-incomplete"
        ),
        pytest.param("chat", JSON, as_json(COHERE_V2), (5, 7), id="cohere-v2-billed-units"),
        pytest.param("chat", JSON, as_json(COHERE_V1), (4, 6), id="cohere-v1-meta-billed-units"),
    ],
)
def test_reported_tokens(endpoint: str, content_type: str, body: bytes, tokens: tuple[int | None, int | None]) -> None:
    assert reported_tokens(endpoint, content_type, body) == tokens
    usage = reported_usage(endpoint, content_type, body)
    assert (usage.input_tokens, usage.output_tokens) == tokens


def test_anthropic_input_tokens_without_cache_fields_are_just_input_tokens() -> None:
    body = as_json({"usage": {"input_tokens": 5, "cache_read_input_tokens": None, "output_tokens": 1}})

    assert reported_tokens("messages", JSON, body) == (5, 1)


def test_embeddings_without_usage_report_nothing_not_zero() -> None:
    assert reported_tokens("embeddings", JSON, as_json({"object": "list", "data": []})) == (None, None)


def test_a_responses_stream_without_a_final_event_reports_nothing() -> None:
    body = responses_stream().rsplit(b"event: response.completed", 1)[0]

    assert reported_tokens("responses", STREAM, body) == (None, None)


def test_one_missing_count_leaves_only_that_side_unknown() -> None:
    body = as_json({"usage": {"prompt_tokens": 9}})

    assert reported_tokens("chat/completions", JSON, body) == (9, None)


@pytest.mark.parametrize(
    ("endpoint", "content_type", "body"),
    [
        pytest.param("chat/completions", JSON, b"this is not json", id="not-json"),
        pytest.param("chat/completions", JSON, b"", id="empty"),
        pytest.param("chat/completions", JSON, b"\xff\xfe\x00", id="binary"),
        pytest.param("chat/completions", JSON, b"[1, 2, 3]", id="array"),
        pytest.param("chat/completions", JSON, b'"usage"', id="string"),
        pytest.param("chat/completions", JSON, b'{"id": "x"}', id="no-usage"),
        pytest.param("chat/completions", JSON, b'{"usage": "lots"}', id="usage-not-object"),
        pytest.param("chat/completions", JSON, b'{"usage": null}', id="usage-null"),
        pytest.param(
            "chat/completions",
            JSON,
            b'{"usage": {"prompt_tokens": "9", "completion_tokens": true}}',
            id="counts-not-integers",
        ),
        pytest.param("chat/completions", JSON, b'{"usage": {"prompt_tokens": 1.5}}', id="count-fraction"),
        pytest.param("messages", JSON, b'{"usage": {"input_tokens": "9", "output_tokens": null}}', id="anthropic-bad"),
        pytest.param("chat", JSON, b'{"usage": {"tokens": {"input_tokens": 3}}}', id="cohere-without-billed-units"),
        pytest.param("chat", JSON, b'{"usage": {"billed_units": [1]}}', id="cohere-billed-units-not-object"),
        pytest.param("chat/completions", STREAM, b"data: not json\n\ndata: [DONE]\n\n", id="stream-of-non-json"),
        pytest.param("chat/completions", STREAM, b"data: [DONE]\n\n", id="stream-only-done"),
        pytest.param("chat/completions", STREAM, b"", id="empty-stream"),
        pytest.param("chat/completions", STREAM, b"data: [1, 2]\n\n", id="stream-of-arrays"),
        pytest.param("messages", STREAM, b"event: ping\ndata: {}\n\n", id="anthropic-stream-without-start"),
        pytest.param("responses", STREAM, sse({"type": "response.completed"}), id="responses-completed-no-response"),
        pytest.param(
            "responses", STREAM, sse({"type": "response.completed", "response": [1]}), id="responses-response-list"
        ),
        pytest.param("embeddings", STREAM, b"data: {}\n\n", id="stream-for-endpoint-without-streams"),
        pytest.param("unknown", JSON, b'{"usage": "x"}', id="unknown-endpoint"),
    ],
)
def test_garbage_reports_no_tokens(endpoint: str, content_type: str, body: bytes) -> None:
    assert reported_tokens(endpoint, content_type, body) == (None, None)
    assert reported_usage(endpoint, content_type, body) == Usage()


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        pytest.param(
            "messages",
            b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x"}}\n\n'
            b'data: {"type":"message_stop"}\n\n',
            id="delta-before-its-block",
        ),
        pytest.param("messages", b'data: {"type":"message_start"}\n\n', id="start-without-message"),
        pytest.param(
            "chat/completions",
            b'data: {"choices":["x"],"usage":{"prompt_tokens":1}}\n\ndata: [DONE]\n\n',
            id="choice-not-an-object",
        ),
        pytest.param("chat/completions", b'data: {"choices":[{"delta":"x"}]}\n\ndata: [DONE]\n\n', id="delta-text"),
    ],
)
def test_streams_of_the_wrong_shape_report_no_tokens_rather_than_fail(endpoint: str, body: bytes) -> None:
    assert reported_tokens(endpoint, "text/event-stream", body) == (None, None)
    assert reported_usage(endpoint, "text/event-stream", body) == Usage()


# Provider-side prompt caching: Usage counts all input in input_tokens, cached reads and cache
# writes being parts of it, whatever the provider's own convention.

OPENAI_CACHED_USAGE = {
    "prompt_tokens": 2006,
    "completion_tokens": 300,
    "total_tokens": 2306,
    "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0},
}


def chat_with_usage(usage: Any) -> dict[str, Any]:
    return {**chat_completion(1, "gpt-4o-mini"), "usage": usage}


def chat_stream_with_usage(usage: Any) -> bytes:
    chunks = [json.loads(chunk.split(b"data: ", 1)[1]) for chunk in chat_chunks(1, "m", usage=True)[:-1]]
    chunks[-1]["usage"] = usage
    return b"".join(f"data: {json.dumps(chunk)}\n\n".encode() for chunk in chunks) + b"data: [DONE]\n\n"


RESPONSE_CACHED_USAGE = {
    "input_tokens": 5000,
    "input_tokens_details": {"cached_tokens": 4096},
    "output_tokens": 120,
    "output_tokens_details": {"reasoning_tokens": 64},
    "total_tokens": 5120,
}


def responses_stream_with_usage(usage: Any) -> bytes:
    response = {**RESPONSE, "usage": usage}
    return sse({"type": "response.created", "sequence_number": 0, "response": {**response, "usage": None}}) + sse(
        {"type": "response.completed", "sequence_number": 1, "response": response}
    )


def anthropic_stream_with_final_cache_usage() -> bytes:
    """Newer Anthropic streams repeat the cumulative input-side counts in message_delta."""
    events = [json.loads(chunk.split(b"data: ", 1)[1]) for chunk in anthropic_events(1, "claude")]
    events[0]["message"]["usage"].update(cache_creation_input_tokens=20, cache_read_input_tokens=300)
    events[-2]["usage"].update(input_tokens=9, cache_creation_input_tokens=20, cache_read_input_tokens=300)
    return sse(*events)


@pytest.mark.parametrize(
    ("endpoint", "content_type", "body", "usage"),
    [
        pytest.param("chat/completions", JSON, as_json(chat_completion(1, "m")), Usage(9, None, 3), id="chat-plain"),
        pytest.param(
            "chat/completions",
            JSON,
            as_json(chat_with_usage(OPENAI_CACHED_USAGE)),
            Usage(input_tokens=2006, cached_input_tokens=1920, output_tokens=300),
            id="chat-cached",
        ),
        pytest.param(
            "chat/completions",
            JSON,
            as_json(chat_with_usage({**OPENAI_CACHED_USAGE, "prompt_tokens_details": None})),
            Usage(2006, None, 300),
            id="chat-details-null",
        ),
        pytest.param(
            "chat/completions",
            JSON,
            as_json(chat_with_usage({**OPENAI_CACHED_USAGE, "prompt_tokens_details": {"cached_tokens": 0}})),
            Usage(2006, 0, 300),
            id="chat-nothing-cached",
        ),
        pytest.param(
            "chat/completions",
            JSON,
            as_json(
                chat_with_usage(
                    {**OPENAI_CACHED_USAGE, "prompt_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 900}}
                )
            ),
            Usage(input_tokens=2006, cached_input_tokens=1000, output_tokens=300, cache_write_tokens=900),
            id="chat-openai-compatible-cache-writes",
        ),
        pytest.param(
            "chat/completions",
            STREAM,
            b"".join(chat_chunks(1, "m", usage=True)),
            Usage(9, None, 3),
            id="chat-stream-plain",
        ),
        pytest.param(
            "chat/completions",
            STREAM,
            chat_stream_with_usage(OPENAI_CACHED_USAGE),
            Usage(input_tokens=2006, cached_input_tokens=1920, output_tokens=300),
            id="chat-stream-cached",
        ),
        pytest.param("responses", JSON, as_json(RESPONSE), Usage(11, None, 22), id="responses-plain"),
        pytest.param(
            "responses",
            JSON,
            as_json({**RESPONSE, "usage": RESPONSE_CACHED_USAGE}),
            Usage(input_tokens=5000, cached_input_tokens=4096, output_tokens=120),
            id="responses-cached",
        ),
        pytest.param("responses", STREAM, responses_stream(), Usage(11, None, 22), id="responses-stream-plain"),
        pytest.param(
            "responses",
            STREAM,
            responses_stream_with_usage(RESPONSE_CACHED_USAGE),
            Usage(input_tokens=5000, cached_input_tokens=4096, output_tokens=120),
            id="responses-stream-cached",
        ),
        pytest.param(
            "messages", JSON, as_json(anthropic_message(1, "claude")), Usage(9, None, 3), id="anthropic-plain"
        ),
        pytest.param(
            "messages",
            JSON,
            as_json(anthropic_with_cache_usage()),
            Usage(input_tokens=1109, cached_input_tokens=1000, output_tokens=3, cache_write_tokens=100),
            id="anthropic-cached",
        ),
        pytest.param(
            "messages",
            JSON,
            as_json({"usage": {"input_tokens": 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}}),
            Usage(input_tokens=0, cached_input_tokens=0, cache_write_tokens=0),
            id="anthropic-zeros-without-output",
        ),
        pytest.param(
            "messages", STREAM, b"".join(anthropic_events(1, "claude")), Usage(9, None, 3), id="anthropic-stream-plain"
        ),
        pytest.param(
            "messages",
            STREAM,
            anthropic_stream_with_cache_usage(),
            Usage(input_tokens=329, cached_input_tokens=300, output_tokens=3, cache_write_tokens=20),
            id="anthropic-stream-cached",
        ),
        pytest.param(
            "messages",
            STREAM,
            anthropic_stream_with_final_cache_usage(),
            Usage(input_tokens=329, cached_input_tokens=300, output_tokens=3, cache_write_tokens=20),
            id="anthropic-stream-cached-counts-repeated-at-the-end",
        ),
        pytest.param(
            "embeddings",
            JSON,
            as_json({"object": "list", "data": [], "usage": {"prompt_tokens": 2, "total_tokens": 2}}),
            Usage(2, None, 0),
            id="embeddings",
        ),
        pytest.param("chat", JSON, as_json(COHERE_V2), Usage(5, None, 7), id="cohere"),
    ],
)
def test_reported_usage(endpoint: str, content_type: str, body: bytes, usage: Usage) -> None:
    assert reported_usage(endpoint, content_type, body) == usage


def test_cached_tokens_are_part_of_the_input_for_every_provider() -> None:
    """The same conversation, 1000 tokens of it read from the provider's cache, reads the same."""
    openai = {"prompt_tokens": 1200, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 1000}}
    anthropic = {"input_tokens": 200, "cache_read_input_tokens": 1000, "output_tokens": 5}

    from_openai = reported_usage("chat/completions", JSON, as_json({"usage": openai}))
    from_anthropic = reported_usage("messages", JSON, as_json({"usage": anthropic}))

    assert from_openai.input_tokens == from_anthropic.input_tokens == 1200
    assert from_openai.cached_input_tokens == from_anthropic.cached_input_tokens == 1000


@pytest.mark.parametrize(
    ("endpoint", "usage", "expected"),
    [
        pytest.param(
            "chat/completions",
            {"prompt_tokens": 9, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": "5"}},
            Usage(9, None, 3),
            id="cached-as-string",
        ),
        pytest.param(
            "chat/completions",
            {"prompt_tokens": 9, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": True}},
            Usage(9, None, 3),
            id="cached-as-bool",
        ),
        pytest.param(
            "chat/completions",
            {"prompt_tokens": 9, "completion_tokens": 3, "prompt_tokens_details": [5]},
            Usage(9, None, 3),
            id="details-not-an-object",
        ),
        pytest.param(
            "chat/completions",
            {"prompt_tokens": -9, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": -1}},
            Usage(None, None, 3),
            id="negative-counts",
        ),
        pytest.param(
            "messages",
            {"input_tokens": 9, "cache_read_input_tokens": 2.5, "cache_creation_input_tokens": -4, "output_tokens": 3},
            Usage(9, None, 3),
            id="anthropic-bad-cache-counts",
        ),
        pytest.param(
            "messages",
            {"cache_read_input_tokens": 7, "output_tokens": 3},
            Usage(input_tokens=7, cached_input_tokens=7, output_tokens=3),
            id="anthropic-without-input-tokens",
        ),
    ],
)
def test_bad_cache_counts_are_left_unknown(endpoint: str, usage: dict[str, Any], expected: Usage) -> None:
    assert reported_usage(endpoint, JSON, as_json({"usage": usage})) == expected


def test_usage_is_immutable_and_hashable() -> None:
    usage = Usage(1, 2, 3, 4)

    with pytest.raises(AttributeError):
        usage.input_tokens = 5  # type: ignore[misc]
    assert {usage: "x"}[Usage(1, 2, 3, 4)] == "x"


def test_an_entry_keeps_the_usage_its_answer_reported() -> None:
    body = as_json(anthropic_with_cache_usage())
    usage = reported_usage("messages", JSON, body)
    entry = CachedResponse(
        status=200,
        content_type=JSON,
        body=body,
        created_at=0.0,
        provider="anthropic",
        endpoint="v1/messages",
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        cache_write_tokens=usage.cache_write_tokens,
    )

    assert entry_usage(entry) == usage == Usage(1109, 1000, 3, 100)


# A stream's usage is read from the few events that can carry it, not from the whole answer converted to
# JSON; both readings agree.


def usage_of_the_whole_answer(endpoint: str, stream: bytes) -> Usage:
    converted = (chat_stream_to_json if endpoint == "chat/completions" else anthropic_stream_to_json)(
        parse_events(stream)
    )
    return reported_usage(endpoint, JSON, as_json(converted)) if converted is not None else Usage()


@pytest.mark.parametrize(
    ("endpoint", "stream"),
    [
        pytest.param("chat/completions", b"".join(chat_chunks(1, "m", usage=True)), id="chat-null-usage-per-chunk"),
        pytest.param("chat/completions", b"".join(chat_chunks(2, "m", tools=True, usage=True)), id="chat-tools"),
        pytest.param("chat/completions", b"".join(chat_chunks(3, "m")), id="chat-without-usage"),
        pytest.param("messages", b"".join(anthropic_events(1, "m")), id="messages"),
        pytest.param("messages", b"".join(anthropic_events(2, "m", tools=True)), id="messages-tools"),
        pytest.param("messages", anthropic_stream_with_cache_usage(), id="messages-cache-usage"),
    ],
)
def test_a_streams_usage_is_what_its_whole_answer_reports(endpoint: str, stream: bytes) -> None:
    assert reported_usage(endpoint, STREAM, stream) == usage_of_the_whole_answer(endpoint, stream)


USAGE_4_2 = b'{"prompt_tokens":4,"completion_tokens":2}'


@pytest.mark.parametrize(
    "usage_event",
    [
        pytest.param(b'data: {"choices":[],"\\u0075sage":' + USAGE_4_2 + b"}\n\n", id="escaped"),
        pytest.param(b'data: {"choices":[],"usage"\ndata: :' + USAGE_4_2 + b"}\n\n", id="two-lines"),
        pytest.param(b'data: {"choices":[],"usage" : ' + USAGE_4_2 + b"}\n\n", id="spaced"),
    ],
)
def test_usage_written_unusually_is_still_read(usage_event: bytes) -> None:
    stream = b"".join(chat_chunks(1, "m", usage=True)[:-2]) + usage_event + b"data: [DONE]\n\n"

    assert reported_usage("chat/completions", STREAM, stream) == Usage(input_tokens=4, output_tokens=2)
