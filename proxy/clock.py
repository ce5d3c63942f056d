"""The clock that deadlines (anyio's cancel scopes) are measured on, read without anyio's per-call lookup
of the running async library (a few percent of a miss's time)."""

from __future__ import annotations

import asyncio


def event_loop_time() -> float:
    """The running event loop's clock: what `anyio.current_time()` returns under asyncio."""
    return asyncio.get_running_loop().time()
