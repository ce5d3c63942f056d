"""The proxy under sustained load (issue 17): memory and tail latency while unique misses never stop, and
thousands of long streams open at once through one process.

    uv run python bench/sustained.py misses [--backend sqlite|redis] [--runs 4] [--duration 10] [--connections 32]
    uv run python bench/sustained.py streams [--backend sqlite|redis] [--streams 2000] [--events 100]
        [--gap-ms 100] [--ramp 1] [--no-floor]

Needs `wrk`, `nginx`, `taskset` and `pgrep`, and for `--backend redis` `redis-server` (a server of its own,
on a free port, is started and stopped; no other Redis is touched). Only loopback traffic. Each command
stops by itself and stops what it started, also on Ctrl-C; it prints its figures, then its goals and
whether they hold, and exits 0 whatever the figures.

`misses`: the proxy (default settings, a fresh store) pinned to CPU 0, `wrk -t1` sending a new prompt on
every request, the zero-delay nginx upstream of bench/throughput.py and the benchmark's redis-server on
CPU 1; `--runs` back-to-back runs of `--duration` seconds. The proxy's RSS (VmRSS) is sampled every
second. Per run: req/s, p50, p99 and max latency (wrk's), RSS at the end of the run and its peak during
it. Then, after waiting up to 30 s for the store to catch up: the answers sent (wrk's requests less its
non-2xx answers), the entries stored, `stores_skipped` (answers served but not stored because the store
fell behind) and the answers neither stored nor counted as skipped (negative down to -runs x connections:
wrk stops each run with that many requests in flight, whose answers the proxy may still store); and the
RSS 10 s after the load.
Goals: peak RSS under 250 MB; every answer stored or counted as skipped; p99 at most 4 x p50 and no
request over 250 ms, in every run.

`streams`: `--streams` streaming misses through one proxy process (default settings, pinned to CPU 0),
started evenly over `--ramp` seconds, so their events are spread in time rather than sent in bursts.
The upstream is a fake of its own (`serve-upstream`, a raw asyncio server on uvloop, in its own process
on CPU 1) that paces each answer: `--events` chat.completion.chunk events `--gap-ms` apart, then
`data: [DONE]`; each event carries when it was due and when it was sent (CLOCK_MONOTONIC, which every
process on the machine shares). The clients are raw asyncio connections in this process, also on CPU 1.
Reported: the streams that completed whole; time from sending a request to its first event; relay delay (the
client's receipt less the upstream's send stamp, every event); the upstream's own send lag (sent less due) and
this process's event-loop lag, which say whether CPU 1 kept up; the proxy's CPU time (user and system) from
the first stream asked to the last ended, per stream and per event, which decides how many streams one core
relays on time; and the proxy's memory per open stream: (RSS while every stream was open - RSS before they
opened) / streams, the RSS being the sample (one a second) taken while the most streams were open, normally
all of them; if they never all were, the division is by the streams open then. Goals: every stream completes,
p99 time to first event under 1 s, p99 relay delay under 50 ms, under 50 kB per open stream. A stream still
open `--ramp` + its paced length + 30 s after the first was asked is given up, and does not count as complete.
Before the proxy, unless `--no-floor`, the same streams go through the relay floor (`bench/floor.py
--relay-to`: a raw ASGI app on the same uvicorn, pinned to CPU 0 too, relaying each request through aiohttp's
pool, each chunk written from aiohttp's wake-up for it as the proxy writes it, and nothing else), from the same
upstream and clients: its figures, and the proxy's as multiples of
them, say how much of what the goals measure is the proxy's own work and how much this machine's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import httptools
import httpx
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.processes import (  # noqa: E402
    backend_env,
    cpu_seconds,
    free_port,
    rss_mb,
    start_floor,
    start_proxy,
    start_redis,
    stop,
    wait_for_proxy,
    wait_until_up,
)
from bench.stream_latency import percentile  # noqa: E402
from bench.throughput import ANSWER, UPSTREAM_SERVER, start_nginx, stop_nginx  # noqa: E402

GOAL_PEAK_RSS_MB = 250.0
GOAL_TAIL_RATIO = 4.0  # p99 at most this many times p50
GOAL_MAX_LATENCY_MS = 250.0
GOAL_FIRST_EVENT_MS = 1000.0
GOAL_RELAY_DELAY_MS = 50.0
GOAL_KB_PER_STREAM = 50.0

CATCH_UP_LIMIT = 30.0  # seconds to wait for the store after the load
STEADY_READS = 3  # `entries` unchanged this many seconds running: the store has caught up
REST_AFTER_LOAD = 10.0  # seconds after the load at which the resting RSS is read
WARM_UP_STREAMS = 20
STREAM_GRACE = 30.0  # seconds a stream may run past its paced length before it is given up


# Measuring the proxy's memory


class RssSampler:
    """A process's RSS (with its children's) once a second, in a thread, as (time.monotonic(), MB)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, float]] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def between(self, start: float, end: float) -> list[float]:
        return [rss for at, rss in self.samples if start <= at <= end]

    def _sample(self) -> None:
        while True:
            try:
                self.samples.append((time.monotonic(), rss_mb(self.pid)))
            except OSError:  # the process is gone
                return
            if self._stopped.wait(1.0):
                return


