from __future__ import annotations

import math
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.sse import (
    DONE,
    SseEvent,
    data_events,
    encode_event,
    events_mentioning,
    mention,
    parse_events,
    split_events,
    stream_completed,
)
from tests.servers import anthropic_events, chat_chunks

# parse_events


@pytest.mark.parametrize(
    "separator",
    [
        pytest.param(b"\n", id="lf"),
        pytest.param(b"\r\n", id="crlf"),
        pytest.param(b"\r", id="cr"),
    ],
)
def test_parse_events_splits_on_blank_lines_with_any_line_ending(separator: bytes) -> None:
    stream = separator.join([b"event: first", b"data: one", b"", b"data: two", b"", b""])

    events = parse_events(stream)

    assert [(event.name, event.data) for event in events] == [("first", "one"), (None, "two")]
    assert events[0].raw == b"event: first" + separator + b"data: one" + separator + separator
    assert b"".join(event.raw for event in events) == stream


@pytest.mark.parametrize(
    "separator",
    [
        pytest.param(b"\n", id="lf"),
        pytest.param(b"\r\n", id="crlf"),
        pytest.param(b"\r", id="cr"),
    ],
)
def test_multi_line_data_is_joined_with_newlines(separator: bytes) -> None:
    stream = separator.join([b"data: first", b"data: second", b"data: third", b"", b""])

    [event] = parse_events(stream)

    assert event.data == "first\nsecond\nthird"


def test_event_name_is_read_from_the_event_field() -> None:
    [event] = parse_events(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')

    assert event.name == "message_stop"
    assert event.data == '{"type":"message_stop"}'


def test_event_without_event_field_has_no_name() -> None:
    [event] = parse_events(b"data: hello\n\n")

    assert event.name is None


@pytest.mark.parametrize(
    ("line", "data"),
    [
        pytest.param(b"data: value", "value", id="with-space"),
        pytest.param(b"data:value", "value", id="without-space"),
        pytest.param(b"data:  value", " value", id="only-first-space-removed"),
        pytest.param(b"data:", "", id="empty-value"),
    ],
)
def test_one_space_after_the_colon_is_optional(line: bytes, data: str) -> None:
    [event] = parse_events(line + b"\n\n")

    assert event.data == data


def test_comment_lines_are_not_data() -> None:
    [event] = parse_events(b": keep-alive\ndata: payload\n\n")

    assert event.data == "payload"


def test_comment_only_block_is_kept_as_an_event_without_data() -> None:
    stream = b": ping\n\ndata: x\n\n"

    events = parse_events(stream)

    assert [(event.name, event.data) for event in events] == [(None, ""), (None, "x")]
    assert events[0].raw == b": ping\n\n"


def test_unknown_fields_are_ignored() -> None:
    [event] = parse_events(b"id: 7\nretry: 1000\ndata: x\n\n")

    assert (event.name, event.data) == (None, "x")


def test_incomplete_trailing_event_is_not_returned() -> None:
    stream = b"data: one\n\ndata: two"

    events = parse_events(stream)

    assert [event.data for event in events] == ["one"]
    assert b"".join(event.raw for event in events) == b"data: one\n\n"


def test_stream_without_any_blank_line_has_no_events() -> None:
    assert parse_events(b"data: partial\n") == ()


def test_empty_stream_has_no_events() -> None:
    assert parse_events(b"") == ()


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param(chat_chunks(1, "m", usage=True), id="openai-chat"),
        pytest.param(chat_chunks(2, "m", tools=True), id="openai-chat-tools"),
        pytest.param(anthropic_events(3, "m", tools=True), id="anthropic"),
    ],
)
def test_raw_bytes_of_realistic_streams_reproduce_the_stream(chunks: list[bytes]) -> None:
    stream = b"".join(chunks)

    events = parse_events(stream)

    assert [event.raw for event in events] == chunks


def test_non_ascii_data_is_decoded_as_utf8() -> None:
    [event] = parse_events('data: {"text": "héllo ✓"}\n\n'.encode())

    assert event.json() == {"text": "héllo ✓"}


