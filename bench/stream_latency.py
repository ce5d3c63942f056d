"""Streaming latency of the proxy: how long an upstream event takes to reach the client on a MISS,
and how long a HIT takes to replay a whole stream.

    uv run python bench/stream_latency.py [--runs 50] [--gap-ms 20]

Starts a fake upstream (in this process) and the proxy (`openai-proxy`, a real server process with a
fresh SQLite cache), both on loopback ports. Each MISS streams 13 events with a gap between them;
the upstream stamps each event as it sends it and the client stamps it as it arrives, on the same
monotonic clock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from bench.processes import free_port

EVENTS = 13


def chunk_events(number: int) -> list[bytes]:
    base = {"id": f"chatcmpl-{number}", "object": "chat.completion.chunk", "created": 0, "model": "bench"}
    events = []
    for index in range(EVENTS - 2):
        delta = {"role": "assistant", "content": ""} if index == 0 else {"content": f"word{index} "}
        events.append({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return [f"data: {json.dumps(event)}\n\n".encode() for event in events] + [b"data: [DONE]\n\n"]


class Upstream:
    def __init__(self, gap: float) -> None:
        self.gap = gap
        self.sent_at: dict[int, list[float]] = {}

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self.stream, methods=["POST"])])

    async def stream(self, request: Request) -> StreamingResponse:
        number = int((await request.json())["messages"][0]["content"])
        stamps = self.sent_at.setdefault(number, [])

        async def events() -> AsyncIterator[bytes]:
            for event in chunk_events(number):
                stamps.append(time.perf_counter())
                yield event
                await asyncio.sleep(self.gap)

        return StreamingResponse(events(), media_type="text/event-stream")


def serve_in_thread(app: Starlette, port: int) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return server


def start_proxy(port: int, upstream_url: str, cache_dir: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "OPENAI_BASE_URL": upstream_url,
        "OPENAI_API_KEY": "sk-bench",
        "CACHE_DB": os.path.join(cache_dir, "bench.db"),
        "LOG_LEVEL": "warning",
    }
    command = [sys.executable, "-c", "import openai_proxy; openai_proxy.main()", "--port", str(port)]
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5)
            return process
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("the proxy did not start")


def request_body(number: int) -> dict[str, object]:
    return {"model": "bench", "stream": True, "messages": [{"role": "user", "content": str(number)}]}


def measure_miss(client: httpx.Client, url: str, upstream: Upstream, number: int) -> list[float]:
    arrivals = []
    with client.stream("POST", url, json=request_body(number)) as response:
        assert response.headers["x-cache-status"] == "MISS", response.headers
        buffer = b""
        for chunk in response.iter_raw():
            buffer += chunk
            while b"\n\n" in buffer:
                _, buffer = buffer.split(b"\n\n", 1)
                arrivals.append(time.perf_counter())
    sent = upstream.sent_at[number]
    assert len(arrivals) == len(sent) == EVENTS, (len(arrivals), len(sent))
    return [(arrived - emitted) * 1000 for arrived, emitted in zip(arrivals, sent, strict=True)]


def measure_hit(client: httpx.Client, url: str, number: int) -> float:
    started = time.perf_counter()
    with client.stream("POST", url, json=request_body(number)) as response:
        assert response.headers["x-cache-status"] == "HIT", response.headers
        body = response.read()
    elapsed = (time.perf_counter() - started) * 1000
    assert body.count(b"\n\n") == EVENTS
    return elapsed


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure_streaming(runs: int, gap_ms: float) -> str:
    """The streaming figures, as a small table."""
    upstream = Upstream(gap_ms / 1000)
    upstream_port, proxy_port = free_port(), free_port()
    server = serve_in_thread(upstream.app(), upstream_port)
    with tempfile.TemporaryDirectory() as cache_dir:
        proxy = start_proxy(proxy_port, f"http://127.0.0.1:{upstream_port}", cache_dir)
        try:
            url = f"http://127.0.0.1:{proxy_port}/v1/chat/completions"
            with httpx.Client(timeout=30) as client:
                measure_miss(client, url, upstream, -1)  # warm up connections
                misses = [measure_miss(client, url, upstream, number) for number in range(runs)]
                time.sleep(0.5)  # let the last recording be stored
                hits = [measure_hit(client, url, number) for number in range(runs)]
        finally:
            proxy.terminate()
            proxy.wait(timeout=10)
            server.should_exit = True

    first = [delays[0] for delays in misses]
    every = [delay for delays in misses for delay in delays]
    rows = [
        ("MISS: first event, upstream -> client (ms)", first),
        ("MISS: any event, upstream -> client (ms)", every),
        (f"HIT: whole {EVENTS}-event stream replayed (ms)", hits),
    ]
    lines = [
        f"{runs} streams of {EVENTS} events, {gap_ms:g} ms apart upstream",
        f"{'measurement':<48} {'p50':>8} {'p99':>8} {'max':>8}",
    ]
    for name, values in rows:
        p50, p99 = statistics.median(values), percentile(values, 0.99)
        lines.append(f"{name:<48} {p50:>8.2f} {p99:>8.2f} {max(values):>8.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50, help="streams per measurement (default 50)")
    parser.add_argument("--gap-ms", type=float, default=20, help="upstream pause between events (default 20)")
    args = parser.parse_args()
    sys.stdout.write(measure_streaming(args.runs, args.gap_ms) + "\n")


if __name__ == "__main__":
    main()