def cache_stats(base: str) -> dict[str, Any]:
    """GET /cache/stats (the admin API answers loopback clients)."""
    response = httpx.get(f"{base}/cache/stats", timeout=30)
    response.raise_for_status()
    stats: dict[str, Any] = response.json()
    return stats


def start_store(backend: str, started: ExitStack) -> str | None:
    """The Redis URL of a redis-server of our own (stopped with `started`), or None for SQLite."""
    if backend != "redis":
        return None
    redis = start_redis()
    started.callback(redis.remove)
    return redis.url


def serve_proxy(
    backend: str, upstream_port: int, folder: Path, started: ExitStack
) -> tuple[int, subprocess.Popen[bytes]]:
    """The proxy under test (default settings, a fresh store, its log in `folder`), stopped with `started`:
    its port and process, once it answers."""
    env = backend_env(backend, start_store(backend, started))
    port = free_port()
    proxy = start_proxy(port, upstream_port, folder / "cache.db", env, errors_to=folder / "proxy.log")
    started.callback(stop, proxy)
    wait_for_proxy(port, proxy, backend)
    return port, proxy


def raise_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def log_digest(log: Path) -> list[str]:
    """How many warnings and errors the proxy logged, and its most frequent ones."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    messages = [match.group(0)[:160] for line in lines if (match := re.search(r"\b(ERROR|WARNING|CRITICAL)\b.*", line))]
    digest = [f"proxy log: {len(lines)} lines, {len(messages)} warnings or errors"]
    digest += [f"  {count} x {message}" for message, count in Counter(messages).most_common(3)]
    return digest


def goal(name: str, holds: bool, figure: str) -> str:
    return f"  {name:<46} {'holds' if holds else 'FAILS'} ({figure})"


# misses: wrk sending a new prompt on every request

MISS_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  local prompt = "sustained miss RUN_TAG " .. counter
  local body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"' .. prompt .. '"}]}'
  return wrk.format("POST", "/v1/chat/completions", {["Content-Type"] = "application/json"}, body)
end
"""


@dataclass(frozen=True)
class WrkFigures:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    non_2xx: int
    socket_errors: int

    @property
    def answered(self) -> int:
        return self.requests - self.non_2xx


def _milliseconds(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}[match.group(2)]
    return float(match.group(1)) * scale


def _found(pattern: str, text: str) -> re.Match[str]:
    match = re.search(pattern, text, re.M)
    if match is None:
        raise ValueError(f"no match for {pattern!r}")
    return match