@given(st.lists(st.sampled_from([b"data: x", b"\n", b"\r", b"\r\n", b"event: e", b":", b"y"]), max_size=30))
def test_splitting_events_by_their_blank_lines_any_line_ending(parts: list[bytes]) -> None:
    stream = b"".join(parts)
    ends = [match.end() for match in re.finditer(rb"\r\n\r\n|\n\n|\r\r", stream)]
    starts = [0, *ends]

    events, rest = split_events(stream)

    assert events == [stream[start:end] for start, end in zip(starts, ends, strict=False)]
    assert rest == stream[starts[-1] :]


# SseEvent


def test_json_of_data_that_is_not_json_is_none() -> None:
    assert SseEvent(None, DONE, b"").json() is None
    assert SseEvent(None, "not json", b"").json() is None


def test_json_reads_what_pythons_json_reads_beyond_orjson() -> None:
    # Read with orjson first; NaN and integers beyond 64 bits are what only Python's JSON reads.
    assert SseEvent(None, '{"n": 18446744073709551616}', b"").json() == {"n": 2**64}
    assert math.isnan(SseEvent(None, '{"x": NaN}', b"").json()["x"])


@pytest.mark.parametrize(
    "raw",
    [
        b'data: {"a": 1}\n\n',
        b"data:{}\n\n",
        b"data:  two spaces\n\n",
        b"data: \n\n",
        b"data: one\ndata: two\n\n",
        b"data: crlf\r\n\r\n",
        b"event: x\ndata: y\n\n",
    ],
)
def test_one_line_events_read_the_same_as_any_other(raw: bytes) -> None:
    [event] = parse_events(raw)
    # The same event with a comment line first, which the general reading handles.
    [general] = parse_events(b": comment\n" + raw)

    assert (event.name, event.data, event.raw) == (general.name, general.data, raw)


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        pytest.param(None, "[DONE]", "[DONE]", id="done"),
        pytest.param("ignored", "[DONE]", "[DONE]", id="done-wins-over-name"),
        pytest.param(None, '{"type": "message_start"}', "message_start", id="json-type"),
        pytest.param("content_block_delta", '{"type": "ping"}', "ping", id="json-type-wins-over-name"),
        pytest.param("message_stop", '{"id": "x"}', "message_stop", id="json-without-type-uses-name"),
        pytest.param("error", '{"type": 3}', "error", id="non-string-type-uses-name"),
        pytest.param("error", "not json", "error", id="non-json-uses-name"),
        pytest.param(None, '{"id": "x"}', "", id="no-type-no-name"),
        pytest.param(None, '["type"]', "", id="json-that-is-not-an-object"),
    ],
)
def test_event_type(name: str | None, data: str, expected: str) -> None:
    assert SseEvent(name, data, b"").type == expected


# encode_event


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"type": "message_stop"}, id="simple"),
        pytest.param({"text": "héllo ✓ 日本", "nested": {"list": [1, 2.5, None, True]}}, id="non-ascii"),
        pytest.param({"text": "line one\nline two\r\nline three"}, id="newlines-in-strings"),
        pytest.param([1, "two"], id="array"),
    ],
)
def test_encoded_event_parses_back_to_the_same_payload(payload: Any) -> None:
    encoded = encode_event(payload, name="custom")

    [event] = parse_events(encoded)

    assert event.json() == payload
    assert event.name == "custom"
    assert event.raw == encoded


def test_encode_event_writes_compact_json_on_one_data_line() -> None:
    encoded = encode_event({"a": 1, "b": "é"})

    assert encoded == 'data: {"a":1,"b":"é"}\n\n'.encode()


def test_encode_event_writes_a_string_literally() -> None:
    encoded = encode_event(DONE)

    assert encoded == b"data: [DONE]\n\n"
    assert parse_events(encoded)[0].type == DONE


def test_encode_event_with_name_writes_the_event_field_first() -> None:
    assert encode_event({"type": "ping"}, name="ping") == b'event: ping\ndata: {"type":"ping"}\n\n'


# data_events


