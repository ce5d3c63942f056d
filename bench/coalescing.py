"""Cross-instance coalescing: identical misses arriving at two proxies that share one Redis at once.

    uv run python bench/coalescing.py [--requests 50] [--delay 0.5]

Starts a counting fake upstream (in this process) that answers `/v1/chat/completions` after
`--delay` seconds, as JSON or, for `"stream": true`, as an OpenAI chunk stream; a redis-server of
its own on a free port; and two proxy processes (`openai-proxy`, CACHE_BACKEND=redis) with the same
REDIS_URL and REDIS_KEY_PREFIX. It then fires `--requests` identical requests at once, split evenly
across the two proxies, once non-streamed and once streamed (a new prompt each time), and prints
how many requests reached the upstream, how the answers were marked (X-Cache-Status), whether every
body was byte-identical and the wall time.

Each proxy coalesces the identical misses it holds itself, so two proxies cost at most two upstream
requests; with cross-instance coalescing they cost one. The benchmark reports what it sees and
checks nothing. Every upstream answer carries its own id, so two upstream answers show as two
distinct bodies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.processes import free_port, stop  # noqa: E402
from tests.redis_servers import RedisServer  # noqa: E402

WORDS = ("Coalescing ", "makes ", "identical ", "misses ", "cost ", "one ", "upstream ", "request.")


class CountingUpstream:
    """A fake OpenAI chat completions endpoint that answers after a delay and counts its requests."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.requests = 0
        self._lock = threading.Lock()

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> Response:
        with self._lock:
            self.requests += 1
            number = self.requests
        body = await request.json()
        await asyncio.sleep(self.delay)
        answer_id = f"chatcmpl-upstream-{number}"
        if body.get("stream"):
            return StreamingResponse(self._events(answer_id), media_type="text/event-stream")
        return JSONResponse(
            {
                "id": answer_id,
                "object": "chat.completion",
                "created": 1700000000,
                "model": "gpt-4o-mini",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(WORDS), "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 12, "completion_tokens": len(WORDS), "total_tokens": 12 + len(WORDS)},
            }
        )

    @staticmethod
    async def _events(answer_id: str) -> AsyncIterator[bytes]:
        base = {"id": answer_id, "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o-mini"}
        deltas: list[dict[str, str]] = [{"role": "assistant", "content": ""}, *({"content": w} for w in WORDS)]
        for delta in deltas:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
            await asyncio.sleep(0.01)
        last = {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]}
        yield f"data: {json.dumps(last)}\n\n".encode()
        yield b"data: [DONE]\n\n"


def serve_in_thread(app: Starlette, port: int) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise SystemExit("the fake upstream did not start")
        time.sleep(0.01)
    return server


def start_proxy(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-c", "import openai_proxy; openai_proxy.main()", "--port", str(port)]
    return subprocess.Popen(command, env={**os.environ, "LOG_LEVEL": "warning", **env})


def wait_for_proxy(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Until /healthz answers with a usable Redis cache."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the proxy on port {port} exited with status {process.returncode}")
        try:
            health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).json()
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        cache = health.get("cache", {})
        if cache.get("backend") != "redis" or not cache.get("ok"):
            raise SystemExit(f"the proxy on port {port} has no usable Redis cache: {health}")
        return
    raise SystemExit(f"the proxy on port {port} did not come up")


@dataclass
class Outcome:
    upstream_requests: int
    statuses: Counter[str]
    by_proxy: list[Counter[str]]
    http_errors: int
    distinct_bodies: int
    seconds: float


async def fire(urls: list[str], count: int, body: dict[str, object]) -> tuple[list[tuple[int, str, int, bytes]], float]:
    """`count` identical requests at once, request i to urls[i % len(urls)]: (proxy, X-Cache-Status, status, body)."""
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=count + 10)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:

        async def one(index: int) -> tuple[int, str, int, bytes]:
            which = index % len(urls)
            async with http.stream("POST", urls[which], json=body) as response:
                content = await response.aread()
                return which, response.headers.get("x-cache-status", "none"), response.status_code, content

        started = time.perf_counter()
        answers = await asyncio.gather(*(one(index) for index in range(count)))
        return list(answers), time.perf_counter() - started


