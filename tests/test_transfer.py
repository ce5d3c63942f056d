"""Entries as JSON lines, for `openai-proxy export` and `import`."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from cache.base import CachedResponse
from cache.transfer import MalformedLine, entry_to_line, line_to_entry
from tests.servers import anthropic_events, chat_chunks

BARE = CachedResponse(
    status=200,
    content_type="application/json",
    body=b'{"id":"chatcmpl-1","choices":[]}',
    created_at=1_700_000_000.25,
    provider="openai",
    endpoint="v1/chat/completions",
)

ENTRIES = [
    pytest.param(BARE, id="optional-fields-unset"),
    pytest.param(
        CachedResponse(
            status=203,
            content_type="application/json; charset=utf-8",
            body='{"text": "héllo ☃ 日本 \\n"}\n'.encode(),
            created_at=1_700_000_000.0,
            provider="anthropic",
            endpoint="v1/messages?beta=true",
            model="claude-3-5-haiku",
            namespace="team/a:b",
            ttl=3600.5,
            input_tokens=12,
            output_tokens=0,
            cached_input_tokens=8,
            cache_write_tokens=2,
            upstream_seconds=1.25,
        ),
        id="every-field-set-non-ascii-text",
    ),
    pytest.param(
        CachedResponse(200, "application/json", b"\x00\xff\xfe\x80 not utf-8", 1.0, "openai", "v1/embeddings", None),
        id="binary-body-model-none",
    ),
    pytest.param(
        CachedResponse(200, "text/event-stream", b"".join(chat_chunks(1, "gpt-4o", usage=True)), 2.0, "openai", "c"),
        id="chat-sse",
    ),
    pytest.param(
        CachedResponse(200, "text/event-stream", b"".join(anthropic_events(1, "claude", tools=True)), 2.0, "a", "m"),
        id="anthropic-sse",
    ),
    pytest.param(
        CachedResponse(
            200, "text/event-stream", b"data: one\r\n\r\ndata: two\r\rdata: \xe2\x80\xa8\n\n", 3.0, "x", "y"
        ),
        id="sse-with-cr-lf-and-line-separator",
    ),
    pytest.param(CachedResponse(204, "application/json", b"", 0.0, "openai", "v1/x", ttl=0), id="empty-body"),
]


@pytest.mark.parametrize("entry", ENTRIES)
def test_an_entry_round_trips_through_a_line(entry: CachedResponse) -> None:
    assert line_to_entry(entry_to_line("key-1", entry)) == ("key-1", entry)


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_line_is_one_line_of_json(entry: CachedResponse) -> None:
    line = entry_to_line("key-1", entry)

    assert "\n" not in line
    assert "\r" not in line
    assert isinstance(json.loads(line), dict)


def test_a_line_read_back_with_its_newline_is_accepted() -> None:
    assert line_to_entry(entry_to_line("k", BARE) + "\n") == ("k", BARE)


def test_a_text_body_is_written_as_text() -> None:
    record = json.loads(entry_to_line("k", BARE))

    assert record["body"] == BARE.body.decode()
    assert "body_base64" not in record
    assert record["key"] == "k"
    assert record["status"] == 200


def test_a_body_that_is_not_utf8_is_written_as_base64() -> None:
    body = b"\x89PNG\r\n\x1a\n\xff"
    record = json.loads(entry_to_line("k", CachedResponse(200, "image/png", body, 1.0, "openai", "v1/x")))

    assert "body" not in record
    assert base64.b64decode(record["body_base64"]) == body


def test_an_integer_created_at_is_read_as_a_float() -> None:
    record = {**json.loads(entry_to_line("k", BARE)), "created_at": 1_700_000_000}

    _, entry = line_to_entry(json.dumps(record))

    assert entry.created_at == 1_700_000_000.0
    assert isinstance(entry.created_at, float)


def test_a_missing_namespace_or_null_optional_fields_take_the_defaults() -> None:
    record = {**json.loads(entry_to_line("k", BARE)), "model": None, "ttl": None, "namespace": None}
    del record["input_tokens"]

    _, entry = line_to_entry(json.dumps(record))

    assert (entry.model, entry.ttl, entry.namespace, entry.input_tokens) == (None, None, "", None)


def valid_record(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(entry_to_line("k", BARE))
    record.update(changes)
    return record


def without(name: str, **changes: Any) -> str:
    record = valid_record(**changes)
    del record[name]
    return json.dumps(record)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        pytest.param("this is not json", r"^not JSON \(", id="not-json"),
        pytest.param('{"key": "k", ', r"^not JSON \(", id="truncated"),
        pytest.param("", r"^not JSON \(", id="empty"),
        pytest.param("[1, 2, 3]", r"^not a JSON object$", id="array"),
        pytest.param('"just a string"', r"^not a JSON object$", id="string"),
        pytest.param("null", r"^not a JSON object$", id="null"),
        pytest.param(without("key"), r"'key' is missing or of the wrong type", id="missing-key"),
        pytest.param(json.dumps(valid_record(key=7)), r"'key' is missing or of the wrong type", id="key-not-string"),
        pytest.param(
            json.dumps(valid_record(status="200")), r"'status' is missing or of the wrong type", id="status-str"
        ),
        pytest.param(
            json.dumps(valid_record(status=True)), r"'status' is missing or of the wrong type", id="status-bool"
        ),
        pytest.param(json.dumps(valid_record(status=200.0)), r"'status'", id="status-float"),
        pytest.param(without("content_type"), r"'content_type' is missing", id="missing-content-type"),
        pytest.param(json.dumps(valid_record(created_at="today")), r"'created_at'", id="created-at-str"),
        pytest.param(json.dumps(valid_record(created_at=False)), r"'created_at'", id="created-at-bool"),
        pytest.param(without("provider"), r"'provider'", id="missing-provider"),
        pytest.param(json.dumps(valid_record(endpoint=None)), r"'endpoint'", id="endpoint-null"),
        pytest.param(json.dumps(valid_record(model=3)), r"'model' is of the wrong type", id="model-int"),
        pytest.param(json.dumps(valid_record(ttl="60")), r"'ttl' is of the wrong type", id="ttl-str"),
        pytest.param(json.dumps(valid_record(input_tokens=1.5)), r"'input_tokens' is of the wrong type", id="float"),
        pytest.param(json.dumps(valid_record(output_tokens=True)), r"'output_tokens' is of the wrong type", id="bool"),
        pytest.param(json.dumps(valid_record(namespace=["a"])), r"'namespace' is of the wrong type", id="namespace"),
        pytest.param(without("body"), r"'body' \(or 'body_base64'\) is missing", id="body-missing"),
        pytest.param(json.dumps(valid_record(body=123)), r"'body' \(or 'body_base64'\) is missing", id="body-int"),
        pytest.param(without("body", body_base64="not base64!"), r"'body_base64' is not valid base64", id="bad-base64"),
        pytest.param(without("body", body_base64="abc"), r"'body_base64' is not valid base64", id="bad-padding"),
        pytest.param(without("body", body_base64="aGVs!bG8="), r"'body_base64' is not valid base64", id="junk-inside"),
        pytest.param(without("body", body_base64="é"), r"'body_base64' is not valid base64", id="non-ascii-base64"),
    ],
)
def test_a_malformed_line_says_what_is_wrong(line: str, message: str) -> None:
    with pytest.raises(MalformedLine, match=message):
        line_to_entry(line)


def test_malformed_line_is_a_value_error() -> None:
    assert issubclass(MalformedLine, ValueError)


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(
            '{"key":"k","status":200,"content_type":"a","created_at":1.0,"provider":"p","endpoint":"e",'
            '"body":"\\ud800"}',
            id="lone-surrogate-body",
        ),
        pytest.param(
            '{"key":"k","status":200,"content_type":"a","created_at":' + "9" * 400 + ',"provider":"p",'
            '"endpoint":"e","body":""}',
            id="huge-created-at",
        ),
        pytest.param(
            '{"key":"k","status":200,"content_type":"a","created_at":NaN,"provider":"p","endpoint":"e","body":""}',
            id="nan-created-at",
        ),
        pytest.param("[" * 100_000, id="deep-nesting"),
    ],
)
def test_hostile_lines_are_malformed_not_crashes(line: str) -> None:
    with pytest.raises(MalformedLine):
        line_to_entry(line)
