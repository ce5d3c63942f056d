"""CacheHealth: each outage logged once when it starts and once when it ends, and a store that fails and
works by turns (a Redis pool that no connection comes free in while the proxy is overloaded) logged at most
once per FLAP_SECONDS, while /healthz still follows every turn."""

from __future__ import annotations

import logging

import pytest

from cache.base import CacheError, StoreBusy
from cache.health import FLAP_LOGGED_AFTER, FLAP_SECONDS, CacheHealth, Operation

READ, WRITE = Operation.READ, Operation.WRITE


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "openai_proxy.cache"]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def health(clock: Clock, caplog: pytest.LogCaptureFixture) -> CacheHealth:
    caplog.set_level(logging.INFO, logger="openai_proxy.cache")
    return CacheHealth("redis", operations_fail_apart=False, clock=clock)


def test_an_outage_is_logged_when_it_starts_and_when_it_ends(
    health: CacheHealth, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(5):
        health.failed(READ, CacheError("connection refused"))
        clock.now += 0.1
    assert not health.state().ok and health.state().reason == "connection refused"
    health.succeeded(READ)
    health.succeeded(WRITE)
    assert health.state().ok
    assert lines(caplog) == [
        "cache store (redis) fails, serving from upstream until it recovers: connection refused",
        "cache store (redis) works again",
    ]


def test_a_store_failing_and_working_by_turns_is_logged_once_per_flap_window(
    health: CacheHealth, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    states = []
    for _ in range(40):  # 40 brief outages, 0.2 s apart: 8 s, within one flap window
        health.failed(READ, CacheError("no Redis connection came free within 0.5 s (32 busy)"))
        states.append(health.state().ok)
        clock.now += 0.01
        health.succeeded(READ)
        states.append(health.state().ok)
        clock.now += 0.19
    assert states == [False, True] * 40, "/healthz follows every turn"
    assert len(lines(caplog)) == 2, "the first outage's two lines, none for the flaps after it"

    clock.now += FLAP_SECONDS  # the next one is logged, with the brief ones counted
    health.failed(READ, CacheError("no Redis connection came free within 0.5 s (32 busy)"))
    assert lines(caplog)[2] == (
        "cache store (redis) fails, serving from upstream until it recovers (after 39 brief outages, not logged"
        " one by one): no Redis connection came free within 0.5 s (32 busy)"
    )


def test_an_outage_that_begins_as_a_flap_and_lasts_is_logged(
    health: CacheHealth, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    health.failed(READ, CacheError("refused"))
    health.succeeded(READ)
    clock.now += 1
    health.failed(READ, CacheError("refused"))  # within the window: not logged yet
    assert len(lines(caplog)) == 2
    clock.now += FLAP_LOGGED_AFTER
    health.failed(READ, CacheError("refused"))
    health.failed(READ, CacheError("refused"))
    assert lines(caplog)[2:] == ["cache store (redis) fails, serving from upstream until it recovers: refused"]
    health.succeeded(READ)
    assert lines(caplog)[3:] == ["cache store (redis) works again"]


def test_reads_and_writes_that_fail_apart_are_logged_apart(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="openai_proxy.cache")
    health = CacheHealth("sqlite", clock=clock)
    health.failed(WRITE, CacheError("disk full"))
    health.succeeded(READ)
    assert not health.state().ok, "a read working does not end the writes' outage"
    health.failed(READ, CacheError("locked"))
    health.succeeded(WRITE)
    health.succeeded(READ)
    assert health.state().ok
    assert lines(caplog) == [
        "cache store (sqlite) writes fail, serving from upstream until it recovers: disk full",
        "cache store (sqlite) reads fail, serving from upstream until it recovers: locked",
        "cache store (sqlite) writes work again",
        "cache store (sqlite) reads work again",
    ]


def busy_line(operations: int, exc: StoreBusy) -> str:
    return (
        "cache store (redis) too busy: the proxy asks more than its connections carry (operations that found every"
        f" connection in use: {operations}; lookups went upstream, writes wait their turn): {exc}"
    )


def test_a_store_too_busy_is_no_outage_and_is_logged_at_most_once_per_flap_window(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="openai_proxy.cache")
    failures: list[Operation] = []
    health = CacheHealth("redis", operations_fail_apart=False, on_failure=failures.append, clock=clock)
    busy = StoreBusy("no Redis connection came free within 0.5 s")
    for _ in range(30):  # 3 s of an overloaded proxy: busy lookups and statistics writes
        health.failed(READ, busy)
        health.failed(WRITE, busy)
        clock.now += 0.1
        assert health.state().ok, "the store works: /healthz says so"
    clock.now += FLAP_SECONDS
    health.failed(READ, busy)

    assert lines(caplog) == [
        busy_line(1, busy),
        busy_line(60, busy),
    ]
    assert len(failures) == 61, "the metrics count every operation that was not done"


def test_a_busy_store_that_then_fails_is_an_outage(health: CacheHealth, caplog: pytest.LogCaptureFixture) -> None:
    health.failed(READ, StoreBusy("no connection came free"))
    health.failed(READ, CacheError("connection refused"))

    assert not health.state().ok and health.state().reason == "connection refused"
    assert lines(caplog)[-1] == "cache store (redis) fails, serving from upstream until it recovers: connection refused"
