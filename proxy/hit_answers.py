"""The answers the latest hits got, kept so that a request hitting the same entry again in the same shape
is answered without replaying the entry again (a conversion between a stream and JSON, or usage taken out
of a stream) or encoding its headers again: only its age is new."""

from __future__ import annotations

from dataclasses import dataclass, field

from cache.base import CachedResponse, same_entry
from cache.replay import Replay, replay
from proxy.responses import BufferedResponse, carries_length
from proxy.server import header_lines

# Bookkeeping per answer besides its body: the shape (its key included), the object, the header tuples and
# their written lines (tracemalloc: 980 bytes for a chat answer).
_OVERHEAD = 1000
HIT = (b"x-cache-status", b"HIT")

# What a hit's answer depends on besides its entry: the key, the endpoint, whether the request wants a
# stream, and usage.
HitShape = tuple[str, str, bool, bool]


@dataclass(slots=True)
class HitAnswer:
    """A hit's answer for one entry: its headers are `content_type`, the age, then `after_age`. They are
    also kept as the server writes them (`written_around_age`: the lines before and after the age; None
    when the server would refuse one), so that a hit answered at once writes no header again.

    The response last made is kept with its age (`last`): the hits of one second all get that response,
    which nothing changes once made."""

    entry: CachedResponse
    body: bytes
    content_type: tuple[bytes, bytes]
    after_age: tuple[tuple[bytes, bytes], ...]
    written_around_age: tuple[bytes, bytes] | None
    last: tuple[int, BufferedResponse] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def made(cls, entry: CachedResponse, replayed: Replay, cache_headers: list[tuple[bytes, bytes]]) -> HitAnswer:
        """The answer `replayed` from `entry`, with the cache's headers (`X-Cache-Status` first)."""
        if carries_length(entry.status):
            cache_headers = [*cache_headers, (b"content-length", b"%d" % len(replayed.body))]
        content_type = (b"content-type", replayed.content_type.encode("latin-1"))
        before, after = header_lines([content_type]), header_lines(cache_headers)
        written = (before, after) if before is not None and after is not None else None
        return cls(entry, replayed.body, content_type, tuple(cache_headers), written)

    @property
    def written_at_once(self) -> bool:
        """Whether the server may write this answer at once, without an ASGI task: a status it knows, with a
        body, and a content type it would not refuse. Any other goes the task's way, through its checks."""
        entry = self.entry
        return (
            self.written_around_age is not None
            and entry.status < 600
            and carries_length(entry.status)
            and entry.content_type.isprintable()
        )

    def response(self, age: int) -> BufferedResponse:
        last = self.last
        if last is not None and last[0] == age:
            return last[1]
        written = self.written_around_age
        head = None if written is None else b"%sage: %d\r\n%s" % (written[0], age, written[1])
        response = BufferedResponse.complete(
            self.entry.status, self.body, [self.content_type, (b"age", b"%d" % age), *self.after_age], head
        )
        self.last = (age, response)
        return response


class HitAnswers:
    """The answers last made, by shape, within `max_bytes` (the oldest go first). An answer is reused only
    for the entry it was made from (`same_entry`: also a new copy of it read from the store); a replaced
    entry gets a new one."""

    def __init__(self, max_bytes: int = 4 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._answers: dict[HitShape, HitAnswer] = {}

    def __len__(self) -> int:
        return len(self._answers)

    def answer(self, shape: HitShape, entry: CachedResponse) -> HitAnswer | None:
        """The answer `entry` gives a request of `shape`; None when it cannot answer it faithfully."""
        kept = self._answers.get(shape)
        if kept is not None and same_entry(kept.entry, entry):
            return kept
        key, endpoint, wants_stream, wants_usage = shape
        replayed = replay(entry, endpoint, wants_stream, wants_usage)
        if replayed is None:
            return None
        made = HitAnswer.made(entry, replayed, [HIT, (b"x-cache-key", key.encode("latin-1"))])
        self._keep(shape, made)
        return made

    def _keep(self, shape: HitShape, made: HitAnswer) -> None:
        self._discard(shape)
        size = _size(made)
        if size > self.max_bytes // 8:
            return  # a large answer would push out many small ones for one request's sake
        self._answers[shape] = made
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._discard(next(iter(self._answers)))

    def _discard(self, shape: HitShape) -> None:
        gone = self._answers.pop(shape, None)
        if gone is not None:
            self.bytes -= _size(gone)


def _size(answer: HitAnswer) -> int:
    """The bytes an answer keeps alive: its body, and its entry's when that is another (a conversion)."""
    entry_body = answer.entry.body
    return len(answer.body) + (len(entry_body) if entry_body is not answer.body else 0) + _OVERHEAD