def test_data_events_keeps_only_json_payloads() -> None:
    stream = b': ping\n\ndata: {"a": 1}\n\nevent: ping\ndata: \n\ndata: [1]\n\ndata: [DONE]\n\n'

    assert data_events(parse_events(stream)) == [{"a": 1}, [1]]


# stream_completed


def data(payload: Any, name: str | None = None) -> bytes:
    return encode_event(payload, name)


CHAT_CHUNK = data({"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}}]})
DONE_EVENT = b"data: [DONE]\n\n"


def anthropic(payload: dict[str, Any]) -> bytes:
    return data(payload, name=payload["type"])


@pytest.mark.parametrize(
    ("endpoint", "stream"),
    [
        pytest.param("chat/completions", CHAT_CHUNK + DONE_EVENT, id="chat-completions-done"),
        pytest.param("chat/completions", b"".join(chat_chunks(1, "m", usage=True)), id="chat-chunks"),
        pytest.param("chat/completions", b"".join(chat_chunks(1, "m", tools=True)), id="chat-tool-chunks"),
        pytest.param("completions", data({"choices": [{"text": "x"}]}) + DONE_EVENT, id="completions-done"),
        pytest.param("messages", b"".join(anthropic_events(1, "m")), id="messages"),
        pytest.param("messages", b"".join(anthropic_events(1, "m", tools=True)), id="messages-tools"),
        pytest.param(
            "responses",
            data({"type": "response.created"}) + data({"type": "response.completed"}),
            id="responses-completed",
        ),
        pytest.param(
            "responses",
            data({"type": "response.created"}) + data({"type": "response.incomplete"}),
            id="responses-incomplete-is-a-whole-answer",
        ),
        pytest.param(
            "chat", data({"type": "content-delta"}) + data({"type": "message-end"}), id="cohere-chat-message-end"
        ),
        pytest.param("v1/unknown", data({"type": "content-delta"}), id="no-terminator-unknown"),
        pytest.param("embeddings", data({"object": "list"}), id="no-terminator-embeddings"),
        pytest.param("chat/completions", b"\r\n".join([b"data: [DONE]", b"", b""]), id="crlf"),
        pytest.param("chat/completions", CHAT_CHUNK + DONE_EVENT + b": trailing comment\n\n", id="comment"),
    ],
)
def test_stream_that_ends_with_the_endpoint_terminator_is_complete(endpoint: str, stream: bytes) -> None:
    assert stream_completed(endpoint, stream) is True


@pytest.mark.parametrize(
    ("endpoint", "stream"),
    [
        pytest.param("chat/completions", CHAT_CHUNK, id="chat-completions-without-done"),
        pytest.param("chat", data({"type": "content-delta"}), id="cohere-chat-without-message-end"),
        pytest.param("chat/completions", b"".join(chat_chunks(1, "m", usage=True)[:-1]), id="chat-chunks-cut"),
        pytest.param("completions", data({"choices": [{"text": "x"}]}), id="completions-without-done"),
        pytest.param("messages", b"".join(anthropic_events(1, "m")[:-1]), id="messages-without-stop"),
        pytest.param("messages", CHAT_CHUNK + DONE_EVENT, id="messages-with-openai-done"),
        pytest.param("responses", data({"type": "response.created"}), id="responses-without-completed"),
        pytest.param("chat/completions", DONE_EVENT + CHAT_CHUNK, id="done-not-last"),
    ],
)
def test_stream_without_the_endpoint_terminator_is_incomplete(endpoint: str, stream: bytes) -> None:
    assert stream_completed(endpoint, stream) is False


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions", "messages", "responses", "chat", "embeddings"])
@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\n\n", id="blank-lines"),
        pytest.param(b": ping\n\n: ping\n\n", id="comments-only"),
        pytest.param(b"event: ping\n\n", id="event-without-data"),
    ],
)
def test_stream_without_data_is_incomplete(endpoint: str, stream: bytes) -> None:
    assert stream_completed(endpoint, stream) is False


MESSAGES_OK = b"".join(anthropic_events(1, "m"))
RESPONSES_CREATED = data({"type": "response.created"})
RESPONSES_COMPLETED = data({"type": "response.completed"})


