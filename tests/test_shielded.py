"""`shielded`: work awaited to its end whatever cancels its caller, as under anyio's shielded scope, and at
once when it never waits."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from proxy.shielded import shielded


async def _at_once(log: list[str]) -> int:
    log.append("ran")
    return 3


async def _waits(log: list[str], fail: bool = False) -> int:
    log.append("started")
    await asyncio.sleep(0.05)
    if fail:
        raise ValueError("failed after waiting")
    log.append("ended")
    return 7


def test_work_that_never_waits_runs_at_once() -> None:
    async def main() -> None:
        log: list[str] = []
        assert await shielded(_at_once(log)) == 3
        assert log == ["ran"]

    anyio.run(main)


def test_a_cancelled_scope_waits_for_the_work_and_cancels_after() -> None:
    async def main() -> list[object]:
        log: list[object] = []
        with anyio.CancelScope() as outer:
            asyncio.get_running_loop().call_later(0.01, outer.cancel)
            log.append(await shielded(_waits(log)))  # type: ignore[arg-type]
            await anyio.sleep(1)  # the scope's cancellation lands here, once the work is done
            log.append("not cancelled")
        assert outer.cancelled_caught
        return log

    assert anyio.run(main) == ["started", "ended", 7]


def test_the_work_gets_what_the_task_sends_and_throws() -> None:
    async def main() -> None:
        log: list[str] = []
        with pytest.raises(ValueError, match="failed after waiting"):
            await shielded(_waits(log, fail=True))
        assert log == ["started"]
        # Many waits in a row, each handed to the task and resumed with what it sends back.
        queue: asyncio.Queue[int] = asyncio.Queue()

        async def three() -> int:
            return await queue.get() + await queue.get() + await queue.get()

        loop = asyncio.get_running_loop()
        for delay, value in ((0.01, 1), (0.02, 10), (0.03, 100)):
            loop.call_later(delay, queue.put_nowait, value)
        assert await shielded(three()) == 111

    anyio.run(main)


def test_a_task_cancelled_outright_is_cancelled_as_under_anyio_shield() -> None:
    """anyio's shield keeps its own scopes' cancellation out, not a task's `cancel()`: neither does this."""

    async def main() -> tuple[list[str], list[str]]:
        logs: tuple[list[str], list[str]] = ([], [])

        async def under_anyio(log: list[str]) -> None:
            with anyio.CancelScope(shield=True):
                await _waits(log)

        async def under_shielded(log: list[str]) -> None:
            await shielded(_waits(log))

        for run, log in zip((under_anyio, under_shielded), logs, strict=True):
            task = asyncio.ensure_future(run(log))
            await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return logs

    by_anyio, by_shielded = anyio.run(main)
    assert by_shielded == by_anyio == ["started"]
