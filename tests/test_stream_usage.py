"""Usage the proxy asked for is withheld from a client that did not: exactly the stream it would have had."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cache.stream_usage import UsageWithheld, ask_for_usage, without_usage
from tests.servers import chat_chunks

USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}


def compact_stream(with_usage: bool) -> bytes:
    """OpenAI's own spelling: compact JSON, `usage` as the last member of every chunk."""
    chunks: list[dict[str, Any]] = [
        {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}
        for text in ('Say "usage": null', "!")
    ]
    events = [{**chunk, "usage": None} if with_usage else chunk for chunk in chunks]
    if with_usage:
        events.append({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": USAGE})
    lines = [b"data: " + orjson.dumps(event) + b"\n\n" for event in events]
    return b"".join(lines) + b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("recorded", "expected"),
    [
        pytest.param(b"".join(chat_chunks(1, "m", usage=True)), b"".join(chat_chunks(1, "m")), id="spaced"),
        pytest.param(compact_stream(True), compact_stream(False), id="compact"),
        pytest.param(
            b"".join(chat_chunks(1, "m", tools=True, usage=True)), b"".join(chat_chunks(1, "m", tools=True)), id="tools"
        ),
        pytest.param(b"".join(chat_chunks(1, "m")), b"".join(chat_chunks(1, "m")), id="nothing-to-withhold"),
    ],
)
def test_a_recording_with_usage_becomes_the_stream_without(recorded: bytes, expected: bytes) -> None:
    assert without_usage(recorded) == expected


def test_usage_in_a_string_is_content_and_stays() -> None:
    assert b'\\"usage\\": null' in without_usage(compact_stream(True))


@pytest.mark.parametrize(
    "chunk",
    [
        pytest.param({"usage": None, "id": "c", "choices": []}, id="first-member"),
        pytest.param({"usage": None}, id="only-member"),
        pytest.param({"id": "c", "choices": [{"index": 0, "delta": {}}], "usage": USAGE}, id="usage-beside-choices"),
    ],
)
def test_other_placements_of_usage_are_withheld_too(chunk: dict[str, Any]) -> None:
    event = f"event: chunk\ndata: {json.dumps(chunk)}\n\n".encode()
    passed = without_usage(event)
    assert passed.startswith(b"event: chunk\n")
    assert json.loads(passed.split(b"data: ", 1)[1]) == {k: v for k, v in chunk.items() if k != "usage"}


_SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text()
_JSON = st.recursive(
    _SCALARS | st.sampled_from(['"usage":null}', ',"usage":null}', "usage"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@given(st.dictionaries(st.text(max_size=6).filter(lambda name: name != "usage"), _JSON, min_size=1, max_size=4))
def test_a_compact_chunk_ending_in_null_usage_loses_just_that_member(chunk: dict[str, Any]) -> None:
    # OpenAI's own chunk (compact, `"usage":null` last) is cut without being parsed: the cut must be the member.
    event = b"data: " + orjson.dumps({**chunk, "usage": None}) + b"\n\n"

    assert without_usage(event) == b"data: " + orjson.dumps(chunk) + b"\n\n"
    assert UsageWithheld().feed(event) == b"data: " + orjson.dumps(chunk) + b"\n\n"


@given(st.lists(st.integers(min_value=0, max_value=len(compact_stream(True))), max_size=12))
def test_a_stream_split_anywhere_passes_as_the_whole_does(cuts: list[int]) -> None:
    recorded = compact_stream(True)
    withheld = UsageWithheld()
    bounds = [0, *sorted(cuts), len(recorded)]
    passed = b"".join(withheld.feed(recorded[start:end]) for start, end in zip(bounds, bounds[1:], strict=False))
    assert passed + withheld.end() == compact_stream(False)


def test_each_complete_event_is_passed_on_at_once() -> None:
    withheld = UsageWithheld()
    first, second = chat_chunks(1, "m", usage=True)[:2]
    assert withheld.feed(first + second[:10]) == chat_chunks(1, "m")[0]
    assert withheld.feed(second[10:]) == chat_chunks(1, "m")[1]


def test_a_chunk_whose_events_end_in_crlf_and_lf_alike_loses_every_usage() -> None:
    """One chunk, two events: the first ended by CRLF CRLF, the second by LF LF (the only blank line the
    one-event shortcut sees). Both are events, and both lose the usage."""
    first, second = compact_stream(True).split(b"\n\n")[:2]
    mixed = first + b"\r\n\r\n" + second + b"\n\n"
    passed = UsageWithheld().feed(mixed)
    assert passed.count(b"data: ") == 2 and b'"usage"' not in passed


def test_an_unfinished_last_event_is_passed_on_at_the_end() -> None:
    withheld = UsageWithheld()
    assert withheld.feed(b"data: [DONE]") == b""
    assert withheld.end() == b"data: [DONE]"


@pytest.mark.parametrize(
    ("body", "options"),
    [
        pytest.param(b'{"model":"m","stream":true}', {"include_usage": True}, id="absent"),
        pytest.param(b' \n{"stream": true}', {"include_usage": True}, id="leading-space"),
        pytest.param(
            b'{"stream":true,"stream_options":{"include_usage":false,"include_obfuscation":false}}',
            {"include_usage": True, "include_obfuscation": False},
            id="kept-options",
        ),
        pytest.param(b'{"stream":true,"stream_options":null}', {"include_usage": True}, id="null"),
    ],
)
def test_the_provider_is_asked_for_usage(body: bytes, options: dict[str, Any]) -> None:
    payload = json.loads(body)
    asked = json.loads(ask_for_usage(body, payload))
    assert asked == {**payload, "stream_options": options}


def test_asking_for_usage_keeps_the_clients_bytes() -> None:
    body = b'{"model": "m",  "messages": [{"role": "user", "content": "\\u00e9"}], "stream": true}'
    assert ask_for_usage(body, json.loads(body)) == b'{"stream_options":{"include_usage":true},' + body[1:]
