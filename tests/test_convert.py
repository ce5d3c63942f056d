from __future__ import annotations

import copy
from typing import Any

import pytest

from cache.convert import (
    anthropic_json_to_stream,
    anthropic_stream_to_json,
    chat_json_to_stream,
    chat_stream_to_json,
    is_usage_chunk,
)
from cache.sse import DONE, SseEvent, encode_event, parse_events, stream_completed
from tests.servers import (
    anthropic_events,
    anthropic_message,
    chat_chunks,
    chat_completion,
    chat_tool_completion,
)

USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
ENVELOPE = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1_700_000_123, "model": "m"}


def events_of(chunks: list[bytes]) -> list[SseEvent]:
    return parse_events(b"".join(chunks))


def chunk(delta: dict[str, Any], index: int = 0, finish_reason: str | None = None, **extra: Any) -> bytes:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return encode_event({**ENVELOPE, "choices": [choice], **extra})


def usage_chunk(usage: dict[str, Any] = USAGE) -> bytes:
    return encode_event({**ENVELOPE, "choices": [], "usage": usage})


def chat_stream(*chunks: bytes) -> list[SseEvent]:
    return events_of([*chunks, usage_chunk(), encode_event(DONE)])


def only_message(completion: dict[str, Any] | None) -> dict[str, Any]:
    assert completion is not None
    [choice] = completion["choices"]
    message: dict[str, Any] = choice["message"]
    return message


def tool_message(number: int, model: str) -> dict[str, Any]:
    message = anthropic_message(number, model)
    message["content"].append({"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}})
    message["stop_reason"] = "tool_use"
    return message


# is_usage_chunk


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param({"choices": [], "usage": USAGE}, True, id="usage-chunk"),
        pytest.param({"choices": [], "usage": None}, False, id="null-usage"),
        pytest.param({"choices": [{"index": 0, "delta": {}}], "usage": USAGE}, False, id="with-choices"),
        pytest.param({"usage": USAGE}, False, id="without-choices-field"),
        pytest.param(None, False, id="not-json"),
        pytest.param([], False, id="not-an-object"),
    ],
)
def test_is_usage_chunk(payload: Any, expected: bool) -> None:
    assert is_usage_chunk(payload) is expected


# OpenAI chat: stream -> JSON


def test_chat_stream_amounts_to_the_same_completion_as_the_json_answer() -> None:
    completion = chat_stream_to_json(events_of(chat_chunks(1, "m", usage=True)))
    expected = chat_completion(1, "m")

    assert completion is not None
    assert completion["object"] == "chat.completion"
    assert completion["id"] == expected["id"] == "chatcmpl-1"
    assert completion["model"] == expected["model"] == "m"
    assert completion["created"] == expected["created"] == 1_700_000_001
    assert completion["system_fingerprint"] == "fp_test"
    assert completion["choices"] == expected["choices"]
    assert only_message(completion)["content"] == "answer 1"
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert completion["usage"] == expected["usage"]


def test_chat_tool_stream_amounts_to_the_same_completion_as_the_json_answer() -> None:
    completion = chat_stream_to_json(events_of(chat_chunks(1, "m", tools=True, usage=True)))
    expected = chat_tool_completion(1, "m")

    assert completion is not None
    assert completion["choices"] == expected["choices"]
    message = only_message(completion)
    assert message["content"] is None
    assert message["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]
    assert completion["choices"][0]["finish_reason"] == "tool_calls"


def test_text_deltas_are_concatenated_in_order() -> None:
    events = chat_stream(
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo, "}),
        chunk({"content": None}),
        chunk({"content": "wörld"}),
        chunk({}, finish_reason="stop"),
    )

    assert only_message(chat_stream_to_json(events))["content"] == "Hello, wörld"


def test_tool_call_deltas_are_merged_per_call_index() -> None:
    events = chat_stream(
        chunk({"role": "assistant", "content": None}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"name": "weather", "arguments": '{"ci'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "now"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
        chunk({}, finish_reason="tool_calls"),
    )

    message = only_message(chat_stream_to_json(events))

    assert message["tool_calls"] == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        },
        {"id": "call_b", "type": "function", "function": {"name": "now", "arguments": "{}"}},
    ]
    assert message["content"] is None