def parse_wrk(output: str) -> WrkFigures:
    # Anchored at line starts: the "+/- Stdev" column ("99.12%") must not be taken for a percentile.
    latency = _found(r"^\s*Latency\s+(\S+)\s+(\S+)\s+(\S+)\s+\S+%", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return WrkFigures(
        requests_per_second=float(_found(r"Requests/sec:\s+([0-9.]+)", output).group(1)),
        p50_ms=_milliseconds(_found(r"^\s*50%\s+(\S+)", output).group(1)),
        p99_ms=_milliseconds(_found(r"^\s*99%\s+(\S+)", output).group(1)),
        max_ms=_milliseconds(latency.group(3)),
        requests=int(_found(r"(\d+) requests in", output).group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in socket_errors.groups()) if socket_errors else 0,
    )


def run_wrk(url: str, script: Path, duration: int, connections: int) -> WrkFigures:
    command = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s"]
    done = subprocess.run([*command, str(script), url], capture_output=True, text=True, timeout=duration + 60)
    try:
        return parse_wrk(done.stdout)
    except ValueError as exc:
        raise SystemExit(f"cannot read wrk's output ({exc}):\n{done.stdout}{done.stderr}") from exc


@dataclass(frozen=True)
class MissRun:
    wrk: WrkFigures
    rss_end: float
    rss_peak: float
    entries_at_end: int


def miss_run(number: int, base: str, folder: Path, sampler: RssSampler, args: argparse.Namespace) -> MissRun:
    script = folder / f"miss-{number}.lua"
    script.write_text(MISS_SCRIPT.replace("RUN_TAG", f"{os.getpid()}-{time.time_ns()}-{number}"))
    started = time.monotonic()
    figures = run_wrk(f"{base}/v1/chat/completions", script, args.duration, args.connections)
    rss_end = rss_mb(sampler.pid)
    peak = max([rss_end, *sampler.between(started, time.monotonic())])
    return MissRun(figures, rss_end, peak, int(cache_stats(base)["entries"]))


def caught_up_stats(base: str, answered: int) -> tuple[dict[str, Any], float]:
    """/cache/stats once every answer is stored or skipped, or `entries` stood still for a few seconds, or
    CATCH_UP_LIMIT passed; and the seconds waited."""
    started = time.monotonic()
    previous, steady = -1, 0
    while True:
        stats = cache_stats(base)
        entries = int(stats["entries"])
        waited = time.monotonic() - started
        if entries + int(stats["stores_skipped"]) >= answered or steady >= STEADY_READS or waited > CATCH_UP_LIMIT:
            return stats, waited
        steady = steady + 1 if entries == previous else 0
        previous = entries
        time.sleep(1)


@dataclass(frozen=True)
class MissFindings:
    runs: list[MissRun]
    stats: dict[str, Any]
    waited: float
    rested: float  # seconds after the load at which `rss_rested` was read
    rss_rested: float
    rss_peak: float
    log: list[str]

    @property
    def answered(self) -> int:
        return sum(run.wrk.answered for run in self.runs)

    @property
    def unaccounted(self) -> int:
        return self.answered - int(self.stats["entries"]) - int(self.stats["stores_skipped"])


def measure_misses(args: argparse.Namespace) -> MissFindings:
    with tempfile.TemporaryDirectory(prefix="openai-proxy-sustained-") as work, ExitStack() as started:
        folder = Path(work)
        upstream = free_port()
        fake = start_nginx(folder, "upstream", 1, UPSTREAM_SERVER.format(upstream=upstream, answer=ANSWER))
        started.callback(stop_nginx, fake)
        wait_until_up(f"http://127.0.0.1:{upstream}/", fake)
        port, proxy = serve_proxy(args.backend, upstream, folder, started)
        sampler = RssSampler(proxy.pid).start()
        started.callback(sampler.stop)
        base = f"http://127.0.0.1:{port}"
        runs = [miss_run(number, base, folder, sampler, args) for number in range(args.runs)]
        load_ended = time.monotonic()
        stats, waited = caught_up_stats(base, sum(run.wrk.answered for run in runs))
        time.sleep(max(0.0, load_ended + REST_AFTER_LOAD - time.monotonic()))
        rested, rss_rested = time.monotonic() - load_ended, rss_mb(proxy.pid)
        peak = max(rss for _, rss in sampler.samples)
        sampler.stop()
        stop(proxy)
        return MissFindings(runs, stats, waited, rested, rss_rested, peak, log_digest(folder / "proxy.log"))


def miss_table(runs: Sequence[MissRun]) -> list[str]:
    lines = [
        f"{'run':>3} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'requests':>9} {'errors':>7}"
        f" {'RSS end MB':>11} {'RSS peak MB':>12} {'entries':>8}"
    ]
    for number, run in enumerate(runs, 1):
        figures = run.wrk
        lines.append(
            f"{number:>3} {figures.requests_per_second:>8.0f} {figures.p50_ms:>8.2f} {figures.p99_ms:>8.2f}"
            f" {figures.max_ms:>8.2f} {figures.requests:>9} {figures.non_2xx + figures.socket_errors:>7}"
            f" {run.rss_end:>11.1f} {run.rss_peak:>12.1f} {run.entries_at_end:>8}"
        )
    return lines


def miss_goals(findings: MissFindings, args: argparse.Namespace) -> list[str]:
    runs = findings.runs
    worst_ratio = max(runs, key=lambda run: run.wrk.p99_ms / run.wrk.p50_ms)
    slowest = max(run.wrk.max_ms for run in runs)
    in_flight = args.runs * args.connections
    unaccounted = findings.unaccounted
    return [
        "goals:",
        goal(
            f"peak RSS under {GOAL_PEAK_RSS_MB:g} MB",
            findings.rss_peak < GOAL_PEAK_RSS_MB,
            f"{findings.rss_peak:.1f} MB",
        ),
        goal(
            "every answer stored or counted as skipped",
            -in_flight <= unaccounted <= 0,
            f"unaccounted {unaccounted}; down to -{in_flight} is requests wrk left in flight",
        ),
        goal(
            f"p99 at most {GOAL_TAIL_RATIO:g} x p50 (every run)",
            all(run.wrk.p99_ms <= GOAL_TAIL_RATIO * run.wrk.p50_ms for run in runs),
            f"worst: run {runs.index(worst_ratio) + 1}, p99 {worst_ratio.wrk.p99_ms:.2f} ms ="
            f" {worst_ratio.wrk.p99_ms / worst_ratio.wrk.p50_ms:.1f} x p50",
        ),
        goal(f"no request over {GOAL_MAX_LATENCY_MS:g} ms", slowest <= GOAL_MAX_LATENCY_MS, f"max {slowest:.2f} ms"),
    ]


def miss_report(findings: MissFindings, args: argparse.Namespace) -> str:
    stats, runs = findings.stats, findings.runs
    redis = "redis-server, " if args.backend == "redis" else ""
    lines = [
        f"misses: {args.runs} runs of wrk -t1 -c{args.connections} -d{args.duration}s, a new prompt on every"
        f" request; {args.backend} store, default settings; proxy on CPU 0; wrk, the zero-delay nginx upstream,"
        f" {redis}this process on CPU 1",
        *miss_table(runs),
        f"answers sent: {findings.answered} (wrk requests {sum(run.wrk.requests for run in runs)}, less"
        f" {sum(run.wrk.non_2xx for run in runs)} non-2xx; socket errors {sum(run.wrk.socket_errors for run in runs)})",
        f"after {findings.waited:.0f} s for the store to catch up: entries {stats['entries']}, stores_skipped"
        f" {stats['stores_skipped']}, unaccounted {findings.unaccounted} (answered - entries - stores_skipped);"
        f" misses the proxy counted: {stats['misses']}",
        f"proxy RSS {findings.rested:.0f} s after the load stopped: {findings.rss_rested:.1f} MB;"
        f" peak over the whole test: {findings.rss_peak:.1f} MB",
        *findings.log,
        *miss_goals(findings, args),
    ]
    return "\n".join(lines) + "\n"


# streams: the fake upstream, paced, each event stamped with when it was due and when it was sent

STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
CHUNK_EVENT = (
    b'data: {"id":"chatcmpl-sustained","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{%s"content":"@%d/%d "},"logprobs":null,'
    b'"finish_reason":%s}]}\n\n'
)
USAGE_EVENT = (
    b'data: {"id":"chatcmpl-sustained","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":100,"total_tokens":112}}\n\n'
)
DONE_EVENT = b"data: [DONE]\n\n"
OK_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"
LAST_CHUNK = b"0\r\n\r\n"


def chunk_event(index: int, events: int, sent_ns: int, due_ns: int) -> bytes:
    role = b'"role":"assistant",' if index == 0 else b""
    finish = b'"stop"' if index == events - 1 else b"null"
    return CHUNK_EVENT % (role, sent_ns, due_ns, finish)


def chunked(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def split_request(buffer: bytes) -> tuple[bytes, bytes] | None:
    """The first whole HTTP request in `buffer` (head and Content-Length body) and what follows it."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    length = re.search(rb"(?im)^content-length:\s*(\d+)", buffer[:head_end])
    end = head_end + 4 + (int(length.group(1)) if length else 0)
    return (buffer[:end], buffer[end:]) if len(buffer) >= end else None


class PacedStream:
    """One answer: `events` chunks `gap_ns` apart (the first at once), then `data: [DONE]`."""

    def __init__(self, transport: asyncio.Transport, events: int, gap_ns: int, with_usage: bool) -> None:
        self.transport = transport
        self.events = events
        self.gap_ns = gap_ns
        self.with_usage = with_usage
        self.loop = asyncio.get_running_loop()
        self.first_due_ns = time.monotonic_ns()
        self.sent = 0

    def start(self) -> None:
        self.transport.write(STREAM_HEAD)
        self.send_next()

    def send_next(self) -> None:
        if self.transport.is_closing():
            return
        due_ns = self.first_due_ns + self.sent * self.gap_ns
        event = chunk_event(self.sent, self.events, time.monotonic_ns(), due_ns)
        self.sent += 1
        if self.sent == self.events:
            ending = USAGE_EVENT + DONE_EVENT if self.with_usage else DONE_EVENT
            self.transport.write(chunked(event + ending) + LAST_CHUNK)
            return
        self.transport.write(chunked(event))
        wait = (self.first_due_ns + self.sent * self.gap_ns - time.monotonic_ns()) / 1e9
        self.loop.call_later(max(0.0, wait), self.send_next)


class UpstreamConnection(asyncio.Protocol):
    """A POST is answered with a paced stream of as many events as its prompt's `events=N` says (the proxy
    asks for usage, and gets it at the end); any other request with `ok`."""

    def __init__(self, gap_ns: int) -> None:
        self.gap_ns = gap_ns
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (split := split_request(self.buffer)) is not None:
            request, self.buffer = split
            self.answer(request)

    def answer(self, request: bytes) -> None:
        assert self.transport is not None
        if not request.startswith(b"POST "):
            self.transport.write(OK_ANSWER)
            return
        events = re.search(rb"events=(\d+)", request)
        with_usage = b'"include_usage":true' in request
        PacedStream(self.transport, int(events.group(1)) if events else 1, self.gap_ns, with_usage).start()


async def serve_upstream(port: int, gap_ms: float) -> None:
    loop = asyncio.get_running_loop()
    gap_ns = round(gap_ms * 1_000_000)
    server = await loop.create_server(lambda: UpstreamConnection(gap_ns), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def run_upstream(args: argparse.Namespace) -> None:
    raise_open_file_limit()
    try:
        uvloop.run(serve_upstream(args.port, args.gap_ms))
    except KeyboardInterrupt:  # how the benchmark stops it
        pass


def start_upstream(port: int, gap_ms: float, log: Path) -> subprocess.Popen[bytes]:
    command = ["taskset", "-c", "1", sys.executable, str(Path(__file__).resolve()), "serve-upstream",
               "--port", str(port), "--gap-ms", str(gap_ms)]  # fmt: skip
    with open(log, "ab") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)


# streams: the clients


@dataclass
class StreamRecord:
    """What one client saw, on CLOCK_MONOTONIC in nanoseconds."""

    asked_ns: int = 0
    status: int = 0
    first_event_ns: int | None = None
    ended_ns: int | None = None  # the response ended cleanly
    closed_ns: int | None = None  # the client closed its connection (or never had one)
    events: int = 0
    done: bool = False  # `data: [DONE]` arrived
    delays_ns: list[int] = field(default_factory=list)  # receipt less the upstream's send stamp
    send_lags_ns: list[int] = field(default_factory=list)  # the upstream's send stamp less when it was due
    error: str = ""

    def whole(self, events: int) -> bool:
        return self.status == 200 and self.done and self.ended_ns is not None and self.events == events

    def failure(self, events: int) -> str:
        if self.error:
            return self.error
        if self.status != 200:
            return f"status {self.status}" if self.status else "no answer"
        if self.ended_ns is None or not self.done:
            return f"cut off after {self.events} events" if self.events < events else "no clean end"
        return f"{self.events} events of {events}"


class StreamClient(asyncio.Protocol):
    """Sends one streaming request and reads the answer's events as they arrive."""

    def __init__(self, request: bytes, record: StreamRecord, finished: asyncio.Future[None]) -> None:
        self.request = request
        self.record = record
        self.finished = finished
        self.parser = httptools.HttpResponseParser(self)
        self.pending = b""
        self.received_ns = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.received_ns = time.monotonic_ns()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.record.error = f"unreadable answer ({type(exc).__name__})"
            self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    # httptools' callbacks

    def on_headers_complete(self) -> None:
        self.record.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        *events, self.pending = (self.pending + body).split(b"\n\n")
        for event in events:
            self._read_event(event)

    def on_message_complete(self) -> None:
        self.record.ended_ns = self.received_ns
        self._finish()

    def _read_event(self, event: bytes) -> None:
        record = self.record
        if event.startswith(b"data: [DONE]"):
            record.done = True
            return
        stamp = event.find(b'"@')
        if stamp < 0:
            return
        slash = event.index(b"/", stamp)
        sent_ns, due_ns = int(event[stamp + 2 : slash]), int(event[slash + 1 : event.index(b" ", slash)])
        if record.first_event_ns is None:
            record.first_event_ns = self.received_ns
        record.events += 1
        record.delays_ns.append(self.received_ns - sent_ns)
        record.send_lags_ns.append(sent_ns - due_ns)

    def _finish(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self.finished.done():
            self.finished.set_result(None)


def stream_request(port: int, prompt: str) -> bytes:
    body = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"%s"}]}' % prompt.encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n" % (port, len(body))
    )
    return head + body


