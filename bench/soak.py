"""Soak test: the proxy under steady mixed traffic for minutes, every answer checked, its memory watched
and what it stored counted.

    uv run python bench/soak.py [--minutes 10] [--backend sqlite|redis] [--rate 200] [--seed 1]

Needs `taskset` and, for `--backend redis`, `redis-server`. Everything listens on 127.0.0.1 only.

Method: a fake OpenAI upstream of its own (`fake_upstream`, a raw ASGI app served by uvicorn in a
subprocess on CPU 1); the proxy as a real server on CPU 0 with a fresh store (a SQLite file in a
temporary folder, or a redis-server of its own on a free port, on CPU 1); and a load generator
(asyncio + httpx over aiohttp's connection pool, in this process, on CPU 1) that offers chat
completions at a fixed rate for `--minutes`, evenly paced: request i starts at i / rate seconds
whether or not earlier ones were answered.

The traffic, drawn from a seeded RNG: new prompts (misses) and repeats of prompts already answered in
full (hits), each as JSON or as a stream, half of the streams asking for `stream_options.include_usage`
(a repeat may take the other shape than its first asking, so hits also go through the conversion);
2% new streams whose client walks away after the first bytes; 2% prompts with a fault marker, which the
fake upstream answers with a 500 or, for a stream, cuts off before `data: [DONE]`.

Every prompt carries a unique nonce that the fake upstream echoes in its answer's content (the message
for JSON, the content deltas for a stream). The generator checks each answer against its own prompt:
a complete 200 answer with other content is a wrong answer (another request's answer, or a garbled one).

Reported: the proxy's RSS (VmRSS, sampled every second) before the load, at minute 1, at the end and
its maximum; p50/p99 latency per class (HIT or not by X-Cache-Status, JSON or stream; to the end of the
answer, and to its first byte for streams) and counts; entries stored (GET /cache/stats once `entries`
stopped changing) against the answers that should have been: the distinct prompts answered in full as
a MISS, less the stores the proxy reports as skipped (`stores_skipped`, 0 where it reports none).
Faulted and walked-away prompts are asked again at the end with `Cache-Control: only-if-cached`: a
faulted one held is a stored broken answer, a walked-away one held an answer the upstream finished
before the proxy saw its client go; neither counts as a stored answer. When entries are missing, every
prompt answered in full is asked again the same way, to name the lost ones. Then the goals and whether
they hold: no wrong answer, no lost entry, no faulted answer stored, final RSS within 20% of minute 1's
and under 250 MB. It exits 0 whatever the figures; only a failed setup exits otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.processes import (  # noqa: E402
    backend_env,
    free_port,
    rss_mb,
    start_proxy,
    start_redis,
    stop,
    wait_for_proxy,
    wait_until_up,
)
from bench.stream_latency import percentile  # noqa: E402

MODEL = "gpt-4o-mini"
CREATED = 1700000000
WORDS = ("a", "cache", "answers", "repeated", "prompts", "from", "memory", "and", "disk", "at", "once")
MIN_WORDS, MAX_WORDS = 6, 60
WORDS_PER_CHUNK = 5
UPSTREAM_WAIT = 0.03  # seconds the fake upstream takes before its first byte, as a model would
CHUNK_GAP = 0.004  # seconds between stream chunks

WALK_AWAY_SHARE = 0.02
FAULT_SHARE = 0.02
REPEAT_SHARE = 0.50
STREAM_SHARE = 0.45
HOT_PROMPTS = 200  # half of the repeats ask one of the latest answered prompts, half any of them

REQUEST_TIMEOUT = 30.0
CLIENT_KEEPALIVE = 2.0
LATE = 0.010  # a request starting this much after its time counts as late
SETTLE_LIMIT = 30.0  # seconds to wait for the stores to finish after the load
PROBES_AT_ONCE = 16
MINUTE = 60.0

GOAL_RSS_CHANGE = 0.20
GOAL_RSS_MB = 250.0


# What a prompt asks and the answer it must get: shared by the fake upstream and the load generator.


class Fault(StrEnum):
    NONE = "none"
    ERROR = "500"  # the upstream answers 500
    DROP = "drop"  # the upstream closes a stream before `data: [DONE]`


@dataclass(frozen=True)
class Prompt:
    nonce: str
    words: int
    fault: Fault = Fault.NONE

    def text(self) -> str:
        return f"soak prompt nonce={self.nonce} words={self.words} fault={self.fault.value}"


_PROMPT = re.compile(r"nonce=(\S+) words=(\d+) fault=(\S+)")
_SERVED_NONCE = re.compile(rb"Answer for nonce ([^:\s\"]+):")


def read_prompt(text: str) -> Prompt:
    match = _PROMPT.search(text)
    if match is None:
        raise ValueError(f"not a soak prompt: {text[:80]!r}")
    return Prompt(match.group(1), int(match.group(2)), Fault(match.group(3)))


def answer_pieces(prompt: Prompt) -> list[str]:
    """The answer's content, in the pieces a stream sends it in; the first names the prompt's nonce."""
    words = [WORDS[index % len(WORDS)] for index in range(prompt.words)]
    groups = (words[start : start + WORDS_PER_CHUNK] for start in range(0, len(words), WORDS_PER_CHUNK))
    return [f"Answer for nonce {prompt.nonce}:", *(" " + " ".join(group) for group in groups)]


def answer_text(prompt: Prompt) -> str:
    return "".join(answer_pieces(prompt))


# The fake upstream


def usage(prompt: Prompt) -> dict[str, int]:
    return {"prompt_tokens": 12, "completion_tokens": prompt.words + 4, "total_tokens": prompt.words + 16}


def completion_body(prompt: Prompt) -> bytes:
    message = {"role": "assistant", "content": answer_text(prompt), "refusal": None}
    return orjson.dumps(
        {
            "id": f"chatcmpl-{prompt.nonce}",
            "object": "chat.completion",
            "created": CREATED,
            "model": MODEL,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
            "usage": usage(prompt),
            "system_fingerprint": "fp_soak",
        }
    )


def stream_events(prompt: Prompt, include_usage: bool) -> list[bytes]:
    """An OpenAI chat.completion.chunk stream: role, content pieces, finish, usage when asked, [DONE]."""
    base: dict[str, Any] = {
        "id": f"chatcmpl-{prompt.nonce}",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "system_fingerprint": "fp_soak",
    }
    if include_usage:
        base["usage"] = None
    deltas = [{"role": "assistant", "content": ""}, *({"content": piece} for piece in answer_pieces(prompt))]
    choices = [*(_chunk_choice(delta) for delta in deltas), _chunk_choice({}, finish_reason="stop")]
    chunks = [{**base, "choices": [choice]} for choice in choices]
    if include_usage:
        chunks.append({**base, "choices": [], "usage": usage(prompt)})
    return [b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks] + [b"data: [DONE]\n\n"]


def _chunk_choice(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


ERROR_BODY = orjson.dumps(
    {"error": {"message": "The server had an error processing your request.", "type": "server_error"}}
)

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def fake_upstream(scope: Message, receive: Receive, send: Send) -> None:
    """POST /v1/chat/completions as OpenAI answers it, the content naming the prompt's nonce; faults
    as the prompt's marker says. Served by uvicorn in a process of its own (`start_upstream`)."""
    if scope["type"] != "http":
        return
    if scope["method"] != "POST" or scope["path"] != "/v1/chat/completions":
        await respond(send, 404, orjson.dumps({"error": {"message": "Not found", "type": "invalid_request_error"}}))
        return
    request = orjson.loads(await read_body(receive))
    prompt = read_prompt(request["messages"][-1]["content"])
    await asyncio.sleep(UPSTREAM_WAIT)
    if prompt.fault is Fault.ERROR:
        await respond(send, 500, ERROR_BODY)
    elif request.get("stream") is True:
        options = request.get("stream_options") or {}
        await send_stream(send, prompt, options.get("include_usage") is True)
    else:
        await respond(send, 200, completion_body(prompt))


