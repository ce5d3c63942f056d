"""The pure Bedrock rules: calls, keys, event stream frames, whole streams and the Converse conversions."""

from __future__ import annotations

import json
from typing import Any

import pytest
from botocore.eventstream import EventStreamBuffer

from cache.bedrock import (
    bedrock_call,
    encode_frame,
    frames,
    json_to_stream,
    stream_finished,
    stream_to_json,
)
from cache.keys import KeyConfig, KeyMode, cache_key, generation_endpoint

MESSAGES = [{"role": "user", "content": [{"text": "hi"}]}]
USAGE = {"inputTokens": 5, "outputTokens": 7, "totalTokens": 12}


def stream(*events: tuple[str, dict[str, Any]]) -> bytes:
    return b"".join(encode_frame(name, payload) for name, payload in events)


def key(path: str, body: dict[str, Any], mode: KeyMode = KeyMode.MESSAGES) -> str:
    return cache_key("bedrock", path, body, KeyConfig(mode=mode))


@pytest.mark.parametrize(
    ("path", "endpoint", "model", "streams"),
    [
        (
            "model/anthropic.claude-3-haiku-20240307-v1%3A0/converse",
            "converse",
            "anthropic.claude-3-haiku-20240307-v1:0",
            False,
        ),
        ("model/amazon.nova-lite-v1:0/converse-stream", "converse", "amazon.nova-lite-v1:0", True),
        ("model/meta.llama3-8b-instruct-v1:0/invoke", "invoke", "meta.llama3-8b-instruct-v1:0", False),
        ("model/m/invoke-with-response-stream", "invoke-with-response-stream", "m", True),
    ],
)
def test_a_call_names_its_endpoint_model_and_streaming(path: str, endpoint: str, model: str, streams: bool) -> None:
    call = bedrock_call(path)
    assert call is not None
    assert (call.endpoint, call.model, call.streams) == (endpoint, model, streams)
    assert generation_endpoint(path) == endpoint


@pytest.mark.parametrize("path", ["model/m/count-tokens", "model/m", "async-invoke", "guardrail/g/version/1/apply"])
def test_other_calls_are_not_generations(path: str) -> None:
    assert bedrock_call(path) is None
    assert generation_endpoint(path) is None


def test_converse_and_its_stream_share_a_key_whatever_the_model_and_sampling() -> None:
    plain = key("model/a/converse", {"messages": MESSAGES})
    streamed = key("model/b/converse-stream", {"messages": MESSAGES, "inferenceConfig": {"temperature": 0.9}})
    assert plain == streamed
    for field in ({"system": [{"text": "be brief"}]}, {"toolConfig": {"tools": []}}, {"guardrailConfig": {"g": 1}}):
        assert key("model/a/converse", {"messages": MESSAGES, **field}) != plain
    assert key("model/a/converse", {"messages": MESSAGES}, KeyMode.FULL) != key(
        "model/b/converse", {"messages": MESSAGES}, KeyMode.FULL
    )


def test_invoke_is_keyed_on_its_whole_body_and_its_model_and_apart_from_its_stream() -> None:
    body = {"prompt": "hi", "temperature": 0.1}
    assert key("model/a/invoke", body) != key("model/a/invoke", {**body, "temperature": 0.2})
    assert key("model/a/invoke", body) != key("model/b/invoke", body)
    assert key("model/a/invoke", body) != key("model/a/invoke-with-response-stream", body)


def test_frames_read_back_as_botocore_reads_them() -> None:
    recorded = stream(("messageStart", {"role": "assistant"}), ("metadata", {"usage": USAGE}))
    buffer = EventStreamBuffer()
    buffer.add_data(recorded)
    read = [(message.headers[":event-type"], json.loads(message.payload)) for message in buffer]
    assert read == [("messageStart", {"role": "assistant"}), ("metadata", {"usage": USAGE})]
    parsed = frames(recorded)
    assert parsed is not None and [frame.event for frame in parsed] == ["messageStart", "metadata"]


def test_a_cut_or_damaged_recording_is_no_frames() -> None:
    recorded = stream(("messageStart", {"role": "assistant"}), ("messageStop", {"stopReason": "end_turn"}))
    assert frames(recorded[:-3]) is None, "a frame cut short"
    damaged = bytearray(recorded)
    damaged[20] ^= 0xFF
    assert frames(bytes(damaged)) is None, "a checksum that does not hold"


def test_a_converse_stream_is_whole_with_message_stop_then_metadata_and_no_exception() -> None:
    start = ("messageStart", {"role": "assistant"})
    stop = ("messageStop", {"stopReason": "end_turn"})
    metadata = ("metadata", {"usage": USAGE})
    assert stream_finished("converse", stream(start, stop, metadata))
    assert not stream_finished("converse", stream(start, stop))
    assert not stream_finished("converse", stream(start, metadata, stop))
    exception = encode_frame("throttlingException", {"message": "slow down"}).replace(b"\x05event", b"\x09exception")
    assert not stream_finished("converse", stream(start, stop, metadata) + exception)
    assert stream_finished("invoke-with-response-stream", stream(("chunk", {"bytes": "e30="})))


def test_a_stream_with_text_tool_use_and_reasoning_joins_into_the_converse_answer() -> None:
    recorded = stream(
        ("messageStart", {"role": "assistant"}),
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"text": "Think "}}}),
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"text": "more."}}}),
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"signature": "sig"}}}),
        ("contentBlockStop", {"contentBlockIndex": 0}),
        ("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"text": "The "}, "p": "abc"}),
        ("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"text": "answer."}}),
        ("contentBlockStop", {"contentBlockIndex": 1}),
        ("contentBlockStart", {"contentBlockIndex": 2, "start": {"toolUse": {"toolUseId": "t1", "name": "f"}}}),
        ("contentBlockDelta", {"contentBlockIndex": 2, "delta": {"toolUse": {"input": '{"city": '}}}),
        ("contentBlockDelta", {"contentBlockIndex": 2, "delta": {"toolUse": {"input": '"Paris"}'}}}),
        ("contentBlockStop", {"contentBlockIndex": 2}),
        ("messageStop", {"stopReason": "tool_use"}),
        ("metadata", {"usage": USAGE, "metrics": {"latencyMs": 42}}),
    )
    answer = {
        "output": {
            "message": {
                "role": "assistant",
                "content": [
                    {"reasoningContent": {"reasoningText": {"text": "Think more.", "signature": "sig"}}},
                    {"text": "The answer."},
                    {"toolUse": {"toolUseId": "t1", "name": "f", "input": {"city": "Paris"}}},
                ],
            }
        },
        "stopReason": "tool_use",
        "usage": USAGE,
        "metrics": {"latencyMs": 42},
    }
    assert stream_to_json(recorded) == answer
    streamed = json_to_stream(answer)
    assert streamed is not None and stream_finished("converse", streamed)
    assert stream_to_json(streamed) == answer, "the stream made of an answer reads back as that answer"


def test_what_the_conversion_does_not_know_is_not_converted() -> None:
    citation = ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"citation": {"title": "t"}}})
    assert stream_to_json(stream(("messageStart", {"role": "assistant"}), citation)) is None
    image = {"output": {"message": {"role": "assistant", "content": [{"image": {"format": "png"}}]}}, "stopReason": "x"}
    assert json_to_stream(image) is None
    assert json_to_stream({"message": "not a converse answer"}) is None