async def one_stream(port: int, request: bytes, record: StreamRecord) -> None:
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    record.asked_ns = time.monotonic_ns()
    try:
        transport, _ = await loop.create_connection(lambda: StreamClient(request, record, finished), "127.0.0.1", port)
    except OSError as exc:
        record.error = f"cannot connect ({exc.strerror or type(exc).__name__})"
        record.closed_ns = time.monotonic_ns()
        return
    try:
        await finished
    finally:
        transport.close()
        record.closed_ns = time.monotonic_ns()


async def open_streams(port: int, count: int, events: int, ramp: float, limit: float) -> list[StreamRecord]:
    """`count` streams started evenly over `ramp` seconds; those still open after `limit` seconds are
    given up."""
    loop = asyncio.get_running_loop()
    tag = f"{os.getpid()}-{time.time_ns()}"
    records = [StreamRecord() for _ in range(count)]
    tasks = []
    started = loop.time()
    for number, record in enumerate(records):
        wait = started + number * ramp / count - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        request = stream_request(port, f"sustained stream {tag} {number} events={events}")
        tasks.append(asyncio.create_task(one_stream(port, request, record)))
    _, late = await asyncio.wait(tasks, timeout=max(0.0, started + limit - loop.time()))
    for task in late:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for record, task in zip(records, tasks, strict=True):
        if task in late:
            record.error = record.error or f"given up after {limit:.0f} s"
    return records


