"""Pure rules: which requests are cacheable and the key a cacheable request is stored under."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Any

import orjson

from cache.bedrock import CONVERSE, EVENTSTREAM, INVOKE, INVOKE_STREAM, bedrock_call, is_bedrock_endpoint
from cache.bedrock import conversation as bedrock_conversation
from cache.bedrock import stream_finished as bedrock_stream_finished
from cache.gemini import EMBEDDING_METHODS, GENERATE, STREAM_GENERATE, gemini_call, is_gemini_endpoint
from cache.gemini import conversation as gemini_conversation
from cache.gemini import stream_finished as gemini_stream_finished
from cache.sse import EVENT_STREAM, stream_completed

KEY_VERSION = 2

# A generation endpoint is the last part of a versioned path: `v1/chat/completions`,
# `compatibility/v1/chat/completions`, `v2/chat`. Anything deeper (`v1/threads/x/messages`,
# `v1/responses/{id}`) is not a generation and is never cached.
GENERATION_ENDPOINTS = ("chat/completions", "completions", "embeddings", "responses", "messages", "chat")
_GENERATION_PATH = re.compile(r"^(?:.*/)?v\d+(?:alpha|beta)?/(" + "|".join(GENERATION_ENDPOINTS) + ")$")
# Every endpoint `generation_endpoint` names (Gemini's and Bedrock's among them).
ALL_GENERATION_ENDPOINTS = (
    *GENERATION_ENDPOINTS,
    GENERATE,
    *sorted(EMBEDDING_METHODS),
    CONVERSE,
    INVOKE,
    INVOKE_STREAM,
)
# Azure OpenAI's deployment paths: the deployment takes the place of the body's `model`.
_DEPLOYMENT_PATH = re.compile(r"^openai/deployments/([^/]+)/(chat/completions|completions|embeddings)$")

# Fields that make up "the conversation" in messages mode.
CONTENT_FIELDS = (
    "messages",
    "system",
    "tools",
    "functions",
    "tool_choice",
    "function_call",
    "response_format",
    "text",
    "n",
    "prompt",
    "suffix",
    "input",
    "instructions",
    # Cohere v1 chat
    "message",
    "chat_history",
    "preamble",
    "documents",
)
MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id", "function_call")
EMBEDDING_FIELDS = ("model", "dimensions", "encoding_format")
# Never part of the content: whether the answer is streamed does not change the answer.
TRANSPORT_FIELDS = frozenset({"stream", "stream_options"})
# Endpoints whose streamed and complete answers convert into each other faithfully, so both
# share one entry. Elsewhere a streamed request gets an entry of its own.
STREAM_CONVERTIBLE = frozenset({"chat/completions", "messages", GENERATE, CONVERSE})
_TEXT_PART_TYPES = frozenset({"text", "input_text"})
# Prompt-caching hints say how the provider should bill, not what the conversation is.
_IGNORED_PART_FIELDS = frozenset({"cache_control"})


class KeyMode(StrEnum):
    MESSAGES = "messages"
    FULL = "full"


@dataclass(frozen=True)
class KeyConfig:
    mode: KeyMode = KeyMode.MESSAGES
    include: tuple[str, ...] = ()


@lru_cache(maxsize=1024)
def generation_endpoint(path: str) -> str | None:
    """The generation endpoint (`chat/completions`, `messages`, ...) a request path names, if any."""
    path = path.strip("/")
    match = _GENERATION_PATH.match(path)
    if match:
        return match.group(1)
    deployment = _DEPLOYMENT_PATH.match(path)
    if deployment:
        return deployment.group(2)
    call = gemini_call(path) or bedrock_call(path)
    return call.endpoint if call else None


def cacheable_endpoint(path: str, query: bytes) -> str | None:
    """The generation endpoint a request may be cached under. A Gemini stream is cached only as an event
    stream (`alt=sse`, as the SDKs ask for it); without it the API streams one JSON array, passed through."""
    endpoint = generation_endpoint(path)
    if endpoint == GENERATE and path.endswith(STREAM_GENERATE) and b"alt=sse" not in query.split(b"&"):
        return None
    return endpoint


@lru_cache(maxsize=1024)
def _as_model(endpoint: str) -> tuple[str, str | None]:
    """`endpoint` without the model its path names (an Azure deployment, a Gemini or Bedrock model), and
    that model (None when it names none). A Gemini stream's or a Converse stream's path is that of its
    whole answer: both share one entry."""
    path, question, query = endpoint.partition("?")
    match = _DEPLOYMENT_PATH.match(path.strip("/"))
    if match is not None:
        return f"openai/deployments/{{model}}/{match.group(2)}{question}{query}", match.group(1)
    bedrock = bedrock_call(path)
    if bedrock is not None:
        return bedrock.key_path + question + query, bedrock.model
    call = gemini_call(path)
    if call is None:
        return endpoint, None
    query = "&".join(part for part in query.split("&") if part and not part.startswith("alt="))
    return call.key_path + ("?" + query if query else ""), call.model


def model_in_path(endpoint: str) -> str | None:
    """The model a request path names (an Azure deployment, a Gemini or Bedrock model), if any."""
    return _as_model(endpoint)[1]


def cache_key(
    provider: str,
    endpoint: str,
    body: Mapping[str, Any],
    config: KeyConfig,
    *,
    scope: str = "",
    namespace: str = "",
) -> str:
    """A hex digest identifying the answer to `body` sent to `provider`'s `endpoint`.

    `endpoint` is the request path below the provider (with its query string, if any);
    `scope` separates credentials that must not share answers; `namespace` partitions the cache.
    A model the path names (an Azure deployment, a Gemini or Bedrock model) counts as the body's `model`:
    it is the one the upstream answers with.
    """
    endpoint, path_model = _as_model(endpoint)
    if path_model is not None:
        body = {**body, "model": path_model}
    if config.mode is KeyMode.FULL:
        content: dict[str, Any] = {k: v for k, v in body.items() if k not in TRANSPORT_FIELDS}
    else:
        content = conversation_content(body, endpoint, config.include)
    material = {
        "v": KEY_VERSION,
        "provider": provider,
        "endpoint": endpoint,
        "mode": config.mode.value,
        "scope": scope,
        "namespace": namespace,
        "content": content,
    }
    if body.get("stream") is True and generation_endpoint(endpoint.split("?", 1)[0]) not in STREAM_CONVERTIBLE:
        material["stream"] = True
    return hashlib.sha256(canonical_json(material)).hexdigest()


def conversation_content(body: Mapping[str, Any], endpoint: str, include: Iterable[str] = ()) -> dict[str, Any]:
    generation = generation_endpoint(endpoint.split("?", 1)[0])
    native = _native_conversation(generation)
    if native is not None:  # Gemini's and Bedrock's own request formats
        return native(dict(body)) | {name: body[name] for name in include if name in body}
    content: dict[str, Any] = {}
    for name in CONTENT_FIELDS:
        if name in body:
            content[name] = body[name]
    if "messages" in content:
        content["messages"] = _normalize_messages(content["messages"])
    if "system" in content:
        content["system"] = normalize_content(content["system"])
    if isinstance(content.get("input"), list):
        content["input"] = _normalize_messages(content["input"])
    if content.get("n") == 1:
        del content["n"]
    if generation == "embeddings":
        include = (*include, *EMBEDDING_FIELDS)
    for name in include:
        if name in body and name not in TRANSPORT_FIELDS:
            content[name] = body[name]
    return content


def _native_conversation(endpoint: str | None) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    """The conversation rule of an API whose requests are not OpenAI-shaped (Gemini, Bedrock), if any."""
    if endpoint is not None and is_gemini_endpoint(endpoint):
        return functools.partial(gemini_conversation, endpoint=endpoint)
    if endpoint is not None and is_bedrock_endpoint(endpoint):
        return functools.partial(bedrock_conversation, endpoint=endpoint)
    return None


def normalize_content(content: Any) -> Any:
    """One text part and a plain string are the same content; prompt-cache hints are dropped."""
    if not isinstance(content, list):
        return content
    parts = [_normalize_part(part) for part in content]
    if len(parts) == 1 and _is_plain_text(parts[0]):
        return parts[0]["text"]
    return parts


def _normalize_messages(messages: Any) -> Any:
    if not isinstance(messages, list):
        return messages
    return [_normalize_message(message) for message in messages]


def _normalize_message(message: Any) -> Any:
    if not isinstance(message, dict):
        return message
    if "role" not in message:  # a Responses API item such as a function call output
        return _normalize_part(message)
    normalized = {k: message[k] for k in MESSAGE_FIELDS if k in message}
    if "content" in normalized:
        normalized["content"] = normalize_content(normalized["content"])
    return normalized


def _normalize_part(part: Any) -> Any:
    if not isinstance(part, dict):
        return part
    return {k: v for k, v in part.items() if k not in _IGNORED_PART_FIELDS}


def _is_plain_text(part: Any) -> bool:
    return (
        isinstance(part, dict)
        and part.keys() == {"type", "text"}
        and part["type"] in _TEXT_PART_TYPES
        and isinstance(part["text"], str)
    )


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # integers beyond 64 bits
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")


def credential_scope(headers: Iterable[tuple[str, str]], query_credential: str = "") -> str:
    """A full SHA-256 over the credential headers a client sent and the credential in its query (Gemini's
    `key=...`); "" stands for none.

    Used to keep apart answers paid for with different credentials when the client's own
    credential is forwarded. The credential itself is never stored.
    """
    found = sorted((name.lower(), value) for name, value in headers if name.lower() in CREDENTIAL_HEADERS)
    if query_credential:
        found.append(("?", query_credential))
    if not found:
        return ""
    return hashlib.sha256(canonical_json(found)).hexdigest()


def is_storable(status: int, headers: Iterable[tuple[str, str]], body: bytes, endpoint: str) -> bool:
    """Only a complete, successful answer meant for anyone may be stored: JSON that parses, or an
    event stream that ended the way `endpoint` ends a whole answer."""
    if not 200 <= status < 300:
        return False
    content_type = ""
    for name, value in headers:
        lowered = name.lower()
        if lowered == "set-cookie":
            return False
        if lowered == "cache-control" and _forbids_storing(value):
            return False
        if lowered == "content-type":
            content_type = value.split(";", 1)[0].strip().lower()
    if content_type == EVENT_STREAM:
        return stream_completed(endpoint, body, gemini_stream_finished if endpoint == GENERATE else None)
    if content_type == EVENTSTREAM:
        return bedrock_stream_finished(endpoint, body)
    if content_type != "application/json" and not content_type.endswith("+json"):
        return False
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return True


def _forbids_storing(cache_control: str) -> bool:
    directives = {part.split("=", 1)[0].strip().lower() for part in cache_control.split(",")}
    return bool(directives & {"no-store", "private"})