def test_text_alongside_tool_calls_is_kept() -> None:
    events = chat_stream(
        chunk({"role": "assistant", "content": "Checking."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "function": {"name": "f", "arguments": "{}"}}]}),
        chunk({}, finish_reason="tool_calls"),
    )

    message = only_message(chat_stream_to_json(events))

    assert message["content"] == "Checking."
    assert [call["id"] for call in message["tool_calls"]] == ["call_a"]


def test_finish_reason_comes_from_the_finishing_chunk() -> None:
    events = chat_stream(chunk({"role": "assistant", "content": "cut"}), chunk({}, finish_reason="length"))

    completion = chat_stream_to_json(events)

    assert completion is not None
    assert completion["choices"][0]["finish_reason"] == "length"


def test_usage_comes_from_the_usage_chunk_not_the_null_usage_of_other_chunks() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    events = events_of(
        [
            chunk({"role": "assistant", "content": "x"}, usage=None),
            chunk({}, finish_reason="stop", usage=None),
            usage_chunk(usage),
            encode_event(DONE),
        ]
    )

    completion = chat_stream_to_json(events)

    assert completion is not None
    assert completion["usage"] == usage


def test_envelope_fields_are_taken_from_the_chunks() -> None:
    envelope = {"system_fingerprint": "fp_1", "service_tier": "default"}
    events = chat_stream(
        chunk({"role": "assistant", "content": "x"}, **envelope), chunk({}, finish_reason="stop", **envelope)
    )

    completion = chat_stream_to_json(events)

    assert completion is not None
    assert {key: completion[key] for key in ("id", "object", "created", "model")} == {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 1_700_000_123,
        "model": "m",
    }
    assert completion["system_fingerprint"] == "fp_1"
    assert completion["service_tier"] == "default"


def test_a_null_envelope_field_in_a_later_chunk_does_not_erase_an_earlier_value() -> None:
    events = chat_stream(
        chunk({"role": "assistant", "content": "x"}, system_fingerprint="fp_1"),
        chunk({}, finish_reason="stop", system_fingerprint=None),
    )

    completion = chat_stream_to_json(events)

    assert completion is not None
    assert completion["system_fingerprint"] == "fp_1"


def test_role_defaults_to_assistant() -> None:
    events = chat_stream(chunk({"content": "x"}), chunk({}, finish_reason="stop"))

    assert only_message(chat_stream_to_json(events))["role"] == "assistant"


def test_refusal_deltas_are_joined() -> None:
    events = chat_stream(
        chunk({"role": "assistant", "refusal": "I can't "}),
        chunk({"refusal": "help with that."}),
        chunk({}, finish_reason="stop"),
    )

    assert only_message(chat_stream_to_json(events))["refusal"] == "I can't help with that."


def test_logprobs_of_every_chunk_are_collected() -> None:
    first = {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}
    second = {"token": "!", "logprob": -0.2, "bytes": [33], "top_logprobs": []}

    def logprob_chunk(content: str, entry: dict[str, Any]) -> bytes:
        choice = {"index": 0, "delta": {"content": content}, "logprobs": {"content": [entry]}}
        return encode_event({**ENVELOPE, "choices": [{**choice, "finish_reason": None}]})

    events = chat_stream(logprob_chunk("Hi", first), logprob_chunk("!", second), chunk({}, finish_reason="stop"))

    completion = chat_stream_to_json(events)

    assert completion is not None
    assert completion["choices"][0]["logprobs"] == {"content": [first, second], "refusal": None}


def test_several_choices_are_kept_apart_by_index() -> None:
    events = chat_stream(
        chunk({"role": "assistant", "content": ""}, index=1),
        chunk({"role": "assistant", "content": ""}, index=0),
        chunk({"content": "second "}, index=1),
        chunk({"content": "first "}, index=0),
        chunk({"content": "two"}, index=1),
        chunk({"content": "one"}, index=0),
        chunk({}, index=1, finish_reason="length"),
        chunk({}, index=0, finish_reason="stop"),
    )

    completion = chat_stream_to_json(events)

    assert completion is not None
    assert [
        (choice["index"], choice["message"]["content"], choice["finish_reason"]) for choice in completion["choices"]
    ] == [(0, "first one", "stop"), (1, "second two", "length")]


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param(chat_chunks(1, "m"), id="text-without-usage"),
        pytest.param(chat_chunks(1, "m", tools=True), id="tools-without-usage"),
        pytest.param([encode_event(DONE)], id="only-done"),
        pytest.param([], id="empty"),
        pytest.param([b": ping\n\n"], id="only-a-comment"),
    ],
)
def test_chat_stream_without_usage_chunk_converts_to_none(chunks: list[bytes]) -> None:
    assert chat_stream_to_json(events_of(chunks)) is None


