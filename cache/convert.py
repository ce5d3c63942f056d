"""Pure conversions between a streamed answer and the equivalent complete JSON answer.

OpenAI chat completions and Anthropic messages convert both ways; other endpoints keep their
streamed and non-streamed entries apart (see `cache.keys.STREAM_CONVERTIBLE`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from cache.sse import DONE, SseEvent, data_events, encode_event

_CHUNK_ENVELOPE = ("id", "created", "model", "system_fingerprint", "service_tier")
# Azure OpenAI's content filtering: of the prompt (top level) and of each choice's content.
_PROMPT_FILTER = "prompt_filter_results"
_CONTENT_FILTER = "content_filter_results"
# What a body that only looks like the expected format raises while being converted.
_MALFORMED = (KeyError, IndexError, TypeError, AttributeError, ValueError)


# OpenAI chat completions


def is_usage_chunk(chunk: Any) -> bool:
    return isinstance(chunk, dict) and chunk.get("choices") == [] and chunk.get("usage") is not None


def chat_stream_to_json(events: Sequence[SseEvent]) -> dict[str, Any] | None:
    """The chat.completion object a recorded chunk stream amounts to; None without usage to report
    or when the chunks do not have the shape of a chat completion."""
    try:
        return _chat_stream_to_json(events)
    except _MALFORMED:
        return None


def _chat_stream_to_json(events: Sequence[SseEvent]) -> dict[str, Any] | None:
    chunks = [chunk for chunk in data_events(events) if isinstance(chunk, dict)]
    if not chunks:
        return None
    completion: dict[str, Any] = {"id": None, "object": "chat.completion", "created": None, "model": None}
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        for field in _CHUNK_ENVELOPE:
            if chunk.get(field):  # Azure's first chunk (prompt filter results) has an empty id and model
                completion[field] = chunk[field]
        if chunk.get(_PROMPT_FILTER) is not None:
            completion[_PROMPT_FILTER] = chunk[_PROMPT_FILTER]
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            _merge_chat_choice(choices.setdefault(choice.get("index", 0), _empty_choice()), choice)
    if usage is None:
        return None
    completion["choices"] = [_finish_choice(index, choices[index]) for index in sorted(choices)]
    completion["usage"] = usage
    return completion


def _empty_choice() -> dict[str, Any]:
    return {
        "role": None,
        "content": [],
        "refusal": [],
        "tool_calls": {},
        "logprobs": None,
        "finish_reason": None,
    }


def _merge_chat_choice(state: dict[str, Any], choice: dict[str, Any]) -> None:
    delta = choice.get("delta") or {}
    if delta.get("role"):
        state["role"] = delta["role"]
    if delta.get("content"):
        state["content"].append(delta["content"])
    if delta.get("refusal"):
        state["refusal"].append(delta["refusal"])
    for call in delta.get("tool_calls") or []:
        merged = state["tool_calls"].setdefault(
            call.get("index", 0), {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        )
        if call.get("id"):
            merged["id"] = call["id"]
        if call.get("type"):
            merged["type"] = call["type"]
        function = call.get("function") or {}
        merged["function"]["name"] += function.get("name") or ""
        merged["function"]["arguments"] += function.get("arguments") or ""
    logprobs = choice.get("logprobs")
    if logprobs:
        state["logprobs"] = state["logprobs"] or {"content": [], "refusal": None}
        state["logprobs"]["content"].extend(logprobs.get("content") or [])
    if choice.get("finish_reason"):
        state["finish_reason"] = choice["finish_reason"]
    if choice.get(_CONTENT_FILTER):
        state[_CONTENT_FILTER] = choice[_CONTENT_FILTER]


def _finish_choice(index: int, state: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": state["role"] or "assistant",
        "content": "".join(state["content"]) if state["content"] else _absent_content(state),
        "refusal": "".join(state["refusal"]) or None,
    }
    if state["tool_calls"]:
        message["tool_calls"] = [state["tool_calls"][i] for i in sorted(state["tool_calls"])]
    finished = {
        "index": index,
        "message": message,
        "logprobs": state["logprobs"],
        "finish_reason": state["finish_reason"],
    }
    if _CONTENT_FILTER in state:
        finished[_CONTENT_FILTER] = state[_CONTENT_FILTER]
    return finished


def _absent_content(state: dict[str, Any]) -> str | None:
    # OpenAI sends null content with tool calls or a refusal, and "" for an empty text answer.
    return None if state["tool_calls"] or state["refusal"] else ""


def chat_json_to_stream(completion: Any, include_usage: bool) -> bytes | None:
    """A chunk stream equivalent to a chat.completion object, ending with `[DONE]`; None when it is not one."""
    try:
        return _chat_json_to_stream(completion, include_usage)
    except _MALFORMED:
        return None


def _chat_json_to_stream(completion: dict[str, Any], include_usage: bool) -> bytes:
    envelope = {"object": "chat.completion.chunk"}
    envelope.update({field: completion[field] for field in _CHUNK_ENVELOPE if field in completion})
    usage = completion.get("usage") if include_usage else None

    def chunk(
        index: int, delta: dict[str, Any], finish_reason: str | None = None, logprobs: Any = None, **extra: Any
    ) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason, **extra}
        body: dict[str, Any] = {**envelope, "choices": [choice]}
        if usage is not None:
            body["usage"] = None
        return encode_event(body)

    events = []
    if completion.get(_PROMPT_FILTER) is not None:  # Azure sends these first, in a chunk of their own
        events.append(encode_event({**envelope, "choices": [], _PROMPT_FILTER: completion[_PROMPT_FILTER]}))
    for choice in completion.get("choices") or []:
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        filtered = {_CONTENT_FILTER: choice[_CONTENT_FILTER]} if _CONTENT_FILTER in choice else {}
        events.append(chunk(index, {"role": message.get("role", "assistant"), "content": ""}))
        if message.get("content"):
            events.append(chunk(index, {"content": message["content"]}, logprobs=choice.get("logprobs"), **filtered))
        if message.get("refusal"):
            events.append(chunk(index, {"refusal": message["refusal"]}))
        for position, call in enumerate(message.get("tool_calls") or []):
            events.append(chunk(index, {"tool_calls": [{"index": position, **call}]}))
        events.append(chunk(index, {}, finish_reason=choice.get("finish_reason")))
    if usage is not None:
        events.append(encode_event({**envelope, "choices": [], "usage": usage}))
    events.append(encode_event(DONE))
    return b"".join(events)


# Anthropic messages


def anthropic_stream_to_json(events: Sequence[SseEvent]) -> dict[str, Any] | None:
    """The message object a recorded Anthropic event stream amounts to; None when it describes none."""
    try:
        return _anthropic_stream_to_json(events)
    except _MALFORMED:
        return None


def _anthropic_stream_to_json(events: Sequence[SseEvent]) -> dict[str, Any] | None:
    message: dict[str, Any] | None = None
    blocks: dict[int, dict[str, Any]] = {}
    partial_json: dict[int, str] = {}
    for payload in data_events(events):
        kind = payload.get("type") if isinstance(payload, dict) else None
        if kind == "message_start":
            message = dict(payload["message"])
            message["usage"] = dict(message.get("usage") or {})
        elif kind == "content_block_start":
            blocks[payload["index"]] = dict(payload["content_block"])
        elif kind == "content_block_delta":
            _apply_block_delta(blocks[payload["index"]], payload["index"], payload["delta"], partial_json)
        elif kind == "content_block_stop" and payload["index"] in partial_json:
            text = partial_json.pop(payload["index"])
            blocks[payload["index"]]["input"] = json.loads(text) if text else {}
        elif kind == "message_delta" and message is not None:
            message.update(payload.get("delta") or {})
            message["usage"].update({k: v for k, v in (payload.get("usage") or {}).items() if v is not None})
    if message is None:
        return None
    message["content"] = [blocks[index] for index in sorted(blocks)]
    return message


def _apply_block_delta(block: dict[str, Any], index: int, delta: dict[str, Any], partial_json: dict[int, str]) -> None:
    kind = delta.get("type")
    if kind == "text_delta":
        block["text"] = block.get("text", "") + delta["text"]
    elif kind == "input_json_delta":
        partial_json[index] = partial_json.get(index, "") + delta["partial_json"]
    elif kind == "thinking_delta":
        block["thinking"] = block.get("thinking", "") + delta["thinking"]
    elif kind == "signature_delta":
        block["signature"] = delta["signature"]
    elif kind == "citations_delta":
        # A new list: the block's own came with its (parsed once, shared) content_block_start event.
        block["citations"] = [*(block.get("citations") or []), delta["citation"]]


def anthropic_json_to_stream(message: Any) -> bytes | None:
    """An Anthropic event stream equivalent to a message object, ending with `message_stop`; None when
    it is not one."""
    try:
        return _anthropic_json_to_stream(message)
    except _MALFORMED:
        return None


def _anthropic_json_to_stream(message: dict[str, Any]) -> bytes:
    usage = dict(message.get("usage") or {})
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}
    events = [_anthropic_event({"type": "message_start", "message": start})]
    for index, block in enumerate(message.get("content") or []):
        skeleton, deltas = _block_skeleton_and_deltas(block)
        events.append(_anthropic_event({"type": "content_block_start", "index": index, "content_block": skeleton}))
        events.extend(
            _anthropic_event({"type": "content_block_delta", "index": index, "delta": delta}) for delta in deltas
        )
        events.append(_anthropic_event({"type": "content_block_stop", "index": index}))
    final = {"stop_reason": message.get("stop_reason"), "stop_sequence": message.get("stop_sequence")}
    events.append(_anthropic_event({"type": "message_delta", "delta": final, "usage": usage}))
    events.append(_anthropic_event({"type": "message_stop"}))
    return b"".join(events)


def _block_skeleton_and_deltas(block: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    kind = block.get("type")
    if kind == "text":
        rest = {k: v for k, v in block.items() if k not in ("text", "citations")}
        deltas: list[dict[str, Any]] = [
            {"type": "citations_delta", "citation": citation} for citation in block.get("citations") or []
        ]
        return {**rest, "text": ""}, [{"type": "text_delta", "text": block.get("text", "")}, *deltas]
    if kind == "tool_use":
        arguments = json.dumps(block.get("input", {}), separators=(",", ":"), ensure_ascii=False)
        return {**block, "input": {}}, [{"type": "input_json_delta", "partial_json": arguments}]
    if kind == "thinking":
        skeleton = {**block, "thinking": "", "signature": ""}
        deltas = [{"type": "thinking_delta", "thinking": block.get("thinking", "")}]
        if block.get("signature"):
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        return skeleton, deltas
    return dict(block), []


def _anthropic_event(payload: dict[str, Any]) -> bytes:
    return encode_event(payload, name=str(payload["type"]))