@pytest.mark.parametrize(
    ("endpoint", "stream"),
    [
        pytest.param(
            "chat/completions",
            CHAT_CHUNK + data({"message": "overloaded"}, name="error") + DONE_EVENT,
            id="error-event-name",
        ),
        pytest.param(
            "messages",
            MESSAGES_OK.replace(
                b"event: message_stop",
                data({"type": "error", "error": {"type": "overloaded_error"}}, name="error") + b"event: message_stop",
            ),
            id="anthropic-error-event",
        ),
        pytest.param(
            "messages",
            data({"type": "error", "error": {"type": "overloaded_error"}}) + MESSAGES_OK,
            id="json-type-error",
        ),
        pytest.param(
            "responses",
            RESPONSES_CREATED + data({"type": "response.failed"}) + RESPONSES_COMPLETED,
            id="response-failed",
        ),
        pytest.param(
            "chat/completions",
            CHAT_CHUNK + data({"error": {"message": "server_error"}}) + DONE_EVENT,
            id="error-key-in-data",
        ),
        pytest.param("chat/completions", CHAT_CHUNK + data({"error": "boom"}) + DONE_EVENT, id="error-string-in-data"),
        pytest.param("chat", data({"type": "content-delta"}) + data({"error": {}}), id="no-terminator"),
        pytest.param("embeddings", data({"message": "bad"}, name="error"), id="only-an-error"),
    ],
)
def test_any_error_event_makes_the_stream_incomplete(endpoint: str, stream: bytes) -> None:
    assert stream_completed(endpoint, stream) is False


def test_null_error_key_is_not_an_error() -> None:
    stream = data({"id": "c", "choices": [], "error": None}) + DONE_EVENT

    assert stream_completed("chat/completions", stream) is True


@pytest.mark.parametrize(
    ("endpoint", "stream"),
    [
        pytest.param("chat/completions", CHAT_CHUNK + b"data: [DONE]", id="done-without-blank-line"),
        pytest.param("chat/completions", CHAT_CHUNK + b"data: [DONE]\n", id="done-with-one-newline"),
        pytest.param(
            "messages",
            MESSAGES_OK.removesuffix(b"\n\n"),
            id="message-stop-without-blank-line",
        ),
        pytest.param("responses", RESPONSES_CREATED + RESPONSES_COMPLETED.rstrip(), id="responses"),
        pytest.param("embeddings", b'data: {"object": "list"}', id="no-terminator-only-a-tail"),
    ],
)
def test_bytes_after_the_last_blank_line_are_the_final_event(endpoint: str, stream: bytes) -> None:
    assert stream_completed(endpoint, stream) is True


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(CHAT_CHUNK + b'data: {"id": "c", "choices": [{"index": 0, "del', id="cut-mid-json"),
        pytest.param(CHAT_CHUNK + b"data: [DO", id="cut-mid-done"),
        pytest.param(CHAT_CHUNK + b'data: {"error": {"message": "boom"}}', id="error-in-the-tail"),
    ],
)
def test_cut_chat_stream_is_incomplete(stream: bytes) -> None:
    assert stream_completed("chat/completions", stream) is False


def test_error_in_the_tail_makes_a_stream_without_terminator_incomplete() -> None:
    stream = data({"type": "content-delta"}) + b'event: error\ndata: {"message": "boom"}'

    assert stream_completed("chat", stream) is False


def test_whitespace_after_the_last_event_is_not_an_event() -> None:
    assert stream_completed("chat/completions", CHAT_CHUNK + DONE_EVENT + b"\n  \r\n") is True


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_unicode_line_separators_inside_data_do_not_split_it(separator: str) -> None:
    event = parse_events(encode_event({"text": f"a{separator}b"}))[0]
    assert event.json() == {"text": f"a{separator}b"}


# Judging a stream reads only the events that can matter, found by what their bytes mention. Whatever the
# stream, the answer is the one a reading of every event gives.

