"""Pure: the tokens a stored answer reports, so hits can count what they saved."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from cache.bedrock import CONVERSE, EVENTSTREAM
from cache.bedrock import stream_to_json as converse_stream_to_json
from cache.convert import anthropic_stream_to_json, chat_stream_to_json
from cache.gemini import GENERATE, is_gemini_endpoint
from cache.gemini import stream_to_json as gemini_stream_to_json
from cache.sse import EVENT_STREAM, events_mentioning, mention, parse_events

if TYPE_CHECKING:
    from cache.base import CachedResponse

Tokens = tuple[int | None, int | None]


@dataclass(frozen=True, slots=True)
class Usage:
    """The tokens one answer reports; None where the answer does not say.

    One convention for every provider, so that totals are comparable:

    - `input_tokens`: ALL input tokens, including those read from and written to the provider's
      prompt cache. OpenAI's `prompt_tokens` (and the Responses API's `input_tokens`) already count
      them; Anthropic's `input_tokens` does not, so for Anthropic this is `input_tokens +
      cache_read_input_tokens + cache_creation_input_tokens`.
    - `cached_input_tokens`: the part of `input_tokens` read from the provider's cache (OpenAI
      `*_tokens_details.cached_tokens`, Anthropic `cache_read_input_tokens`).
    - `output_tokens`: output tokens (0 for embeddings, which have no output).
    - `cache_write_tokens`: the part of `input_tokens` written to the provider's cache (Anthropic
      `cache_creation_input_tokens`; `*_tokens_details.cache_write_tokens` where an OpenAI-compatible
      provider reports it).

    So the input billed at the plain input price is `input_tokens - cached_input_tokens -
    cache_write_tokens` (None counting as 0).
    """

    input_tokens: int | None = None
    cached_input_tokens: int | None = None
    output_tokens: int | None = None
    cache_write_tokens: int | None = None


NO_USAGE = Usage()


def entry_usage(entry: CachedResponse) -> Usage:
    """The usage a stored entry keeps (its counts follow the convention of `Usage`)."""
    return Usage(
        input_tokens=entry.input_tokens,
        cached_input_tokens=entry.cached_input_tokens,
        output_tokens=entry.output_tokens,
        cache_write_tokens=entry.cache_write_tokens,
    )


def reported_tokens(endpoint: str, content_type: str, body: bytes) -> Tokens:
    """(input, output) tokens the answer's usage reports; None where it reports none.

    Input counts cached tokens too (see `Usage`)."""
    usage = reported_usage(endpoint, content_type, body)
    return usage.input_tokens, usage.output_tokens


def reported_usage(endpoint: str, content_type: str, body: bytes) -> Usage:
    """The usage a stored answer (JSON, or an SSE stream) reports, by the convention of `Usage`.

    Understands OpenAI chat/completions, completions, responses and embeddings, Anthropic messages
    (for streams: `message_start` carries the input side, `message_delta` the output) and Cohere
    chat (billed units). Anything else, or anything malformed, reports `Usage()` (all None)."""
    answer = _usage_holder(endpoint, content_type, body)
    if not isinstance(answer, dict):
        return NO_USAGE
    if is_gemini_endpoint(endpoint):
        return _gemini_usage(answer.get("usageMetadata"))
    if endpoint == CONVERSE:
        return _converse_usage(answer.get("usage"))
    usage = answer.get("usage")
    if endpoint == "chat":  # Cohere: billed units under `usage` (v2) or `meta` (v1)
        container = answer.get("usage") or answer.get("meta")
        usage = container.get("billed_units") if isinstance(container, dict) else None
    if not isinstance(usage, dict):
        return NO_USAGE
    if endpoint == "messages":
        return Usage(
            input_tokens=_sum(usage, "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"),
            cached_input_tokens=_int(usage.get("cache_read_input_tokens")),
            output_tokens=_int(usage.get("output_tokens")),
            cache_write_tokens=_int(usage.get("cache_creation_input_tokens")),
        )
    inputs = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
    outputs = _int(usage.get("completion_tokens", usage.get("output_tokens")))
    if endpoint == "embeddings" and inputs is not None:
        outputs = 0
    # Chat completions name the details after prompt_tokens, the Responses API after input_tokens.
    details = usage.get("prompt_tokens_details", usage.get("input_tokens_details"))
    if not isinstance(details, dict):
        details = {}
    return Usage(
        input_tokens=inputs,
        cached_input_tokens=_int(details.get("cached_tokens")),
        output_tokens=outputs,
        cache_write_tokens=_int(details.get("cache_write_tokens")),
    )


def _gemini_usage(usage: Any) -> Usage:
    """Gemini's `usageMetadata`: the prompt counts cached content too; thinking is billed as output."""
    if not isinstance(usage, dict):
        return NO_USAGE
    return Usage(
        input_tokens=_int(usage.get("promptTokenCount")),
        cached_input_tokens=_int(usage.get("cachedContentTokenCount")),
        output_tokens=_sum(usage, "candidatesTokenCount", "thoughtsTokenCount"),
    )


def _converse_usage(usage: Any) -> Usage:
    """Bedrock Converse's `usage`: like Anthropic's, its input leaves out what the cache read and wrote."""
    if not isinstance(usage, dict):
        return NO_USAGE
    return Usage(
        input_tokens=_sum(usage, "inputTokens", "cacheReadInputTokens", "cacheWriteInputTokens"),
        cached_input_tokens=_int(usage.get("cacheReadInputTokens")),
        output_tokens=_int(usage.get("outputTokens")),
        cache_write_tokens=_int(usage.get("cacheWriteInputTokens")),
    )


def reported_model(endpoint: str, content_type: str, body: bytes) -> str | None:
    """The model an answer names (JSON, or a stream that converts to JSON), if any."""
    answer = _as_json(endpoint, content_type, body)
    model = answer.get("model") if isinstance(answer, dict) else None
    return model if isinstance(model, str) and model else None


# The events of a stream that can carry its usage; the others, hundreds in a long answer, are not parsed.
_CHAT_USAGE = mention(b'"usage"', unless_followed_by=rb"[ \t]*:[ \t]*null")  # every chunk may say `"usage":null`
_MESSAGES_USAGE = mention(b"message_start", b"message_delta")


def _usage_holder(endpoint: str, content_type: str, body: bytes) -> Any:
    """What holds the answer's usage where `reported_usage` looks for it: for a chat or messages stream,
    just its usage, read from the few events that can carry it; otherwise the answer as JSON."""
    if content_type.split(";", 1)[0].strip().lower() == EVENT_STREAM:
        if endpoint == "chat/completions":
            return _chat_stream_usage(body)
        if endpoint == "messages":
            return _messages_stream_usage(body)
    return _as_json(endpoint, content_type, body)


def _chat_stream_usage(body: bytes) -> dict[str, Any] | None:
    """The last usage the chunks report, as `chat_stream_to_json` reads it; None when a chunk that reports
    one does not have a chunk's shape."""
    usage = None
    for event in events_mentioning(body, _CHAT_USAGE):
        chunk = event.json()
        if isinstance(chunk, dict) and chunk.get("usage") is not None:
            choices = chunk.get("choices") or []
            if not isinstance(choices, list) or not all(isinstance(choice, dict) for choice in choices):
                return None
            usage = chunk["usage"]
    return None if usage is None else {"usage": usage}


def _messages_stream_usage(body: bytes) -> dict[str, Any] | None:
    """`message_start`'s usage updated by each `message_delta`'s, as `anthropic_stream_to_json` reads it."""
    usage: dict[str, Any] | None = None
    try:
        for event in events_mentioning(body, _MESSAGES_USAGE):
            payload = event.json()
            kind = payload.get("type") if isinstance(payload, dict) else None
            if kind == "message_start":
                usage = dict(payload["message"].get("usage") or {})
            elif kind == "message_delta" and usage is not None:
                usage.update({k: v for k, v in (payload.get("usage") or {}).items() if v is not None})
    except (KeyError, TypeError, AttributeError, ValueError):
        return None  # not the shape of a messages stream
    return None if usage is None else {"usage": usage}


def _as_json(endpoint: str, content_type: str, body: bytes) -> Any:
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == EVENTSTREAM:
        return converse_stream_to_json(body) if endpoint == CONVERSE else None
    if media_type != EVENT_STREAM:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
    events = parse_events(body)
    if endpoint == "chat/completions":
        return chat_stream_to_json(events)
    if endpoint == "messages":
        return anthropic_stream_to_json(events)
    if endpoint == GENERATE:
        return gemini_stream_to_json(events)
    if endpoint == "responses":
        finals = [event.json() for event in events if event.type in ("response.completed", "response.incomplete")]
        return finals[-1].get("response") if finals and isinstance(finals[-1], dict) else None
    return None


def _int(value: Any) -> int | None:
    """A token count: a non-negative JSON integer."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _sum(usage: dict[str, Any], *names: str) -> int | None:
    values = [value for name in names if (value := _int(usage.get(name))) is not None]
    return sum(values) if values else None
