"""The proxy's added latency at a fixed offered rate, below saturation (issue 17): what one user feels,
which closed-loop saturation figures (bench/throughput.py) hide.

    uv run python bench/fixed_rate.py [--rates 500,1000] [--seconds 20] [--backend sqlite|redis] [--no-floor]

Needs `nginx` and `taskset`, and for `--backend redis` `redis-server` (a server of its own on a free
port, started and stopped here; no other Redis is touched). Only loopback traffic; it stops by itself and
stops what it started, also on Ctrl-C, and exits 0 whatever the figures.

Measured, at each rate in turn, for each target with the same load generator:

- `direct`: the zero-delay nginx fake upstream of bench/throughput.py (a fixed ~1 kB chat completion),
  called without the proxy, a new prompt every request;
- `floor` (unless `--no-floor`), for reference: bench/floor.py, uvicorn as the proxy runs it with a raw
  ASGI app answering the same ~1 kB, pinned to the proxy's core: how much of the proxy's added latency
  any Python server on that core would add (nginx answers in C, on the generator's core);
- `floor relay` (unless `--no-floor`), for reference: bench/floor.py with `--relay-to` the upstream, the same
  raw ASGI app relaying each request through aiohttp's pool and doing nothing else, on the proxy's core: how
  much of a miss's added latency any Python relay on that core would add, a new prompt every request;
- `proxy MISS`: the proxy (default settings, a fresh store: SQLite in a temporary folder, or Redis) in
  front of that upstream, a new prompt every request;
- `proxy HIT`: the proxy asked one prompt over and over, its entry warmed first.

Reported per target: the requests answered, errors (answers other than 200, connections lost, requests
unanswered 5 s after the last was due), answers whose X-Cache-Status is not the expected one, p50, p99,
p99.9 and max latency, how late the generator started requests, the connections it had to open because
every one was busy (the server fell behind), and the server's CPU time per request (user and system, from
/proc). Then the proxy's added latency, the proxy's figure less the direct one at p50 and p99, for misses
and hits, against the goals: added p50 under 0.5 ms, added p99 under 2 ms (and the floors', beside them).

Method: the proxy is pinned to CPU 0; nginx, the benchmark's redis-server and this process (the load
generator, one thread) to CPU 1. The generator is an open loop: request n is due at start + n / rate; a
Linux timerfd ticks at those instants (the event loop's own timers tick in whole milliseconds) and the
event loop (uvloop) then sends each request that has come due at once, on an idle keep-alive connection
of its own pool (raw asyncio HTTP/1.1, answers read with httptools; a new connection is opened when none
is idle), whatever the earlier requests are doing. Latency runs from the instant a request was due to the
last byte of its answer, so a stall shows in every request it delays (no coordinated omission). How late
the generator started requests (started less due) is reported too, and whether it kept up: the `direct`
row should show a p50 under 1 ms and under 1% of requests started over 1 ms late; the output says so if
not. Each measurement follows a 1 s warm-up at the same rate, not counted; the generator's garbage
collector is off while it measures; after the misses the proxy is given time to store what they left
behind (its entry count stops moving) before the hits are measured.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import httptools
import httpx
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.processes import (  # noqa: E402
    backend_env,
    cpu_seconds,
    free_port,
    start_floor,
    start_proxy,
    start_redis,
    stop,
    wait_for_proxy,
    wait_until_up,
)
from bench.stream_latency import percentile  # noqa: E402
from bench.throughput import ANSWER, HIT_BODY, UPSTREAM_SERVER, start_nginx, stop_nginx, warm_hit  # noqa: E402
from openai_proxy import raise_open_file_limit  # noqa: E402

GOAL_ADDED_P50_MS = 0.5
GOAL_ADDED_P99_MS = 2.0
GENERATOR_P50_LIMIT_MS = 1.0  # a `direct` p50 above this says the generator, not the server, is slow
LATE_MS = 0.1  # a request started this much after it was due counts as late
VERY_LATE_MS = 1.0
VERY_LATE_SHARE_LIMIT = 0.01  # more requests than this started VERY_LATE_MS late: the generator fell behind
WARMUP_SECONDS = 1.0
DRAIN_SECONDS = 5.0  # after the last request was due, how long its answer and the others' are awaited
POOL_SIZE = 16  # connections opened before a run; more are opened when none is idle
SETTLE_LIMIT_SECONDS = 30.0
CLOCK_MONOTONIC = 1  # linux/time.h
TFD_TIMER_ABSTIME = 1  # linux/timerfd.h

Requests = Callable[[int], bytes]  # request number -> the bytes of the whole HTTP request


def post(port: int, body: bytes) -> bytes:
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def new_prompts(port: int) -> Requests:
    """Requests whose prompts were never asked before: each run gets a token of its own."""
    run = secrets.token_hex(8)

    def request(number: int) -> bytes:
        body = f'{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"fixed rate {run} {number}"}}]}}'
        return post(port, body.encode())

    return request


def same_prompt(port: int) -> Requests:
    request = post(port, HIT_BODY.encode())
    return lambda _: request


@dataclass(frozen=True)
class Server:
    port: int
    pid: int  # the process whose CPU time is the server's (with its children: nginx's worker)


@dataclass(frozen=True)
class Target:
    """A server and what is asked of it: each run's requests, and the X-Cache-Status every answer should
    carry (None: no check)."""

    server: Server
    new_requests: Callable[[int], Requests]  # port -> the requests of one run
    cache_status: bytes | None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def pid(self) -> int:
        return self.server.pid

    def requests(self) -> Requests:
        return self.new_requests(self.server.port)


@dataclass
class Tally:
    """One paced run, by request number: when each was due, started and answered (perf_counter seconds;
    NaN: it was not, or its answer was an error)."""

    due: list[float]
    started: list[float]
    answered: list[float]
    failed: int = 0
    unexpected: int = 0  # answers whose X-Cache-Status was not the one expected
    opened: int = 0  # connections opened during the run because none was idle
    server_cpu_seconds: float = math.nan  # the server's CPU time (user and system) during the run

    @classmethod
    def evenly_spaced(cls, origin_ns: int, period_ns: int, count: int) -> Tally:
        due = [(origin_ns + number * period_ns) / 1e9 for number in range(count)]
        return cls(due, [math.nan] * count, [math.nan] * count)


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection of the generator, one request at a time."""

    def __init__(self, load: PacedLoad) -> None:
        self.load = load
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.number = -1  # the request waiting for its answer here, or -1
        self.cache_status = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, number: int, request: bytes) -> None:
        assert self.transport is not None
        self.number, self.cache_status = number, b""
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-cache-status":
            self.cache_status = value

    def on_message_complete(self) -> None:
        number, self.number = self.number, -1
        self.load.answered(number, self.parser.get_status_code(), self.cache_status)
        if self.parser.should_keep_alive():
            self.load.idle.append(self)
        else:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.load.lost(self, self.number)
        self.number = -1

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abandon(self) -> None:
        """Close the connection without counting its request as failed: it belongs to a run that is over."""
        self.number = -1
        self.close()


