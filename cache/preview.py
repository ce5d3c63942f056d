"""Pure: the line of a request that the dashboard shows for its cache entry (the prompt, shortened)."""

from __future__ import annotations

from typing import Any

PREVIEW_LENGTH = 80


def prompt_preview(payload: dict[str, Any]) -> str | None:
    """The first non-blank line of the request's last user input, at most PREVIEW_LENGTH characters;
    None when the request carries no text (token arrays, images only, an unknown shape)."""
    text = _last_user_text(payload)
    if text is None:
        return None
    for line in text.splitlines():
        line = " ".join(line.split())
        if line:
            return line if len(line) <= PREVIEW_LENGTH else line[: PREVIEW_LENGTH - 1] + "…"
    return None


def _last_user_text(payload: dict[str, Any]) -> str | None:
    # Chat Completions, Anthropic Messages, Cohere v2 chat; Gemini; then Responses' input, Completions' prompt,
    # Embeddings' input, Cohere v1 chat's message.
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return _text(message.get("content"))
        return None
    contents = payload.get("contents")  # Gemini: a user's content has role "user", or none
    if isinstance(contents, list):
        for content in reversed(contents):
            if isinstance(content, dict) and content.get("role", "user") == "user":
                return _text(content.get("parts"))
        return None
    for field in ("input", "prompt", "message"):
        value = payload.get(field)
        if isinstance(value, list):
            users = [item for item in value if isinstance(item, dict) and item.get("role") == "user"]
            value = users[-1].get("content") if users else value
        text = _text(value)
        if text is not None:
            return text
    return None


def _text(content: Any) -> str | None:
    """The text of a message's content: a string, or the first text part of a list of parts or strings."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                return part
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                return str(part["text"])
    return None