async def watch_loop_lag(lags: list[float]) -> None:
    """How late this process's event loop wakes up, every 10 ms, until cancelled."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(0.01)
        lags.append(time.monotonic() - before - 0.01)


async def stream_load(port: int, args: argparse.Namespace) -> tuple[list[StreamRecord], list[float]]:
    lags: list[float] = []
    watching = asyncio.create_task(watch_loop_lag(lags))
    try:
        limit = args.ramp + args.events * args.gap_ms / 1000 + STREAM_GRACE
        records = await open_streams(port, args.streams, args.events, args.ramp, limit)
    finally:
        watching.cancel()
    return records, lags


@dataclass(frozen=True)
class StreamFindings:
    records: list[StreamRecord]
    loop_lags: list[float]
    rss_before: float
    busiest: tuple[int, float] | None  # the most streams open at an RSS sample, and that RSS
    rss_peak: float
    cpu_seconds: float  # the server's CPU time (user and system) from the first stream asked to the last ended
    stats: dict[str, Any]
    stats_waited: float  # seconds after the last stream ended at which `stats` were read
    log: list[str]


def open_at(records: Sequence[StreamRecord], moment: float) -> int:
    """Streams whose client had asked and not yet closed at `moment` (time.monotonic())."""
    at_ns = moment * 1e9
    return sum(record.asked_ns <= at_ns < (record.closed_ns or at_ns + 1) for record in records if record.asked_ns)


def busiest_sample(samples: Sequence[tuple[float, float]], records: Sequence[StreamRecord]) -> tuple[int, float] | None:
    """The RSS sample taken while the most streams were open (every stream, if they all were at once):
    that many streams, and the RSS."""
    counted = [(open_at(records, moment), rss) for moment, rss in samples]
    return max(counted, default=None)


def measure_streams(args: argparse.Namespace) -> tuple[StreamFindings | None, StreamFindings]:
    """The streams through the relay floor (unless `--no-floor`), then through the proxy, from one upstream."""
    raise_open_file_limit()
    with tempfile.TemporaryDirectory(prefix="openai-proxy-sustained-") as work, ExitStack() as started:
        folder = Path(work)
        upstream_port = free_port()
        upstream = start_upstream(upstream_port, args.gap_ms, folder / "upstream.log")
        started.callback(stop, upstream)
        wait_until_up(f"http://127.0.0.1:{upstream_port}/", upstream)
        floor = None
        if not args.no_floor:
            with ExitStack() as serving:
                port, relay = serve_floor(upstream_port, serving)
                floor = stream_through(port, relay, args, proxied=False)
        with ExitStack() as serving:
            port, proxy = serve_proxy(args.backend, upstream_port, folder, serving)
            findings = stream_through(port, proxy, args, proxied=True)
        return floor, replace(findings, log=log_digest(folder / "proxy.log"))


def serve_floor(upstream_port: int, started: ExitStack) -> tuple[int, subprocess.Popen[bytes]]:
    """The relay floor (bench/floor.py --relay-to) in front of the upstream, stopped with `started`."""
    port = free_port()
    relay = start_floor(port, relay_to=f"http://127.0.0.1:{upstream_port}")
    started.callback(stop, relay)
    wait_until_up(f"http://127.0.0.1:{port}/", relay)
    return port, relay


def stream_through(
    port: int, server: subprocess.Popen[bytes], args: argparse.Namespace, proxied: bool
) -> StreamFindings:
    """The streams through the server on `port` (the proxy when `proxied`, its cache stats read after)."""
    # A few short streams first, so what the server builds on its first request is in `rss_before`.
    uvloop.run(open_streams(port, WARM_UP_STREAMS, 2, 0.0, 10 + 2 * args.gap_ms / 1000))
    time.sleep(2)
    rss_before = rss_mb(server.pid)
    sampler = RssSampler(server.pid).start()
    cpu_before = cpu_seconds(server.pid)
    try:
        records, lags = uvloop.run(stream_load(port, args))
    finally:
        sampler.stop()
    cpu = cpu_seconds(server.pid) - cpu_before
    busiest = busiest_sample(sampler.samples, records)
    stats: dict[str, Any] = {}
    waited = 0.0
    if proxied:
        whole = sum(record.whole(args.events) for record in records)
        stats, waited = caught_up_stats(f"http://127.0.0.1:{port}", whole + WARM_UP_STREAMS)
    peak = max([rss_before, *(rss for _, rss in sampler.samples)])
    stop(server)
    return StreamFindings(records, lags, rss_before, busiest, peak, cpu, stats, waited, [])


def _ms(values_ns: Sequence[float]) -> list[float]:
    return [value / 1e6 for value in values_ns]


def spread_line(name: str, values_ms: Sequence[float]) -> str:
    if not values_ms:
        return f"{name:<42} {'-':>9} {'-':>9} {'-':>9}"
    p50, p99 = statistics.median(values_ms), percentile(list(values_ms), 0.99)
    return f"{name:<42} {p50:>9.2f} {p99:>9.2f} {max(values_ms):>9.2f}"


@dataclass(frozen=True)
class StreamFigures:
    whole: int
    first_event_ms: list[float]
    delays_ms: list[float]
    send_lags_ms: list[float]
    loop_lags_ms: list[float]
    failures: Counter[str]

    @classmethod
    def of(cls, findings: StreamFindings, events: int) -> StreamFigures:
        records = findings.records
        firsts = [record.first_event_ns - record.asked_ns for record in records if record.first_event_ns is not None]
        return cls(
            whole=sum(record.whole(events) for record in records),
            first_event_ms=_ms(firsts),
            delays_ms=_ms([delay for record in records for delay in record.delays_ns]),
            send_lags_ms=_ms([lag for record in records for lag in record.send_lags_ns]),
            loop_lags_ms=[lag * 1000 for lag in findings.loop_lags],
            failures=Counter(record.failure(events) for record in records if not record.whole(events)),
        )


def memory_per_stream_kb(findings: StreamFindings) -> float | None:
    if findings.busiest is None or findings.busiest[0] == 0:
        return None
    streams, rss = findings.busiest
    return (rss - findings.rss_before) * 1024 / streams


def upstream_note(figures: StreamFigures) -> str:
    """Whether the fake upstream kept its pace: an event sent late reaches the client late, and its first
    event late, though the relay delay (from the send stamp) does not count it."""
    if not figures.send_lags_ms:
        return "the upstream sent no event"
    p99 = percentile(figures.send_lags_ms, 0.99)
    verdict = "small: the upstream kept its pace" if p99 < 10 else "LARGE: the upstream fell behind its pace"
    return f"upstream send lag p99 {p99:.2f} ms ({verdict})"


def stream_goals(figures: StreamFigures, per_stream_kb: float | None, streams: int) -> list[str]:
    first_p99 = percentile(figures.first_event_ms, 0.99) if figures.first_event_ms else float("inf")
    relay_p99 = percentile(figures.delays_ms, 0.99) if figures.delays_ms else float("inf")
    memory = f"{per_stream_kb:.1f} kB" if per_stream_kb is not None else "no RSS sample with a stream open"
    return [
        "goals:",
        goal("every stream completes", figures.whole == streams, f"{figures.whole} of {streams}"),
        goal(
            f"p99 time to first event under {GOAL_FIRST_EVENT_MS:g} ms",
            first_p99 < GOAL_FIRST_EVENT_MS,
            f"{first_p99:.1f} ms",
        ),
        goal(
            f"p99 relay delay under {GOAL_RELAY_DELAY_MS:g} ms", relay_p99 < GOAL_RELAY_DELAY_MS, f"{relay_p99:.1f} ms"
        ),
        goal(
            f"memory per open stream under {GOAL_KB_PER_STREAM:g} kB",
            per_stream_kb is not None and per_stream_kb < GOAL_KB_PER_STREAM,
            memory,
        ),
    ]


def cpu_line(findings: StreamFindings, args: argparse.Namespace) -> str:
    """The server's CPU time for the streams: what decides, on one core, how many it can relay on time."""
    per_stream_ms = findings.cpu_seconds * 1000 / args.streams
    per_event_us = findings.cpu_seconds * 1e6 / (args.streams * (args.events + 1))
    return (
        f"CPU for the streams: {findings.cpu_seconds:.2f} s, {per_stream_ms:.2f} ms a stream,"
        f" {per_event_us:.1f} us an event (its share of the stream's set-up included)"
    )


