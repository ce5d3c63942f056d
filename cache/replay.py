"""Pure: how a stored entry answers a request, in the shape (stream or not, usage or not) it asks for."""

from __future__ import annotations

import json
from dataclasses import dataclass

from cache.base import CachedResponse
from cache.bedrock import CONVERSE, EVENTSTREAM
from cache.bedrock import json_to_stream as converse_json_to_stream
from cache.bedrock import stream_to_json as converse_stream_to_json
from cache.convert import (
    anthropic_json_to_stream,
    anthropic_stream_to_json,
    chat_json_to_stream,
    chat_stream_to_json,
    is_usage_chunk,
)
from cache.gemini import GENERATE
from cache.gemini import json_to_stream as gemini_json_to_stream
from cache.gemini import stream_to_json as gemini_stream_to_json
from cache.keys import STREAM_CONVERTIBLE
from cache.sse import EVENT_STREAM, parse_events
from cache.stream_usage import without_usage


@dataclass(frozen=True)
class Replay:
    body: bytes
    content_type: str


def is_event_stream(content_type: str) -> bool:
    """A streamed answer: Server-Sent Events, or AWS's binary event stream (Bedrock)."""
    return content_type.split(";", 1)[0].strip().lower() in (EVENT_STREAM, EVENTSTREAM)


def replay(entry: CachedResponse, endpoint: str, wants_stream: bool, wants_usage: bool) -> Replay | None:
    """The answer to send for `entry`, or None when it cannot answer faithfully (then it is a miss).

    The stored bytes go out unchanged when the request asks for the shape that was recorded.
    """
    stored_stream = is_event_stream(entry.content_type)
    if stored_stream and wants_stream and endpoint == "chat/completions":
        return _chat_stream_with_usage_as_asked(entry, wants_usage)
    if stored_stream == wants_stream:
        return Replay(entry.body, entry.content_type)
    if endpoint not in STREAM_CONVERTIBLE:
        return None
    if endpoint == CONVERSE:
        return _converse_as_asked(entry, stored_stream)
    if stored_stream:
        events = parse_events(entry.body)
        if endpoint == "chat/completions":
            message = chat_stream_to_json(events)
        elif endpoint == GENERATE:
            message = gemini_stream_to_json(events)
        else:
            message = anthropic_stream_to_json(events)
        if message is None:
            return None
        return Replay(json.dumps(message, ensure_ascii=False).encode(), "application/json")
    try:
        stored = json.loads(entry.body)
    except ValueError:
        return None
    if endpoint == "chat/completions":
        stream = chat_json_to_stream(stored, include_usage=wants_usage)
    elif endpoint == GENERATE:
        stream = gemini_json_to_stream(stored)
    else:
        stream = anthropic_json_to_stream(stored)
    return None if stream is None else Replay(stream, EVENT_STREAM)


def _chat_stream_with_usage_as_asked(entry: CachedResponse, wants_usage: bool) -> Replay | None:
    if not wants_usage:
        return Replay(without_usage(entry.body), entry.content_type)
    if any(is_usage_chunk(event.json()) for event in parse_events(entry.body)):
        return Replay(entry.body, entry.content_type)
    return None  # the recording has no usage to give; fetch an answer that has


def _converse_as_asked(entry: CachedResponse, stored_stream: bool) -> Replay | None:
    if stored_stream:
        answer = converse_stream_to_json(entry.body)
        return None if answer is None else Replay(json.dumps(answer, ensure_ascii=False).encode(), "application/json")
    try:
        stored = json.loads(entry.body)
    except ValueError:
        return None
    stream = converse_json_to_stream(stored)
    return None if stream is None else Replay(stream, EVENTSTREAM)
