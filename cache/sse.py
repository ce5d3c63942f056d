"""Pure Server-Sent Events handling: split a recorded stream into events, and tell whether it completed."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any

import orjson

EVENT_STREAM = "text/event-stream"
DONE = "[DONE]"

_LF = ord("\n")
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE_END = re.compile(r"\r\n|\r|\n")

# How each generation endpoint says its stream is over. Endpoints not listed have no terminator:
# a clean end of a 200 response is a complete stream for them.
_OPENAI_DONE = frozenset({DONE})
_TERMINATORS: dict[str, frozenset[str]] = {
    "chat/completions": _OPENAI_DONE,
    "completions": _OPENAI_DONE,
    "messages": frozenset({"message_stop"}),
    "responses": frozenset({"response.completed", "response.incomplete"}),
    "chat": frozenset({"message-end"}),  # Cohere v2
}
_ERROR_TYPES = frozenset({"error", "response.failed"})


_UNREAD = object()


class SseEvent:
    """One event: its `event:` name, its joined `data:` lines, and its exact bytes (with the blank line)."""

    __slots__ = ("name", "data", "raw", "_payload", "_type")

    def __init__(self, name: str | None, data: str, raw: bytes) -> None:
        self.name = name
        self.data = data
        self.raw = raw
        self._payload: Any = _UNREAD
        self._type: str | None = None

    def __repr__(self) -> str:
        return f"SseEvent(name={self.name!r}, data={self.data!r}, raw={self.raw!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SseEvent):
            return NotImplemented
        return (self.name, self.data, self.raw) == (other.name, other.data, other.raw)

    def __hash__(self) -> int:
        return hash((self.name, self.data, self.raw))

    def json(self) -> Any:
        """The data as JSON, or None when it is not JSON (such as `[DONE]`). Parsed once: a recorded
        stream is read by several rules (complete? usage? the JSON it amounts to) before it is stored."""
        if self._payload is _UNREAD:
            self._payload = _json_or_none(self.data)
        return self._payload

    @property
    def type(self) -> str:
        """What the event is: `[DONE]`, the `type` of its JSON data, or its `event:` name."""
        if self._type is None:
            self._type = self._read_type()
        return self._type

    def _read_type(self) -> str:
        if self.data == DONE:
            return DONE
        payload = self.json()
        if isinstance(payload, dict) and isinstance(payload.get("type"), str):
            return str(payload["type"])
        return self.name or ""


def _json_or_none(data: str) -> Any:
    if not data or data == DONE:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:  # what orjson refuses and JSON's Python reading accepts: NaN, integers beyond 64 bits
        return json.loads(data)
    except ValueError:
        return None


# Streams up to this size have their events kept (two of them): the rules that judge a recording before
# it is stored each read the same bytes, one after the other. A larger one is parsed again, not kept.
_KEPT_STREAM_BYTES = 1024 * 1024


def parse_events(stream: bytes) -> tuple[SseEvent, ...]:
    """Every complete event in `stream`; comments-only blocks are kept (as events without data)."""
    return _kept_events(stream) if len(stream) <= _KEPT_STREAM_BYTES else _events(stream)


def _events(stream: bytes) -> tuple[SseEvent, ...]:
    events, _ = split_events(stream)
    return tuple(parse_event(raw) for raw in events)


_kept_events = lru_cache(maxsize=2)(_events)


def split_events(stream: bytes) -> tuple[list[bytes], bytes]:
    """The exact bytes of each complete event in `stream` (blank line included), and what follows them."""
    if b"\r" not in stream:  # the usual stream, whose lines end in LF alone
        *whole, rest = stream.split(b"\n\n")
        return [event + b"\n\n" for event in whole], rest
    events = []
    position = 0
    for end in _EVENT_END.finditer(stream):
        events.append(stream[position : end.end()])
        position = end.end()
    return events, stream[position:]


def parse_event(raw: bytes) -> SseEvent:
    """One event from its exact bytes."""
    if raw.startswith(b"data: ") and raw.endswith(b"\n\n") and raw.count(b"\n") == 2 and b"\r" not in raw:
        return SseEvent(None, raw[6:-2].decode("utf-8", errors="replace"), raw)  # the usual one-line event
    name: str | None = None
    data: list[str] = []
    # Only CR, LF and CRLF end an SSE line; str.splitlines would also split on U+2028 inside JSON text.
    for line in _LINE_END.split(raw.decode("utf-8", errors="replace")):
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
    return SseEvent(name, "\n".join(data), raw)


def encode_event(data: Any, name: str | None = None) -> bytes:
    """One event with `data` as compact JSON (or a literal string such as `[DONE]`)."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    prefix = f"event: {name}\n" if name else ""
    return f"{prefix}data: {text}\n\n".encode()


# JSON may write any character as an escape (`\u0065` for `e`), so bytes holding an escaped ASCII
# character could spell any word: they always count as a mention.
_ESCAPED_ASCII = rb"\\u00[0-7][0-9a-fA-F]"
_ESCAPE_START = b"\\u00"