def warm_up(urls: list[str]) -> float:
    """One request of its own through each proxy, so the measured ones find their connections made.

    Returns the slowest of them: what one request alone takes, for comparison with the wall times.
    """
    slowest = 0.0
    with httpx.Client(timeout=60) as http:
        for url in urls:
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"warm-up {uuid.uuid4()}"}]}
            started = time.perf_counter()
            http.post(url, json=body).raise_for_status()
            slowest = max(slowest, time.perf_counter() - started)
    return slowest


def run_case(upstream: CountingUpstream, urls: list[str], count: int, streamed: bool) -> Outcome:
    prompt = f"coalescing bench {uuid.uuid4()}: what does a cache do?"
    body: dict[str, object] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]}
    if streamed:
        body["stream"] = True
    before = upstream.requests
    answers, seconds = asyncio.run(fire(urls, count, body))
    by_proxy: list[Counter[str]] = [Counter() for _ in urls]
    for which, status, _, _ in answers:
        by_proxy[which][status] += 1
    return Outcome(
        upstream_requests=upstream.requests - before,
        statuses=Counter(status for _, status, _, _ in answers),
        by_proxy=by_proxy,
        http_errors=sum(1 for _, _, code, _ in answers if code != 200),
        distinct_bodies=len({content for _, _, _, content in answers}),
        seconds=seconds,
    )


def report(count: int, delay: float, alone: float, outcomes: list[tuple[str, Outcome]]) -> str:
    lines = [
        f"cross-instance coalescing: {count} identical concurrent requests split across 2 proxies (A, B) sharing one"
        f" Redis; upstream answers after {delay:g} s, one request alone took {alone:.2f} s",
        f"{'request':<10} {'upstream':>8} {'HIT':>5} {'MISS':>5} {'other':>6} {'non-200':>8}"
        f" {'bodies identical':>18} {'wall s':>7}   per proxy",
    ]
    for name, outcome in outcomes:
        hits, misses = outcome.statuses["HIT"], outcome.statuses["MISS"]
        other = sum(outcome.statuses.values()) - hits - misses
        identical = "yes" if outcome.distinct_bodies == 1 else f"no ({outcome.distinct_bodies} distinct)"
        per_proxy = "; ".join(
            f"{'AB'[index]}: " + ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))
            for index, counts in enumerate(outcome.by_proxy)
        )
        lines.append(
            f"{name:<10} {outcome.upstream_requests:>8} {hits:>5} {misses:>5} {other:>6} {outcome.http_errors:>8}"
            f" {identical:>18} {outcome.seconds:>7.2f}   {per_proxy}"
        )
    return "\n".join(lines)


def measure_coalescing(count: int = 50, delay: float = 0.5) -> str:
    """Start the upstream, a Redis and two proxies; fire the requests; stop everything; the figures as a table."""
    upstream = CountingUpstream(delay)
    server = serve_in_thread(upstream.app(), free_port())
    redis = RedisServer()
    proxies: list[subprocess.Popen[bytes]] = []
    try:
        redis.start()
        with tempfile.TemporaryDirectory() as work:
            env = {
                "OPENAI_BASE_URL": f"http://127.0.0.1:{server.config.port}",
                "OPENAI_API_KEY": "sk-bench",
                "CACHE_BACKEND": "redis",
                "REDIS_URL": redis.url,
                "REDIS_KEY_PREFIX": "openai-proxy-coalescing-bench",
            }
            ports = [free_port(), free_port()]
            try:
                for index, port in enumerate(ports):
                    # CACHE_DB unused with Redis; kept apart so nothing touches a file in the working directory.
                    proxies.append(start_proxy(port, {**env, "CACHE_DB": str(Path(work) / f"unused-{index}.db")}))
                for port, process in zip(ports, proxies, strict=True):
                    wait_for_proxy(port, process)
                urls = [f"http://127.0.0.1:{port}/v1/chat/completions" for port in ports]
                alone = warm_up(urls)
                outcomes = [
                    ("JSON", run_case(upstream, urls, count, streamed=False)),
                    ("streamed", run_case(upstream, urls, count, streamed=True)),
                ]
            finally:
                for process in proxies:
                    stop(process)
    finally:
        redis.remove()
        server.should_exit = True
    return report(count, delay, alone, outcomes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50, help="identical requests fired at once (default 50)")
    parser.add_argument("--delay", type=float, default=0.5, help="seconds the upstream takes to answer (default 0.5)")
    args = parser.parse_args()
    sys.stdout.write(measure_coalescing(args.requests, args.delay) + "\n")


if __name__ == "__main__":
    main()
