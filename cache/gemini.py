"""Pure rules for Google's Gemini API: which calls are cached, what of a request is the conversation, when a
stream is whole, and the conversions between a stream and a whole answer.

A call names its model and method in the path (`v1beta/models/gemini-2.0-flash:generateContent`); a
streamed call is `:streamGenerateContent?alt=sse`, an event stream of `GenerateContentResponse` chunks.
Both are the endpoint `generateContent` and share one entry.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cache.sse import SseEvent, data_events

GENERATE = "generateContent"
STREAM_GENERATE = "streamGenerateContent"
EMBEDDING_METHODS = frozenset({"embedContent", "batchEmbedContents"})
_CALL = re.compile(
    r"^(v1|v1beta|v1alpha)/((?:models|tunedModels)/[^/:]+):"
    r"(generateContent|streamGenerateContent|embedContent|batchEmbedContents)$"
)
# What of a generateContent request is the conversation in `messages` mode, and the parts of its
# generationConfig that change the answer's shape (sampling settings do not).
CONTENT_FIELDS = ("contents", "systemInstruction", "tools", "toolConfig", "cachedContent")
SHAPE_FIELDS = ("responseMimeType", "responseSchema", "responseJsonSchema", "candidateCount", "responseModalities")
_SNAKE = re.compile(r"_([a-z])")
# A text part another text part may be appended to, when both are thoughts or both are not.
_MERGEABLE_TEXT = frozenset({"text", "thought"})


@dataclass(frozen=True)
class GeminiCall:
    """A cacheable Gemini call, as its path names it."""

    version: str  # v1beta
    resource: str  # models/gemini-2.0-flash
    method: str  # generateContent

    @property
    def endpoint(self) -> str:
        """The generation endpoint: both generate methods are `generateContent`."""
        return GENERATE if self.method == STREAM_GENERATE else self.method

    @property
    def streams(self) -> bool:
        return self.method == STREAM_GENERATE

    @property
    def model(self) -> str:
        """`gemini-2.0-flash` for `models/gemini-2.0-flash`; a tuned model keeps its `tunedModels/` prefix."""
        return self.resource.removeprefix("models/")

    @property
    def key_path(self) -> str:
        """The path an entry's key names: the model left to the key's content, streaming left out."""
        return f"{self.version}/models/{{model}}:{self.endpoint}"


@lru_cache(maxsize=1024)
def gemini_call(path: str) -> GeminiCall | None:
    match = _CALL.match(path.split("?", 1)[0].strip("/"))
    return GeminiCall(*match.groups()) if match else None


def is_gemini_endpoint(endpoint: str) -> bool:
    return endpoint == GENERATE or endpoint in EMBEDDING_METHODS


def conversation(body: dict[str, Any], endpoint: str) -> dict[str, Any]:
    """What of a request is the conversation: the content fields and the answer's shape for a generation,
    the whole request for an embedding. Field names in snake_case (which the API also takes) count as their
    camelCase names."""
    body = _camel_keys(body)
    if endpoint in EMBEDDING_METHODS:
        return body
    content = {name: body[name] for name in CONTENT_FIELDS if name in body}
    config = body.get("generationConfig")
    if isinstance(config, dict):
        shape = {name: value for name, value in _camel_keys(config).items() if name in SHAPE_FIELDS}
        if shape.get("candidateCount") == 1:
            del shape["candidateCount"]
        if shape:
            content["generationConfig"] = shape
    return content


def _camel_keys(value: dict[str, Any]) -> dict[str, Any]:
    return {_SNAKE.sub(lambda match: match.group(1).upper(), name): item for name, item in value.items()}


def stream_finished(events: Sequence[SseEvent]) -> bool:
    """Whether a recorded stream is a whole answer: its last chunk has candidates, each with a finishReason."""
    chunks = data_events(events)
    if not chunks or not isinstance(chunks[-1], dict):
        return False
    candidates = chunks[-1].get("candidates")
    return (
        isinstance(candidates, list)
        and bool(candidates)
        and all(isinstance(candidate, dict) and candidate.get("finishReason") for candidate in candidates)
    )


def stream_to_json(events: Sequence[SseEvent]) -> dict[str, Any] | None:
    """The GenerateContentResponse a recorded stream amounts to: each candidate's parts in order, adjacent
    plain text parts joined; the last chunk's usage, model version and finish reasons. None when the chunks
    are not GenerateContentResponses."""
    chunks = [chunk for chunk in data_events(events) if isinstance(chunk, dict)]
    if not chunks or not any("candidates" in chunk for chunk in chunks):
        return None
    response: dict[str, Any] = {}
    candidates: dict[int, dict[str, Any]] = {}
    try:
        for chunk in chunks:
            for name, value in chunk.items():
                if name == "candidates":
                    for position, candidate in enumerate(value):
                        _merge_candidate(candidates.setdefault(candidate.get("index", position), {}), candidate)
                elif value is not None:
                    response[name] = value
    except (TypeError, AttributeError):
        return None
    return {"candidates": [candidates[index] for index in sorted(candidates)], **response}


def _merge_candidate(merged: dict[str, Any], candidate: dict[str, Any]) -> None:
    for name, value in candidate.items():
        if name != "content":
            merged[name] = value
            continue
        content = merged.setdefault("content", {"parts": []})
        for part in value.get("parts") or []:
            _append_part(content["parts"], part)
        if value.get("role"):
            content["role"] = value["role"]


def _append_part(parts: list[dict[str, Any]], part: dict[str, Any]) -> None:
    last = parts[-1] if parts else None
    if (
        last is not None
        and isinstance(last.get("text"), str)
        and isinstance(part.get("text"), str)
        and part.keys() <= _MERGEABLE_TEXT
        and last.keys() <= _MERGEABLE_TEXT | {"thoughtSignature"}
        and last.get("thought", False) == part.get("thought", False)
    ):
        parts[-1] = {**last, "text": last["text"] + part["text"]}
    else:
        parts.append(dict(part))


def json_to_stream(response: Any) -> bytes | None:
    """A stream equivalent to a whole GenerateContentResponse: the response as its one chunk (a stream's
    reader joins chunks, so one chunk that holds everything reads the same). None when it is not one."""
    if not isinstance(response, dict) or not isinstance(response.get("candidates"), list):
        return None
    return b"data: " + json.dumps(response, separators=(",", ":"), ensure_ascii=False).encode() + b"\r\n\r\n"