def memory_line(findings: StreamFindings, per_stream_kb: float | None, streams: int) -> str:
    line = f"proxy RSS: before the streams {findings.rss_before:.1f} MB, peak {findings.rss_peak:.1f} MB"
    if findings.busiest is None or per_stream_kb is None:
        return line + "; no RSS sample while a stream was open"
    opened, rss = findings.busiest
    when = "every stream was open" if opened == streams else f"the most streams were open ({opened} of {streams})"
    return line + f"; {rss:.1f} MB while {when}: {per_stream_kb:.1f} kB per open stream"


def stream_report(floor: StreamFindings | None, findings: StreamFindings, args: argparse.Namespace) -> str:
    figures = StreamFigures.of(findings, args.events)
    per_stream_kb = memory_per_stream_kb(findings)
    failures = ", ".join(f"{reason}: {count}" for reason, count in figures.failures.most_common(5)) or "none"
    stats = findings.stats
    lines = [
        f"streams: {args.streams} streaming misses started evenly over {args.ramp:g} s, each {args.events} events"
        f" {args.gap_ms:g} ms apart upstream, then data: [DONE]; {args.backend} store, default settings; proxy on"
        " CPU 0; the fake upstream (its own process), the clients and this process on CPU 1",
        f"completed whole: {figures.whole} of {args.streams} (the others: {failures})",
        f"{'measurement':<42} {'p50':>9} {'p99':>9} {'max':>9}",
        spread_line("time to first event (ms)", figures.first_event_ms),
        spread_line("relay delay, every event (ms)", figures.delays_ms),
        spread_line("upstream send lag, sent - due (ms)", figures.send_lags_ms),
        spread_line("client event-loop lag (ms)", figures.loop_lags_ms),
        upstream_note(figures),
        "proxy " + cpu_line(findings, args),
        memory_line(findings, per_stream_kb, args.streams),
        f"store {findings.stats_waited:.0f} s after (once every complete stream was stored or counted as skipped,"
        f" or the entries stood still): entries {stats['entries']} (with {WARM_UP_STREAMS} warm-up streams),"
        f" stores_skipped {stats['stores_skipped']}, misses counted {stats['misses']}",
        *findings.log,
        *([] if floor is None else floor_lines(floor, figures, per_stream_kb, findings.cpu_seconds, args)),
        *stream_goals(figures, per_stream_kb, args.streams),
    ]
    return "\n".join(lines) + "\n"


