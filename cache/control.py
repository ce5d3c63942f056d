"""Pure: what a request asks of the cache (standard Cache-Control directives and our X-Cache-* headers),
and whether a stored entry is fresh enough to answer it."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

NAMESPACE_HEADER = "x-cache-namespace"
TTL_HEADER = "x-cache-ttl"
MAX_NAMESPACE_LENGTH = 128
_NAMESPACE = re.compile(r"^[A-Za-z0-9._:/@+=-]+$")
_WHOLE_SECONDS = re.compile(r"^[0-9]{1,12}$")
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class ControlError(ValueError):
    """A cache-control value the proxy cannot honour; the message says which and why."""


class RequestControl(NamedTuple):
    """What one request asks of the cache (a tuple: built on every request)."""

    no_cache: bool = False
    no_store: bool = False
    only_if_cached: bool = False
    max_age: int | None = None
    namespace: str = ""
    ttl: int | None = None


def request_control(headers: Iterable[tuple[str, str]], *, offline: bool = False) -> RequestControl:
    """The cache directives in a request's headers. Unknown Cache-Control directives are ignored."""
    no_cache = no_store = only_if_cached = False
    max_age: int | None = None
    namespace = ""
    ttl: int | None = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == "cache-control":
            for directive, argument in _directives(value):
                if directive == "no-cache":
                    no_cache = True
                elif directive == "no-store":
                    no_store = True
                elif directive == "only-if-cached":
                    only_if_cached = True
                elif directive == "max-age":
                    max_age = _whole_seconds(argument, "Cache-Control max-age")
        elif lowered == NAMESPACE_HEADER:
            namespace = _namespace(value)
        elif lowered == TTL_HEADER:
            ttl = _whole_seconds(value, "X-Cache-TTL")
    return RequestControl(no_cache, no_store, only_if_cached or offline, max_age, namespace, ttl)


def _directives(value: str) -> list[tuple[str, str | None]]:
    directives = []
    for part in value.split(","):
        name, equals, argument = part.strip().partition("=")
        if name:
            directives.append((name.strip().lower(), argument.strip().strip('"') if equals else None))
    return directives


def _whole_seconds(value: str | None, what: str) -> int:
    if value is None or not _WHOLE_SECONDS.match(value.strip()):
        shown = "nothing" if value is None else repr(value[:40])
        raise ControlError(f"{what} must be a whole number of seconds (0 or more), got {shown}.")
    return int(value)


def _namespace(value: str) -> str:
    value = value.strip()
    if len(value) > MAX_NAMESPACE_LENGTH:
        raise ControlError(f"X-Cache-Namespace is longer than {MAX_NAMESPACE_LENGTH} characters.")
    if value and not _NAMESPACE.match(value):
        raise ControlError("X-Cache-Namespace may only hold letters, digits and . _ : / @ + = -")
    return value


def parse_duration(text: str) -> float:
    """Seconds in `7d`, `12h`, `30m`, `3600s`, `1w` or a plain number of seconds."""
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise ControlError(f"{text[:40]!r} is not a duration such as 3600s, 30m, 12h, 7d or 2w.")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def is_fresh(created_at: float, ttl: float, now: float, max_age: int | None = None) -> bool:
    """Whether an entry may still answer: younger than its time to live (0: forever) and than max-age."""
    age = now - created_at
    if ttl > 0 and age >= ttl:
        return False
    return max_age is None or age <= max_age
