"""Pure: an OpenAI chat chunk stream without the usage a client did not ask for.

The proxy asks the provider for usage on every chat stream it records (`stream_options.include_usage`),
so one recording can also answer a non-streamed request. A client that did not ask gets the stream it
would have had: no final usage chunk, and no `"usage": null` field in the other chunks.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from cache.sse import encode_event, parse_event, split_events

# A top-level `"usage": null` member with the comma that joins it to its neighbour. Inside a JSON string
# a quote is escaped, so the pattern can only match a member; the result is still checked.
_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null(?=\s*[,}])|"usage"\s*:\s*null\s*,\s*')
_USAGE = b'"usage"'
_LAST_NULL_USAGE = b',"usage":null}\n\n'


def ask_for_usage(body: bytes, payload: dict[str, Any]) -> bytes:
    """The request body with `stream_options.include_usage` set; the client's bytes kept where possible."""
    if "stream_options" not in payload:
        opening = body.index(b"{") + 1
        return body[:opening] + b'"stream_options":{"include_usage":true},' + body[opening:]
    options = payload["stream_options"] if isinstance(payload["stream_options"], dict) else {}
    return orjson.dumps({**payload, "stream_options": {**options, "include_usage": True}})


def without_usage(stream: bytes) -> bytes:
    """A whole recorded chunk stream as a client that did not ask for usage receives it."""
    if _USAGE not in stream:
        return stream
    withheld = UsageWithheld()
    return withheld.feed(stream) + withheld.end()


class UsageWithheld:
    """The same, for a stream as it passes: `feed` each chunk, then `end`; whole events are passed on as
    soon as they are complete, so nothing waits for more than the rest of its own event."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self._pending and chunk.endswith(b"\n\n"):
            if _USAGE not in chunk:
                return chunk  # whole events, none with usage: the usual chunk, passed on as it is
            if chunk.find(b"\n\n") == len(chunk) - 2 and b"\r" not in chunk:
                return _event_without_usage(chunk)  # one whole event, as a chunk of a model's stream usually is
        pending = self._pending + chunk if self._pending else chunk
        events, self._pending = split_events(pending)
        return b"".join([_event_without_usage(event) for event in events])

    def end(self) -> bytes:
        """What is left: bytes after the last complete event, as the upstream ended them."""
        rest, self._pending = self._pending, b""
        return _event_without_usage(rest) if rest.strip() else rest


def _event_without_usage(raw: bytes) -> bytes:
    if _USAGE not in raw:
        return raw
    if raw.endswith(_LAST_NULL_USAGE) and raw.startswith(b"data:") and raw.count(b"\n") == 2 and raw.count(_USAGE) == 1:
        # OpenAI's own chunk, which ends its one data line with `"usage":null`: every chunk but the last
        # of a stream that asked for usage. Its final brace closes the top-level object, so the member before
        # it is a top-level one (a quote cannot follow a comma inside a JSON string): it is cut here. Parsing
        # the event twice, as below, cost 7.5 us an event; this, 1.6.
        return raw[: -len(_LAST_NULL_USAGE)] + b"}\n\n"
    chunk = _json(_data(raw))
    if not isinstance(chunk, dict) or "usage" not in chunk:
        return raw
    if chunk.get("choices") == [] and chunk["usage"] is not None:
        return b""  # the usage chunk itself
    rest = {name: value for name, value in chunk.items() if name != "usage"}
    if chunk["usage"] is None:
        edited = _NULL_USAGE.sub(b"", raw, count=1)
        if _json(_data(edited)) == rest:
            return edited
    return encode_event(rest, name=parse_event(raw).name)


def _data(raw: bytes) -> bytes:
    """An event's data: a lone `data:` line taken as it is, any other event parsed."""
    if raw.startswith(b"data:"):
        data = raw[5:].strip()
        if b"\n" not in data and b"\r" not in data:
            return data
    return parse_event(raw).data.encode()


def _json(data: bytes) -> Any:
    # orjson: this runs for every event of every stream whose usage is withheld.
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
