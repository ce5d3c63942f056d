"""The pure Gemini rules: calls, keys, whole streams and the stream/JSON conversions."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cache.gemini import gemini_call, json_to_stream, stream_finished, stream_to_json
from cache.keys import KeyConfig, KeyMode, cache_key, cacheable_endpoint, generation_endpoint
from cache.sse import parse_events

CONTENTS = [{"role": "user", "parts": [{"text": "hi"}]}]


def stream(*chunks: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n" for chunk in chunks)


def key(path: str, body: dict[str, Any], mode: KeyMode = KeyMode.MESSAGES, include: tuple[str, ...] = ()) -> str:
    return cache_key("gemini", path, body, KeyConfig(mode=mode, include=include))


@pytest.mark.parametrize(
    ("path", "endpoint", "model", "streams"),
    [
        ("v1beta/models/gemini-2.0-flash:generateContent", "generateContent", "gemini-2.0-flash", False),
        ("v1/models/gemini-2.0-flash:streamGenerateContent", "generateContent", "gemini-2.0-flash", True),
        ("v1beta/tunedModels/mine-123:generateContent", "generateContent", "tunedModels/mine-123", False),
        ("v1beta/models/gemini-embedding-001:embedContent", "embedContent", "gemini-embedding-001", False),
        ("v1/models/text-embedding-004:batchEmbedContents", "batchEmbedContents", "text-embedding-004", False),
    ],
)
def test_a_call_names_its_endpoint_model_and_streaming(path: str, endpoint: str, model: str, streams: bool) -> None:
    call = gemini_call(path)
    assert call is not None
    assert (call.endpoint, call.model, call.streams) == (endpoint, model, streams)
    assert generation_endpoint(path) == endpoint


@pytest.mark.parametrize(
    "path",
    ["v1beta/models/gemini-2.0-flash:countTokens", "v1beta/models", "v1beta/cachedContents", "v2/models/x:generate"],
)
def test_other_calls_are_not_generations(path: str) -> None:
    assert gemini_call(path) is None
    assert generation_endpoint(path) is None


def test_a_stream_is_cached_only_as_an_event_stream() -> None:
    path = "v1beta/models/m:streamGenerateContent"
    assert cacheable_endpoint(path, b"alt=sse") == "generateContent"
    assert cacheable_endpoint(path, b"") is None
    assert cacheable_endpoint(path, b"alt=ssex") is None


def test_a_stream_and_a_generation_share_a_key_whatever_the_model_and_sampling() -> None:
    plain = key("v1beta/models/gemini-2.0-flash:generateContent", {"contents": CONTENTS})
    streamed = key("v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse", {"contents": CONTENTS})
    sampled = key(
        "v1beta/models/gemini-2.0-flash:generateContent",
        {"contents": CONTENTS, "generationConfig": {"temperature": 0.3, "topK": 4, "candidateCount": 1}},
    )
    assert plain == streamed == sampled
    assert plain != key("v1/models/gemini-2.0-flash:generateContent", {"contents": CONTENTS})


def test_snake_case_fields_are_their_camel_case_names() -> None:
    camel = {"contents": CONTENTS, "systemInstruction": {"parts": [{"text": "be brief"}]}}
    snake = {"contents": CONTENTS, "system_instruction": {"parts": [{"text": "be brief"}]}}
    path = "v1beta/models/m:generateContent"
    assert key(path, camel) == key(path, snake)
    assert key(path, camel) != key(path, {"contents": CONTENTS})
    shaped = {"contents": CONTENTS, "generation_config": {"response_mime_type": "application/json"}}
    assert key(path, shaped) == key(
        path, {"contents": CONTENTS, "generationConfig": {"responseMimeType": "application/json"}}
    )
    assert key(path, shaped) != key(path, {"contents": CONTENTS})


def test_the_model_counts_for_embeddings_with_include_and_in_full_mode() -> None:
    body = {"content": {"parts": [{"text": "hi"}]}}
    assert key("v1beta/models/a:embedContent", body) != key("v1beta/models/b:embedContent", body)
    generate = {"contents": CONTENTS}
    for mode, include in ((KeyMode.MESSAGES, ("model",)), (KeyMode.FULL, ())):
        first = key("v1beta/models/a:generateContent", generate, mode, include)
        assert first != key("v1beta/models/b:generateContent", generate, mode, include)


def test_a_stream_is_whole_when_its_last_chunk_has_a_finish_reason() -> None:
    started = {"candidates": [{"content": {"parts": [{"text": "a"}]}}]}
    finished = {"candidates": [{"content": {"parts": [{"text": "b"}]}, "finishReason": "STOP"}]}
    assert stream_finished(parse_events(stream(started, finished)))
    assert not stream_finished(parse_events(stream(started)))
    assert not stream_finished(parse_events(stream(finished, started)))
    assert not stream_finished(parse_events(stream({"promptFeedback": {"blockReason": "SAFETY"}})))


def test_a_stream_joins_into_the_whole_answer() -> None:
    thought = {"text": "thinking ", "thought": True}
    chunks = [
        {"candidates": [{"content": {"parts": [thought], "role": "model"}, "index": 0}], "responseId": "r"},
        {"candidates": [{"content": {"parts": [{"text": "more", "thought": True}], "role": "model"}, "index": 0}]},
        {"candidates": [{"content": {"parts": [{"text": "The "}], "role": "model"}, "index": 0}]},
        {"candidates": [{"content": {"parts": [{"text": "answer", "thoughtSignature": "c2ln"}]}, "index": 0}]},
        {
            "candidates": [
                {
                    "content": {"parts": [{"functionCall": {"name": "f", "args": {"x": 1}}}], "role": "model"},
                    "finishReason": "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4, "totalTokenCount": 7},
            "modelVersion": "gemini-2.5-flash",
        },
    ]
    whole = stream_to_json(parse_events(stream(*chunks)))
    assert whole == {
        "candidates": [
            {
                "content": {
                    "parts": [
                        {"text": "thinking more", "thought": True},
                        {"text": "The "},
                        {"text": "answer", "thoughtSignature": "c2ln"},
                        {"functionCall": {"name": "f", "args": {"x": 1}}},
                    ],
                    "role": "model",
                },
                "index": 0,
                "finishReason": "STOP",
            }
        ],
        "responseId": "r",
        "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4, "totalTokenCount": 7},
        "modelVersion": "gemini-2.5-flash",
    }


def test_a_whole_answer_streams_as_one_chunk_that_reads_back_the_same() -> None:
    whole = {"candidates": [{"content": {"parts": [{"text": "hi"}], "role": "model"}, "finishReason": "STOP"}]}
    streamed = json_to_stream(whole)
    assert streamed is not None and streamed.endswith(b"\r\n\r\n")
    assert stream_finished(parse_events(streamed))
    assert stream_to_json(parse_events(streamed)) == whole
    assert json_to_stream({"error": {"code": 400}}) is None