class Mention:
    """What finds the bytes that could hold one of some words: a word itself (unless what follows it matches
    `unless_followed_by`) or any escaped ASCII character. Each is looked for as literal bytes first (in C,
    fast), and only where those occur is the rest checked: one regular expression searching a recorded
    stream for all of them at once tries every byte of it (judging a 100-event stream took 170 us so, 65 us
    this way)."""

    __slots__ = ("_literals", "_at")

    def __init__(self, words: Sequence[bytes], unless_followed_by: bytes | None = None) -> None:
        guard = b"(?!" + unless_followed_by + b")" if unless_followed_by else b""
        self._literals = (*words, _ESCAPE_START)
        # Every alternative begins with one of the literals, so a mention starts where this matches.
        self._at = re.compile(b"|".join([*(re.escape(word) + guard for word in words), _ESCAPED_ASCII]))

    def find(self, data: bytes, start: int = 0) -> int:
        """Where the first mention at or after `start` begins; -1 when there is none."""
        first = -1
        for literal in self._literals:
            end = len(data) if first < 0 else first + len(literal) - 1  # so as to begin before `first`
            position = data.find(literal, start, end)
            while position >= 0 and self._at.match(data, position) is None:
                position = data.find(literal, position + 1, end)
            if position >= 0:
                first = position
        return first


def mention(*words: bytes, unless_followed_by: bytes | None = None) -> Mention:
    """What finds an event that could hold one of `words` (literal bytes; see `Mention`)."""
    return Mention(words, unless_followed_by)


def events_mentioning(stream: bytes, mentioned: Mention) -> list[SseEvent]:
    """The complete events of `stream` in which `mentioned` finds a mention, in order: all a rule that looks
    for what they mention needs to parse, usually a few events of hundreds, found in C."""
    if b"\r" in stream:
        events, _ = split_events(stream)
        return [parse_event(raw) for raw in events if mentioned.find(raw) >= 0]
    found = []
    position = mentioned.find(stream)
    while position >= 0:
        end = stream.find(b"\n\n", position)
        if end < 0:
            break  # in the bytes after the last complete event
        taken = end + 2
        found.append(parse_event(stream[_event_start(stream, position) : taken]))
        position = mentioned.find(stream, taken)
    return found


def _event_start(stream: bytes, position: int) -> int:
    """Where the event holding `position` starts in an LF-only stream, as `split_events` splits it: after the
    blank lines before it, taken two newlines at a time from the left (an odd one out starts the event)."""
    pair = stream.rfind(b"\n\n", 0, position)
    if pair < 0:
        return 0
    newlines_start = pair
    while newlines_start > 0 and stream[newlines_start - 1] == _LF:
        newlines_start -= 1
    return pair + 2 - (pair + 2 - newlines_start) % 2


# An event that is an error names it: `error` (an event name, a type, a key) or `response.failed`.
_ERROR_MENTION = mention(b"error", b"failed")


def stream_completed(
    endpoint: str, stream: bytes, finished: Callable[[Sequence[SseEvent]], bool] | None = None
) -> bool:
    """Whether a recorded stream ended the way the endpoint ends a whole answer, with no error in it;
    `finished` tells that for an endpoint without a terminating event (Gemini's).

    Bytes after the last blank line count as a final event: the upstream ended its response there.
    """
    if finished is None and _ERROR_MENTION.find(stream) < 0:
        # No event can be an error: only the last one with data needs reading (hundreds are not parsed).
        last = _last_data_event(stream)
        terminators = _TERMINATORS.get(endpoint)
        return last is not None and (terminators is None or last.type in terminators)
    parsed = parse_events(stream)
    tail = stream[sum(len(event.raw) for event in parsed) :]
    events = [event for event in parsed if event.data]
    if tail.strip() and (last := parse_event(tail)).data:
        events.append(last)
    if not events or any(_is_error(event) for event in events):
        return False
    if finished is not None:
        return finished(events)
    terminators = _TERMINATORS.get(endpoint)
    return terminators is None or events[-1].type in terminators


def _last_data_event(stream: bytes) -> SseEvent | None:
    """The last event with data, the bytes after the last blank line counting as a final event."""
    latest_first: Iterable[bytes]
    if b"\r" in stream:
        events, tail = split_events(stream)
        latest_first = reversed(events)
    else:  # split_events' events, made only as far back as needed
        *whole, tail = stream.split(b"\n\n")
        latest_first = (event + b"\n\n" for event in reversed(whole))
    if tail.strip() and (last := parse_event(tail)).data:
        return last
    for raw in latest_first:
        if (event := parse_event(raw)).data:
            return event
    return None


def _is_error(event: SseEvent) -> bool:
    if event.type in _ERROR_TYPES or event.name == "error":
        return True
    payload = event.json()
    return isinstance(payload, dict) and "error" in payload and payload["error"] is not None


def data_events(events: Iterable[SseEvent]) -> list[Any]:
    """The JSON payloads of the events, skipping `[DONE]`, pings without data and comments."""
    return [payload for event in events if event.data and (payload := event.json()) is not None]
