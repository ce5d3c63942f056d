"""Awaiting work that a cancellation must not cut short, without paying for a cancel scope when the work
never waits: anyio's shielded scope costs about 10 us to make and enter, and most work given here (closing
a response whose body was read whole) ends without waiting on anything."""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

import anyio

T = TypeVar("T")


async def shielded(work: Coroutine[Any, Any, T]) -> T:
    """`await work` under a shielded cancel scope, or at once when `work` ends without waiting: then no
    cancellation can reach it anyway."""
    try:
        waits_on = work.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    with anyio.CancelScope(shield=True):
        result = await _Resumed(work, waits_on)
    return result


class _Resumed(Generic[T]):
    """The rest of a coroutine that was started and now waits on `waits_on`: awaited, it hands every wait
    to the task running it and everything the task sends or throws back to the coroutine, as `await`
    would have from the start."""

    __slots__ = ("work", "waits_on")

    def __init__(self, work: Coroutine[Any, Any, T], waits_on: Any) -> None:
        self.work, self.waits_on = work, waits_on

    def __await__(self) -> Generator[Any, Any, T]:
        work, waits_on = self.work, self.waits_on
        while True:
            try:
                sent = yield waits_on
            except GeneratorExit:
                work.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - thrown in by the task: the coroutine gets it
                try:
                    waits_on = work.throw(exc)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
                continue
            try:
                waits_on = work.send(sent)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