async def read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        chunk: bytes = message.get("body", b"")
        body += chunk
        if not message.get("more_body", False):
            return body


async def respond(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_stream(send: Send, prompt: Prompt, include_usage: bool) -> None:
    events = stream_events(prompt, include_usage)
    if prompt.fault is Fault.DROP:
        events = events[: len(events) // 2]
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for event in events:
        await send({"type": "http.response.body", "body": event, "more_body": True})
        await asyncio.sleep(CHUNK_GAP)
    if prompt.fault is not Fault.DROP:
        await send({"type": "http.response.body", "body": b""})
    # Otherwise the app returns with the response unfinished, and uvicorn closes the connection.


def start_upstream(port: int, log: Path) -> subprocess.Popen[bytes]:
    """`fake_upstream` on CPU 1; what uvicorn logs (each cut-off stream, for one) goes to `log`."""
    command = ["taskset", "-c", "1", sys.executable, "-m", "uvicorn", "bench.soak:fake_upstream",
               "--app-dir", str(ROOT), "--host", "127.0.0.1", "--port", str(port),
               "--lifespan", "off", "--no-access-log", "--log-level", "warning"]  # fmt: skip
    with open(log, "ab") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)


# The traffic


@dataclass(frozen=True)
class Asking:
    """One request the load generator sends."""

    prompt: Prompt
    stream: bool
    include_usage: bool = False
    repeat: bool = False
    walk_away: bool = False

    def body(self) -> bytes:
        request: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": self.prompt.text()}]}
        if self.stream:
            request["stream"] = True
            if self.include_usage:
                request["stream_options"] = {"include_usage": True}
        return orjson.dumps(request)

    @property
    def kind(self) -> str:
        if self.walk_away:
            return "walk-away"
        if self.prompt.fault is not Fault.NONE:
            return f"fault {self.prompt.fault.value}"
        return "repeat" if self.repeat else "new"

    @property
    def healthy(self) -> bool:
        """Whether a complete answer must come back, and be stored."""
        return self.prompt.fault is Fault.NONE and not self.walk_away


class Traffic:
    """The requests to offer, drawn from a seeded RNG; repeats ask prompts already answered in full (MISS)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.prompts = 0
        self.answered: list[Prompt] = []
        self.first_answers: dict[str, Outcome] = {}

    def next_asking(self) -> Asking:
        draw = self.rng.random()
        stream = self.rng.random() < STREAM_SHARE
        include_usage = stream and self.rng.random() < 0.5
        if draw < WALK_AWAY_SHARE:
            return Asking(self._new_prompt(), stream=True, include_usage=include_usage, walk_away=True)
        if draw < WALK_AWAY_SHARE + FAULT_SHARE:
            fault = Fault.DROP if stream and self.rng.random() < 0.5 else Fault.ERROR
            return Asking(self._new_prompt(fault), stream, include_usage)
        if draw < WALK_AWAY_SHARE + FAULT_SHARE + REPEAT_SHARE and self.answered:
            return Asking(self._earlier_prompt(), stream, include_usage, repeat=True)
        return Asking(self._new_prompt(), stream, include_usage)

    def answered_in_full(self, outcome: Outcome) -> None:
        """Note a prompt whose answer the proxy should now hold, so that it may be repeated."""
        prompt = outcome.asking.prompt
        if prompt.nonce not in self.first_answers:
            self.first_answers[prompt.nonce] = outcome
            self.answered.append(prompt)

    def _new_prompt(self, fault: Fault = Fault.NONE) -> Prompt:
        self.prompts += 1
        nonce = f"{self.prompts}-{self.rng.getrandbits(40):010x}"
        return Prompt(nonce, self.rng.randint(MIN_WORDS, MAX_WORDS), fault)

    def _earlier_prompt(self) -> Prompt:
        pool = self.answered[-HOT_PROMPTS:] if self.rng.random() < 0.5 else self.answered
        return self.rng.choice(pool)


# Asking the proxy and judging its answers


class Verdict(StrEnum):
    OK = "ok"
    WRONG = "wrong"  # complete, but not the answer to this prompt
    MALFORMED = "malformed"  # not a chat completion as asked: unreadable, or usage missing or unasked
    TRUNCATED = "truncated"  # ended before it was complete
    FAILED = "failed"  # not 200, or no answer at all
    LEFT = "left"  # the client walked away, as planned


@dataclass(frozen=True)
class Outcome:
    asking: Asking
    verdict: Verdict
    status: int  # 0: no HTTP answer
    cache_status: str  # X-Cache-Status ("" without one)
    seconds: float  # to the end of the answer
    first_byte: float | None = None  # to the first byte of a stream's body
    served_nonce: str = ""  # for a wrong answer, the nonce it names
    failure: str = ""  # without an HTTP answer, the error instead

    @property
    def answer_class(self) -> str:
        return f"{'hit' if self.cache_status == 'HIT' else 'miss'} {'stream' if self.asking.stream else 'JSON'}"


def judge(asking: Asking, status: int, body: bytes, complete: bool) -> Verdict:
    if status != 200:
        return Verdict.FAILED
    if not complete:
        return Verdict.TRUNCATED
    return judge_stream(body, asking) if asking.stream else judge_json(body, asking.prompt)


def judge_json(body: bytes, prompt: Prompt) -> Verdict:
    try:
        completion = orjson.loads(body)
        content = completion["choices"][0]["message"]["content"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return Verdict.MALFORMED
    if content != answer_text(prompt):
        return Verdict.WRONG
    return Verdict.OK if completion.get("usage") is not None else Verdict.MALFORMED


def judge_stream(body: bytes, asking: Asking) -> Verdict:
    read = stream_content(body)
    if read is None:
        return Verdict.MALFORMED
    content, has_usage, done = read
    if not done:
        return Verdict.TRUNCATED
    if content != answer_text(asking.prompt):
        return Verdict.WRONG
    return Verdict.OK if has_usage == asking.include_usage else Verdict.MALFORMED


def stream_content(body: bytes) -> tuple[str, bool, bool] | None:
    """A chunk stream's joined content, whether a chunk carried usage and whether it ended with
    `data: [DONE]`; None when it is not a chunk stream."""
    pieces: list[str] = []
    has_usage = done = False
    for event in body.split(b"\n\n"):
        if not event.strip():
            continue
        if done or not event.startswith(b"data:"):
            return None
        data = event.removeprefix(b"data:").strip()
        if data == b"[DONE]":
            done = True
            continue
        try:
            chunk = orjson.loads(data)
            has_usage |= chunk.get("usage") is not None
            pieces.extend(choice["delta"].get("content") or "" for choice in chunk["choices"])
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return None
    return "".join(pieces), has_usage, done


async def ask(client: httpx.AsyncClient, url: str, asking: Asking) -> Outcome:
    started = time.perf_counter()
    headers = {"content-type": "application/json"}
    try:
        async with client.stream("POST", url, content=asking.body(), headers=headers) as response:
            if asking.walk_away:
                return await walk_away(response, asking, started)
            return await read_answer(response, asking, started)
    except httpx.TransportError as exc:
        return Outcome(asking, Verdict.FAILED, 0, "", time.perf_counter() - started, failure=failure_name(exc))


def failure_name(exc: httpx.TransportError) -> str:
    """The error, and the aiohttp error under it (the transport maps several to one httpx error)."""
    cause = exc.__cause__
    return type(exc).__name__ + (f" from {type(cause).__name__}" if cause is not None else "")


async def read_answer(response: httpx.Response, asking: Asking, started: float) -> Outcome:
    chunks: list[bytes] = []
    first_byte = None
    complete = True
    try:
        async for chunk in response.aiter_bytes():
            if first_byte is None:
                first_byte = time.perf_counter() - started
            chunks.append(chunk)
    except httpx.TransportError:  # cut off (as a stream whose upstream broke off should be) or timed out
        complete = False
    seconds = time.perf_counter() - started
    body = b"".join(chunks)
    verdict = judge(asking, response.status_code, body, complete)
    served = _SERVED_NONCE.search(body) if verdict is Verdict.WRONG else None
    return Outcome(
        asking,
        verdict,
        response.status_code,
        response.headers.get("x-cache-status", ""),
        seconds,
        first_byte if asking.stream else None,
        served.group(1).decode() if served else "",
    )


async def walk_away(response: httpx.Response, asking: Asking, started: float) -> Outcome:
    """Read the first bytes, then leave: closing a response read only in part closes its connection."""
    first_byte = None
    async for _ in response.aiter_raw():
        first_byte = time.perf_counter() - started
        break
    verdict = Verdict.LEFT if response.status_code == 200 and first_byte is not None else Verdict.FAILED
    seconds = time.perf_counter() - started
    return Outcome(asking, verdict, response.status_code, response.headers.get("x-cache-status", ""), seconds)


async def is_held(client: httpx.AsyncClient, url: str, asking: Asking) -> bool:
    """Whether the proxy holds an answer for the prompt (asked in the same shape; nothing goes upstream)."""
    headers = {"content-type": "application/json", "cache-control": "only-if-cached"}
    response = await client.post(url, content=asking.body(), headers=headers)
    cache_status: str | None = response.headers.get("x-cache-status")
    return cache_status == "HIT"


async def which_held(client: httpx.AsyncClient, url: str, askings: list[Asking]) -> list[bool]:
    gate = asyncio.Semaphore(PROBES_AT_ONCE)

    async def probe(asking: Asking) -> bool:
        async with gate:
            return await is_held(client, url, asking)

    return await asyncio.gather(*(probe(asking) for asking in askings))


# The run


@dataclass
class Tally:
    """What the answers showed, gathered as they arrive."""

    seconds: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    first_bytes: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    verdicts: Counter[tuple[str, Verdict]] = field(default_factory=Counter)
    cache_statuses: Counter[str] = field(default_factory=Counter)
    repeat_statuses: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    wrong: list[Outcome] = field(default_factory=list)
    faulted: list[Asking] = field(default_factory=list)
    walked_away: list[Asking] = field(default_factory=list)
    sent: int = 0
    late: int = 0
    sending_seconds: float = 0.0
    answering_seconds: float = 0.0

    def add(self, outcome: Outcome) -> None:
        asking = outcome.asking
        self.verdicts[asking.kind, outcome.verdict] += 1
        self.cache_statuses[outcome.cache_status or "none"] += 1
        if outcome.verdict is Verdict.WRONG:
            self.wrong.append(outcome)
        if asking.walk_away:
            self.walked_away.append(asking)
        elif asking.prompt.fault is not Fault.NONE:
            self.faulted.append(asking)
        elif outcome.verdict is Verdict.OK:
            self.seconds[outcome.answer_class].append(outcome.seconds)
            if outcome.first_byte is not None:
                self.first_bytes[outcome.answer_class].append(outcome.first_byte)
        elif outcome.verdict is not Verdict.WRONG:
            why = outcome.status or outcome.failure
            self.unexpected[f"{asking.kind} {outcome.answer_class}: {outcome.verdict} ({why})"] += 1
        if asking.repeat:
            self.repeat_statuses[outcome.cache_status or "none"] += 1


@dataclass
class Findings:
    tally: Tally
    idle_mb: float  # the proxy's RSS before the load
    memory: list[tuple[float, float]]  # (seconds into the load, proxy RSS in MB)
    stats: dict[str, Any]
    should_store: int
    faulted_held: int
    walked_away_held: int
    lost: list[Outcome]  # the first answers of prompts the proxy does not hold, looked for when entries are missing

    @property
    def missing(self) -> int:
        """Answers that should be stored but are not: negative when the proxy holds more than expected."""
        skipped = int(self.stats.get("stores_skipped", 0))
        stored_answers = int(self.stats["entries"]) - self.faulted_held - self.walked_away_held
        return self.should_store - stored_answers - skipped


async def exchange(client: httpx.AsyncClient, url: str, asking: Asking, traffic: Traffic, tally: Tally) -> None:
    outcome = await ask(client, url, asking)
    tally.add(outcome)
    # A complete MISS is an answer the proxy should store (a BYPASS, with the store failing, is not).
    if outcome.verdict is Verdict.OK and asking.healthy and outcome.cache_status == "MISS":
        traffic.answered_in_full(outcome)


async def offer(
    client: httpx.AsyncClient, url: str, traffic: Traffic, tally: Tally, rate: float, seconds: float
) -> None:
    """Start request i at i / rate seconds, answered or not; return once every request was answered."""
    started = time.perf_counter()
    async with asyncio.TaskGroup() as requests:
        for number in range(round(rate * seconds)):
            wait = started + number / rate - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            elif wait < -LATE:
                tally.late += 1
            requests.create_task(exchange(client, url, traffic.next_asking(), traffic, tally))
            tally.sent += 1
        tally.sending_seconds = time.perf_counter() - started
    tally.answering_seconds = time.perf_counter() - started


async def sample_memory(pid: int, started: float, samples: list[tuple[float, float]]) -> None:
    """The proxy's RSS every second, until cancelled."""
    for second in itertools.count():
        samples.append((time.perf_counter() - started, await asyncio.to_thread(rss_mb, pid)))
        await asyncio.sleep(max(0.0, started + second + 1 - time.perf_counter()))


async def settled_stats(client: httpx.AsyncClient, base: str) -> dict[str, Any]:
    """GET /cache/stats once `entries` has stopped changing: each store runs just after its answer was sent."""
    deadline = time.monotonic() + SETTLE_LIMIT
    previous = None
    while True:
        await asyncio.sleep(1)
        response = await client.get(f"{base}/cache/stats")
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        if stats["entries"] == previous or time.monotonic() > deadline:
            return stats
        previous = stats["entries"]


def load_client() -> httpx.AsyncClient:
    """httpx over aiohttp's connection pool: httpx's own pool spends its time scanning its connections
    once a few hundred are open, as proxy/upstream.py found; no limit on connections, as the load is open."""

    def session() -> aiohttp.ClientSession:
        # Idle connections are let go before uvicorn's keep-alive timeout (5 s) closes them under a request.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=CLIENT_KEEPALIVE)
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    return httpx.AsyncClient(transport=AiohttpTransport(client=session), timeout=REQUEST_TIMEOUT)


async def soak(port: int, pid: int, args: argparse.Namespace) -> Findings:
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/v1/chat/completions"
    traffic, tally = Traffic(args.seed), Tally()
    memory: list[tuple[float, float]] = []
    idle_mb = rss_mb(pid)
    async with load_client() as client:
        started = time.perf_counter()
        sampling = asyncio.create_task(sample_memory(pid, started, memory))
        try:
            await offer(client, url, traffic, tally, args.rate, args.minutes * MINUTE)
        finally:
            sampling.cancel()
        memory.append((time.perf_counter() - started, await asyncio.to_thread(rss_mb, pid)))
        stats = await settled_stats(client, base)
        faulted_held = sum(await which_held(client, url, tally.faulted))
        walked_away_held = sum(await which_held(client, url, tally.walked_away))
        findings = Findings(tally, idle_mb, memory, stats, len(traffic.answered), faulted_held, walked_away_held, [])
        if findings.missing > 0:
            findings.lost = await not_held(client, url, list(traffic.first_answers.values()))
    return findings


async def not_held(client: httpx.AsyncClient, url: str, answers: list[Outcome]) -> list[Outcome]:
    """The answers whose prompt the proxy does not hold (each asked again with only-if-cached)."""
    held = await which_held(client, url, [answer.asking for answer in answers])
    return [answer for answer, found in zip(answers, held, strict=True) if not found]


def run(folder: Path, args: argparse.Namespace) -> Findings:
    """Start the fake upstream, the store and the proxy; soak it from CPU 1; stop them all."""
    with ExitStack() as started:
        upstream_port = free_port()
        upstream = start_upstream(upstream_port, folder / "upstream.log")
        started.callback(stop, upstream)
        wait_until_up(f"http://127.0.0.1:{upstream_port}/", upstream)
        redis_url = None
        if args.backend == "redis":
            redis = start_redis()
            started.callback(redis.remove)
            redis_url = redis.url
        port = free_port()
        env = backend_env(args.backend, redis_url)
        proxy = start_proxy(port, upstream_port, folder / "cache.db", env, errors_to=folder / "proxy.log")
        started.callback(stop, proxy)
        wait_for_proxy(port, proxy, args.backend)
        os.sched_setaffinity(0, {1})
        findings = asyncio.run(soak(port, proxy.pid, args))
    return findings


# The report


def latency_table(tally: Tally) -> list[str]:
    lines = [f"{'class':<12} {'count':>7} {'p50 ms':>8} {'p99 ms':>8} {'1st byte p50':>13} {'1st byte p99':>13}"]
    for name in ("hit JSON", "miss JSON", "hit stream", "miss stream"):
        seconds, first = tally.seconds[name], tally.first_bytes[name]
        line = f"{name:<12} {len(seconds):>7} {_p50_p99(seconds)}"
        lines.append(line + (f" {_p50_p99(first, width=13)}" if first else ""))
    return lines


def _p50_p99(values: list[float], width: int = 8) -> str:
    if not values:
        return f"{'-':>{width}} {'-':>{width}}"
    return f"{statistics.median(values) * 1000:>{width}.2f} {percentile(values, 0.99) * 1000:>{width}.2f}"


def counts(counter: Iterable[tuple[str, int]]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counter) or "none"


def verdict_lines(tally: Tally) -> list[str]:
    kinds = sorted({kind for kind, _ in tally.verdicts})
    lines = ["answers by request kind:"]
    for kind in kinds:
        found = [(str(verdict), n) for (each, verdict), n in sorted(tally.verdicts.items()) if each == kind]
        lines.append(f"  {kind:<11} {counts(found)}")
    lines.append(f"X-Cache-Status: {counts(tally.cache_statuses.most_common())}")
    lines.append(f"repeats by X-Cache-Status: {counts(tally.repeat_statuses.most_common())}")
    lines.append(f"unexpected answers to healthy prompts: {counts(tally.unexpected.most_common())}")
    for outcome in tally.wrong[:5]:
        asking = outcome.asking
        lines.append(
            f"  wrong: asked nonce {asking.prompt.nonce} ({asking.kind}, {outcome.answer_class}),"
            f" served nonce {outcome.served_nonce or '?'}"
        )
    return lines


@dataclass(frozen=True)
class Memory:
    idle: float
    minute_one: float
    end: float
    peak: float

    @property
    def change(self) -> float:
        return (self.end - self.minute_one) / self.minute_one


def memory_figures(findings: Findings) -> Memory:
    samples = findings.memory
    minute_one = next((rss for at, rss in samples if at >= MINUTE), samples[-1][1])
    return Memory(findings.idle_mb, minute_one, samples[-1][1], max(rss for _, rss in samples))


def memory_line(memory: Memory, samples: int) -> str:
    return (
        f"proxy RSS: before the load {memory.idle:.1f} MB, minute 1 {memory.minute_one:.1f} MB,"
        f" end {memory.end:.1f} MB, max {memory.peak:.1f} MB ({samples} samples, one a second)"
    )


def store_lines(findings: Findings) -> list[str]:
    stats = findings.stats
    lost, extra = max(0, findings.missing), max(0, -findings.missing)
    lines = [
        f"entries stored: {stats['entries']} (of them faulted prompts {findings.faulted_held}, walked-away prompts"
        f" {findings.walked_away_held}); should have been stored: {findings.should_store}; skipped by the proxy:"
        f" {stats.get('stores_skipped', 0)}; lost: {lost}" + (f"; more entries than answers: {extra}" if extra else ""),
    ]
    if findings.lost:
        lines.append(f"  prompts answered in full that the proxy does not hold: {len(findings.lost)}")
    for outcome in findings.lost[:5]:
        asking = outcome.asking
        usage = ", include_usage" if asking.include_usage else ""
        lines.append(
            f"    nonce {asking.prompt.nonce}: first answered as {outcome.answer_class}{usage} ({asking.kind},"
            f" {outcome.seconds * 1000:.0f} ms)"
        )
    lines.append(f"proxy statistics: hits {stats.get('hits')}, misses {stats.get('misses')}")
    return lines


_LOG_LINE = re.compile(r"\b(CRITICAL|ERROR|WARNING)\b:?\s*(.*)")


def log_summary(log: Path) -> str:
    """How many lines the proxy logged at each level, and its most frequent messages."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    leveled = [(match.group(1), match.group(2)) for line in lines if (match := _LOG_LINE.search(line))]
    levels = Counter(level for level, _ in leveled)
    summary = f"proxy log: {len(lines)} lines ({counts(levels.most_common())})"
    for message, count in Counter(message for _, message in leveled).most_common(3):
        summary += f"\n  {count} x {message[:160]}"
    return summary


def goal_lines(findings: Findings, memory: Memory) -> list[str]:
    wrong, lost, faulted = len(findings.tally.wrong), max(0, findings.missing), findings.faulted_held
    return [
        "goals:",
        _goal("no wrong answer", wrong == 0, f"{wrong} wrong"),
        _goal("no lost entry", lost == 0, f"{lost} lost"),
        _goal("no faulted answer stored", faulted == 0, f"{faulted} stored"),
        _goal(
            f"final RSS within {GOAL_RSS_CHANGE:.0%} of minute 1's",
            abs(memory.change) <= GOAL_RSS_CHANGE,
            f"{memory.minute_one:.1f} -> {memory.end:.1f} MB, {memory.change:+.1%}",
        ),
        _goal(f"final RSS under {GOAL_RSS_MB:g} MB", memory.end < GOAL_RSS_MB, f"{memory.end:.1f} MB"),
    ]


def _goal(name: str, holds: bool, figure: str) -> str:
    return f"  {name:<36} {'holds' if holds else 'FAILS'} ({figure})"


def report(args: argparse.Namespace, findings: Findings, proxy_log: str) -> str:
    tally = findings.tally
    memory = memory_figures(findings)
    redis = ", redis-server" if args.backend == "redis" else ""
    lines = [
        f"soak: {args.minutes:g} min, {args.rate:g} req/s offered, {args.backend} store, seed {args.seed};"
        f" proxy on CPU 0; load generator (this process), fake upstream{redis} on CPU 1",
        f"sent {tally.sent} requests in {tally.sending_seconds:.1f} s ({tally.sent / tally.sending_seconds:.1f}/s),"
        f" {tally.late} started over {LATE * 1000:g} ms late; the last answered at {tally.answering_seconds:.1f} s",
        *latency_table(tally),
        *verdict_lines(tally),
        memory_line(memory, len(findings.memory)),
        *store_lines(findings),
        proxy_log,
        *goal_lines(findings, memory),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10, help="how long to offer the load (default 10)")
    parser.add_argument("--backend", choices=("sqlite", "redis"), default="sqlite", help="cache store (default sqlite)")
    parser.add_argument("--rate", type=float, default=200, help="requests per second offered (default 200)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the traffic's RNG (default 1)")
    args = parser.parse_args()
    if args.minutes <= 0 or args.rate <= 0:
        parser.error("--minutes and --rate must be positive")
    for tool in ("taskset", "pgrep", *(("redis-server",) if args.backend == "redis" else ())):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed: apt-get install util-linux procps redis-server")
    with tempfile.TemporaryDirectory(prefix="openai-proxy-soak-") as work:
        folder = Path(work)
        findings = run(folder, args)
        text = report(args, findings, log_summary(folder / "proxy.log"))
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