# OpenAI chat: JSON -> stream


def stream_payloads(stream: bytes) -> list[Any]:
    return [event.json() for event in parse_events(stream) if event.data != DONE]


def test_chat_json_stream_ends_with_done() -> None:
    stream = chat_json_to_stream(chat_completion(1, "m"), include_usage=True)

    assert stream.endswith(b"\n\ndata: [DONE]\n\n")
    assert [event.type for event in parse_events(stream)][-1] == DONE
    assert b"".join(event.raw for event in parse_events(stream)) == stream
    assert stream_completed("chat/completions", stream)


def test_chat_json_stream_with_usage_ends_with_the_stored_usage() -> None:
    completion = chat_completion(1, "m")

    *chunks, last = stream_payloads(chat_json_to_stream(completion, include_usage=True))

    assert last["choices"] == []
    assert last["usage"] == completion["usage"]
    assert is_usage_chunk(last)
    assert chunks
    assert all(payload["usage"] is None for payload in chunks)
    assert not any(is_usage_chunk(payload) for payload in chunks)


def test_chat_json_stream_without_usage_has_no_usage_chunk() -> None:
    payloads = stream_payloads(chat_json_to_stream(chat_completion(1, "m"), include_usage=False))

    assert payloads
    assert all("usage" not in payload for payload in payloads)
    assert all(payload["choices"] for payload in payloads)


def test_chat_json_stream_chunks_carry_the_envelope() -> None:
    completion = {**chat_completion(7, "gpt-x"), "system_fingerprint": "fp_7", "service_tier": "default"}

    payloads = stream_payloads(chat_json_to_stream(completion, include_usage=True))

    for payload in payloads:
        assert payload["object"] == "chat.completion.chunk"
        assert payload["id"] == "chatcmpl-7"
        assert payload["created"] == 1_700_000_007
        assert payload["model"] == "gpt-x"
        assert payload["system_fingerprint"] == "fp_7"
        assert payload["service_tier"] == "default"


def test_chat_json_stream_sends_role_then_content_then_finish() -> None:
    payloads = stream_payloads(chat_json_to_stream(chat_completion(1, "m"), include_usage=False))

    assert [(p["choices"][0]["delta"], p["choices"][0]["finish_reason"]) for p in payloads] == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "answer 1"}, None),
        ({}, "stop"),
    ]


