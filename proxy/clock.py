"""The clock that deadlines (anyio's cancel scopes) are measured on, read without anyio's per-call lookup
of the running async library (a few percent of a miss's time)."""

from __future__ import annotations

import asyncio
import math


def event_loop_time() -> float:
    """The running event loop's clock: what `anyio.current_time()` returns under asyncio."""
    return asyncio.get_running_loop().time()


def within(seconds: float) -> asyncio.Timeout:
    """A deadline `seconds` from now (none when infinite) for `async with`: asyncio's own, which costs half
    as much as anyio's `move_on_after` on every upstream request. It raises TimeoutError when it expires;
    `expired()` tells that from a TimeoutError of the work itself."""
    return asyncio.timeout(seconds if seconds < math.inf else None)