class PacedLoad:
    """Requests to one server at evenly spaced instants, each sent when due whatever the others are doing
    (an open loop), on a pool of keep-alive connections."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.loop = asyncio.get_running_loop()
        self.idle: deque[Connection] = deque()
        self.connections: set[Connection] = set()
        self.opening: set[asyncio.Task[None]] = set()
        self.tally = Tally([], [], [])
        self.requests = target.requests()
        self.next_number = 0
        self.remaining = 0
        self.finished = asyncio.Event()
        self.stopping = False

    async def open(self, count: int) -> None:
        for _ in range(count):
            self.idle.append(await self.connect())

    async def connect(self) -> Connection:
        _, connection = await self.loop.create_connection(lambda: Connection(self), "127.0.0.1", self.target.port)
        self.connections.add(connection)
        return connection

    def close(self) -> None:
        for connection in list(self.connections):
            connection.close()

    async def run(self, rate: float, seconds: float) -> Tally:
        count = round(rate * seconds)
        origin_ns, period_ns = time.perf_counter_ns() + 10_000_000, round(1e9 / rate)
        self.tally = Tally.evenly_spaced(origin_ns, period_ns, count)
        self.requests, self.next_number, self.remaining, self.stopping = self.target.requests(), 0, count, False
        self.finished.clear()
        server_cpu = cpu_seconds(self.target.pid)
        # A collection pauses the loop for milliseconds, which would be charged to the server under test.
        gc.disable()
        try:
            await self.start_on_time(origin_ns, period_ns, seconds + DRAIN_SECONDS)
        finally:
            self.stopping = True
            gc.enable()
            self.abandon_unanswered()
        self.tally.server_cpu_seconds = cpu_seconds(self.target.pid) - server_cpu
        return self.tally

    async def start_on_time(self, origin_ns: int, period_ns: int, limit_seconds: float) -> None:
        """Start the requests as they come due, until every one is answered or `limit_seconds` have passed
        (those still unanswered then count as errors)."""
        with metronome(origin_ns, period_ns) as ticks:
            self.loop.add_reader(ticks, self.start_due, ticks)
            try:
                with suppress(TimeoutError):
                    await asyncio.wait_for(self.finished.wait(), limit_seconds)
            finally:
                self.loop.remove_reader(ticks)

    def abandon_unanswered(self) -> None:
        """Drop what a run left waiting, so that a late answer is never taken for one of the next run."""
        for task in list(self.opening):
            task.cancel()
        for connection in list(self.connections):
            if connection.number >= 0:
                connection.abandon()

    def start_due(self, ticks: int) -> None:
        """Start every request that has come due since the metronome last ticked."""
        for _ in range(elapsed_ticks(ticks)):
            if self.next_number == len(self.tally.due):
                return
            self.start(self.next_number)
            self.next_number += 1

    def start(self, number: int) -> None:
        self.tally.started[number] = time.perf_counter()
        request = self.requests(number)
        if self.idle:
            self.idle.popleft().send(number, request)
        else:
            self.tally.opened += 1
            task = self.loop.create_task(self.send_on_new_connection(number, request))
            self.opening.add(task)
            task.add_done_callback(self.opening.discard)

    async def send_on_new_connection(self, number: int, request: bytes) -> None:
        try:
            connection = await self.connect()
        except OSError:
            self.count_failure()
            return
        connection.send(number, request)

    def answered(self, number: int, status: int, cache_status: bytes) -> None:
        now = time.perf_counter()
        if number < 0:
            return  # an answer to no request of this run
        if status == 200:
            self.tally.answered[number] = now
            if self.target.cache_status is not None and cache_status != self.target.cache_status:
                self.tally.unexpected += 1
            self.count_done()
        else:
            self.count_failure()

    def lost(self, connection: Connection, number: int) -> None:
        self.connections.discard(connection)
        if connection in self.idle:
            self.idle.remove(connection)
        if number >= 0 and not self.stopping:
            self.count_failure()

    def count_failure(self) -> None:
        self.tally.failed += 1
        self.count_done()

    def count_done(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.finished.set()


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", Timespec), ("it_value", Timespec)]


@contextmanager
def metronome(origin_ns: int, period_ns: int) -> Iterator[int]:
    """A Linux timerfd that becomes readable at `origin_ns` and every `period_ns` after, on the clock of
    time.perf_counter_ns (CLOCK_MONOTONIC): the event loop's own timers tick in whole milliseconds, a
    timerfd's to the nanosecond, and it needs no thread of its own."""
    libc = ctypes.CDLL(None, use_errno=True)
    ticks = libc.timerfd_create(CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
    if ticks < 0:
        raise OSError(ctypes.get_errno(), "timerfd_create")
    try:
        schedule = Itimerspec(Timespec(*divmod(period_ns, 1_000_000_000)), Timespec(*divmod(origin_ns, 1_000_000_000)))
        if libc.timerfd_settime(ticks, TFD_TIMER_ABSTIME, ctypes.byref(schedule), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime")
        yield ticks
    finally:
        os.close(ticks)


def elapsed_ticks(ticks: int) -> int:
    """The periods that have ended since the timerfd `ticks` was last read."""
    try:
        return int.from_bytes(os.read(ticks, 8), sys.byteorder)
    except BlockingIOError:
        return 0


async def paced(target: Target, rate: float, seconds: float) -> Tally:
    """A warm-up at `rate`, then the measured run, on a pool of connections of their own."""
    load = PacedLoad(target)
    await load.open(POOL_SIZE)
    try:
        await load.run(rate, WARMUP_SECONDS)
        return await load.run(rate, seconds)
    finally:
        load.close()
        await asyncio.sleep(0.01)  # lets the transports finish closing before the loop does


@dataclass
class Figures:
    requests: int
    answered: int
    errors: int
    unexpected: int
    opened: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    late: int  # started over LATE_MS after they were due
    very_late: int  # started over VERY_LATE_MS after they were due
    late_p99_ms: float
    late_max_ms: float
    server_cpu_ms: float  # the server's CPU time per request


def figures_of(tally: Tally) -> Figures:
    answered = zip(tally.due, tally.answered, strict=True)
    started = zip(tally.due, tally.started, strict=True)
    latencies = [(end - due) * 1000 for due, end in answered if not math.isnan(end)]
    lateness = [(start - due) * 1000 for due, start in started if not math.isnan(start)]
    latency = latencies or [math.nan]
    return Figures(
        requests=len(tally.due),
        answered=len(latencies),
        errors=len(tally.due) - len(latencies),
        unexpected=tally.unexpected,
        opened=tally.opened,
        p50_ms=percentile(latency, 0.50),
        p99_ms=percentile(latency, 0.99),
        p999_ms=percentile(latency, 0.999),
        max_ms=max(latency),
        late=sum(1 for late in lateness if late > LATE_MS),
        very_late=sum(1 for late in lateness if late > VERY_LATE_MS),
        late_p99_ms=percentile(lateness or [math.nan], 0.99),
        late_max_ms=max(lateness or [math.nan]),
        server_cpu_ms=tally.server_cpu_seconds * 1000 / max(1, len(tally.due)),
    )


def measure(target: Target, rate: float, seconds: float) -> Figures:
    return figures_of(uvloop.run(paced(target, rate, seconds)))


def settle(port: int) -> None:
    """Wait until the proxy's store has written what the misses left behind (its entry count stops moving).
    A store that failed under the misses' load (Redis commands timed out: /cache/stats answers 503) is
    waited for the same way, until it answers again."""
    deadline = time.monotonic() + SETTLE_LIMIT_SECONDS
    previous = None
    while time.monotonic() < deadline:
        answer = httpx.get(f"http://127.0.0.1:{port}/cache/stats")
        entries = answer.json()["entries"] if answer.status_code == 200 else None
        if entries is not None and entries == previous:
            return
        previous = entries
        time.sleep(1)


Row = tuple[int, str, Figures]  # rate, target, figures


@dataclass(frozen=True)
class Servers:
    upstream: Server
    proxy: Server
    floor: Server | None  # bench/floor.py on the proxy's core, unless --no-floor
    relay_floor: Server | None  # the same, relaying to the upstream


def measure_rate(rate: int, servers: Servers, seconds: float) -> list[Row]:
    rows = [(rate, "direct", measure(Target(servers.upstream, new_prompts, None), rate, seconds))]
    if servers.floor is not None:
        rows.append((rate, "floor", measure(Target(servers.floor, new_prompts, None), rate, seconds)))
    if servers.relay_floor is not None:
        rows.append((rate, "floor relay", measure(Target(servers.relay_floor, new_prompts, None), rate, seconds)))
    rows.append((rate, "proxy MISS", measure(Target(servers.proxy, new_prompts, b"MISS"), rate, seconds)))
    settle(servers.proxy.port)
    warm_hit(f"http://127.0.0.1:{servers.proxy.port}/v1/chat/completions")
    rows.append((rate, "proxy HIT", measure(Target(servers.proxy, same_prompt, b"HIT"), rate, seconds)))
    return rows


def measure_all(args: argparse.Namespace, folder: Path, redis_url: str | None) -> list[Row]:
    with ExitStack() as started:
        upstream = free_port()
        fake = start_nginx(folder, "upstream", 1, UPSTREAM_SERVER.format(upstream=upstream, answer=ANSWER))
        started.callback(stop_nginx, fake)
        wait_until_up(f"http://127.0.0.1:{upstream}/", fake)
        floor = relay_floor = None
        if not args.no_floor:
            floor = start_floor_server(started, None)
            relay_floor = start_floor_server(started, f"http://127.0.0.1:{upstream}")
        port = free_port()
        proxy = start_proxy(port, upstream, folder / "cache.db", backend_env(args.backend, redis_url))
        started.callback(stop, proxy)
        wait_for_proxy(port, proxy, args.backend)
        servers = Servers(Server(upstream, fake.pid), Server(port, proxy.pid), floor, relay_floor)
        rows = [row for rate in args.rates for row in measure_rate(rate, servers, args.seconds)]
    return rows


def start_floor_server(started: ExitStack, relay_to: str | None) -> Server:
    """bench/floor.py on CPU 0 (a relay to `relay_to`, when given), stopped with `started`."""
    port = free_port()
    process = start_floor(port, relay_to=relay_to)
    started.callback(stop, process)
    wait_until_up(f"http://127.0.0.1:{port}/", process)
    return Server(port, process.pid)


def table(rows: list[Row]) -> str:
    lines = [
        f"{'req/s':>6} {'target':<11} {'answered':>8} {'errors':>6} {'wrong':>5} {'p50':>7} {'p99':>7}"
        f" {'p99.9':>7} {'max':>7} {'late':>6} {'>1ms':>5} {'late p99':>8} {'late max':>8} {'new conns':>9}"
        f" {'CPU/req':>7}"
    ]
    for rate, target, f in rows:
        lines.append(
            f"{rate:>6} {target:<11} {f.answered:>8} {f.errors:>6} {f.unexpected:>5} {f.p50_ms:>7.3f}"
            f" {f.p99_ms:>7.3f} {f.p999_ms:>7.3f} {f.max_ms:>7.2f} {f.late:>6} {f.very_late:>5}"
            f" {f.late_p99_ms:>8.3f} {f.late_max_ms:>8.2f} {f.opened:>9} {f.server_cpu_ms:>7.3f}"
        )
    return "\n".join(lines)


def added_latency(rows: list[Row]) -> list[str]:
    """The proxy's figure less the direct one, at p50 and p99, for misses and hits, against the goals; and the
    floors', for reference."""
    direct = {rate: figures for rate, target, figures in rows if target == "direct"}
    lines = [f"added latency, less direct (goals for the proxy: p50 under {GOAL_ADDED_P50_MS} ms, p99 under"
             f" {GOAL_ADDED_P99_MS:.0f} ms):"]  # fmt: skip
    for rate, target, figures in rows:
        if target == "direct":
            continue
        added_p50 = figures.p50_ms - direct[rate].p50_ms
        added_p99 = figures.p99_ms - direct[rate].p99_ms
        if target.startswith("floor"):
            goals = ", for reference: " + FLOOR_MEANING[target]
            lines.append(f"{rate:>6} req/s {target:<11} p50 {added_p50:+7.3f} ms, p99 {added_p99:+7.3f} ms{goals}")
            continue
        lines.append(
            f"{rate:>6} req/s {target:<11} p50 {added_p50:+7.3f} ms ({verdict(added_p50 < GOAL_ADDED_P50_MS)}),"
            f" p99 {added_p99:+7.3f} ms ({verdict(added_p99 < GOAL_ADDED_P99_MS)})"
        )
    return lines


FLOOR_MEANING = {
    "floor": "what uvicorn and a raw ASGI app on CPU 0 add here (for hits)",
    "floor relay": "what uvicorn and a raw ASGI relay through aiohttp on CPU 0 add here (for misses)",
}


def generator_check(rows: list[Row]) -> list[str]:
    """Whether the generator was the bottleneck (the `direct` p50 at or over 1 ms), and where it was held up."""
    direct = [(rate, figures) for rate, target, figures in rows if target == "direct"]
    slow = [f"{rate} req/s: {f.p50_ms:.3f} ms" for rate, f in direct if f.p50_ms >= GENERATOR_P50_LIMIT_MS]
    if slow:
        verdict_line = (
            f"generator: THE BOTTLENECK, the direct p50 is {GENERATOR_P50_LIMIT_MS:g} ms or more"
            f" ({', '.join(slow)}): every figure overstates the servers' latency"
        )
    else:
        worst = max(f.p50_ms for _, f in direct)
        verdict_line = (
            f"generator: not the bottleneck (direct p50 at most {worst:.3f} ms, under {GENERATOR_P50_LIMIT_MS:g} ms)"
        )
    held_up = [
        f"{rate} req/s {target} {f.very_late} of {f.requests}"
        for rate, target, f in rows
        if f.very_late > VERY_LATE_SHARE_LIMIT * f.requests
    ]
    if not held_up:
        return [verdict_line]
    return [
        verdict_line,
        f"generator: held up on CPU 1 in some runs, over {VERY_LATE_SHARE_LIMIT:.0%} of requests started over"
        f" {VERY_LATE_MS:g} ms late ({'; '.join(held_up)}); that delay is in their p99 and above",
    ]


def verdict(holds: bool) -> str:
    return "met" if holds else "NOT MET"


def parse_rates(text: str) -> list[int]:
    try:
        rates = [int(rate) for rate in text.split(",") if rate.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"a comma-separated list of requests a second; got {text!r}") from exc
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError(f"a comma-separated list of positive rates; got {text!r}")
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=parse_rates, default=[500, 1000], help="requests a second (default 500,1000)")
    parser.add_argument("--seconds", type=float, default=20, help="seconds measured per target and rate (default 20)")
    parser.add_argument("--backend", choices=["sqlite", "redis"], default="sqlite", help="the proxy's store")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor rows (bench/floor.py on CPU 0)")
    args = parser.parse_args()
    needed = ["nginx", "taskset", *(["redis-server"] if args.backend == "redis" else [])]
    for tool in needed:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed: apt-get install nginx-light util-linux redis-server")
    # The generator (this process, its pacing thread included) shares CPU 1 with nginx and redis-server.
    os.sched_setaffinity(0, {1})
    # A server that falls behind makes the generator open a connection for each request due meanwhile.
    raise_open_file_limit()
    with tempfile.TemporaryDirectory() as work:
        if args.backend == "redis":
            redis = start_redis()
            try:
                rows = measure_all(args, Path(work), redis.url)
            finally:
                redis.remove()
        else:
            rows = measure_all(args, Path(work), None)
    report(rows, args)


def report(rows: list[Row], args: argparse.Namespace) -> None:
    out = sys.stdout
    out.write(
        f"open loop at a fixed rate, {args.seconds:g} s per target and rate after a {WARMUP_SECONDS:g} s warm-up;"
        f" proxy ({args.backend}, default settings) on CPU 0; generator, nginx upstream and redis-server on CPU 1\n"
        f"latency in ms from the instant a request was due to the end of its answer; late: started over"
        f" {LATE_MS:g} ms after it was due (p99, max in ms); wrong: X-Cache-Status not the expected one;\n"
        "new conns: opened because every connection was busy (the server fell behind); CPU/req: the server's"
        " CPU time per request, ms (nginx for direct)\n"
    )
    out.write(table(rows) + "\n\n")
    for line in added_latency(rows):
        out.write(line + "\n")
    for line in generator_check(rows):
        out.write(line + "\n")


if __name__ == "__main__":
    main()