_PIECES = [
    b'data: {"choices":[{"delta":{"content":"x"}}]}',
    b'data: {"choices":[],"usage":{"prompt_tokens":1}}',
    b'data: {"usage":null}',
    b'data: {"error":{"message":"boom"}}',
    b'data: {"\\u0065rror":"escaped"}',
    b'data: {"error":null}',
    b'data: {"type":"response.failed"}',
    b"event: error",
    b"data: [DONE]",
    b"data: error",
    b": comment",
    b'data: {"type":"message_stop"}',
    b"\n",
    b"\r\n",
    b"\n\n",
]


def reference_completed(endpoint: str, stream: bytes) -> bool:
    """stream_completed as the rule says it, every event read."""
    events, tail = split_events(stream)
    parsed = [event for raw in events if (event := parse_events(raw)[0]).data] if events else []
    if tail.strip():
        [last] = parse_events(tail + b"\n\n") or [None]
        if last is not None and last.data:
            parsed.append(last)
    if not parsed:
        return False
    for event in parsed:
        payload = event.json()
        if event.type in ("error", "response.failed") or event.name == "error":
            return False
        if isinstance(payload, dict) and payload.get("error") is not None:
            return False
    terminators = {"chat/completions": {DONE}, "messages": {"message_stop"}}.get(endpoint)
    return terminators is None or parsed[-1].type in terminators


@settings(max_examples=500)
@given(st.lists(st.sampled_from(_PIECES), max_size=12), st.sampled_from(["chat/completions", "messages", "embeddings"]))
def test_a_stream_is_judged_as_reading_every_event_judges_it(pieces: list[bytes], endpoint: str) -> None:
    stream = b"".join(pieces)

    assert stream_completed(endpoint, stream) is reference_completed(endpoint, stream)


@settings(max_examples=500)
@given(st.lists(st.sampled_from(_PIECES), max_size=12))
def test_the_events_mentioning_a_word_are_those_whose_bytes_hold_it_or_an_escape(pieces: list[bytes]) -> None:
    stream = b"".join(pieces)
    mentioned = mention(rb"usage", rb"error")

    found = events_mentioning(stream, mentioned)

    assert found == [event for event in parse_events(stream) if re.search(rb"usage|error|\\u00", event.raw)]


def test_an_error_spelled_with_escapes_still_makes_the_stream_incomplete() -> None:
    stream = CHAT_CHUNK + b'data: {"\\u0065rror": {"message": "boom"}}\n\n' + DONE_EVENT

    assert stream_completed("chat/completions", stream) is False


def test_a_long_stream_without_errors_is_judged_by_its_last_event() -> None:
    chunks = chat_chunks(1, "m", usage=True)
    long_stream = b"".join(chunks[:-1] * 200) + chunks[-1]

    assert stream_completed("chat/completions", long_stream) is True
    assert stream_completed("chat/completions", long_stream.removesuffix(chunks[-1])) is False


_MENTION_PIECES = [b"error", b"err", b"ror", b"failed", b'"usage"', b'"usage":null', b'"usage" :\tnull', b'"usage":1']
_MENTION_PIECES += [b"\\u0065", b"\\u00e9", b"\\u00", b"\\", b"u00", b"x", b"\n\n", b"o"]


@settings(max_examples=500)
@given(st.lists(st.sampled_from(_MENTION_PIECES), max_size=14), st.integers(min_value=0, max_value=40))
def test_a_mention_is_found_where_a_regular_expression_search_finds_it(pieces: list[bytes], start: int) -> None:
    data = b"".join(pieces)
    words = mention(b"error", b"failed")
    overlapping = mention(b"rror", b"err", b"or\\u")  # one may begin inside another, or inside an escape
    usage = mention(b'"usage"', unless_followed_by=rb"[ \t]*:[ \t]*null")

    def searched(pattern: bytes) -> int:
        match = re.compile(pattern).search(data, start)
        return match.start() if match else -1

    assert words.find(data, start) == searched(rb"error|failed|\\u00[0-7][0-9a-fA-F]")
    assert overlapping.find(data, start) == searched(rb"rror|err|or\\u|\\u00[0-7][0-9a-fA-F]")
    assert usage.find(data, start) == searched(rb'"usage"(?![ \t]*:[ \t]*null)|\\u00[0-7][0-9a-fA-F]')
