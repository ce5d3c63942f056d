"""Pure rules for AWS Bedrock Runtime: which calls are cached, what of a request is the conversation, when
an event stream is whole, and the conversions between a Converse stream and a whole Converse answer.

A call names its model and method in the path (`model/{modelId}/converse`). Streams come as
`application/vnd.amazon.eventstream`: binary frames (a prelude with the lengths and its CRC32, typed
headers such as `:event-type`, a JSON payload, the frame's CRC32), read with botocore's parser.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

from botocore.eventstream import EventStreamBuffer, ParserError

EVENTSTREAM = "application/vnd.amazon.eventstream"
CONVERSE = "converse"
INVOKE = "invoke"
INVOKE_STREAM = "invoke-with-response-stream"
_METHODS = {"converse": CONVERSE, "converse-stream": CONVERSE, "invoke": INVOKE, INVOKE_STREAM: INVOKE_STREAM}
_CALL = re.compile(r"^model/([^/]+)/(converse|converse-stream|invoke|invoke-with-response-stream)$")
# What of a Converse request is the conversation in `messages` mode (inferenceConfig, the sampling, is not).
CONTENT_FIELDS = ("messages", "system", "toolConfig", "guardrailConfig", "additionalModelRequestFields")
# A Converse stream is whole once these came, in this order, at its end.
_CONVERSE_END = ("messageStop", "metadata")


@dataclass(frozen=True)
class BedrockCall:
    """A cacheable Bedrock Runtime call, as its path names it."""

    raw_model: str  # as sent: botocore percent-encodes the `:` of versioned ids
    method: str  # converse-stream

    @property
    def endpoint(self) -> str:
        """`converse` (both Converse methods), `invoke` or `invoke-with-response-stream`."""
        return _METHODS[self.method]

    @property
    def streams(self) -> bool:
        return self.method in ("converse-stream", INVOKE_STREAM)

    @property
    def model(self) -> str:
        return unquote(self.raw_model)

    @property
    def key_path(self) -> str:
        """The path an entry's key names: the model left to the key's content, a Converse stream's path
        that of its whole answer (the two share an entry)."""
        return f"model/{{model}}/{self.endpoint}"


@lru_cache(maxsize=1024)
def bedrock_call(path: str) -> BedrockCall | None:
    match = _CALL.match(path.split("?", 1)[0].strip("/"))
    return BedrockCall(*match.groups()) if match else None


def is_bedrock_endpoint(endpoint: str) -> bool:
    return endpoint in (CONVERSE, INVOKE, INVOKE_STREAM)


def conversation(body: dict[str, Any], endpoint: str) -> dict[str, Any]:
    """What of a request is the conversation: Converse's content fields; an Invoke body is model-specific,
    so all of it (the model with it: see `cache.keys`)."""
    if endpoint != CONVERSE:
        return body
    return {name: body[name] for name in CONTENT_FIELDS if name in body}


@dataclass(frozen=True)
class Frame:
    """One event stream message: its headers (`:event-type`, `:message-type`, ...) and payload."""

    headers: dict[str, Any]
    payload: bytes

    @property
    def event(self) -> str:
        return str(self.headers.get(":event-type", ""))

    @property
    def is_event(self) -> bool:
        """An event, not an exception or an error (`:message-type`)."""
        return self.headers.get(":message-type") == "event"

    def json(self) -> Any:
        try:
            return json.loads(self.payload)
        except ValueError:
            return None


def frames(stream: bytes) -> list[Frame] | None:
    """Every frame of a recorded stream; None when it is not whole frames with valid checksums."""
    buffer = EventStreamBuffer()
    buffer.add_data(stream)
    parsed: list[Frame] = []
    length = 0
    try:
        for message in buffer:
            parsed.append(Frame(dict(message.headers), message.payload))
            length += message.prelude.total_length
    except (ParserError, KeyError, ValueError, struct.error):  # a checksum, length or header type that is off
        return None
    return parsed if length == len(stream) else None


def stream_finished(endpoint: str, stream: bytes) -> bool:
    """Whether a recorded stream is a whole answer: whole frames, every one an event, and for Converse
    ending with `messageStop` then `metadata`."""
    parsed = frames(stream)
    if not parsed or not all(frame.is_event for frame in parsed):
        return False
    if endpoint == CONVERSE:
        return tuple(frame.event for frame in parsed[-2:]) == _CONVERSE_END
    return True


def encode_frame(event: str, payload: Any) -> bytes:
    """One event frame holding `payload` as JSON."""
    headers = b"".join(
        _header(name, value)
        for name, value in ((":event-type", event), (":content-type", "application/json"), (":message-type", "event"))
    )
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    prelude = struct.pack(">II", 12 + len(headers) + len(body) + 4, len(headers))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + headers + body
    return message + struct.pack(">I", zlib.crc32(message))


def _header(name: str, value: str) -> bytes:
    encoded_name, encoded_value = name.encode(), value.encode()
    # 7: the string type
    return bytes([len(encoded_name)]) + encoded_name + b"\x07" + struct.pack(">H", len(encoded_value)) + encoded_value


# Converse: stream <-> whole answer


def stream_to_json(stream: bytes) -> dict[str, Any] | None:
    """The Converse answer a recorded ConverseStream amounts to; None when it holds what the conversion
    does not know (citations, images, ...) or is not a whole stream."""
    parsed = frames(stream)
    if parsed is None:
        return None
    try:
        return _stream_to_json([(frame.event, frame.json()) for frame in parsed])
    except (KeyError, TypeError, AttributeError, ValueError):
        return None


def _stream_to_json(events: Iterable[tuple[str, Any]]) -> dict[str, Any] | None:
    role = "assistant"
    blocks: dict[int, dict[str, Any]] = {}
    answer: dict[str, Any] = {}
    for event, payload in events:
        if event == "messageStart":
            role = payload["role"]
        elif event == "contentBlockStart":
            start = payload["start"]
            if set(start) != {"toolUse"}:
                return None
            use = start["toolUse"]
            blocks[payload["contentBlockIndex"]] = {"toolUse": {**use, "input": ""}}
        elif event == "contentBlockDelta":
            if not _add_delta(blocks, payload["contentBlockIndex"], payload["delta"]):
                return None
        elif event == "messageStop":
            answer["stopReason"] = payload["stopReason"]
            if "additionalModelResponseFields" in payload:
                answer["additionalModelResponseFields"] = payload["additionalModelResponseFields"]
        elif event == "metadata":
            answer.update({name: payload[name] for name in ("usage", "metrics", "trace") if name in payload})
    content = [_finish_block(blocks[index]) for index in sorted(blocks)]
    return {"output": {"message": {"role": role, "content": content}}, **answer}


def _add_delta(blocks: dict[int, dict[str, Any]], index: int, delta: dict[str, Any]) -> bool:
    if "text" in delta:
        block = blocks.setdefault(index, {"text": ""})
        block["text"] += delta["text"]
    elif "toolUse" in delta:
        blocks[index]["toolUse"]["input"] += delta["toolUse"]["input"]
    elif "reasoningContent" in delta:
        reasoning = blocks.setdefault(index, {"reasoningContent": {"reasoningText": {"text": ""}}})
        text = reasoning["reasoningContent"]["reasoningText"]
        part = delta["reasoningContent"]
        if set(part) - {"text", "signature"}:
            return False
        text["text"] += part.get("text", "")
        if "signature" in part:
            text["signature"] = part["signature"]
    else:
        return False
    return True


def _finish_block(block: dict[str, Any]) -> dict[str, Any]:
    if "toolUse" in block:
        use = block["toolUse"]
        return {"toolUse": {**use, "input": json.loads(use["input"]) if use["input"] else {}}}
    return block


def json_to_stream(answer: Any) -> bytes | None:
    """A ConverseStream equivalent to a whole Converse answer; None when it holds what the conversion does
    not know."""
    try:
        events = _json_to_events(answer)
    except (KeyError, TypeError, AttributeError):
        return None
    return None if events is None else b"".join(encode_frame(event, payload) for event, payload in events)


def _json_to_events(answer: dict[str, Any]) -> list[tuple[str, dict[str, Any]]] | None:
    message = answer["output"]["message"]
    events: list[tuple[str, dict[str, Any]]] = [("messageStart", {"role": message["role"]})]
    for index, block in enumerate(message["content"]):
        if set(block) == {"text"}:
            events.append(("contentBlockDelta", {"contentBlockIndex": index, "delta": {"text": block["text"]}}))
        elif set(block) == {"toolUse"}:
            use = block["toolUse"]
            start = {"toolUse": {"toolUseId": use["toolUseId"], "name": use["name"]}}
            events.append(("contentBlockStart", {"contentBlockIndex": index, "start": start}))
            delta = {"toolUse": {"input": json.dumps(use["input"], separators=(",", ":"))}}
            events.append(("contentBlockDelta", {"contentBlockIndex": index, "delta": delta}))
        elif set(block) == {"reasoningContent"}:
            text = block["reasoningContent"]["reasoningText"]
            thought = {"reasoningContent": {"text": text["text"]}}
            events.append(("contentBlockDelta", {"contentBlockIndex": index, "delta": thought}))
            if "signature" in text:
                signature = {"reasoningContent": {"signature": text["signature"]}}
                events.append(("contentBlockDelta", {"contentBlockIndex": index, "delta": signature}))
        else:
            return None
        events.append(("contentBlockStop", {"contentBlockIndex": index}))
    stop = {"stopReason": answer["stopReason"]}
    if "additionalModelResponseFields" in answer:
        stop["additionalModelResponseFields"] = answer["additionalModelResponseFields"]
    events.append(("messageStop", stop))
    events.append(("metadata", {name: answer[name] for name in ("usage", "metrics", "trace") if name in answer}))
    return events
