"""Pure: the tokens a stored answer reports, so hits can count what they saved."""

from __future__ import annotations

from typing import Any

import orjson

from cache.convert import anthropic_stream_to_json, chat_stream_to_json
from cache.sse import EVENT_STREAM, parse_events

Tokens = tuple[int | None, int | None]


def reported_tokens(endpoint: str, content_type: str, body: bytes) -> Tokens:
    """(input, output) tokens the answer's usage reports; None where it reports none."""
    answer = _as_json(endpoint, content_type, body)
    if not isinstance(answer, dict):
        return None, None
    usage = answer.get("usage")
    if endpoint == "chat":  # Cohere: billed units under `usage` (v2) or `meta` (v1)
        container = answer.get("usage") or answer.get("meta")
        usage = container.get("billed_units") if isinstance(container, dict) else None
    if not isinstance(usage, dict):
        return None, None
    if endpoint == "messages":
        inputs = _sum(usage, "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        return inputs, _int(usage.get("output_tokens"))
    inputs = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
    outputs = _int(usage.get("completion_tokens", usage.get("output_tokens")))
    if endpoint == "embeddings" and inputs is not None:
        outputs = 0
    return inputs, outputs


def _as_json(endpoint: str, content_type: str, body: bytes) -> Any:
    if content_type.split(";", 1)[0].strip().lower() != EVENT_STREAM:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
    events = parse_events(body)
    if endpoint == "chat/completions":
        return chat_stream_to_json(events)
    if endpoint == "messages":
        return anthropic_stream_to_json(events)
    if endpoint == "responses":
        finals = [event.json() for event in events if event.type in ("response.completed", "response.incomplete")]
        return finals[-1].get("response") if finals and isinstance(finals[-1], dict) else None
    return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _sum(usage: dict[str, Any], *names: str) -> int | None:
    values = [value for name in names if (value := _int(usage.get(name))) is not None]
    return sum(values) if values else None