def floor_lines(
    floor: StreamFindings, proxy: StreamFigures, proxy_kb: float | None, proxy_cpu: float, args: argparse.Namespace
) -> list[str]:
    """The same streams through the relay floor, measured just before, and the proxy's figures against it."""
    figures = StreamFigures.of(floor, args.events)
    per_stream_kb = memory_per_stream_kb(floor)

    def ratio(of_proxy: float | None, of_floor: float | None) -> str:
        return f"{of_proxy / of_floor:.1f} x" if of_proxy is not None and of_floor else "-"

    def p99(values: list[float]) -> float | None:
        return percentile(values, 0.99) if values else None

    return [
        "the same streams through the relay floor (bench/floor.py --relay-to: a raw ASGI app on the same uvicorn"
        " relaying through aiohttp with no task per chunk, nothing else), measured first:",
        f"  completed whole: {figures.whole} of {args.streams}",
        "  " + spread_line("time to first event (ms)", figures.first_event_ms),
        "  " + spread_line("relay delay, every event (ms)", figures.delays_ms),
        "  " + upstream_note(figures),
        "  floor " + cpu_line(floor, args),
        "  " + memory_line(floor, per_stream_kb, args.streams).replace("proxy RSS", "floor RSS"),
        f"  proxy / floor: first event p99 {ratio(p99(proxy.first_event_ms), p99(figures.first_event_ms))}, relay"
        f" delay p99 {ratio(p99(proxy.delays_ms), p99(figures.delays_ms))}, CPU {ratio(proxy_cpu, floor.cpu_seconds)},"
        f" memory per open stream {ratio(proxy_kb, per_stream_kb)}",
    ]