def test_chat_json_stream_sends_tool_calls_with_their_index() -> None:
    payloads = stream_payloads(chat_json_to_stream(chat_tool_completion(1, "m"), include_usage=False))

    tool_deltas = [p["choices"][0]["delta"]["tool_calls"] for p in payloads if "tool_calls" in p["choices"][0]["delta"]]
    assert tool_deltas == [
        [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ]
    ]
    assert payloads[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_chat_json_to_stream_does_not_change_the_completion() -> None:
    completion = chat_tool_completion(1, "m")
    before = copy.deepcopy(completion)

    chat_json_to_stream(completion, include_usage=True)

    assert completion == before


# OpenAI chat: round trips


def with_two_choices(completion: dict[str, Any]) -> dict[str, Any]:
    second = copy.deepcopy(completion["choices"][0])
    second["index"] = 1
    second["message"]["content"] = "another answer"
    second["finish_reason"] = "length"
    return {**completion, "choices": [completion["choices"][0], second]}


def with_logprobs(completion: dict[str, Any]) -> dict[str, Any]:
    entry = {"token": "answer", "logprob": -0.5, "bytes": None, "top_logprobs": []}
    completion = copy.deepcopy(completion)
    completion["choices"][0]["logprobs"] = {"content": [entry], "refusal": None}
    return completion


def with_content(completion: dict[str, Any], content: str) -> dict[str, Any]:
    completion = copy.deepcopy(completion)
    completion["choices"][0]["message"]["content"] = content
    return completion


def with_two_tool_calls(completion: dict[str, Any]) -> dict[str, Any]:
    completion = copy.deepcopy(completion)
    calls = completion["choices"][0]["message"]["tool_calls"]
    calls.append({"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}})
    return completion


@pytest.mark.parametrize(
    "completion",
    [
        pytest.param(chat_completion(1, "m"), id="text"),
        pytest.param(chat_tool_completion(1, "m"), id="tool-call"),
        pytest.param(with_two_tool_calls(chat_tool_completion(1, "m")), id="two-tool-calls"),
        pytest.param(with_two_choices(chat_completion(1, "m")), id="two-choices"),
        pytest.param(with_logprobs(chat_completion(1, "m")), id="logprobs"),
        pytest.param(
            {**chat_completion(1, "m"), "system_fingerprint": "fp_1", "service_tier": "default"},
            id="fingerprint-and-tier",
        ),
        pytest.param(
            with_content(chat_completion(1, "m"), "héllo ✓ 日本\nnew line\r\n\ttab"),
            id="non-ascii-and-line-breaks",
        ),
    ],
)
def test_chat_completion_survives_json_to_stream_to_json(completion: dict[str, Any]) -> None:
    stream = chat_json_to_stream(completion, include_usage=True)

    assert chat_stream_to_json(parse_events(stream)) == completion


def test_chat_json_stream_without_usage_cannot_convert_back() -> None:
    stream = chat_json_to_stream(chat_completion(1, "m"), include_usage=False)

    assert chat_stream_to_json(parse_events(stream)) is None


@pytest.mark.parametrize("tools", [pytest.param(False, id="text"), pytest.param(True, id="tools")])
def test_chat_stream_survives_stream_to_json_to_stream(tools: bool) -> None:
    original = chat_stream_to_json(events_of(chat_chunks(1, "m", tools=tools, usage=True)))
    assert original is not None

    again = chat_stream_to_json(parse_events(chat_json_to_stream(original, include_usage=True)))

    assert again == original


# Anthropic messages: stream -> JSON


def test_anthropic_stream_amounts_to_the_json_message() -> None:
    message = anthropic_stream_to_json(events_of(anthropic_events(1, "m")))

    assert message == anthropic_message(1, "m")
    assert message is not None
    assert message["content"] == [{"type": "text", "text": "answer 1"}]
    assert message["stop_reason"] == "end_turn"
    assert message["usage"] == {"input_tokens": 9, "output_tokens": 3}


def test_anthropic_tool_stream_amounts_to_the_json_message() -> None:
    message = anthropic_stream_to_json(events_of(anthropic_events(1, "m", tools=True)))

    assert message == tool_message(1, "m")
    assert message is not None
    assert message["id"] == "msg_1"
    assert message["model"] == "m"
    assert message["content"][1] == {
        "type": "tool_use",
        "id": "toolu_1",
        "name": "get_weather",
        "input": {"city": "Paris"},
    }
    assert message["stop_reason"] == "tool_use"
    assert message["usage"]["input_tokens"] == 9
    assert message["usage"]["output_tokens"] == 3


def anthropic(payload: dict[str, Any]) -> bytes:
    return encode_event(payload, name=str(payload["type"]))


def message_start(**usage: Any) -> bytes:
    start = {**anthropic_message(1, "m"), "content": [], "stop_reason": None}
    start["usage"] = usage or {"input_tokens": 9, "output_tokens": 1}
    return anthropic({"type": "message_start", "message": start})


def block(index: int, content_block: dict[str, Any], *deltas: dict[str, Any]) -> list[bytes]:
    return [
        anthropic({"type": "content_block_start", "index": index, "content_block": content_block}),
        *(anthropic({"type": "content_block_delta", "index": index, "delta": delta}) for delta in deltas),
        anthropic({"type": "content_block_stop", "index": index}),
    ]


def message_end(stop_reason: str = "end_turn", **usage: Any) -> list[bytes]:
    delta = {"stop_reason": stop_reason, "stop_sequence": None}
    return [
        anthropic({"type": "message_delta", "delta": delta, "usage": usage or {"output_tokens": 3}}),
        anthropic({"type": "message_stop"}),
    ]


def test_anthropic_thinking_and_signature_deltas_build_the_thinking_block() -> None:
    thinking = block(
        0,
        {"type": "thinking", "thinking": "", "signature": ""},
        {"type": "thinking_delta", "thinking": "Let me "},
        {"type": "thinking_delta", "thinking": "think."},
        {"type": "signature_delta", "signature": "sig-abc"},
    )
    text = block(1, {"type": "text", "text": ""}, {"type": "text_delta", "text": "Done."})

    message = anthropic_stream_to_json(events_of([message_start(), *thinking, *text, *message_end()]))

    assert message is not None
    assert message["content"] == [
        {"type": "thinking", "thinking": "Let me think.", "signature": "sig-abc"},
        {"type": "text", "text": "Done."},
    ]


def test_converting_the_same_events_twice_gives_the_same_answer() -> None:
    # Parsed events keep their JSON, and several rules convert one recording: none may change it.
    citation = {"type": "char_location", "cited_text": "x", "document_index": 0}
    cited = block(
        0,
        {"type": "text", "text": "", "citations": []},
        {"type": "citations_delta", "citation": citation},
        {"type": "text_delta", "text": "cited"},
    )
    events = events_of([message_start(), *cited, *message_end()])

    first = anthropic_stream_to_json(events)
    second = anthropic_stream_to_json(events)

    assert first is not None and first == second
    assert first["content"] == [{"type": "text", "text": "cited", "citations": [citation]}]


def test_anthropic_citation_deltas_are_collected_on_the_text_block() -> None:
    citation = {"type": "char_location", "cited_text": "x", "document_index": 0}
    cited = block(
        0,
        {"type": "text", "text": ""},
        {"type": "citations_delta", "citation": citation},
        {"type": "text_delta", "text": "cited"},
    )

    message = anthropic_stream_to_json(events_of([message_start(), *cited, *message_end()]))

    assert message is not None
    assert message["content"] == [{"type": "text", "text": "cited", "citations": [citation]}]


@pytest.mark.parametrize(
    "deltas",
    [
        pytest.param((), id="no-delta"),
        pytest.param(({"type": "input_json_delta", "partial_json": ""},), id="empty-partial-json"),
    ],
)
def test_anthropic_tool_use_without_arguments_has_empty_input(deltas: tuple[dict[str, Any], ...]) -> None:
    tool = block(0, {"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}, *deltas)

    message = anthropic_stream_to_json(events_of([message_start(), *tool, *message_end("tool_use")]))

    assert message is not None
    assert message["content"] == [{"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}]


def test_anthropic_message_delta_usage_updates_without_erasing() -> None:
    start = message_start(input_tokens=9, output_tokens=1, cache_read_input_tokens=4)
    end = message_end(output_tokens=12, input_tokens=None)

    message = anthropic_stream_to_json(events_of([start, *end]))

    assert message is not None
    assert message["usage"] == {"input_tokens": 9, "output_tokens": 12, "cache_read_input_tokens": 4}


def test_anthropic_blocks_are_ordered_by_index() -> None:
    first = block(0, {"type": "text", "text": ""}, {"type": "text_delta", "text": "first"})
    second = block(1, {"type": "text", "text": ""}, {"type": "text_delta", "text": "second"})

    message = anthropic_stream_to_json(events_of([message_start(), *second, *first, *message_end()]))

    assert message is not None
    assert [content["text"] for content in message["content"]] == ["first", "second"]


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param([], id="empty"),
        pytest.param([anthropic({"type": "ping"}), anthropic({"type": "message_stop"})], id="ping-and-stop"),
        pytest.param(anthropic_events(1, "m")[1:], id="missing-message-start"),
        pytest.param(chat_chunks(1, "m", usage=True), id="openai-chunks"),
    ],
)
def test_anthropic_stream_without_message_start_converts_to_none(chunks: list[bytes]) -> None:
    assert anthropic_stream_to_json(events_of(chunks)) is None


# Anthropic messages: JSON -> stream


def test_anthropic_json_stream_is_a_well_formed_message_stream() -> None:
    stream = anthropic_json_to_stream(tool_message(1, "m"))

    events = parse_events(stream)

    assert b"".join(event.raw for event in events) == stream
    assert events[0].type == "message_start"
    assert events[-1].type == "message_stop"
    assert all(event.name == event.type for event in events)
    assert stream_completed("messages", stream)
    assert [event.type for event in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


def test_anthropic_json_stream_starts_empty_and_finishes_with_the_stop_reason() -> None:
    payloads = [event.json() for event in parse_events(anthropic_json_to_stream(tool_message(1, "m")))]

    start = payloads[0]["message"]
    assert start["id"] == "msg_1"
    assert start["model"] == "m"
    assert start["content"] == []
    assert start["stop_reason"] is None
    delta = payloads[-2]
    assert delta["type"] == "message_delta"
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 3


def test_anthropic_json_stream_sends_tool_input_as_partial_json() -> None:
    payloads = [event.json() for event in parse_events(anthropic_json_to_stream(tool_message(1, "m")))]

    starts = [p["content_block"] for p in payloads if p["type"] == "content_block_start"]
    deltas = [p["delta"] for p in payloads if p["type"] == "content_block_delta"]
    assert starts[1] == {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
    assert deltas[1] == {"type": "input_json_delta", "partial_json": '{"city":"Paris"}'}


THINKING_MESSAGE = {
    **anthropic_message(2, "claude-x"),
    "content": [
        {"type": "thinking", "thinking": "Pondering…", "signature": "EqQBCkYIARgCKkC"},
        {"type": "redacted_thinking", "data": "opaque"},
        {"type": "text", "text": "Here it is."},
        {"type": "tool_use", "id": "toolu_9", "name": "lookup", "input": {"q": ["a", 1, None], "deep": {}}},
    ],
    "stop_reason": "tool_use",
    "usage": {"input_tokens": 20, "output_tokens": 50, "cache_creation_input_tokens": 0},
}

CITED_MESSAGE = {
    **anthropic_message(3, "m"),
    "content": [
        {
            "type": "text",
            "text": "The sky is blue.",
            "citations": [{"type": "char_location", "cited_text": "blue", "document_index": 0}],
        }
    ],
}


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(anthropic_message(1, "m"), id="text"),
        pytest.param(tool_message(1, "m"), id="text-and-tool-use"),
        pytest.param(THINKING_MESSAGE, id="thinking-redacted-text-tool"),
        pytest.param(CITED_MESSAGE, id="citations"),
        pytest.param({**anthropic_message(1, "m"), "content": []}, id="no-content"),
        pytest.param(
            {**anthropic_message(1, "m"), "stop_reason": "stop_sequence", "stop_sequence": "\n\nHuman:"},
            id="stop-sequence",
        ),
    ],
)
def test_anthropic_message_survives_json_to_stream_to_json(message: dict[str, Any]) -> None:
    before = copy.deepcopy(message)

    stream = anthropic_json_to_stream(message)

    assert message == before
    assert anthropic_stream_to_json(parse_events(stream)) == message


def test_thinking_block_keeps_its_signature_through_a_round_trip() -> None:
    again = anthropic_stream_to_json(parse_events(anthropic_json_to_stream(THINKING_MESSAGE)))

    assert again is not None
    assert again["content"][0] == {
        "type": "thinking",
        "thinking": "Pondering…",
        "signature": "EqQBCkYIARgCKkC",
    }


@pytest.mark.parametrize("tools", [pytest.param(False, id="text"), pytest.param(True, id="tools")])
def test_anthropic_stream_survives_stream_to_json_to_stream(tools: bool) -> None:
    original = anthropic_stream_to_json(events_of(anthropic_events(1, "m", tools=tools)))
    assert original is not None

    assert anthropic_stream_to_json(parse_events(anthropic_json_to_stream(original))) == original


def test_a_refusal_keeps_null_content_through_a_round_trip() -> None:
    completion = chat_completion(1, "m")
    completion["choices"][0]["message"] = {"role": "assistant", "content": None, "refusal": "I can't help."}
    round_trip = chat_stream_to_json(parse_events(chat_json_to_stream(completion, include_usage=True)))
    assert round_trip is not None
    assert round_trip["choices"][0]["message"]["content"] is None
    assert round_trip["choices"][0]["message"]["refusal"] == "I can't help."