# Commands


def check_tools(tools: Sequence[str]) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed: apt-get install wrk nginx-light util-linux procps redis-server")


def run_misses(args: argparse.Namespace) -> None:
    check_tools(["wrk", "nginx", "taskset", "pgrep", *(["redis-server"] if args.backend == "redis" else [])])
    os.sched_setaffinity(0, {1})
    sys.stdout.write(miss_report(measure_misses(args), args))


def run_streams(args: argparse.Namespace) -> None:
    check_tools(["taskset", "pgrep", *(["redis-server"] if args.backend == "redis" else [])])
    os.sched_setaffinity(0, {1})
    sys.stdout.write(stream_report(*measure_streams(args), args))


def positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    misses = commands.add_parser("misses", help="memory and tail latency under sustained unique misses")
    misses.add_argument("--runs", type=positive(int), default=4, help="back-to-back wrk runs (default 4)")
    misses.add_argument("--duration", type=positive(int), default=10, help="seconds per run (default 10)")
    misses.add_argument("--connections", type=positive(int), default=32, help="wrk connections (default 32)")
    streams = commands.add_parser("streams", help="thousands of paced streams open at once")
    streams.add_argument("--streams", type=positive(int), default=2000, help="concurrent streams (default 2000)")
    streams.add_argument("--events", type=positive(int), default=100, help="chunk events per stream (default 100)")
    streams.add_argument("--gap-ms", type=positive(float), default=100, help="ms between events (default 100)")
    streams.add_argument("--ramp", type=float, default=1.0, help="seconds over which streams start (default 1)")
    streams.add_argument("--no-floor", action="store_true", help="skip the relay floor measured first")
    for command in (misses, streams):
        command.add_argument("--backend", choices=("sqlite", "redis"), default="sqlite", help="store (default sqlite)")
    upstream = commands.add_parser("serve-upstream", help="the fake paced upstream `streams` runs (internal)")
    upstream.add_argument("--port", type=int, required=True)
    upstream.add_argument("--gap-ms", type=positive(float), default=100)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    {"misses": run_misses, "streams": run_streams, "serve-upstream": run_upstream}[args.command](args)


if __name__ == "__main__":
    main()
